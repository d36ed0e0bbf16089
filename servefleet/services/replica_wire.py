"""How a proxy and a replica talk: the replica's own gRPC service, and answers as
``(status code, payload)`` tuples (cheap to pickle across a Ray call; payload is the serialized
ModelInferResponse on OK, the error message otherwise).

A replica's error has one form from the replica to the SDK: a domain error (``common.errors``)
with one code and one message. It travels as ``(code, message)`` over Ray, as status and details
over gRPC (the replica's and the proxy's ``GrpcServer`` interceptor), and ``common.errors``' one
table turns it back into the same class with the same message at the proxy and in the SDK."""

from __future__ import annotations

import grpc

from servefleet.common.errors import ServefleetError, error_for_status

#: The replica's own gRPC service (raw bytes in and out: ModelInferRequest -> ModelInferResponse).
REPLICA_SERVICE = "servefleet.Replica"
#: A shard replica's lookup method: raw little-endian int64 keys in, float32 rows [k, 1 + dim] out
#: (plain arrays both ways: nothing to encode or parse on the router's hot path).
SHARD_LOOKUP = "/servefleet.Shard/Lookup"
#: What a replica answers: ``(OK, response bytes)`` or ``(code, message)``.
Answer = tuple[int, bytes | str]


def code(status: grpc.StatusCode) -> int:
    """The integer of a status code: replicas answer (code, payload) tuples, cheap to pickle."""
    return int(status.value[0])


OK = code(grpc.StatusCode.OK)
CODES: dict[int, grpc.StatusCode] = {code(s): s for s in grpc.StatusCode}


def error_for(status: int, message: str) -> ServefleetError:
    """The domain error for a replica's status (the server interceptor turns it back into it)."""
    return error_for_status(CODES.get(status, grpc.StatusCode.INTERNAL), message)
