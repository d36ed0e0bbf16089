"""Deployment actor: hosts one replica of a user's model class inside a Ray actor.

The proxy forwards a ModelInferRequest as serialized bytes; the replica decodes it, runs the model
(sync ``__call__`` on a thread pool so the event loop keeps answering stats and drains; async
``__call__`` on the loop; batched when the spec asks), and answers ``(status code, payload)``:
payload is the serialized ModelInferResponse on OK and the error message otherwise. Plain tuples,
not exceptions, so an error costs no traceback pickling and a model failure never kills the actor.

Admission: at most ``max_concurrency`` requests run and ``max_queued`` wait; anything beyond gets
RESOURCE_EXHAUSTED at once, so memory stays bounded whatever the offered load.

Metrics (``/metrics`` of the actor, registered in discovery as kind ``metrics``, part ``replica``):
requests by code, latency, requests running and queued, rejections, slots and busy slot-seconds;
the autoscaler reads its load from exactly these series.
"""

from __future__ import annotations

import asyncio
import contextvars
import importlib
import inspect
import logging
import os
import time
from collections.abc import AsyncIterator, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractContextManager, asynccontextmanager
from typing import Any, TypeVar

import grpc
import numpy as np
from opentelemetry.trace import Span, SpanKind, Status, StatusCode
from prometheus_client import Counter, Gauge, Histogram
from tritonclient.grpc import service_pb2

from servefleet.api import common_pb2
from servefleet.common import metrics, telemetry
from servefleet.common.appid import AppId
from servefleet.common.errors import InvalidArgument, ServefleetError
from servefleet.common.server import GrpcServer
from servefleet.common.tensors import decode_request, encode_response
from servefleet.services import context
from servefleet.services.batching import Batcher
from servefleet.services.replica_wire import CODES, OK, REPLICA_SERVICE, Answer, code, error_for
from servefleet.spec import struct_to_python

log = logging.getLogger(__name__)

T = TypeVar("T")
Tensors = dict[str, np.ndarray]

_EWMA_ALPHA = 0.2
_DONE = object()

REQUESTS = Counter(
    "servefleet_replica_requests_total",
    "Requests a replica answered (proxy path), by app and status code.",
    ["app", "code"],
    registry=metrics.REGISTRY,
)
LATENCY = Histogram(
    "servefleet_replica_latency_seconds",
    "Time a request spent in the replica, queueing included.",
    ["app"],
    buckets=metrics.LATENCY_BUCKETS,
    registry=metrics.REGISTRY,
)
REJECTED = Counter(
    "servefleet_replica_rejected_total",
    "Requests refused at once because running + queued was at the replica's limit.",
    ["app"],
    registry=metrics.REGISTRY,
)
RUNNING = Gauge(
    "servefleet_replica_in_flight",
    "Requests holding one of the replica's slots now (proxy and broker paths).",
    ["app"],
    registry=metrics.REGISTRY,
)
QUEUED = Gauge(
    "servefleet_replica_queued",
    "Requests admitted and waiting for a slot.",
    ["app"],
    registry=metrics.REGISTRY,
)
SLOTS = Gauge(
    "servefleet_replica_slots",
    "Requests the replica runs at once (max_concurrency).",
    ["app"],
    registry=metrics.REGISTRY,
)
BUSY = Counter(
    "servefleet_replica_busy_seconds_total",
    "Slot-seconds spent running requests (divide by slots x time for utilisation).",
    ["app"],
    registry=metrics.REGISTRY,
)


def import_object(path: str) -> Any:
    """``module:Qualified.Name`` -> the object (InvalidArgument naming what is missing)."""
    module_name, _, qualname = path.partition(":")
    try:
        obj: Any = importlib.import_module(module_name)
    except ImportError as exc:
        raise InvalidArgument(f"import_path {path!r}: cannot import {module_name!r}: {exc}") from exc
    for part in qualname.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise InvalidArgument(f"import_path {path!r}: {module_name!r} has no {qualname!r}") from None
    return obj


class ModelTime:
    """How long a synchronous model call takes, and whether to make it on the event loop.

    A sync model runs on a thread so that a slow one never stalls the replica's event loop (health,
    other requests, cancellation). For a model that answers in microseconds the thread hand-off
    (two wake-ups and the GIL passing twice) costs more than the model; such a call runs inline.
    It starts on threads; once the moving average of the last calls is under ``INLINE_BELOW_S``
    calls run inline, and any call that takes longer than that sends the next ones back to threads,
    so a slow call can stall the loop at most once in a row.
    """

    INLINE_BELOW_S = 0.0002
    WARMUP_CALLS = 16

    def __init__(self) -> None:
        self.ewma_s = float("inf")
        self.calls = 0

    @property
    def inline(self) -> bool:
        return self.calls >= self.WARMUP_CALLS and self.ewma_s < self.INLINE_BELOW_S

    def timed(self, call: Callable[[Tensors], Any], inputs: Tensors) -> Any:
        start = time.perf_counter()
        try:
            return call(inputs)
        finally:
            self.observe(time.perf_counter() - start)

    def observe(self, seconds: float) -> None:
        """A slow call resets the average to itself (back to threads at once); fast ones decay it."""
        self.calls += 1
        fast = seconds < self.INLINE_BELOW_S and self.ewma_s != float("inf")
        self.ewma_s = 0.8 * self.ewma_s + 0.2 * seconds if fast else seconds


class Replica:
    """One model replica (run as a Ray actor by the application master; plain class for tests)."""

    def __init__(
        self,
        spec_bytes: bytes,
        name: str,
        *,
        redis: str = "",
        broker: str = "",
        discovery: str = "",
        cluster: str = "",
        credential: str = "",
    ) -> None:
        spec = common_pb2.ApplicationSpec.FromString(spec_bytes)
        telemetry.setup_tracing("servefleet-replica")
        self.name = name
        self.version = spec.version
        self.model_name = AppId.parse(AppId.parse(spec).ref()).model_name
        self.capacity = spec.max_concurrency + spec.max_queued
        source = None
        if broker:  # the app's own Redis user, asked of the broker with the app's endpoint token
            from servefleet.broker.worker import from_broker

            source = from_broker(broker, credential, AppId.parse(spec).ref())
        context.set_deployment(context.Deployment(AppId.parse(spec).ref(), spec.version, redis, source))
        kwargs = struct_to_python(spec.init_args)
        if spec.edges:  # a pipeline stage: a handle per stage it calls, as keyword arguments
            from servefleet.services.stages import stage_handles

            kwargs.update(stage_handles(spec))
        self._model = import_object(spec.import_path)(**kwargs)
        call = type(self._model).__call__
        # A generator __call__ streams; a model with a `stream` generator method serves
        # ModelStreamInfer from it and ModelInfer from __call__.
        self._produce = getattr(self._model, "stream", None)
        if self._produce is None and (inspect.isgeneratorfunction(call) or inspect.isasyncgenfunction(call)):
            self._produce = self._model
        self.streaming = self._produce is not None
        self._executor = ThreadPoolExecutor(max_workers=spec.max_concurrency, thread_name_prefix="model")
        self._model_time = ModelTime()
        self._slots = asyncio.Semaphore(spec.max_concurrency)
        self.running = 0
        self.waiting = 0
        self._batcher: Batcher | None = None
        if spec.batching.max_batch_size > 1 and not self.streaming:
            self._batcher = Batcher(
                self._run_model,
                max_batch_size=spec.batching.max_batch_size,
                wait_s=spec.batching.batch_wait_timeout_ms / 1000,
            )
        self.in_flight = 0
        self.served = 0
        self.failed = 0
        self.rejected = 0
        self.latency_ms = 0.0
        self.draining = False
        self._idle = asyncio.Event()
        self._idle.set()
        RUNNING.labels(self.model_name).set_function(lambda: self.running)
        QUEUED.labels(self.model_name).set_function(lambda: self.waiting)
        SLOTS.labels(self.model_name).set(spec.max_concurrency)
        self._metrics = metrics.expose(
            discovery,
            AppId.parse(spec).ref(),
            "replica",
            {"cluster": cluster, "replica": name, "version": self.version},
            credential=credential,
        )
        # The platform's server: gRPC health, the error-mapping and tracing interceptor, keepalive.
        self._server = GrpcServer("replica", "127.0.0.1:0", [self._register], [REPLICA_SERVICE])
        self._serving = asyncio.get_running_loop().create_task(self._server.start())
        self._worker: Any = None
        if spec.async_mode.enabled and (redis or broker):
            # With a broker, the worker pulls as the app's own Redis user; without, it uses
            # ``redis`` as given (a Redis without auth).
            self._worker = self._pull_worker(spec, source or redis)
            self._worker_started = asyncio.get_running_loop().create_task(self._worker.start())

    # ---- control calls (master) -------------------------------------------------------------

    async def ready(self) -> dict[str, Any]:
        """Identity and placement; the master awaits this before routing to the replica."""
        import ray

        await self.serving()
        return {
            "name": self.name,
            "address": self.address,
            "version": self.version,
            "node_id": ray.get_runtime_context().get_node_id(),
            "capacity": self.capacity,
            "streaming": self.streaming,
        }

    async def stats(self) -> dict[str, Any]:
        """Load as the master's health check and the autoscaler see it."""
        return {
            "in_flight": self.in_flight,
            "capacity": self.capacity,
            "latency_ms": self.latency_ms,
            "served": self.served,
            "failed": self.failed,
            "rejected": self.rejected,
            "draining": self.draining,
            "version": self.version,
            "pid": os.getpid(),
            "metrics": metrics.address(),
        }

    async def drain(self, timeout_s: float) -> int:
        """Stop pulling async work, wait up to ``timeout_s`` for in-flight requests; returns those left.

        A draining replica still serves what reaches it: proxies stopped routing to it before the
        drain began, so only requests already on their way arrive, and failing them would fail a
        client during a rollout.
        """
        self.draining = True
        self._metrics.cancel()
        if self._worker is not None:
            await self._worker_started
            await self._worker.stop(drain=True)
        try:
            await asyncio.wait_for(self._idle.wait(), timeout_s)
        except TimeoutError:
            log.warning("replica %s drained with %d requests in flight", self.name, self.in_flight)
        return self.in_flight

    @property
    def address(self) -> str:
        """The replica's own gRPC endpoint (loopback: for proxies on this node)."""
        return self._server.address

    async def serving(self) -> None:
        await self._serving

    async def close(self) -> None:
        """Stop the gRPC endpoint and the model's threads (the actor's death does this too)."""
        await self._serving
        await self._server.stop(0)
        self._executor.shutdown(wait=False)

    # ---- request path (proxy) ---------------------------------------------------------------

    async def infer(self, request: bytes, carrier: dict[str, str], timeout_s: float | None) -> Answer:
        """Run one serialized ModelInferRequest; ``(OK, response bytes)`` or ``(code, message)``."""
        with self._admit("infer", carrier) as span:
            if isinstance(span, tuple):
                return span
            try:
                async with asyncio.timeout(timeout_s):
                    async with self._slot():
                        parsed = service_pb2.ModelInferRequest.FromString(request)
                        with context.serving(context.RequestContext.of(parsed, timeout_s)):
                            outputs = await self._infer(decode_request(parsed))
                        response = encode_response(
                            self.model_name, outputs, model_version=self.version, request_id=parsed.id
                        )
                return self._answer(span, OK, response.SerializeToString())
            except Exception as exc:
                return self._failure(span, exc)

    async def stream(
        self, request: bytes, carrier: dict[str, str], timeout_s: float | None
    ) -> AsyncIterator[Answer]:
        """ModelStreamInfer: every chunk a streaming model yields (one answer for other models)."""
        with self._admit("stream", carrier) as span:
            if isinstance(span, tuple):
                yield span
                return
            try:
                async with asyncio.timeout(timeout_s), self._slot():
                    parsed = service_pb2.ModelInferRequest.FromString(request)
                    inputs = decode_request(parsed)
                    chunks = self._chunks(inputs) if self.streaming else self._single(inputs)
                    async for outputs in _within(context.RequestContext.of(parsed, timeout_s), chunks):
                        response = encode_response(
                            self.model_name, outputs, model_version=self.version, request_id=parsed.id
                        )
                        yield OK, response.SerializeToString()
                self._answer(span, OK, b"")
            except Exception as exc:
                yield self._failure(span, exc)

    # ---- the same calls over the replica's own gRPC endpoint (same-node proxies) -----------

    def _register(self, server: grpc.aio.Server) -> None:
        """Raw-bytes methods: the proxy's deadline and cancellation arrive as gRPC's own."""
        handlers = grpc.method_handlers_generic_handler(
            REPLICA_SERVICE,
            {
                "Infer": grpc.unary_unary_rpc_method_handler(self._grpc_infer),
                "Stream": grpc.unary_stream_rpc_method_handler(self._grpc_stream),
            },
        )
        server.add_generic_rpc_handlers((handlers,))

    async def _grpc_infer(self, request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        status, payload = await self.infer(request, _carrier(context), context.time_remaining())
        if status != OK:
            raise error_for(status, str(payload))  # the server's interceptor answers its status
        return payload  # type: ignore[return-value]

    async def _grpc_stream(self, request: bytes, context: grpc.aio.ServicerContext) -> AsyncIterator[bytes]:
        async for status, payload in self.stream(request, _carrier(context), context.time_remaining()):
            if status != OK:
                raise error_for(status, str(payload))
            yield payload  # type: ignore[misc]

    # ---- internals --------------------------------------------------------------------------

    def _admit(self, kind: str, carrier: dict[str, str]) -> AbstractContextManager[Span | Answer]:
        """Count the request in (or refuse it when full) and open the model-call span."""
        return _Admission(self, kind, carrier)

    @asynccontextmanager
    async def _slot(self) -> AsyncIterator[None]:
        """Hold one of ``max_concurrency`` slots, counted as queued until it is free, then busy."""
        self.waiting += 1
        try:
            await self._slots.acquire()
        finally:
            self.waiting -= 1
        self.running += 1
        start = time.perf_counter()
        try:
            yield
        finally:
            self.running -= 1
            self._slots.release()
            BUSY.labels(self.model_name).inc(time.perf_counter() - start)

    def _answer(self, span: Span, status: int, payload: bytes | str) -> Answer:
        REQUESTS.labels(self.model_name, CODES[status].name).inc()
        span.set_attribute("servefleet.status", CODES[status].name)
        span.set_attribute("rpc.grpc.status_code", status)
        if status != OK:
            span.set_status(Status(StatusCode.ERROR, str(payload)))
        return status, payload

    def _failure(self, span: Span, exc: BaseException) -> Answer:
        self.failed += 1
        if isinstance(exc, ServefleetError):
            return self._answer(span, code(exc.code), str(exc))
        if isinstance(exc, TimeoutError):
            return self._answer(span, code(grpc.StatusCode.DEADLINE_EXCEEDED), "deadline exceeded in replica")
        log.warning("model %s raised %s: %s", self.model_name, type(exc).__name__, exc)
        return self._answer(
            span, code(grpc.StatusCode.INTERNAL), f"model {self.model_name}: {type(exc).__name__}: {exc}"
        )

    async def _infer(self, inputs: Tensors) -> Tensors:
        if self._batcher is not None:
            return await self._batcher.submit(inputs)
        return await self._run_model(inputs)

    async def _run_model(self, inputs: Tensors) -> Tensors:
        if inspect.iscoroutinefunction(type(self._model).__call__):
            result = await self._model(inputs)
        elif self._model_time.inline:
            result = self._model_time.timed(self._model, inputs)
        else:
            # copy_context: the model's thread sees the request context and the trace span.
            call = contextvars.copy_context().run
            result = await asyncio.get_running_loop().run_in_executor(
                self._executor, call, self._model_time.timed, self._model, inputs
            )
        if inspect.isawaitable(result):
            result = await result
        return _as_outputs(result, self.model_name)

    async def _single(self, inputs: Tensors) -> AsyncIterator[Tensors]:
        yield await self._infer(inputs)

    async def _chunks(self, inputs: Tensors) -> AsyncIterator[Tensors]:
        assert self._produce is not None
        produced = self._produce(inputs)
        if inspect.isasyncgen(produced):
            async for chunk in produced:
                yield _as_outputs(chunk, self.model_name)
            return
        loop = asyncio.get_running_loop()
        iterator: Iterator[Tensors] = iter(produced)
        while (chunk := await loop.run_in_executor(self._executor, next, iterator, _DONE)) is not _DONE:
            yield _as_outputs(chunk, self.model_name)

    def _pull_worker(self, spec: common_pb2.ApplicationSpec, redis: Any) -> Any:
        """The broker's pull loop for an async app: it takes requests only when this replica has
        a free slot, and shares ``max_concurrency`` with the synchronous path."""
        from servefleet.broker.worker import PullWorker  # async apps only

        return PullWorker(
            redis,
            AppId.parse(spec).ref(),
            consumer=self.name,
            slots=spec.max_concurrency,
            handler=self._broker_request,
            config=spec.async_mode,
        )

    async def _broker_request(self, request: service_pb2.ModelInferRequest) -> service_pb2.ModelInferResponse:
        async with self._slot():
            with context.serving(context.RequestContext.of(request, None)):
                outputs = await self._infer(decode_request(request))
        return encode_response(self.model_name, outputs, model_version=self.version, request_id=request.id)


class _Admission(AbstractContextManager["Span | Answer"]):
    """Admission control, in-flight accounting and latency EWMA around one request."""

    def __init__(self, replica: Replica, kind: str, carrier: dict[str, str]) -> None:
        self._replica = replica
        self._kind = kind
        self._carrier = carrier
        self._span_cm: Any = None
        self._start = 0.0

    def __enter__(self) -> Span | Answer:
        replica = self._replica
        if replica.in_flight >= replica.capacity:
            replica.rejected += 1
            REJECTED.labels(replica.model_name).inc()
            return code(grpc.StatusCode.RESOURCE_EXHAUSTED), (
                f"model {replica.model_name}: replica {replica.name} is full "
                f"({replica.in_flight} requests in flight or queued, limit {replica.capacity})"
            )
        replica.in_flight += 1
        replica._idle.clear()
        self._start = time.perf_counter()
        self._span_cm = telemetry.tracer.start_as_current_span(
            "model.call",
            context=telemetry.extract_context(list(self._carrier.items())),
            kind=SpanKind.INTERNAL,
            attributes={
                "servefleet.model": replica.model_name,
                "servefleet.model_version": replica.version,
                "servefleet.replica": replica.name,
                "servefleet.call": self._kind,
            },
        )
        span: Span = self._span_cm.__enter__()
        return span

    def __exit__(self, *exc: object) -> None:
        if self._span_cm is None:
            return
        self._span_cm.__exit__(*exc)
        replica = self._replica
        replica.in_flight -= 1
        replica.served += 1
        elapsed_ms = (time.perf_counter() - self._start) * 1000
        LATENCY.labels(replica.model_name).observe(elapsed_ms / 1000)
        replica.latency_ms += _EWMA_ALPHA * (elapsed_ms - replica.latency_ms)
        if replica.in_flight == 0:
            replica._idle.set()


def _carrier(context: grpc.aio.ServicerContext) -> dict[str, str]:
    return {k: v for k, v in context.invocation_metadata() or () if isinstance(v, str)}


async def _within(request: context.RequestContext, chunks: AsyncIterator[T]) -> AsyncIterator[T]:
    """Each chunk produced with the request current (set per step: a generator may be resumed
    from another task, and a context variable must be reset where it was set)."""
    iterator = aiter(chunks)
    while True:
        with context.serving(request):
            try:
                chunk = await anext(iterator)
            except StopAsyncIteration:
                return
        yield chunk


def _as_outputs(result: Any, name: str) -> Tensors:
    if not isinstance(result, dict):
        raise TypeError(f"model {name} returned {type(result).__name__}; expected dict[str, ndarray]")
    return {str(k): np.asarray(v) for k, v in result.items()}
