"""The KServe v2 gRPC proxy of one application: ``inference.GRPCInferenceService`` in a Ray actor.

``ProxyCore`` (plain, unit-tested with a fake transport) checks each request against the spec,
picks a replica with :class:`Router` and forwards the request *bytes* as received: ModelInfer is
registered with identity (de)serializers, so the proxy parses a request once (upb, to route and
check it) and never re-encodes a tensor; the replica's response bytes go back to the client as is.

Failures: a replica that dies or refuses (full, draining) costs a retry on another replica while the
caller's deadline lasts; none left -> UNAVAILABLE (dead) or RESOURCE_EXHAUSTED (full). The caller's
deadline becomes the replica's timeout; a cancelled call cancels the Ray task.

Metrics (the actor's ``/metrics``, registered in discovery as kind ``metrics``, part ``proxy``):
requests by app and code, latency, requests in flight, and rejections (every replica full).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import math
import os
import resource
import time
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any, Protocol

import grpc
from prometheus_client import Counter, Gauge, Histogram
from tritonclient.grpc import service_pb2

import servefleet
from servefleet.api import common_pb2, discovery_pb2
from servefleet.common import metrics, telemetry
from servefleet.common.appid import AppId
from servefleet.common.config import settings
from servefleet.common.errors import (
    DeadlineExceeded,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
    ServefleetError,
    Unavailable,
)
from servefleet.common.retry import Backoff
from servefleet.common.server import GrpcServer
from servefleet.common.tensors import DTYPES
from servefleet.services.forwarder import CppForwarder
from servefleet.services.replica_wire import OK, Answer, code, error_for
from servefleet.services.router import Router, Slot
from servefleet.services.routing import Routing
from servefleet.services.transports import (
    GrpcTransport,
    NodeLocalTransport,
    RayTransport,
    ReplicaGone,
    ReplicaTransport,
)

log = logging.getLogger(__name__)

SERVICE = "inference.GRPCInferenceService"
_RETRY = {code(grpc.StatusCode.RESOURCE_EXHAUSTED), code(grpc.StatusCode.UNAVAILABLE)}
_FULL = code(grpc.StatusCode.RESOURCE_EXHAUSTED)
#: How long a stream's request waits for a replica to place it on (the SDK's unary retries wait up
#: to the caller's deadline; a stream without one waits this long), and how often it looks again.
STREAM_PLACE_WAIT_S = 30.0
STREAM_PLACE_BACKOFF = Backoff(initial_s=0.05, max_s=1.0, jitter=0.5)

REQUESTS = Counter(
    "servefleet_proxy_requests_total",
    "Inference requests a proxy answered, by app and status code (stream requests one each).",
    ["app", "code"],
    registry=metrics.REGISTRY,
)
LATENCY = Histogram(
    "servefleet_proxy_latency_seconds",
    "Time from a request's arrival at the proxy to its answer (retries included).",
    ["app"],
    buckets=metrics.LATENCY_BUCKETS,
    registry=metrics.REGISTRY,
)
IN_FLIGHT = Gauge(
    "servefleet_proxy_in_flight",
    "Inference requests the proxy is handling now.",
    ["app"],
    registry=metrics.REGISTRY,
)
REJECTED = Counter(
    "servefleet_proxy_rejected_total",
    "Requests answered RESOURCE_EXHAUSTED because every replica was full.",
    ["app"],
    registry=metrics.REGISTRY,
)


@functools.cache
def _series(app: str) -> tuple[Gauge, Histogram, Counter]:
    """An app's in-flight, latency and rejection series, looked up once (not per request)."""
    return IN_FLIGHT.labels(app), LATENCY.labels(app), REJECTED.labels(app)


@functools.cache
def _requests(app: str, code: grpc.StatusCode) -> Counter:
    return REQUESTS.labels(app, code.name)


@contextlib.contextmanager
def _measured(app: str) -> Iterator[None]:
    """In flight while the request runs, then its code and latency."""
    start, status = time.perf_counter(), grpc.StatusCode.OK
    in_flight, latency, rejected = _series(app)
    in_flight.inc()
    try:
        yield
    except ServefleetError as exc:
        status = exc.code
        raise
    except asyncio.CancelledError:
        status = grpc.StatusCode.CANCELLED
        raise
    except Exception:
        status = grpc.StatusCode.INTERNAL
        raise
    finally:
        in_flight.dec()
        latency.observe(time.perf_counter() - start)
        _requests(app, status).inc()
        if status == grpc.StatusCode.RESOURCE_EXHAUSTED:
            rejected.inc()


def check_served(name: str, version: str, model_name: str, serving_version: str, server: str) -> None:
    """NOT_FOUND naming what is served when a request asks for another model or version."""
    if not model_name or name != model_name:
        raise NotFound(f"model {name!r} is not served here (this {server} serves {model_name!r})")
    if version and version != serving_version:
        raise NotFound(f"model {name!r} version {version!r} is not served (serving {serving_version!r})")


def parse_infer_request(raw: bytes) -> service_pb2.ModelInferRequest:
    try:
        return service_pb2.ModelInferRequest.FromString(raw)
    except Exception as exc:
        raise InvalidArgument(f"malformed ModelInferRequest: {exc}") from None


def check_request(request: service_pb2.ModelInferRequest, spec: common_pb2.ApplicationSpec) -> None:
    """INVALID_ARGUMENT naming the tensor when inputs disagree with the spec's (when it has any)."""
    if not spec.inputs:
        return
    expected = {t.name: t for t in spec.inputs}
    raw = request.raw_input_contents
    if raw and len(raw) != len(request.inputs):
        raise InvalidArgument(f"{len(request.inputs)} inputs but {len(raw)} raw_input_contents entries")
    given: set[str] = set()
    for i, tensor in enumerate(request.inputs):
        want = expected.get(tensor.name)
        if want is None:
            raise InvalidArgument(
                f"tensor {tensor.name!r}: not an input of the model (inputs: {list(expected)})"
            )
        given.add(tensor.name)
        if tensor.datatype != want.datatype:
            raise InvalidArgument(
                f"tensor {tensor.name!r}: datatype {tensor.datatype} where the model takes {want.datatype}"
            )
        shape = list(tensor.shape)
        if len(shape) != len(want.shape) or any(
            w not in (-1, s) for w, s in zip(want.shape, shape, strict=True)
        ):
            raise InvalidArgument(
                f"tensor {tensor.name!r}: shape {shape} does not match the model's {list(want.shape)}"
            )
        if raw and tensor.datatype != "BYTES":
            size = math.prod(shape) * DTYPES[tensor.datatype].itemsize
            if len(raw[i]) != size:
                raise InvalidArgument(
                    f"tensor {tensor.name!r}: {len(raw[i])} bytes for {tensor.datatype} {shape}, "
                    f"expected {size}"
                )
    missing = [name for name in expected if name not in given]
    if missing:
        raise InvalidArgument(f"missing input tensor(s) {missing}")


def model_metadata(spec: common_pb2.ApplicationSpec) -> service_pb2.ModelMetadataResponse:
    def tensors(specs: Any) -> list[service_pb2.ModelMetadataResponse.TensorMetadata]:
        return [
            service_pb2.ModelMetadataResponse.TensorMetadata(name=t.name, datatype=t.datatype, shape=t.shape)
            for t in specs
        ]

    return service_pb2.ModelMetadataResponse(
        name=AppId.parse(spec).model_name,
        versions=[spec.version],
        platform=f"servefleet_{spec.kind}",
        inputs=tensors(spec.inputs),
        outputs=tensors(spec.outputs),
    )


def _stream_response(infer_response: bytes) -> bytes:
    """ModelStreamInferResponse{infer_response} built around response bytes without parsing them."""
    size, prefix = len(infer_response), bytearray(b"\x12")
    while size > 0x7F:
        prefix.append(0x80 | (size & 0x7F))
        size >>= 7
    prefix.append(size)
    return bytes(prefix) + infer_response


class ProxyCore:
    """Request path of one application's proxy: check, route, forward, retry."""

    def __init__(self, node_id: str, transport: ReplicaTransport, *, attempts: int | None = None) -> None:
        self.router = Router(node_id)
        self.transport = transport
        self.attempts = attempts or settings.proxy_attempts
        self.routing: Routing | None = None
        self.spec = common_pb2.ApplicationSpec()
        self.model_name = ""
        self.triton_models: dict[str, bytes] = {}  # kind triton: model -> its ModelMetadataResponse

    def set_routing(self, routing: Routing) -> bool:
        """Adopt a newer routing table (older epochs are ignored); True when adopted."""
        if self.routing is not None and routing.epoch <= self.routing.epoch:
            return False
        self.routing = routing
        self.spec = common_pb2.ApplicationSpec.FromString(routing.spec)
        self.model_name = routing.model_name
        self.triton_models = {model: meta for r in routing.replicas for model, meta in r.metadata}
        self.router.update(routing.replicas)
        return True

    @property
    def ready(self) -> bool:
        return len(self.router) > 0

    def check_model(self, name: str, version: str = "") -> None:
        if self.triton_models:  # Triton serves its repository's models and checks versions itself
            if name not in self.triton_models:
                served = sorted(self.triton_models)
                raise NotFound(f"model {name!r} is not served here (Triton models: {served})")
            return
        check_served(name, version, self.model_name, self.spec.version, "proxy")

    def metadata(self, name: str) -> service_pb2.ModelMetadataResponse:
        """A Triton model's metadata as its server gave it, else the one the spec describes."""
        if name in self.triton_models:
            return service_pb2.ModelMetadataResponse.FromString(self.triton_models[name])
        return model_metadata(self.spec)

    def parse(self, raw: bytes) -> service_pb2.ModelInferRequest:
        request = parse_infer_request(raw)
        self.check_model(request.model_name, request.model_version)
        check_request(request, self.spec)
        return request

    async def infer(self, raw: bytes, timeout_s: float | None) -> bytes:
        """Serialized ModelInferResponse for a serialized request, or a domain error."""
        with _measured(self.model_name):
            self.parse(raw)
            carrier = _carrier()
            return await self._with_replica(
                lambda slot: self.transport.infer(slot.info, raw, carrier, timeout_s)
            )

    async def stream(self, raw: bytes, timeout_s: float | None) -> AsyncIterator[bytes]:
        """Serialized ModelStreamInferResponse messages for one request of a stream; errors travel
        in ``error_message`` (the stream itself stays open for the next request)."""
        try:
            with _measured(self.model_name):
                self.parse(raw)
                async for payload in self._stream_once_placed(raw, timeout_s):
                    yield _stream_response(payload)
        except ServefleetError as exc:
            yield service_pb2.ModelStreamInferResponse(error_message=str(exc)).SerializeToString()

    async def _stream_once_placed(self, raw: bytes, timeout_s: float | None) -> AsyncIterator[bytes]:
        """``_stream``, but a request no replica could start (none ready yet, or every one gone:
        a new cluster's proxies are listed before their replicas are ready) waits for one within the
        stream's deadline (at most ``STREAM_PLACE_WAIT_S``). A unary caller gets UNAVAILABLE and its
        SDK retries; a stream carries errors in-band, with no status to retry on, so the proxy does."""
        loop = asyncio.get_running_loop()
        start = loop.time()
        deadline = start + min(STREAM_PLACE_WAIT_S, timeout_s if timeout_s is not None else math.inf)
        failures = 0
        while True:
            sent = False
            left = None if timeout_s is None else max(0.001, timeout_s - (loop.time() - start))
            try:
                async for payload in self._stream(raw, left):
                    sent = True
                    yield payload
                return
            except Unavailable:
                failures += 1
                pause = STREAM_PLACE_BACKOFF.delay(failures)
                if sent or loop.time() + pause > deadline:
                    raise
            await asyncio.sleep(pause)

    async def _stream(self, raw: bytes, timeout_s: float | None) -> AsyncIterator[bytes]:
        carrier = _carrier()
        gone, last = 0, ""
        for slot in self._candidates():
            sent = False
            slot.in_flight += 1
            try:
                async for status, payload in self._answers(slot, raw, carrier, timeout_s):
                    if status != OK and (sent or status not in _RETRY):
                        raise error_for(status, str(payload))
                    if status != OK:
                        gone, last = gone + (status != _FULL), str(payload)
                        break
                    sent = True
                    yield payload  # type: ignore[misc]
                else:
                    return
            except ReplicaGone as exc:
                self.router.forget(slot.info.name)
                if sent:
                    raise Unavailable(f"model {self.model_name}: replica died mid-stream: {exc}") from exc
                gone, last = gone + 1, f"replica {slot.info.name} is gone ({exc})"
            finally:
                slot.in_flight -= 1
        raise self._no_replica(gone, last)

    async def _answers(
        self, slot: Slot, raw: bytes, carrier: dict[str, str], timeout_s: float | None
    ) -> AsyncIterator[Answer]:
        """A replica's answers to one stream request (one unary call when it answers once)."""
        if slot.info.unary_streams:
            yield await self.transport.infer(slot.info, raw, carrier, timeout_s)
            return
        async for answer in self.transport.stream(slot.info, raw, carrier, timeout_s):
            yield answer

    def _candidates(self) -> Iterator[Slot]:
        """Up to ``attempts`` distinct replicas, the next chosen only if the last one failed."""
        tried: set[str] = set()
        for _ in range(self.attempts):
            slot = self.router.choose(tried)
            if slot is None:
                return
            tried.add(slot.info.name)
            yield slot

    async def _with_replica(self, call: Callable[[Slot], Any]) -> bytes:
        gone, last = 0, ""
        for slot in self._candidates():
            slot.in_flight += 1
            try:
                status, payload = await call(slot)
            except ReplicaGone as exc:
                self.router.forget(slot.info.name)
                gone, last = gone + 1, f"replica {slot.info.name} is gone ({exc})"
                continue
            finally:
                slot.in_flight -= 1
            if status == OK:
                return payload
            if status not in _RETRY:
                raise error_for(status, str(payload))
            gone, last = gone + (status != _FULL), str(payload)
        raise self._no_replica(gone, last)

    def _no_replica(self, gone: int, last: str) -> ServefleetError:
        """RESOURCE_EXHAUSTED when every replica was full, UNAVAILABLE when some were gone."""
        if gone:
            return Unavailable(f"model {self.model_name}: no replica could take the request: {last}")
        if not len(self.router):
            return Unavailable(f"model {self.model_name}: no replica is ready")
        return ResourceExhausted(
            f"model {self.model_name}: every replica is full ({len(self.router)} replicas x "
            f"{self.spec.max_concurrency} running + {self.spec.max_queued} queued); retry later"
        )


def _carrier() -> dict[str, str]:
    """The current trace context as a dict, handed to the replica with the Ray call."""
    return {k: str(v) for k, v in telemetry.inject_metadata(None)}


def _timeout(context: grpc.aio.ServicerContext) -> float | None:
    remaining = context.time_remaining()
    if remaining is not None and remaining <= 0:
        raise DeadlineExceeded("deadline passed before the request reached a replica")
    return remaining


class InferenceCore(Protocol):
    """What :class:`InferenceServicer` serves from: a proxy's core or a sharded app's router core."""

    spec: common_pb2.ApplicationSpec

    @property
    def ready(self) -> bool: ...

    def check_model(self, name: str, version: str = "") -> None: ...

    def metadata(self, name: str) -> service_pb2.ModelMetadataResponse: ...

    async def infer(self, raw: bytes, timeout_s: float | None) -> bytes: ...

    def stream(self, raw: bytes, timeout_s: float | None) -> AsyncIterator[bytes]: ...


class InferenceServicer:
    """Thin gRPC layer over an :class:`InferenceCore` (domain errors become statuses in the interceptor)."""

    def __init__(self, core: InferenceCore) -> None:
        self.core = core

    async def ServerLive(self, request: Any, context: Any) -> service_pb2.ServerLiveResponse:
        return service_pb2.ServerLiveResponse(live=True)

    async def ServerReady(self, request: Any, context: Any) -> service_pb2.ServerReadyResponse:
        return service_pb2.ServerReadyResponse(ready=self.core.ready)

    async def ServerMetadata(self, request: Any, context: Any) -> service_pb2.ServerMetadataResponse:
        return service_pb2.ServerMetadataResponse(name="servefleet", version=servefleet.__version__)

    async def ModelReady(
        self, request: service_pb2.ModelReadyRequest, context: Any
    ) -> service_pb2.ModelReadyResponse:
        self.core.check_model(request.name, request.version)
        return service_pb2.ModelReadyResponse(ready=self.core.ready)

    async def ModelMetadata(
        self, request: service_pb2.ModelMetadataRequest, context: Any
    ) -> service_pb2.ModelMetadataResponse:
        self.core.check_model(request.name, request.version)
        return self.core.metadata(request.name)

    async def ModelInfer(self, request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        return await self.core.infer(request, _timeout(context))

    async def ModelStreamInfer(
        self, requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[bytes]:
        async for raw in requests:
            async for response in self.core.stream(raw, context.time_remaining()):
                yield response


def _identity(data: bytes) -> bytes:
    return data


def registrar(servicer: InferenceServicer) -> Callable[[grpc.aio.Server], None]:
    """Handlers for the methods the proxy serves; ModelInfer/ModelStreamInfer keep raw bytes."""

    def typed(method: Callable[..., Any], request_type: Any, response_type: Any) -> grpc.RpcMethodHandler:
        return grpc.unary_unary_rpc_method_handler(
            method,
            request_deserializer=request_type.FromString,
            response_serializer=response_type.SerializeToString,
        )

    handlers = {
        "ServerLive": typed(
            servicer.ServerLive, service_pb2.ServerLiveRequest, service_pb2.ServerLiveResponse
        ),
        "ServerReady": typed(
            servicer.ServerReady, service_pb2.ServerReadyRequest, service_pb2.ServerReadyResponse
        ),
        "ServerMetadata": typed(
            servicer.ServerMetadata, service_pb2.ServerMetadataRequest, service_pb2.ServerMetadataResponse
        ),
        "ModelReady": typed(
            servicer.ModelReady, service_pb2.ModelReadyRequest, service_pb2.ModelReadyResponse
        ),
        "ModelMetadata": typed(
            servicer.ModelMetadata, service_pb2.ModelMetadataRequest, service_pb2.ModelMetadataResponse
        ),
        "ModelInfer": grpc.unary_unary_rpc_method_handler(
            servicer.ModelInfer, request_deserializer=_identity, response_serializer=_identity
        ),
        "ModelStreamInfer": grpc.stream_stream_rpc_method_handler(
            servicer.ModelStreamInfer, request_deserializer=_identity, response_serializer=_identity
        ),
    }

    def register(server: grpc.aio.Server) -> None:
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))

    return register


class Proxy:
    """The proxy actor: serves gRPC on a free loopback port, learns its routing table from the
    application master (pushed on every change, pulled at start so a restarted proxy catches up)
    and stays registered in discovery as kind ``proxy`` while it lives."""

    def __init__(
        self,
        app: bytes,
        master: str,
        *,
        cluster: str,
        discovery: str,
        credential: str = "",
        host: str = "127.0.0.1",
    ) -> None:
        import ray

        telemetry.setup_tracing("servefleet-proxy")
        self.app = common_pb2.AppRef.FromString(app)
        self.node_id = ray.get_runtime_context().get_node_id()
        self._local = GrpcTransport()
        self.core = ProxyCore(self.node_id, NodeLocalTransport(self.node_id, self._local, RayTransport()))
        self._master = master
        self._cluster = cluster
        self._discovery = discovery
        self._credential = credential  # the app's endpoint token: registers it in discovery
        # With the C++ forwarder, it owns the public port and the Python server sits behind it.
        self._host = host
        self._forwarder = (
            CppForwarder(self.node_id, REQUESTS, LATENCY, IN_FLIGHT) if settings.proxy_cpp_forward else None
        )
        listen = "127.0.0.1:0" if self._forwarder else f"{host}:0"
        self._server = GrpcServer("proxy", listen, [registrar(InferenceServicer(self.core))], [SERVICE])
        self._address = ""
        self._registered: asyncio.Task[None] | None = None
        self._serving = asyncio.Event()  # set once the proxy has a replica to send to
        self._started = asyncio.get_running_loop().create_task(self._start())
        self._metrics = metrics.expose(
            discovery, self.app, "proxy", {"cluster": cluster, "node": self.node_id}, credential=credential
        )

    async def _start(self) -> None:
        import ray

        from servefleet.services.actors import RAY_NAMESPACE

        await self._server.start()
        self._address = self._server.address
        if self._forwarder is not None:
            self._address = self._forwarder.start(f"{self._host}:0", self._server.address)
        with contextlib.suppress(ValueError):  # master gone: it pushes a table when it is back
            master = ray.get_actor(self._master, namespace=RAY_NAMESPACE)
            routing = await master.routing.remote()
            if routing is not None:
                self._adopt(routing)
        if self._discovery:
            self._registered = asyncio.create_task(self._stay_registered())

    async def _stay_registered(self) -> None:
        """Registered only once it can serve, so clients never discover an empty proxy. No
        version: a proxy serves whichever version the app runs, through rollouts."""
        from servefleet.discovery.registration import registration

        await self._serving.wait()
        endpoint = discovery_pb2.Endpoint(
            app=self.app,
            kind="proxy",
            address=self._address,
            labels={"cluster": self._cluster, "node": self.node_id},
        )
        async with registration(
            self._discovery, endpoint, ttl_s=settings.discovery_ttl_s, token=self._credential
        ):
            await asyncio.Event().wait()

    async def address(self) -> str:
        await self._started
        return self._address

    async def update(self, routing: Routing) -> bool:
        await self._started
        return self._adopt(routing)

    def _adopt(self, routing: Routing) -> bool:
        adopted = self.core.set_routing(routing)
        if adopted:
            self._local.forget({r.address for r in routing.replicas})
            if self._forwarder is not None:
                self._forwarder.set_table(routing, self.core.spec)
            if self.core.ready:
                self._serving.set()
        return adopted

    async def stats(self) -> dict[str, int | str]:
        """Requests this proxy has in flight on replicas, its peak memory (bounded by design), and
        where it runs."""
        return {
            "in_flight": sum(slot.in_flight for slot in self.core.router.slots)
            + (self._forwarder.in_flight if self._forwarder else 0),
            "max_rss_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
            "pid": os.getpid(),
            "node_id": self.node_id,
        }

    async def stop(self) -> None:
        """Deregister first (clients move away), then let in-flight calls finish."""
        self._metrics.cancel()
        if self._registered is not None:
            self._registered.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._registered
        if self._forwarder is not None:  # first: what it relays needs the Python server
            await self._forwarder.stop(settings.shutdown_grace_s)
        await self._server.stop()
