"""numpy arrays <-> KServe v2 (Triton) inference messages, tensors carried as raw bytes.

One module for the SDK, the proxy, the replicas and the broker's workers, so the wire format of
a tensor is defined once. BYTES tensors use Triton's raw layout: each element prefixed by its
length as a little-endian uint32.
"""

from __future__ import annotations

import struct
from collections.abc import Mapping

import numpy as np
from tritonclient.grpc import service_pb2

from servefleet.common.errors import InvalidArgument

#: KServe v2 datatype name -> numpy dtype (BYTES is an object array of bytes).
DTYPES: dict[str, np.dtype[np.generic]] = {
    "BOOL": np.dtype(np.bool_),
    "UINT8": np.dtype(np.uint8),
    "UINT16": np.dtype(np.uint16),
    "UINT32": np.dtype(np.uint32),
    "UINT64": np.dtype(np.uint64),
    "INT8": np.dtype(np.int8),
    "INT16": np.dtype(np.int16),
    "INT32": np.dtype(np.int32),
    "INT64": np.dtype(np.int64),
    "FP16": np.dtype(np.float16),
    "FP32": np.dtype(np.float32),
    "FP64": np.dtype(np.float64),
    "BYTES": np.dtype(np.object_),
}
_NAMES = {dtype: name for name, dtype in DTYPES.items() if name != "BYTES"}

# Field of InferTensorContents used when a client sends typed contents instead of raw bytes.
_CONTENTS_FIELD = {
    "BOOL": "bool_contents",
    "UINT8": "uint_contents",
    "UINT16": "uint_contents",
    "UINT32": "uint_contents",
    "UINT64": "uint64_contents",
    "INT8": "int_contents",
    "INT16": "int_contents",
    "INT32": "int_contents",
    "INT64": "int64_contents",
    "FP32": "fp32_contents",
    "FP64": "fp64_contents",
    "BYTES": "bytes_contents",
}


def datatype_of(array: np.ndarray) -> str:
    """The KServe v2 datatype name for a numpy array (str/bytes/object arrays are BYTES)."""
    if array.dtype.kind in ("O", "S", "U"):
        return "BYTES"
    try:
        return _NAMES[array.dtype]
    except KeyError:
        raise InvalidArgument(f"numpy dtype {array.dtype} has no KServe v2 datatype") from None


def to_raw(array: np.ndarray) -> bytes:
    """Raw little-endian bytes of a tensor, in Triton's layout."""
    if datatype_of(array) != "BYTES":
        return np.ascontiguousarray(array).astype(array.dtype.newbyteorder("<"), copy=False).tobytes()
    chunks = []
    for item in array.reshape(-1):
        data = item.encode() if isinstance(item, str) else bytes(item)
        chunks.append(struct.pack("<I", len(data)))
        chunks.append(data)
    return b"".join(chunks)


def from_raw(name: str, datatype: str, shape: list[int] | tuple[int, ...], raw: bytes) -> np.ndarray:
    """Parse raw bytes into an array; InvalidArgument naming the tensor when sizes disagree."""
    if datatype not in DTYPES:
        raise InvalidArgument(f"tensor {name!r}: unknown datatype {datatype!r}")
    if any(dim < 0 for dim in shape):
        raise InvalidArgument(f"tensor {name!r}: negative dimension in shape {list(shape)}")
    count = int(np.prod(shape, dtype=np.int64))
    if datatype == "BYTES":
        items: list[bytes] = []
        offset = 0
        while offset < len(raw):
            if offset + 4 > len(raw):
                raise InvalidArgument(f"tensor {name!r}: truncated BYTES element length")
            (length,) = struct.unpack_from("<I", raw, offset)
            offset += 4
            if offset + length > len(raw):
                raise InvalidArgument(f"tensor {name!r}: BYTES element overruns the buffer")
            items.append(raw[offset : offset + length])
            offset += length
        if len(items) != count:
            raise InvalidArgument(f"tensor {name!r}: {len(items)} BYTES elements for shape {list(shape)}")
        out = np.empty(count, dtype=np.object_)
        out[:] = items
        return out.reshape(shape)
    dtype = DTYPES[datatype].newbyteorder("<")
    expected = count * dtype.itemsize
    if len(raw) != expected:
        raise InvalidArgument(
            f"tensor {name!r}: {len(raw)} bytes for {datatype} shape {list(shape)}, expected {expected}"
        )
    return np.frombuffer(raw, dtype=dtype).reshape(shape)


def _from_contents(tensor: service_pb2.ModelInferRequest.InferInputTensor) -> np.ndarray:
    field = _CONTENTS_FIELD.get(tensor.datatype)
    if field is None:
        raise InvalidArgument(f"tensor {tensor.name!r}: {tensor.datatype} needs raw_input_contents")
    values = list(getattr(tensor.contents, field))
    shape = list(tensor.shape)
    if len(values) != int(np.prod(shape, dtype=np.int64)):
        raise InvalidArgument(f"tensor {tensor.name!r}: {len(values)} values for shape {shape}")
    if tensor.datatype == "BYTES":
        out = np.empty(len(values), dtype=np.object_)
        out[:] = values
        return out.reshape(shape)
    return np.asarray(values, dtype=DTYPES[tensor.datatype]).reshape(shape)


def decode_request(request: service_pb2.ModelInferRequest) -> dict[str, np.ndarray]:
    """Input tensors of a ModelInferRequest, whether sent as raw bytes or typed contents."""
    raw = request.raw_input_contents
    if raw and len(raw) != len(request.inputs):
        raise InvalidArgument(f"{len(request.inputs)} inputs but {len(raw)} raw_input_contents entries")
    out: dict[str, np.ndarray] = {}
    for i, tensor in enumerate(request.inputs):
        if tensor.name in out:
            raise InvalidArgument(f"tensor {tensor.name!r} given twice")
        if raw:
            out[tensor.name] = from_raw(tensor.name, tensor.datatype, list(tensor.shape), raw[i])
        else:
            out[tensor.name] = _from_contents(tensor)
    return out


def encode_request(
    model_name: str,
    inputs: Mapping[str, np.ndarray],
    *,
    model_version: str = "",
    request_id: str = "",
    outputs: list[str] | None = None,
    parameters: Mapping[str, Parameter] | None = None,
) -> service_pb2.ModelInferRequest:
    request = service_pb2.ModelInferRequest(model_name=model_name, model_version=model_version, id=request_id)
    for key, value in (parameters or {}).items():
        set_parameter(request.parameters[key], value, key)
    for name, array in inputs.items():
        array = np.asarray(array)
        request.inputs.add(name=name, datatype=datatype_of(array), shape=array.shape)
        request.raw_input_contents.append(to_raw(array))
    for name in outputs or ():
        request.outputs.add(name=name)
    return request


Parameter = bool | int | float | str


def set_parameter(slot: service_pb2.InferParameter, value: Parameter, key: str) -> None:
    """A KServe request parameter from a Python scalar (bool before int: bool is an int)."""
    if isinstance(value, bool):
        slot.bool_param = value
    elif isinstance(value, int):
        slot.int64_param = value
    elif isinstance(value, float):
        slot.double_param = value
    elif isinstance(value, str):
        slot.string_param = value
    else:
        raise InvalidArgument(f"parameter {key!r}: {type(value).__name__} is not bool, int, float or str")


def decode_parameters(request: service_pb2.ModelInferRequest) -> dict[str, Parameter]:
    """The request's KServe parameters as Python scalars."""
    out: dict[str, Parameter] = {}
    for key, slot in request.parameters.items():
        which = slot.WhichOneof("parameter_choice")
        if which is not None:
            out[key] = getattr(slot, which)
    return out


def encode_response(
    model_name: str,
    outputs: Mapping[str, np.ndarray],
    *,
    model_version: str = "",
    request_id: str = "",
) -> service_pb2.ModelInferResponse:
    response = service_pb2.ModelInferResponse(
        model_name=model_name, model_version=model_version, id=request_id
    )
    for name, array in outputs.items():
        array = np.asarray(array)
        response.outputs.add(name=name, datatype=datatype_of(array), shape=array.shape)
        response.raw_output_contents.append(to_raw(array))
    return response


def decode_response(response: service_pb2.ModelInferResponse) -> dict[str, np.ndarray]:
    raw = response.raw_output_contents
    return {
        t.name: from_raw(t.name, t.datatype, list(t.shape), raw[i]) for i, t in enumerate(response.outputs)
    }
