"""10 000 fuzzed requests against the C++ server: every one answered, the server never crashes."""

from __future__ import annotations

import random
import struct
from collections import Counter
from collections.abc import Callable

import grpc
import numpy as np
import pytest
from tritonclient.grpc import service_pb2

from servefleet.common.tensors import encode_request
from servefleet.direct import INPUT_NAME, DirectServer
from tests.integration.direct.conftest import MODEL_NAME

FIELDS, ROWS = 16, 1 << 20
METHOD = "/inference.GRPCInferenceService/ModelInfer"
DATATYPES = ["INT64", "INT32", "FP32", "BYTES", "", "int64", "INT64\0", "UINT64"]
INTERESTING = [0, 1, -1, 2, FIELDS, FIELDS + 1, ROWS, 100_000_000, -(2**63), 2**63 - 1, 2**31, 1 << 40]


def _valid(rng: random.Random) -> service_pb2.ModelInferRequest:
    batch = rng.choice([0, 1, 2, 64])
    ids = np.random.default_rng(rng.getrandbits(32)).integers(0, ROWS, size=(batch, FIELDS), dtype=np.int64)
    return encode_request(MODEL_NAME, {INPUT_NAME: ids})


def _mutations(rng: random.Random) -> list[Callable[[service_pb2.ModelInferRequest], None]]:
    def shape(r: service_pb2.ModelInferRequest) -> None:
        r.inputs[0].ClearField("shape")
        r.inputs[0].shape.extend(rng.choice(INTERESTING) for _ in range(rng.randint(0, 4)))

    def ids(r: service_pb2.ModelInferRequest) -> None:
        data = bytearray(r.raw_input_contents[0] if r.raw_input_contents else b"")
        if len(data) >= 8:
            at = 8 * rng.randrange(len(data) // 8)
            data[at : at + 8] = struct.pack("<q", rng.choice(INTERESTING))
            r.raw_input_contents[0] = bytes(data)

    def raw(r: service_pb2.ModelInferRequest) -> None:
        if not r.raw_input_contents:
            return
        data = bytearray(r.raw_input_contents[0])
        cut = rng.randint(0, len(data))
        r.raw_input_contents[0] = bytes(data[:cut]) + rng.randbytes(rng.choice([0, 1, 7, 8]))

    return [
        shape,
        ids,
        raw,
        lambda r: setattr(r.inputs[0], "datatype", rng.choice(DATATYPES)),
        lambda r: setattr(r.inputs[0], "name", rng.choice(["", "feature_id", "score", INPUT_NAME * 3])),
        lambda r: setattr(r, "model_name", rng.choice(["", "recs", MODEL_NAME + "x"])),
        lambda r: setattr(r, "model_version", rng.choice(["", "1", "2", "\xff"])),
        lambda r: r.raw_input_contents.append(rng.randbytes(rng.randint(0, 64))),
        lambda r: r.ClearField("raw_input_contents"),
        lambda r: r.inputs.add(name=INPUT_NAME, datatype="INT64", shape=[1, FIELDS]),
        lambda r: r.outputs.add(name=rng.choice(["score", "x", ""])),
        lambda r: r.inputs[0].contents.int64_contents.extend(rng.choice(INTERESTING) for _ in range(FIELDS)),
    ]


def _fuzzed(rng: random.Random) -> bytes:
    """A mutated valid request (mostly), a bit-flipped serialization, or plain garbage."""
    roll = rng.random()
    if roll < 0.1:
        return rng.randbytes(rng.randint(0, 512))
    request = _valid(rng)
    if roll < 0.8:
        for mutate in rng.sample(_mutations(rng), rng.randint(1, 3)):
            mutate(request)
    data = bytearray(request.SerializeToString())
    if roll >= 0.8 and data:
        for _ in range(rng.randint(1, 8)):
            data[rng.randrange(len(data))] = rng.randrange(256)
    return bytes(data)


def _parsed(data: bytes) -> service_pb2.ModelInferRequest | None:
    try:
        return service_pb2.ModelInferRequest.FromString(data)
    except Exception:
        return None


@pytest.mark.slow
def test_ten_thousand_fuzzed_requests_all_answered(direct_server: DirectServer, direct_address: str) -> None:
    rng = random.Random(20261123)
    before = direct_server.stats()["requests"]
    codes: Counter[grpc.StatusCode] = Counter()
    wrong: list[str] = []  # answers that contradict the request
    with grpc.insecure_channel(direct_address) as channel:
        call = channel.unary_unary(METHOD)  # bytes in, bytes out: garbage reaches the server as-is
        for i in range(10_000):
            data = _fuzzed(rng)
            request = _parsed(data)
            try:
                answer = call(data, timeout=10)
            except grpc.RpcError as exc:
                codes[exc.code()] += 1
                continue
            codes[grpc.StatusCode.OK] += 1
            # An OK answer is only right for a request that parses, and it must hold one FP32
            # score per row of the request's batch.
            response = service_pb2.ModelInferResponse.FromString(answer)
            rows = request.inputs[0].shape[0] if request is not None and request.inputs else -1
            scores = len(response.raw_output_contents[0]) // 4 if response.raw_output_contents else -1
            if request is None or scores != rows:
                wrong.append(f"request {i}: OK with {scores} scores for {rows} rows")
        assert not wrong, wrong[:5]
        # No request hung or died with the connection: each got a real answer from the server.
        assert set(codes) <= {
            grpc.StatusCode.OK,
            grpc.StatusCode.INVALID_ARGUMENT,
            grpc.StatusCode.NOT_FOUND,
            grpc.StatusCode.INTERNAL,  # unparseable bytes: gRPC's own "failed to parse" answer
        }, codes
        assert codes[grpc.StatusCode.INVALID_ARGUMENT] > 3_000 and codes[grpc.StatusCode.OK] > 500
        # Still serving afterwards.
        call(_valid(rng).SerializeToString(), timeout=10)
    assert direct_server.running
    # Every request gRPC could parse reached the model's handler, plus the last valid one.
    assert direct_server.stats()["requests"] - before == 10_000 - codes[grpc.StatusCode.INTERNAL] + 1
