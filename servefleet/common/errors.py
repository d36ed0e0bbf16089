"""Domain errors and their one translation table to and from gRPC status codes.

Cores raise these; the server interceptor turns them into a status (no RPC method
repeats try/except), and the SDK turns a status back into the same class.
"""

from __future__ import annotations

import grpc


class ServefleetError(Exception):
    """Base of every error a servefleet service reports to its caller."""

    code: grpc.StatusCode = grpc.StatusCode.INTERNAL


class InvalidArgument(ServefleetError):
    code = grpc.StatusCode.INVALID_ARGUMENT


class NotFound(ServefleetError):
    code = grpc.StatusCode.NOT_FOUND


class AlreadyExists(ServefleetError):
    code = grpc.StatusCode.ALREADY_EXISTS


class Conflict(ServefleetError):
    """A compare-and-swap lost: someone else changed the object first."""

    code = grpc.StatusCode.ABORTED


class FailedPrecondition(ServefleetError):
    code = grpc.StatusCode.FAILED_PRECONDITION


class ResourceExhausted(ServefleetError):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class Unavailable(ServefleetError):
    code = grpc.StatusCode.UNAVAILABLE


class DeadlineExceeded(ServefleetError):
    code = grpc.StatusCode.DEADLINE_EXCEEDED


class Unauthenticated(ServefleetError):
    code = grpc.StatusCode.UNAUTHENTICATED


class PermissionDenied(ServefleetError):
    code = grpc.StatusCode.PERMISSION_DENIED


class Cancelled(ServefleetError):
    code = grpc.StatusCode.CANCELLED


class Internal(ServefleetError):
    code = grpc.StatusCode.INTERNAL


_BY_CODE: dict[grpc.StatusCode, type[ServefleetError]] = {
    cls.code: cls
    for cls in (
        InvalidArgument,
        NotFound,
        AlreadyExists,
        Conflict,
        FailedPrecondition,
        ResourceExhausted,
        Unavailable,
        DeadlineExceeded,
        Unauthenticated,
        PermissionDenied,
        Cancelled,
        Internal,
    )
}


def error_for_status(code: grpc.StatusCode, message: str) -> ServefleetError:
    """The domain error for a status code (INTERNAL for codes we don't map)."""
    return _BY_CODE.get(code, Internal)(message or str(code))


def from_rpc_error(error: grpc.RpcError) -> ServefleetError:
    """The domain error for a status received from the wire."""
    code = error.code() if hasattr(error, "code") else grpc.StatusCode.UNKNOWN
    details = error.details() if hasattr(error, "details") else str(error)
    return error_for_status(code, details)
