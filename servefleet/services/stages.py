"""Stage-to-stage calls inside a pipeline: what a caller stage's model gets for each stage it calls.

A :class:`StageHandle` routes like a proxy does (it *is* a :class:`ProxyCore` over the callee
stage's replicas: power of two choices on its own in-flight counts, same-node replicas over their
gRPC endpoint, others by Ray call, retries on a gone or full replica), and carries the request:

- deadline: the caller's remaining time (``context.current()``) unless ``timeout`` says less; the
  callee gets it as its own timeout, and the caller stops waiting when it passes;
- cancellation: cancelling the awaiting coroutine (the caller's own request was cancelled, or
  its deadline passed) cancels the callee's Ray task or gRPC call;
- tracing: a ``stage.call`` client span, whose context the callee's ``model.call`` span continues;
- backpressure: a callee whose replicas are all full answers RESOURCE_EXHAUSTED at once, and the
  caller's request fails with it rather than queueing without bound.

The callee's routing table comes from the pipeline master (``stage_routing``), pulled at start and
every ``master_reconcile_interval_s``, and at once when no replica is known.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Mapping
from typing import Any

import numpy as np
from opentelemetry import trace
from opentelemetry.trace import Span, SpanKind
from tritonclient.grpc import service_pb2

from servefleet.api import common_pb2
from servefleet.common import tensors
from servefleet.common.appid import AppId
from servefleet.common.config import settings
from servefleet.common.errors import DeadlineExceeded, Unavailable
from servefleet.common.telemetry import tracer
from servefleet.pipeline_spec import pipeline_of, stage_app
from servefleet.services import context
from servefleet.services.actors import RAY_NAMESPACE, master_name
from servefleet.services.proxy import ProxyCore
from servefleet.services.routing import Routing
from servefleet.services.transports import GrpcTransport, NodeLocalTransport, RayTransport, ReplicaTransport

log = logging.getLogger(__name__)

Tensors = dict[str, np.ndarray]
RoutingSource = Callable[[], Awaitable[Routing | None]]


class StageCore(ProxyCore):
    """ProxyCore used from inside a stage: the same checks, routing and retries, answering the
    callee's response payloads (a stream's errors raise with their status, not in-band)."""

    async def responses(self, raw: bytes, timeout_s: float | None) -> AsyncGenerator[bytes, None]:
        self.parse(raw)
        async for payload in self._stream(raw, timeout_s):
            yield payload


class StageHandle:
    """Calls one callee stage of a pipeline; the caller's model receives it as a keyword argument."""

    def __init__(
        self,
        pipeline: common_pb2.AppRef,
        callee: str,
        *,
        node_id: str,
        transport: ReplicaTransport | None = None,
        routing: RoutingSource | None = None,
    ) -> None:
        """``transport`` and ``routing`` replace the replica calls and the master's table (tests)."""
        self.pipeline = pipeline
        self.callee = callee
        self.app = stage_app(pipeline, callee, entry=False)
        self.model_name = AppId.parse(self.app).model_name
        self._local = GrpcTransport()
        self.core = StageCore(node_id, transport or NodeLocalTransport(node_id, self._local, RayTransport()))
        self._source = routing or self._from_master
        self._changed = asyncio.Event()
        self._master: Any = None
        self._follow = asyncio.get_running_loop().create_task(self._follow_routing())

    async def infer(self, inputs: Mapping[str, np.ndarray], *, timeout: float | None = None) -> Tensors:
        """Run the callee on ``inputs``; raises the callee's domain error (ResourceExhausted when
        it is full, DeadlineExceeded when the time is up, ...)."""
        left = await self._ready(timeout)
        raw = self._request(inputs)
        with trace.use_span(self._span("infer"), end_on_exit=True):
            try:
                payload = await asyncio.wait_for(self._infer(raw, left), left)
            except TimeoutError:
                raise DeadlineExceeded(f"stage {self.callee}: no answer within {left:.3f}s") from None
        return tensors.decode_response(service_pb2.ModelInferResponse.FromString(payload))

    async def _infer(self, raw: bytes, left: float | None) -> bytes:
        try:
            return await self.core.infer(raw, left)
        except Unavailable:
            # Its replicas are gone (a rollout retired them): a fresher table may know others.
            if not await self._refreshed():
                raise
            return await self.core.infer(raw, left)

    async def stream(
        self, inputs: Mapping[str, np.ndarray], *, timeout: float | None = None
    ) -> AsyncIterator[Tensors]:
        """The callee's chunks as it yields them (a streaming model; one chunk otherwise)."""
        left = await self._ready(timeout)
        loop = asyncio.get_running_loop()
        deadline = None if left is None else loop.time() + left
        raw = self._request(inputs)
        chunks = self.core.responses(raw, left)
        span = self._span("stream")
        sent = False
        try:
            while True:
                # The span is current only within each step: a generator may resume in another task.
                with trace.use_span(span, end_on_exit=False):
                    wait = None if deadline is None else deadline - loop.time()
                    try:
                        payload = await asyncio.wait_for(anext(chunks), wait)
                    except StopAsyncIteration:
                        return
                    except TimeoutError:
                        raise DeadlineExceeded(
                            f"stage {self.callee}: stream not done within {left:.3f}s"
                        ) from None
                    except Unavailable:
                        if sent or not await self._refreshed():  # tokens went out: never repeat them
                            raise
                        await chunks.aclose()
                        chunks = self.core.responses(raw, wait)
                        continue
                sent = True
                yield tensors.decode_response(service_pb2.ModelInferResponse.FromString(payload))
        finally:
            span.end()
            await chunks.aclose()

    async def close(self) -> None:
        self._follow.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._follow

    def _request(self, inputs: Mapping[str, np.ndarray]) -> bytes:
        request_id = context.current().request_id
        return tensors.encode_request(self.model_name, inputs, request_id=request_id).SerializeToString()

    def _span(self, call: str) -> Span:
        return tracer.start_span(
            "stage.call",
            kind=SpanKind.CLIENT,
            attributes={
                "servefleet.stage": self.callee,
                "servefleet.model": self.model_name,
                "servefleet.call": call,
            },
        )

    async def _ready(self, timeout: float | None) -> float | None:
        """Time left for the call (the tighter of ``timeout`` and the caller's deadline), once a
        routing table with a replica is known."""
        remaining = context.current().remaining()
        left = remaining if timeout is None else (timeout if remaining is None else min(timeout, remaining))
        if left is not None and left <= 0:
            raise DeadlineExceeded(f"stage {self.callee}: the caller's deadline passed before the call")
        if not self.core.ready:
            self._changed.clear()
            wait = settings.replica_start_timeout_s if left is None else left
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wait_ready(), wait)
            if not self.core.ready:
                raise Unavailable(f"stage {self.callee} of {self.pipeline.name}: no replica is ready")
        return left

    async def _wait_ready(self) -> None:
        while not self.core.ready:
            await self._changed.wait()
            self._changed.clear()

    async def _follow_routing(self) -> None:
        """Pull the callee's table from the pipeline master, fast while none is known."""
        while True:
            await self._pull()
            interval = settings.master_reconcile_interval_s
            await asyncio.sleep(interval if self.core.ready else min(interval, 0.1))

    async def _refreshed(self) -> bool:
        """After gone replicas were dropped: the latest table, and whether it still has any."""
        await self._pull()
        return self.core.ready

    async def _from_master(self) -> Routing | None:
        import ray

        try:
            if self._master is None:
                self._master = ray.get_actor(master_name(self.pipeline), namespace=RAY_NAMESPACE)
            routing: Routing | None = await self._master.stage_routing.remote(self.app.name)
            return routing
        except Exception as exc:  # master restarting: ask again (its name stays)
            log.debug("stage %s: routing from the pipeline master: %s", self.callee, exc)
            self._master = None
            return None

    async def _pull(self) -> bool:
        """Ask for the callee's table now; True when a newer one came."""
        routing = await self._source()
        if routing is None or not self.core.set_routing(routing):
            return False
        self._local.forget({r.address for r in routing.replicas})
        self._changed.set()
        return True


def stage_handles(spec: common_pb2.ApplicationSpec) -> dict[str, StageHandle]:
    """One handle per stage ``spec`` (a stage's deployment spec) calls, keyed by callee name."""
    import ray

    node_id = ray.get_runtime_context().get_node_id()
    pipeline = common_pb2.AppRef(namespace=spec.namespace, name=pipeline_of(spec.name))
    return {edge.callee: StageHandle(pipeline, edge.callee, node_id=node_id) for edge in spec.edges}
