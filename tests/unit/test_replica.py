"""The replica as a plain object (no Ray): admission, model errors, batching, streaming, drain."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from tritonclient.grpc import service_pb2

from servefleet.common.errors import InvalidArgument
from servefleet.common.tensors import decode_response, encode_request
from servefleet.services.replica import ModelTime, Replica, import_object
from servefleet.services.replica_wire import OK, code
from servefleet.spec import load_spec


@pytest.fixture
async def replica() -> AsyncIterator[Callable[..., Replica]]:
    """``replica(import_path, **spec)``: a plain Replica, closed after the test."""
    made: list[Replica] = []

    def make(import_path: str, **spec: Any) -> Replica:
        loaded = load_spec({"name": "m", "import_path": import_path, **spec})
        made.append(Replica(loaded.SerializeToString(), "replica:default/m:1:a"))
        return made[-1]

    yield make
    for r in made:
        await r.close()


def x_request(value: float = 1.0, rows: int = 1) -> bytes:
    return encode_request("m", {"x": np.full(rows, value, dtype=np.float32)}).SerializeToString()


def y_of(payload: bytes | str) -> list[float]:
    assert isinstance(payload, bytes)
    return list(decode_response(service_pb2.ModelInferResponse.FromString(payload))["y"])


async def test_sync_model_answers_with_version_and_counts_latency(replica: Callable[..., Replica]) -> None:
    r = replica("examples.iris:IrisClassifier", version="7")
    raw = encode_request("m", {"features": np.array([[6.7, 3.0, 5.6, 2.1]], np.float32)}).SerializeToString()
    status, payload = await r.infer(raw, {}, None)
    assert status == OK
    response = service_pb2.ModelInferResponse.FromString(payload)  # type: ignore[arg-type]
    assert response.model_version == "7" and decode_response(response)["label"].tolist() == [2]
    assert (await r.stats())["served"] == 1 and r.latency_ms > 0


async def test_model_exception_is_internal_and_replica_keeps_serving(replica: Callable[..., Replica]) -> None:
    r = replica("examples.latency:VariableLatency", init_args={"min_ms": 0, "max_ms": 0, "fail_on": -1})
    status, message = await r.infer(x_request(-1), {}, None)
    assert status == code(grpc.StatusCode.INTERNAL) and "refuses" in str(message)
    status, payload = await r.infer(x_request(2), {}, None)
    assert status == OK and y_of(payload) == [4.0]


async def test_admission_refuses_beyond_concurrency_plus_queue(replica: Callable[..., Replica]) -> None:
    r = replica(
        "examples.latency:VariableLatency",
        init_args={"min_ms": 50, "max_ms": 50},
        max_concurrency=2,
        max_queued=1,
    )
    answers = await asyncio.gather(*(r.infer(x_request(), {}, None) for _ in range(6)))
    statuses = sorted(status for status, _ in answers)
    assert statuses.count(OK) == 3 and statuses.count(code(grpc.StatusCode.RESOURCE_EXHAUSTED)) == 3
    assert r.in_flight == 0 and r.rejected == 3


async def test_deadline_in_replica_is_deadline_exceeded(replica: Callable[..., Replica]) -> None:
    r = replica("examples.latency:VariableLatency", init_args={"min_ms": 200, "max_ms": 200})
    status, _ = await r.infer(x_request(), {}, 0.01)
    assert status == code(grpc.StatusCode.DEADLINE_EXCEEDED)


async def test_batching_joins_concurrent_requests(replica: Callable[..., Replica]) -> None:
    r = replica(
        "examples.latency:VariableLatency",
        init_args={"min_ms": 0, "max_ms": 0},
        batching={"max_batch_size": 4, "batch_wait_timeout_ms": 20},
    )
    answers = await asyncio.gather(*(r.infer(x_request(i, rows=2), {}, None) for i in range(4)))
    assert [y_of(p) for _, p in answers] == [[0, 0], [2, 2], [4, 4], [6, 6]]


async def test_streaming_model_yields_each_chunk(replica: Callable[..., Replica]) -> None:
    r = replica("examples.streaming:TokenStreamer", init_args={"delay_ms": 0})
    raw = encode_request(
        "m", {"prompt": np.array([b"p"], dtype=np.object_), "count": np.array([3], np.int32)}
    ).SerializeToString()
    chunks = [payload async for _, payload in r.stream(raw, {}, None)]
    tokens = [decode_response(service_pb2.ModelInferResponse.FromString(c))["token"][0] for c in chunks]  # type: ignore[arg-type]
    assert tokens == [b"p-0", b"p-1", b"p-2"]


async def test_drain_waits_for_in_flight_requests(replica: Callable[..., Replica]) -> None:
    r = replica("examples.latency:VariableLatency", init_args={"min_ms": 100, "max_ms": 100})
    call = asyncio.create_task(r.infer(x_request(), {}, None))
    await asyncio.sleep(0.01)
    assert await r.drain(5.0) == 0 and call.done() and r.draining


def test_import_object_names_what_is_missing() -> None:
    with pytest.raises(InvalidArgument, match="cannot import 'nope'"):
        import_object("nope:Thing")
    with pytest.raises(InvalidArgument, match="has no 'Missing'"):
        import_object("examples.iris:Missing")


async def test_grpc_endpoint_carries_status_and_bytes(replica: Callable[..., Replica]) -> None:
    from servefleet.services.routing import ReplicaInfo
    from servefleet.services.transports import GrpcTransport

    r = replica("examples.latency:VariableLatency", init_args={"min_ms": 0, "max_ms": 0, "fail_on": -1})
    await r.serving()
    info = ReplicaInfo("r", None, "n", "1", 4, address=r.address)
    transport = GrpcTransport()
    status, payload = await transport.infer(info, x_request(2), {}, 5.0)
    assert status == OK and y_of(payload) == [4.0]
    status, message = await transport.infer(info, x_request(-1), {}, 5.0)
    assert status == code(grpc.StatusCode.INTERNAL) and "refuses" in str(message)
    # One form: the same code and message as the Ray path's answer for the same request.
    assert (status, message) == await r.infer(x_request(-1), {}, 5.0)
    # The replica's server is the platform's GrpcServer: it answers gRPC health.
    async with grpc.aio.insecure_channel(r.address) as channel:
        health = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
    assert health.status == health_pb2.HealthCheckResponse.SERVING


def test_model_time_runs_fast_models_inline_and_slow_ones_on_threads() -> None:
    timing = ModelTime()
    for _ in range(ModelTime.WARMUP_CALLS - 1):
        timing.observe(0.00001)
    assert not timing.inline  # still measuring
    timing.observe(0.00001)
    assert timing.inline
    timing.observe(0.5)  # one slow call: the next ones go back to threads
    assert not timing.inline
    for _ in range(60):
        timing.observe(0.00001)
    assert timing.inline
