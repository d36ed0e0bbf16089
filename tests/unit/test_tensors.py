"""Tensor wire format: round trips, Triton's BYTES layout, and precise errors on bad sizes."""

from __future__ import annotations

import numpy as np
import pytest
import tritonclient.grpc as tc

from servefleet.common import tensors
from servefleet.common.errors import InvalidArgument


@pytest.mark.parametrize("dtype", ["float32", "float64", "int64", "int32", "uint8", "bool", "float16"])
def test_numeric_round_trip(dtype: str) -> None:
    array = (np.arange(12) % 3).astype(dtype).reshape(3, 4)
    request = tensors.encode_request("m", {"x": array})
    [back] = tensors.decode_request(request).values()
    assert back.dtype == array.dtype and back.shape == (3, 4)
    np.testing.assert_array_equal(back, array)


def test_bytes_match_tritonclient_layout() -> None:
    array = np.array([b"a", b"", "h\u00e9llo".encode()], dtype=np.object_)
    ours = tensors.to_raw(array)
    theirs = tc.InferInput("x", [3], "BYTES")
    theirs.set_data_from_numpy(array)
    assert ours == theirs._get_content()
    np.testing.assert_array_equal(tensors.from_raw("x", "BYTES", [3], ours), array)


def test_typed_contents_are_accepted() -> None:
    request = tensors.encode_request("m", {})
    tensor = request.inputs.add(name="x", datatype="FP32", shape=[2])
    tensor.contents.fp32_contents.extend([1.5, 2.5])
    np.testing.assert_array_equal(tensors.decode_request(request)["x"], np.array([1.5, 2.5], np.float32))


def test_size_mismatch_names_the_tensor() -> None:
    with pytest.raises(InvalidArgument, match="tensor 'x': 8 bytes for FP32 shape \\[3\\]"):
        tensors.from_raw("x", "FP32", [3], b"\0" * 8)
    with pytest.raises(InvalidArgument, match="unknown datatype"):
        tensors.from_raw("x", "FP8", [1], b"\0")


def test_response_round_trip() -> None:
    out = {"y": np.array([[0.25, 0.75]], np.float32), "label": np.array([b"setosa"], np.object_)}
    decoded = tensors.decode_response(tensors.encode_response("m", out))
    np.testing.assert_array_equal(decoded["y"], out["y"])
    assert decoded["label"].tolist() == [b"setosa"]
