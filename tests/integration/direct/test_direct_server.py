"""The C++ direct ingress answers an unmodified tritonclient with the Python reference's scores and
rejects bad input with INVALID_ARGUMENT naming the problem."""

from __future__ import annotations

import re
from pathlib import Path

import grpc
import numpy as np
import pytest
import tritonclient.grpc as tritongrpc
from tritonclient.grpc import service_pb2, service_pb2_grpc
from tritonclient.utils import InferenceServerException

from servefleet.common import health
from servefleet.common.tensors import decode_response, encode_request
from servefleet.direct import INPUT_NAME, OUTPUT_NAME, DirectServer, ctr
from tests.integration.direct.conftest import MODEL_NAME

FIELDS, ROWS = 16, 1 << 20


def _ids(batch: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, ROWS, size=(batch, FIELDS), dtype=np.int64)


@pytest.fixture(scope="module")
def triton(direct_address: str) -> tritongrpc.InferenceServerClient:
    return tritongrpc.InferenceServerClient(direct_address)


@pytest.fixture(scope="module")
def stub(direct_address: str) -> service_pb2_grpc.GRPCInferenceServiceStub:
    return service_pb2_grpc.GRPCInferenceServiceStub(grpc.insecure_channel(direct_address))


@pytest.mark.parametrize("batch", [1, 7, 64, 1000])
def test_tritonclient_gets_the_reference_scores(
    triton: tritongrpc.InferenceServerClient, ctr_reference: ctr.FactorizationMachine, batch: int
) -> None:
    ids = _ids(batch, seed=batch)
    tensor = tritongrpc.InferInput(INPUT_NAME, list(ids.shape), "INT64")
    tensor.set_data_from_numpy(ids)
    result = triton.infer(MODEL_NAME, [tensor], request_id="r1")
    scores = result.as_numpy(OUTPUT_NAME)
    assert scores.shape == (batch,) and scores.dtype == np.float32
    np.testing.assert_allclose(scores, ctr_reference.score(ids), rtol=1e-5, atol=1e-6)
    assert result.get_response().id == "r1"


def test_health_and_metadata(triton: tritongrpc.InferenceServerClient, direct_address: str) -> None:
    assert health.grpc_health(direct_address) == (True, "SERVING")
    assert triton.is_server_live() and triton.is_server_ready()
    assert triton.is_model_ready(MODEL_NAME) and triton.is_model_ready(MODEL_NAME, "1")
    assert not triton.is_model_ready("recs/other")
    meta = triton.get_model_metadata(MODEL_NAME)
    assert list(meta.versions) == ["1"]
    assert [(t.name, t.datatype, list(t.shape)) for t in meta.inputs] == [(INPUT_NAME, "INT64", [-1, FIELDS])]
    assert [(t.name, t.datatype, list(t.shape)) for t in meta.outputs] == [(OUTPUT_NAME, "FP32", [-1])]
    with pytest.raises(InferenceServerException, match="not served here"):
        triton.get_model_metadata("recs/other")


def test_typed_contents_are_accepted(
    stub: service_pb2_grpc.GRPCInferenceServiceStub, ctr_reference: ctr.FactorizationMachine
) -> None:
    ids = _ids(3, seed=9)
    request = service_pb2.ModelInferRequest(model_name=MODEL_NAME)
    tensor = request.inputs.add(name=INPUT_NAME, datatype="INT64", shape=list(ids.shape))
    tensor.contents.int64_contents.extend(ids.reshape(-1).tolist())
    scores = decode_response(stub.ModelInfer(request))[OUTPUT_NAME]
    np.testing.assert_allclose(scores, ctr_reference.score(ids), rtol=1e-5, atol=1e-6)


def _valid() -> service_pb2.ModelInferRequest:
    return encode_request(MODEL_NAME, {INPUT_NAME: _ids(2, seed=1)})


def _with(mutate: object) -> service_pb2.ModelInferRequest:
    request = _valid()
    mutate(request)  # type: ignore[operator]
    return request


BAD_REQUESTS = {
    "wrong input name": (
        lambda r: setattr(r.inputs[0], "name", "ids"),
        "exactly one input tensor 'feature_ids'",
    ),
    "no inputs": (lambda r: (r.ClearField("inputs"), r.ClearField("raw_input_contents")), "got 0 input"),
    "two inputs": (lambda r: r.inputs.add(name="x", datatype="INT64", shape=[1]), "got 2 input"),
    "wrong datatype": (lambda r: setattr(r.inputs[0], "datatype", "INT32"), "must be INT64, got 'INT32'"),
    "rank 1": (lambda r: r.inputs[0].ClearField("shape"), r"shape \[batch, 16\], got \[\]"),
    "wrong fields": (lambda r: r.inputs[0].shape.__setitem__(1, 15), r"got \[2, 15\]"),
    "negative batch": (lambda r: r.inputs[0].shape.__setitem__(0, -2), r"got \[-2, 16\]"),
    "huge batch": (lambda r: r.inputs[0].shape.__setitem__(0, 1 << 60), "too large"),
    "batch larger than the bytes sent": (
        lambda r: r.inputs[0].shape.__setitem__(0, 100_000_000),
        "256 bytes, expected 12800000000",
    ),
    "batch larger than the values sent": (
        lambda r: (r.ClearField("raw_input_contents"), r.inputs[0].shape.__setitem__(0, 100_000_000)),
        "0 int64_contents values, expected 1600000000",
    ),
    "short bytes": (lambda r: r.raw_input_contents.__setitem__(0, r.raw_input_contents[0][:-1]), "255 bytes"),
    "extra raw entry": (lambda r: r.raw_input_contents.append(b""), "2 raw_input_contents"),
    "id too large": (
        lambda r: r.raw_input_contents.__setitem__(0, np.full((2, FIELDS), ROWS, dtype=np.int64).tobytes()),
        "feature id 1048576 at example 0, field 0 is outside",
    ),
    "negative id": (
        lambda r: r.raw_input_contents.__setitem__(0, np.full((2, FIELDS), -5, dtype=np.int64).tobytes()),
        "feature id -5",
    ),
    "unknown output": (lambda r: r.outputs.add(name="logit"), "unknown output 'logit'"),
}


@pytest.mark.parametrize("case", sorted(BAD_REQUESTS))
def test_bad_input_is_invalid_argument(stub: service_pb2_grpc.GRPCInferenceServiceStub, case: str) -> None:
    mutate, message = BAD_REQUESTS[case]
    with pytest.raises(grpc.RpcError) as caught:
        stub.ModelInfer(_with(mutate))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert re.search(message, caught.value.details()), caught.value.details()


def test_unknown_model_or_version_is_not_found(stub: service_pb2_grpc.GRPCInferenceServiceStub) -> None:
    for mutate in (
        lambda r: setattr(r, "model_name", "recs/other"),
        lambda r: setattr(r, "model_version", "9"),
    ):
        with pytest.raises(grpc.RpcError) as caught:
            stub.ModelInfer(_with(mutate))
        assert caught.value.code() == grpc.StatusCode.NOT_FOUND


def test_stats_count_requests_errors_and_rows(
    direct_server: DirectServer, stub: service_pb2_grpc.GRPCInferenceServiceStub
) -> None:
    before = direct_server.stats()
    stub.ModelInfer(_valid())
    with pytest.raises(grpc.RpcError):
        stub.ModelInfer(_with(lambda r: setattr(r.inputs[0], "datatype", "FP32")))
    after = direct_server.stats()
    assert after["requests"] - before["requests"] == 2
    assert after["errors"] - before["errors"] == 1
    assert after["rows"] - before["rows"] == 2
    assert 0 < after["p50_latency_us"] <= after["p99_latency_us"]


def test_lifecycle_and_bad_model_files(ctr_model_path: Path, tmp_path: Path) -> None:
    server = DirectServer()
    junk = tmp_path / "junk.bin"
    junk.write_bytes(b"SFCTRFM1" + b"\0" * 100)
    with pytest.raises(ValueError, match="out of range"):
        server.load_model(str(junk), "m")
    with pytest.raises(ValueError, match="cannot open"):
        server.load_model(str(tmp_path / "missing.bin"), "m")
    port = server.start("127.0.0.1:0", workers=1)
    client = tritongrpc.InferenceServerClient(f"127.0.0.1:{port}")
    assert client.is_server_live() and not client.is_server_ready()
    with pytest.raises(RuntimeError, match="already started"):
        server.start("127.0.0.1:0")
    server.load_model(str(ctr_model_path), "m", "2")
    assert client.is_server_ready() and client.is_model_ready("m", "2") and server.model_name == "m"
    server.stop(grace_s=1.0)
    assert not server.running
    server.stop()  # idempotent
