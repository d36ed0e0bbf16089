"""``AsyncClient`` and ``Client``: numpy in, numpy out, over KServe v2 to an endpoint discovery chose.

Per application the client holds one Watch stream (never polls) and its live endpoint set; each
request picks an endpoint (power of two choices, see ``picker.py``) and, when the endpoint is
unreachable, retries on another one, and on all of them again after a pause, within the caller's
deadline (``INFER_RETRY``).
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Coroutine, Iterator, Mapping, Sequence
from typing import Any, TypeVar

import grpc
import numpy as np
import tritonclient.grpc
import tritonclient.grpc.aio
from opentelemetry import context as otel_context
from opentelemetry.trace import SpanKind
from tritonclient.grpc.service_pb2_grpc import GRPCInferenceServiceStub

from servefleet.api import common_pb2, discovery_pb2, discovery_pb2_grpc
from servefleet.common import tensors
from servefleet.common.appid import AppId
from servefleet.common.auth import resolve_token
from servefleet.common.channels import ChannelCache, aio_channel, discovery_addresses
from servefleet.common.errors import (
    DeadlineExceeded,
    FailedPrecondition,
    Internal,
    InvalidArgument,
    Unavailable,
    from_rpc_error,
)
from servefleet.common.retry import Backoff, RetryPolicy, on_status
from servefleet.common.telemetry import aio_client_interceptors, tracer
from servefleet.sdk.broker_client import AsyncBrokerClient
from servefleet.sdk.picker import Picker
from servefleet.sdk.watch import AppWatch

T = TypeVar("T")


#: What ``infer`` retries: UNAVAILABLE (the endpoint is gone, or has no replica right now) on
#: another endpoint at once, and once every live endpoint has failed (or none is live) again after a
#: jittered, capped pause that a change of the endpoint set cuts short, until the caller's deadline.
#: Inference counts as idempotent; ``retry=False`` sends once. Other calls are not retried.
INFER_RETRY = RetryPolicy(
    Backoff(initial_s=0.005, max_s=0.5), retry_on=on_status(grpc.StatusCode.UNAVAILABLE)
)
NO_RETRY = RetryPolicy(Backoff(initial_s=0.0, max_s=0.0), attempts=1)


class AsyncClient:
    """asyncio client of the serving fleet. Create it inside a running loop; ``await close()``.

    ``discovery``: host:port of a discovery instance, or several (``a:1,b:2`` or a list; default
    ``$SERVEFLEET_DISCOVERY``): watches and calls are balanced over the live ones, and a watch whose
    instance dies resumes on another from the last revision it applied, missing no change.
    ``zone``: prefer endpoints labelled with this zone. ``retry``: False turns retries off; a
    RetryPolicy tunes them. ``timeout``: default deadline of a request in seconds. ``broker``:
    host:port of the async broker, for ``submit``/``result``. ``token``: the caller's token for
    discovery and the broker (default ``$SERVEFLEET_TOKEN``); a tenant token sees its own
    namespaces' applications only.
    """

    def __init__(
        self,
        discovery: str | Sequence[str] = "",
        *,
        zone: str = "",
        retry: bool | RetryPolicy = True,
        timeout: float = 30.0,
        broker: str | None = None,
        token: str | None = None,
    ) -> None:
        self._token = resolve_token(token)
        self._discovery = aio_channel(discovery_addresses(discovery), token=self._token)
        self._stub = discovery_pb2_grpc.DiscoveryStub(self._discovery)
        self._retry = retry if isinstance(retry, RetryPolicy) else (INFER_RETRY if retry else NO_RETRY)
        self._timeout = timeout
        self.picker = Picker(zone=zone)
        self._pool = ChannelCache(interceptors=aio_client_interceptors())
        self._watches: dict[tuple[str, str], AppWatch] = {}
        self._broker_address = broker
        self._broker: AsyncBrokerClient | None = None

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def watch(self, app: str | common_pb2.AppRef) -> AppWatch:
        """The live endpoint set of ``app`` (its Watch stream starts on first use): for callers
        that want ``wait_changed`` or the revision, not just a list."""
        app = AppId.parse(app).ref()
        key = (app.namespace, app.name)
        watch = self._watches.get(key)
        if watch is None:
            watch = self._watches[key] = AppWatch(self._stub, app, on_removed=self._removed)
        return watch

    def _removed(self, endpoints: list[discovery_pb2.Endpoint]) -> None:
        live = {e.address for w in self._watches.values() for e in w.state.endpoints.values()}
        gone = {e.address for e in endpoints} - live
        self._pool.discard(gone)
        self.picker.forget(gone)

    async def _synced(self, app: str, timeout: float) -> AppWatch:
        watch = self.watch(app)
        if not await watch.wait_synced(timeout):
            if watch.error is not None:
                raise watch.error
            raise Unavailable(f"no endpoint set for {app!r} from discovery within {timeout:.1f}s")
        return watch

    async def endpoints(self, app: str, *, timeout: float = 10.0) -> list[discovery_pb2.Endpoint]:
        """The live endpoints of ``app`` ("namespace/name" or "name"), as this client sees them."""
        return (await self._synced(app, timeout)).endpoints

    async def _next_endpoint(
        self,
        app: str,
        watch: AppWatch,
        tried: set[str],
        *,
        deadline: float,
        policy: RetryPolicy,
        failures: int = 0,
        last: grpc.aio.AioRpcError | None = None,
    ) -> Any:
        """The endpoint to try next, within the deadline: one not in ``tried``; while none is live,
        wait for one to appear; once every live endpoint has failed (``last``), pause (cut short
        when the set changes), forget ``tried`` and try them all again. Past the deadline it
        raises ``last`` (or UNAVAILABLE / DEADLINE_EXCEEDED when nothing was sent)."""
        loop = asyncio.get_running_loop()
        while True:
            endpoint = self.picker.pick(watch.endpoints, exclude=tried)
            left = deadline - loop.time()
            if endpoint is None and last is None:  # none live yet: wait for one to appear
                if left <= 0 or not await watch.wait_changed(left):
                    raise Unavailable(f"application {app!r} has no live endpoints")
                continue
            if endpoint is None:
                if left <= 0:
                    raise from_rpc_error(last)
                await watch.wait_changed(min(policy.backoff.delay(failures), left))
                tried.clear()
                continue
            if left <= 0:
                if last is not None:
                    raise from_rpc_error(last)
                raise DeadlineExceeded(f"deadline passed before trying {endpoint.address}")
            return endpoint

    async def infer(
        self,
        app: str,
        inputs: Mapping[str, np.ndarray],
        *,
        outputs: Sequence[str] | None = None,
        model: str = "",
        model_version: str = "",
        request_id: str = "",
        timeout: float | None = None,
        retry: bool | None = None,
        metadata: Sequence[tuple[str, str]] = (),
        parameters: Mapping[str, tensors.Parameter] | None = None,
    ) -> dict[str, np.ndarray]:
        """Run ``app`` on ``inputs``; raises the domain error (InvalidArgument, Unavailable, ...)
        the endpoint answered. Retried as ``INFER_RETRY`` says (the client's policy) unless
        ``retry=False``: an UNAVAILABLE endpoint is retried on others, and when all have failed
        or none is live, again after a pause, until the deadline; only then does it raise.
        ``model``: the model_name to send (default :func:`served_model`). ``parameters``: KServe
        request parameters (e.g. ``{"cache": False}`` for an LLM pipeline)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + (self._timeout if timeout is None else timeout)
        policy = self._retry if retry is None else (self._retry if retry else NO_RETRY)
        app_id = AppId.parse(app)
        ref = app_id.ref()
        request = tensors.encode_request(
            app_id.model_name,
            inputs,
            model_version=model_version,
            request_id=request_id,
            outputs=list(outputs) if outputs else None,
            parameters=parameters,
        )
        with tracer.start_as_current_span("servefleet.infer", kind=SpanKind.INTERNAL) as span:
            span.set_attribute("servefleet.app", app_id.model_name)
            watch = await self._synced(app, max(0.0, deadline - loop.time()))
            tried: set[str] = set()  # endpoints that failed since the set last changed or was retried
            failures = 0
            last: grpc.aio.AioRpcError | None = None
            while True:
                endpoint = await self._next_endpoint(
                    app, watch, tried, deadline=deadline, policy=policy, failures=failures, last=last
                )
                left = deadline - loop.time()
                request.model_name = model or served_model(endpoint, ref)
                self.picker.started(endpoint.address)
                start = loop.time()
                try:
                    reply = await self._pool.stub(endpoint.address, GRPCInferenceServiceStub).ModelInfer(
                        request, timeout=left, metadata=tuple(metadata)
                    )
                except grpc.aio.AioRpcError as exc:
                    retryable = policy.retries(exc)
                    timed_out = exc.code() == grpc.StatusCode.DEADLINE_EXCEEDED
                    self.picker.failed(
                        endpoint.address,
                        unavailable=retryable,
                        latency_s=loop.time() - start if timed_out else None,
                    )
                    failures, last = failures + 1, exc
                    if not retryable or not policy.allows(failures):
                        raise from_rpc_error(exc) from None
                    span.add_event("retry", {"endpoint": endpoint.address, "code": exc.code().name})
                    tried.add(endpoint.address)
                    continue
                except BaseException:  # cancelled by the caller: the request no longer counts
                    self.picker.failed(endpoint.address, unavailable=False)
                    raise
                self.picker.succeeded(endpoint.address, loop.time() - start)
                span.set_attribute("servefleet.endpoint", endpoint.address)
                return tensors.decode_response(reply)

    async def stream(
        self,
        app: str,
        inputs: Mapping[str, np.ndarray],
        *,
        timeout: float | None = None,
        parameters: Mapping[str, tensors.Parameter] | None = None,
        request_id: str = "",
    ) -> AsyncGenerator[dict[str, np.ndarray], None]:
        """ModelStreamInfer: each response of a streaming model as it arrives (one for others).

        Retried like :meth:`infer` (the client's policy: an UNAVAILABLE endpoint on the others, then
        all again after a pause, until the deadline) before the first response only: once tokens
        came, a retry would repeat them, so a stream cut after that raises. KServe v2 reports a
        failure inside a stream as a message without a status code, so it raises ``Internal``.
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + (self._timeout if timeout is None else timeout)
        app_id = AppId.parse(app)
        request = tensors.encode_request(
            app_id.model_name, inputs, request_id=request_id, parameters=parameters
        )
        watch = await self._synced(app, max(0.0, deadline - loop.time()))
        tried: set[str] = set()
        failures = 0
        last: grpc.aio.AioRpcError | None = None
        while True:
            endpoint = await self._next_endpoint(
                app, watch, tried, deadline=deadline, policy=self._retry, failures=failures, last=last
            )
            tried.add(endpoint.address)
            request.model_name = served_model(endpoint, app_id.ref())
            stub = self._pool.stub(endpoint.address, GRPCInferenceServiceStub)
            call = stub.ModelStreamInfer(_once(request), timeout=max(0.0, deadline - loop.time()))
            sent = False
            try:
                async for response in call:
                    if response.error_message:
                        raise Internal(f"{app}: {response.error_message}")
                    sent = True
                    yield tensors.decode_response(response.infer_response)
                return
            except grpc.aio.AioRpcError as exc:
                failures, last = failures + 1, exc
                retryable = self._retry.retries(exc)
                self.picker.failed(endpoint.address, unavailable=retryable)
                if sent or not retryable or not self._retry.allows(failures):
                    raise from_rpc_error(exc) from None
            finally:
                call.cancel()

    async def triton_client(
        self, app: str, *, timeout: float = 10.0
    ) -> tritonclient.grpc.aio.InferenceServerClient:
        """A ready tritonclient (asyncio) for the endpoint the picker chooses now; caller closes it.
        Send the app's model name (a Triton app's: a repository model, see :func:`served_model`)."""
        return tritonclient.grpc.aio.InferenceServerClient(await self._address(app, timeout))

    async def _address(self, app: str, timeout: float) -> str:
        loop = asyncio.get_running_loop()
        watch = await self._synced(app, timeout)
        endpoint = await self._next_endpoint(
            app, watch, set(), deadline=loop.time() + timeout, policy=self._retry
        )
        return str(endpoint.address)

    def _broker_client(self) -> AsyncBrokerClient:
        if self._broker_address is None:
            raise FailedPrecondition("this client was created without broker='host:port'")
        if self._broker is None:
            self._broker = AsyncBrokerClient(self._broker_address, token=self._token)
        return self._broker

    async def submit(
        self,
        app: str,
        inputs: Mapping[str, np.ndarray],
        *,
        priority: int = 0,
        idempotency_key: str = "",
        ttl_s: int = 0,
    ) -> str:
        """Queue a long request on the async broker; returns its ticket at once."""
        return await self._broker_client().submit(
            AppId.parse(app).ref(), inputs, priority=priority, idempotency_key=idempotency_key, ttl_s=ttl_s
        )

    async def result(self, ticket: str, *, timeout: float | None = None) -> dict[str, np.ndarray]:
        """Wait for the outputs of a submitted request."""
        return await self._broker_client().result(
            ticket, timeout=self._timeout if timeout is None else timeout
        )

    async def close(self) -> None:
        watches = list(self._watches.values())
        self._watches.clear()
        await asyncio.gather(*(w.close() for w in watches))
        await self._pool.close()
        if self._broker is not None:
            await self._broker.close()
        await self._discovery.close()


def served_model(endpoint: discovery_pb2.Endpoint, app: common_pb2.AppRef) -> str:
    """The model_name an endpoint serves ``app`` under: the app's own name, except on a Triton
    endpoint, whose models keep their repository names (label ``models``): its only model, or
    the one named like the app (or the app's name when it lists none). InvalidArgument when that
    does not say which."""
    name = AppId.parse(app).model_name
    models = [m for m in endpoint.labels.get("models", "").split(",") if m]
    if endpoint.kind != "triton" or not models:
        return name
    if len(models) == 1 or name in models:
        return models[0] if len(models) == 1 else name
    raise InvalidArgument(f"application {name!r} serves Triton models {models}: pass model=NAME")


async def _once(request: Any) -> AsyncIterator[Any]:
    """A request stream of one message (the call half-closes after it)."""
    yield request


async def _in_context(ctx: otel_context.Context, work: Awaitable[T]) -> T:
    """Run ``work`` under the caller thread's trace context (it does not cross threads by itself)."""
    token = otel_context.attach(ctx)
    try:
        return await work
    finally:
        otel_context.detach(token)


class Client:
    """Blocking twin of :class:`AsyncClient` (same arguments); runs one asyncio loop in a daemon
    thread. Safe to share between threads."""

    def __init__(self, discovery: str | Sequence[str] = "", **options: Any) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="servefleet-client", daemon=True)
        self._thread.start()

        async def make() -> AsyncClient:
            return AsyncClient(discovery, **options)

        self.aio = self._run(make())

    def _run(self, work: Coroutine[Any, Any, T]) -> T:
        future = asyncio.run_coroutine_threadsafe(_in_context(otel_context.get_current(), work), self._loop)
        return future.result()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def endpoints(self, app: str, *, timeout: float = 10.0) -> list[discovery_pb2.Endpoint]:
        return self._run(self.aio.endpoints(app, timeout=timeout))

    def infer(self, app: str, inputs: Mapping[str, np.ndarray], **kwargs: Any) -> dict[str, np.ndarray]:
        """See :meth:`AsyncClient.infer` (same keyword arguments)."""
        return self._run(self.aio.infer(app, inputs, **kwargs))

    def stream(
        self, app: str, inputs: Mapping[str, np.ndarray], **kwargs: Any
    ) -> Iterator[dict[str, np.ndarray]]:
        """See :meth:`AsyncClient.stream`; each response as it arrives."""
        chunks = self.aio.stream(app, inputs, **kwargs)

        async def step() -> dict[str, np.ndarray]:
            return await anext(chunks)

        try:
            while True:
                try:
                    yield self._run(step())
                except StopAsyncIteration:
                    return
        finally:
            self._run(chunks.aclose())

    def triton_client(self, app: str, *, timeout: float = 10.0) -> tritonclient.grpc.InferenceServerClient:
        """A ready, blocking tritonclient for the endpoint the picker chooses now."""
        return tritonclient.grpc.InferenceServerClient(self._run(self.aio._address(app, timeout)))

    def submit(self, app: str, inputs: Mapping[str, np.ndarray], **kwargs: Any) -> str:
        return self._run(self.aio.submit(app, inputs, **kwargs))

    def result(self, ticket: str, *, timeout: float | None = None) -> dict[str, np.ndarray]:
        return self._run(self.aio.result(ticket, timeout=timeout))

    async def _shutdown(self) -> None:
        """Close the client, then end what is still running on its loop (a channel closing with
        grace, a gRPC callback) the way ``asyncio.run`` does, so closing the loop destroys no
        pending task ("Task was destroyed but it is pending!" after ``app infer``)."""
        await self.aio.close()
        rest = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        for task in rest:
            task.cancel()
        await asyncio.gather(*rest, return_exceptions=True)
        await asyncio.get_running_loop().shutdown_asyncgens()

    def close(self) -> None:
        if self._loop.is_closed():
            return
        with contextlib.suppress(RuntimeError):
            self._run(self._shutdown())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=5)
        self._loop.close()
