"""ProxyCore without gRPC or Ray: checks against the spec, routing, retries and status choice,
with a typed fake transport standing in for Ray actor calls."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import grpc
import numpy as np
import pytest
from tritonclient.grpc import service_pb2

from servefleet.common.errors import InvalidArgument, NotFound, ResourceExhausted, Unavailable
from servefleet.common.tensors import decode_response, encode_request, encode_response
from servefleet.services.proxy import ProxyCore, check_request, model_metadata
from servefleet.services.replica_wire import OK, code
from servefleet.services.routing import ReplicaInfo, Routing
from servefleet.services.transports import ReplicaGone
from servefleet.spec import load_spec

SPEC = load_spec(
    {
        "name": "m",
        "import_path": "a:B",
        "inputs": [{"name": "x", "datatype": "FP32", "shape": [-1, 2]}],
        "outputs": [{"name": "y", "datatype": "FP32", "shape": [-1, 2]}],
        "max_concurrency": 1,
        "max_queued": 0,
    }
)
FULL, GONE = code(grpc.StatusCode.RESOURCE_EXHAUSTED), "gone"


class FakeTransport:
    """Answers per replica name: an echo model, a status code, or death."""

    def __init__(self, behaviour: dict[str, object]) -> None:
        self.behaviour = behaviour
        self.calls: list[str] = []

    def _answer(self, replica: ReplicaInfo, request: bytes) -> tuple[int, bytes | str]:
        self.calls.append(replica.name)
        what = self.behaviour.get(replica.name, "echo")
        if what == GONE:
            raise ReplicaGone("actor died")
        if isinstance(what, int):
            return what, f"refused by {replica.name}"
        x = service_pb2.ModelInferRequest.FromString(request)
        return OK, encode_response(
            "m", {"y": np.frombuffer(x.raw_input_contents[0], "<f4") * 2}
        ).SerializeToString()

    async def infer(
        self, replica: ReplicaInfo, request: bytes, carrier: dict[str, str], timeout_s: float | None
    ) -> tuple[int, bytes | str]:
        return self._answer(replica, request)

    async def stream(
        self, replica: ReplicaInfo, request: bytes, carrier: dict[str, str], timeout_s: float | None
    ) -> AsyncIterator[tuple[int, bytes | str]]:
        for _ in range(2):
            yield self._answer(replica, request)


def core(behaviour: dict[str, object], names: tuple[str, ...] = ("r1", "r2")) -> ProxyCore:
    proxy = ProxyCore("n1", FakeTransport(behaviour), attempts=3)
    replicas = tuple(ReplicaInfo(n, object(), "n1", "1", 1) for n in names)
    proxy.set_routing(Routing(epoch=1, spec=SPEC.SerializeToString(), replicas=replicas))
    return proxy


def request(**overrides: object) -> bytes:
    message = encode_request("m", {"x": np.ones((1, 2), dtype=np.float32)})
    for key, value in overrides.items():
        if key == "shape":
            message.inputs[0].ClearField("shape")
            message.inputs[0].shape.extend(value)  # type: ignore[arg-type]
        else:
            setattr(message.inputs[0], key, value)
    return message.SerializeToString()


async def test_forwards_bytes_and_returns_replica_bytes() -> None:
    raw = await core({}).infer(request(), None)
    out = decode_response(service_pb2.ModelInferResponse.FromString(raw))
    assert out["y"].tolist() == [2.0, 2.0]


async def test_dead_replica_is_retried_elsewhere_and_forgotten() -> None:
    proxy = core({"r1": GONE})
    for _ in range(50):  # until the random pick has met r1 once
        await proxy.infer(request(), None)
        if "r1" in proxy.transport.calls:  # type: ignore[attr-defined]
            break
    assert [s.info.name for s in proxy.router.slots] == ["r2"]


async def test_every_replica_full_is_resource_exhausted() -> None:
    with pytest.raises(ResourceExhausted, match="every replica is full"):
        await core({"r1": FULL, "r2": FULL}).infer(request(), None)


async def test_all_dead_is_unavailable_and_no_replicas_too() -> None:
    with pytest.raises(Unavailable, match="gone"):
        await core({"r1": GONE, "r2": GONE}).infer(request(), None)
    with pytest.raises(Unavailable, match="no replica is ready"):
        await core({}, names=()).infer(request(), None)


async def test_model_error_is_not_retried() -> None:
    proxy = core({"r1": code(grpc.StatusCode.INTERNAL)}, names=("r1",))
    with pytest.raises(Exception, match="refused by r1") as info:
        await proxy.infer(request(), None)
    assert type(info.value).__name__ == "Internal"
    assert proxy.transport.calls == ["r1"]  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"datatype": "FP64"}, "tensor 'x': datatype FP64 where the model takes FP32"),
        ({"shape": [1, 3]}, "tensor 'x': shape [1, 3] does not match"),
        ({"shape": [2, 2]}, "tensor 'x': 8 bytes for FP32 [2, 2], expected 16"),
        ({"name": "z"}, "tensor 'z': not an input"),
    ],
)
def test_inputs_are_checked_against_the_spec(overrides: dict[str, object], message: str) -> None:
    with pytest.raises(InvalidArgument) as info:
        check_request(service_pb2.ModelInferRequest.FromString(request(**overrides)), SPEC)
    assert message in str(info.value)


async def test_unknown_model_and_version_are_not_found() -> None:
    proxy = core({})
    with pytest.raises(NotFound, match="'other'"):
        proxy.check_model("other")
    with pytest.raises(NotFound, match="version '9'"):
        proxy.check_model("m", "9")


def test_older_routing_epoch_is_ignored() -> None:
    proxy = core({})
    assert not proxy.set_routing(Routing(epoch=0, spec=SPEC.SerializeToString(), replicas=()))
    assert len(proxy.router) == 2


async def test_stream_wraps_each_chunk_and_reports_errors_in_band() -> None:
    chunks = [c async for c in core({}).stream(request(), None)]
    responses = [service_pb2.ModelStreamInferResponse.FromString(c) for c in chunks]
    assert len(responses) == 2 and all(r.infer_response.model_name == "m" for r in responses)
    [bad] = [c async for c in core({}).stream(request(datatype="INT8"), None)]
    assert "datatype INT8" in service_pb2.ModelStreamInferResponse.FromString(bad).error_message


def test_metadata_comes_from_the_spec() -> None:
    metadata = model_metadata(SPEC)
    assert metadata.name == "m" and list(metadata.versions) == ["1"]
    assert [(t.name, list(t.shape)) for t in metadata.inputs] == [("x", [-1, 2])]


async def test_stream_to_a_one_answer_replica_uses_one_unary_call() -> None:
    proxy = ProxyCore("n1", FakeTransport({}), attempts=3)
    replica = ReplicaInfo("r1", object(), "n1", "1", 1, unary_streams=True)
    proxy.set_routing(Routing(epoch=1, spec=SPEC.SerializeToString(), replicas=(replica,)))
    chunks = [c async for c in proxy.stream(request(), None)]
    assert len(chunks) == 1  # the fake streams two answers; the unary call answers once
    response = service_pb2.ModelStreamInferResponse.FromString(chunks[0])
    assert decode_response(response.infer_response)["y"].tolist() == [2.0, 2.0]


async def test_a_stream_request_waits_for_a_replica_within_its_deadline() -> None:
    """No replica ready yet (a new cluster's proxy is listed before its replicas): the request is
    started once one is, not answered with an error the caller cannot retry on; past the stream's
    deadline it is answered in-band."""
    proxy = core({}, names=())

    async def ready_soon() -> None:
        await asyncio.sleep(0.3)
        replicas = (ReplicaInfo("r1", object(), "n1", "1", 1),)
        proxy.set_routing(Routing(epoch=2, spec=SPEC.SerializeToString(), replicas=replicas))

    arriving = asyncio.create_task(ready_soon())
    chunks = [service_pb2.ModelStreamInferResponse.FromString(c) async for c in proxy.stream(request(), 10.0)]
    await arriving
    assert [c.error_message for c in chunks] == ["", ""]
    [late] = [c async for c in core({}, names=()).stream(request(), 0.2)]
    assert "no replica is ready" in service_pb2.ModelStreamInferResponse.FromString(late).error_message
