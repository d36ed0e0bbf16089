"""StageHandle without Ray: the caller's deadline, trace context, cancellation and the callee's
backpressure carried across one stage-to-stage call, over a typed fake transport."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import grpc
import numpy as np
import pytest
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from tritonclient.grpc import service_pb2

from servefleet.api import common_pb2
from servefleet.common import telemetry
from servefleet.common.errors import DeadlineExceeded, ResourceExhausted
from servefleet.common.tensors import encode_response
from servefleet.pipeline_spec import stage_spec
from servefleet.services import context
from servefleet.services.replica_wire import OK, code
from servefleet.services.routing import ReplicaInfo, Routing
from servefleet.services.stages import StageHandle
from servefleet.services.transports import ReplicaGone
from servefleet.spec import load_spec

PIPELINE = common_pb2.AppRef(namespace="default", name="llm")
SPEC = stage_spec(
    load_spec(
        {
            "name": "llm",
            "kind": "pipeline",
            "stages": [{"name": "cache", "import_path": "a:C"}, {"name": "model", "import_path": "a:M"}],
            "edges": [{"caller": "cache", "callee": "model"}],
        }
    ),
    "model",
)


class Callee:
    """A fake callee stage: records what each call carried; ``mode`` says how it answers."""

    def __init__(self, mode: str = "echo") -> None:
        self.mode = mode
        self.calls: list[tuple[str, dict[str, str], float | None]] = []
        self.cancelled = asyncio.Event()

    async def infer(
        self, replica: ReplicaInfo, request: bytes, carrier: dict[str, str], timeout_s: float | None
    ) -> tuple[int, bytes | str]:
        self.calls.append((replica.name, carrier, timeout_s))
        if self.mode == "full":
            return code(grpc.StatusCode.RESOURCE_EXHAUSTED), f"{replica.name} is full"
        if self.mode == "gone" and replica.name == "r1":
            raise ReplicaGone("died")
        if self.mode == "slow":
            try:
                await asyncio.sleep(60)
            except asyncio.CancelledError:
                self.cancelled.set()
                raise
        x = service_pb2.ModelInferRequest.FromString(request).raw_input_contents[0]
        return OK, encode_response("llm--model", {"y": np.frombuffer(x, "<f4") * 2}).SerializeToString()

    async def stream(
        self, replica: ReplicaInfo, request: bytes, carrier: dict[str, str], timeout_s: float | None
    ) -> AsyncIterator[tuple[int, bytes | str]]:
        for i in range(3):
            yield OK, encode_response("llm--model", {"token": np.array([i], np.int32)}).SerializeToString()


def routing(*names: str, epoch: int = 1) -> Routing:
    replicas = tuple(ReplicaInfo(name=n, handle=None, node_id="n", version="1", capacity=1) for n in names)
    return Routing(epoch=epoch, spec=SPEC.SerializeToString(), replicas=replicas)


async def handle(callee: Callee, *tables: Routing) -> StageHandle:
    pending = list(tables)

    async def source() -> Routing | None:
        return pending.pop(0) if len(pending) > 1 else pending[0]

    stage = StageHandle(PIPELINE, "model", node_id="n", transport=callee, routing=source)
    await asyncio.sleep(0)
    return stage


async def test_the_callers_remaining_deadline_and_trace_reach_the_callee() -> None:
    memory = InMemorySpanExporter()
    telemetry.setup_tracing("stage-test", processor=SimpleSpanProcessor(memory))
    callee = Callee()
    stage = await handle(callee, routing("r1"))
    with context.serving(context.RequestContext.of(service_pb2.ModelInferRequest(id="q1"), 2.0)):
        out = await stage.infer({"x": np.array([1.5], np.float32)})
    np.testing.assert_array_equal(out["y"], [3.0])
    _, carrier, timeout_s = callee.calls[0]
    assert timeout_s is not None and 1.5 < timeout_s <= 2.0
    span = next(s for s in memory.get_finished_spans() if s.name == "stage.call")
    assert f"{span.context.trace_id:032x}" in carrier["traceparent"]
    await stage.close()


async def test_a_passed_deadline_cancels_the_callee_call() -> None:
    callee = Callee("slow")
    stage = await handle(callee, routing("r1"))
    with pytest.raises(DeadlineExceeded):
        await stage.infer({"x": np.array([1.0], np.float32)}, timeout=0.05)
    await asyncio.wait_for(callee.cancelled.wait(), 1.0)
    with context.serving(context.RequestContext(deadline=0.0)), pytest.raises(DeadlineExceeded):
        await stage.infer({"x": np.array([1.0], np.float32)})
    await stage.close()


async def test_a_full_callee_answers_resource_exhausted_at_once() -> None:
    stage = await handle(Callee("full"), routing("r1", "r2"))
    with pytest.raises(ResourceExhausted):
        await stage.infer({"x": np.array([1.0], np.float32)})
    await stage.close()


async def test_gone_replicas_send_the_call_to_a_fresher_table() -> None:
    callee = Callee("gone")
    stage = await handle(callee, routing("r1"), routing("r2", epoch=2))
    out = await stage.infer({"x": np.array([2.0], np.float32)})
    np.testing.assert_array_equal(out["y"], [4.0])
    assert [name for name, _, _ in callee.calls] == ["r1", "r2"]
    await stage.close()


async def test_stream_yields_each_chunk() -> None:
    stage = await handle(Callee(), routing("r1"))
    chunks = [c["token"][0] async for c in stage.stream({"x": np.array([1.0], np.float32)})]
    assert chunks == [0, 1, 2]
    await stage.close()
