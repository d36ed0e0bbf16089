"""The proxy's C++ ModelInfer forwarder in front of the real Python proxy server (no Ray): fake
replicas on loopback gRPC record what reached them. Requests carry an unsampled traceparent so C++
answers them (the test session records every new trace, and a request that needs a span is
Python's); everything else must come back exactly as the Python path answers it."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import grpc
import numpy as np
import pytest
from tritonclient.grpc import service_pb2

from servefleet.common import metrics
from servefleet.common.net import free_port
from servefleet.common.server import GrpcServer
from servefleet.common.tensors import encode_request, encode_response
from servefleet.services.forwarder import CppForwarder
from servefleet.services.proxy import (
    IN_FLIGHT,
    LATENCY,
    REQUESTS,
    SERVICE,
    InferenceServicer,
    ProxyCore,
    registrar,
)
from servefleet.services.routing import ReplicaInfo, Routing
from servefleet.services.transports import GrpcTransport
from servefleet.spec import load_spec

pytest.importorskip("servefleet.direct._direct")

SPEC = load_spec(
    {
        "name": "fwd",
        "import_path": "a:B",
        "inputs": [{"name": "x", "datatype": "FP32", "shape": [-1, 2]}],
        "outputs": [{"name": "y", "datatype": "FP32", "shape": [-1, 2]}],
        "max_concurrency": 4,
        "max_queued": 4,
    }
)
INFER = "/inference.GRPCInferenceService/ModelInfer"
UNSAMPLED = "00-" + "ab" * 16 + "-" + "cd" * 8 + "-00"
SAMPLED = UNSAMPLED[:-1] + "1"


def request(shape: tuple[int, int] = (1, 2), model: str = "fwd") -> bytes:
    return encode_request(model, {"x": np.ones(shape, np.float32)}).SerializeToString()


class FakeReplica:
    """A replica's gRPC Infer: answers, refuses with a code, or hangs until cancelled."""

    def __init__(self, behaviour: str = "ok") -> None:
        self.behaviour = behaviour
        self.calls: list[dict[str, Any]] = []
        self.arrived, self.cancelled = asyncio.Event(), asyncio.Event()
        self.server = grpc.aio.server()
        ident = lambda b: b  # noqa: E731
        self.server.add_generic_rpc_handlers(
            (
                grpc.method_handlers_generic_handler(
                    "servefleet.Replica",
                    {
                        "Infer": grpc.unary_unary_rpc_method_handler(self.infer, ident, ident),
                        "Stream": grpc.unary_stream_rpc_method_handler(self.stream, ident, ident),
                    },
                ),
            )
        )
        self.address = f"127.0.0.1:{self.server.add_insecure_port('127.0.0.1:0')}"

    async def infer(self, raw: bytes, context: grpc.aio.ServicerContext) -> bytes:
        metadata = dict(context.invocation_metadata() or ())
        self.calls.append({"metadata": metadata, "left": context.time_remaining()})
        self.arrived.set()
        if self.behaviour == "unavailable":
            await context.abort(grpc.StatusCode.UNAVAILABLE, "draining")
        if self.behaviour == "full":
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, "replica full")
        if self.behaviour == "hang":
            try:
                await asyncio.sleep(60)
            except asyncio.CancelledError:
                self.cancelled.set()
                raise
        return encode_response("fwd", {"y": np.full((1, 2), 3, np.float32)}).SerializeToString()

    async def stream(self, raw: bytes, context: grpc.aio.ServicerContext) -> AsyncIterator[bytes]:
        yield await self.infer(raw, context)


class Stack:
    def __init__(self, replicas: list[FakeReplica], dead: int = 0, capacity: int = 8) -> None:
        self.replicas = replicas
        self.capacity = capacity
        self.addresses = [f"127.0.0.1:{free_port()}" for _ in range(dead)] + [r.address for r in replicas]
        self.core = ProxyCore("node", GrpcTransport())
        self.server = GrpcServer("proxy", "127.0.0.1:0", [registrar(InferenceServicer(self.core))], [SERVICE])
        self.forwarder = CppForwarder("node", REQUESTS, LATENCY, IN_FLIGHT)

    async def __aenter__(self) -> Stack:
        for r in self.replicas:
            await r.server.start()
        await self.server.start()
        infos = tuple(
            ReplicaInfo(f"r{i}", None, "node", "1", self.capacity, address=a)
            for i, a in enumerate(self.addresses)
        )
        routing = Routing(1, SPEC.SerializeToString(), infos)
        self.core.set_routing(routing)
        self.address = self.forwarder.start("127.0.0.1:0", self.server.address)
        self.forwarder.set_table(routing, self.core.spec)
        self.channel = grpc.aio.insecure_channel(self.address)
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.channel.close()
        await self.forwarder.stop(1.0)
        await self.server.stop(0)
        for r in self.replicas:
            await r.server.stop(0)

    def relayed(self) -> int:
        return int(self.forwarder.native.stats()["relayed"])

    async def infer(self, raw: bytes, **kwargs: Any) -> service_pb2.ModelInferResponse:
        answer = await self.channel.unary_unary(INFER)(raw, **kwargs)
        return service_pb2.ModelInferResponse.FromString(answer)


def _count(code: str) -> float:
    labels = {"app": "fwd", "code": code}
    return metrics.REGISTRY.get_sample_value("servefleet_proxy_requests_total", labels) or 0.0


async def test_forwards_in_cpp_with_deadline_and_metadata_unchanged_and_counts_in_metrics() -> None:
    replica = FakeReplica()
    async with Stack([replica]) as stack:
        before = _count("OK")
        meta = (("traceparent", UNSAMPLED), ("x-caller", "abc"))
        response = await stack.infer(request(), timeout=5, metadata=meta)
        assert np.frombuffer(response.raw_output_contents[0], "<f4").tolist() == [3, 3]
        assert stack.relayed() == 0  # C++ answered it
        seen = replica.calls[0]
        assert seen["metadata"]["traceparent"] == UNSAMPLED and seen["metadata"]["x-caller"] == "abc"
        assert 0 < seen["left"] <= 5
        stack.forwarder.sync_metrics()
        assert _count("OK") == before + 1


async def test_unavailable_replicas_cost_a_retry_on_another() -> None:
    refusing, live = FakeReplica("unavailable"), FakeReplica()
    async with Stack([refusing, live], dead=1) as stack:
        for _ in range(10):
            await stack.infer(request(), timeout=5, metadata=(("traceparent", UNSAMPLED),))
        assert len(live.calls) == 10 and stack.relayed() == 0
        assert stack.forwarder.native.stats()["retried"] > 0


async def test_full_replicas_leave_the_answer_to_pythons_admission() -> None:
    full, live = FakeReplica("full"), FakeReplica()
    async with Stack([full, live]) as stack:
        for _ in range(6):  # a full replica costs a retry on the other
            await stack.infer(request(), timeout=5, metadata=(("traceparent", UNSAMPLED),))
        assert len(live.calls) == 6 and stack.relayed() == 0
    full = FakeReplica("full")
    async with Stack([full]) as stack:
        rejected = metrics.REGISTRY.get_sample_value("servefleet_proxy_rejected_total", {"app": "fwd"}) or 0
        with pytest.raises(grpc.aio.AioRpcError) as exc:
            await stack.infer(request(), timeout=5, metadata=(("traceparent", UNSAMPLED),))
        assert exc.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "every replica is full" in (exc.value.details() or "") and stack.relayed() == 1
        assert (
            metrics.REGISTRY.get_sample_value("servefleet_proxy_rejected_total", {"app": "fwd"})
            == rejected + 1
        )


async def test_client_cancellation_reaches_the_replica() -> None:
    replica = FakeReplica("hang")
    async with Stack([replica]) as stack:
        call = stack.channel.unary_unary(INFER)(request(), timeout=30, metadata=(("traceparent", UNSAMPLED),))
        await asyncio.wait_for(replica.arrived.wait(), 10)
        call.cancel()
        await asyncio.wait_for(replica.cancelled.wait(), 10)


async def test_what_cpp_cannot_answer_gets_pythons_answer() -> None:
    replica = FakeReplica()
    async with Stack([replica]) as stack:
        unsampled = (("traceparent", UNSAMPLED),)
        with pytest.raises(grpc.aio.AioRpcError) as bad:
            await stack.infer(request((1, 3)), timeout=5, metadata=unsampled)
        assert bad.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "shape [1, 3]" in (bad.value.details() or "")
        with pytest.raises(grpc.aio.AioRpcError) as unknown:
            await stack.infer(request(model="other"), timeout=5, metadata=unsampled)
        assert unknown.value.code() == grpc.StatusCode.NOT_FOUND
        assert "'other'" in (unknown.value.details() or "")
        await stack.infer(request(), timeout=5, metadata=(("traceparent", SAMPLED),))  # needs a span
        await stack.infer(request(), timeout=5)  # no caller trace: this session samples every new one
        assert stack.relayed() == 4 and len(replica.calls) == 2
        live = await stack.channel.unary_unary(
            "/inference.GRPCInferenceService/ServerLive",
            request_serializer=service_pb2.ServerLiveRequest.SerializeToString,
            response_deserializer=service_pb2.ServerLiveResponse.FromString,
        )(service_pb2.ServerLiveRequest(), timeout=5)
        assert live.live
        stream = stack.channel.stream_stream("/inference.GRPCInferenceService/ModelStreamInfer")

        async def two() -> AsyncIterator[bytes]:
            yield request()
            yield request()

        answers = [
            service_pb2.ModelStreamInferResponse.FromString(a) async for a in stream(two(), timeout=10)
        ]
        assert [a.error_message for a in answers] == ["", ""] and len(replica.calls) == 4


async def test_a_replaced_sampler_keeps_every_request_on_the_python_path(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("OTEL_TRACES_SAMPLER", "always_on")  # C++ cannot tell what it would record
    replica = FakeReplica()
    async with Stack([replica]) as stack:
        await stack.infer(request(), timeout=5, metadata=(("traceparent", UNSAMPLED),))
        assert stack.relayed() == 1 and len(replica.calls) == 1


async def test_relayed_streams_beside_forwarded_calls_under_load() -> None:
    """64 relayed streams and 8 forwarded callers for 3 s. A relay that could start an operation on
    Python's side of a call after it had finished aborted a stress run like this one once (pure
    virtual call); the hold on that side (relay.cc CloseUpstream) rules it out."""
    replica = FakeReplica()
    async with Stack([replica], capacity=256) as stack:
        stream = stack.channel.stream_stream("/inference.GRPCInferenceService/ModelStreamInfer")
        end = asyncio.get_running_loop().time() + 3

        async def streaming() -> int:
            call, n = stream(timeout=60), 0
            while asyncio.get_running_loop().time() < end:
                await call.write(request())
                assert not service_pb2.ModelStreamInferResponse.FromString(await call.read()).error_message
                n += 1
            await call.done_writing()
            return n

        async def forwarded() -> int:
            n = 0
            while asyncio.get_running_loop().time() < end:
                await stack.infer(request(), timeout=30, metadata=(("traceparent", UNSAMPLED),))
                n += 1
            return n

        done = await asyncio.gather(*(streaming() for _ in range(64)), *(forwarded() for _ in range(8)))
        assert all(done) and stack.relayed() == 64
