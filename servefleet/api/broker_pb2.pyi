from servefleet.api import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class SubmitRequest(_message.Message):
    __slots__ = ("app", "infer_request", "priority", "idempotency_key", "ttl_s")
    APP_FIELD_NUMBER: _ClassVar[int]
    INFER_REQUEST_FIELD_NUMBER: _ClassVar[int]
    PRIORITY_FIELD_NUMBER: _ClassVar[int]
    IDEMPOTENCY_KEY_FIELD_NUMBER: _ClassVar[int]
    TTL_S_FIELD_NUMBER: _ClassVar[int]
    app: _common_pb2.AppRef
    infer_request: bytes
    priority: int
    idempotency_key: str
    ttl_s: int
    def __init__(self, app: _Optional[_Union[_common_pb2.AppRef, _Mapping]] = ..., infer_request: _Optional[bytes] = ..., priority: _Optional[int] = ..., idempotency_key: _Optional[str] = ..., ttl_s: _Optional[int] = ...) -> None: ...

class SubmitResponse(_message.Message):
    __slots__ = ("ticket", "duplicate")
    TICKET_FIELD_NUMBER: _ClassVar[int]
    DUPLICATE_FIELD_NUMBER: _ClassVar[int]
    ticket: str
    duplicate: bool
    def __init__(self, ticket: _Optional[str] = ..., duplicate: _Optional[bool] = ...) -> None: ...

class TicketStatus(_message.Message):
    __slots__ = ("ticket", "state", "infer_response", "error", "deliveries")
    class State(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        STATE_UNSPECIFIED: _ClassVar[TicketStatus.State]
        QUEUED: _ClassVar[TicketStatus.State]
        RUNNING: _ClassVar[TicketStatus.State]
        DONE: _ClassVar[TicketStatus.State]
        FAILED: _ClassVar[TicketStatus.State]
        EXPIRED: _ClassVar[TicketStatus.State]
        CANCELLED: _ClassVar[TicketStatus.State]
    STATE_UNSPECIFIED: TicketStatus.State
    QUEUED: TicketStatus.State
    RUNNING: TicketStatus.State
    DONE: TicketStatus.State
    FAILED: TicketStatus.State
    EXPIRED: TicketStatus.State
    CANCELLED: TicketStatus.State
    TICKET_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    INFER_RESPONSE_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    DELIVERIES_FIELD_NUMBER: _ClassVar[int]
    ticket: str
    state: TicketStatus.State
    infer_response: bytes
    error: str
    deliveries: int
    def __init__(self, ticket: _Optional[str] = ..., state: _Optional[_Union[TicketStatus.State, str]] = ..., infer_response: _Optional[bytes] = ..., error: _Optional[str] = ..., deliveries: _Optional[int] = ...) -> None: ...

class GetResultRequest(_message.Message):
    __slots__ = ("ticket", "wait_timeout_s")
    TICKET_FIELD_NUMBER: _ClassVar[int]
    WAIT_TIMEOUT_S_FIELD_NUMBER: _ClassVar[int]
    ticket: str
    wait_timeout_s: float
    def __init__(self, ticket: _Optional[str] = ..., wait_timeout_s: _Optional[float] = ...) -> None: ...

class WatchResultRequest(_message.Message):
    __slots__ = ("ticket",)
    TICKET_FIELD_NUMBER: _ClassVar[int]
    ticket: str
    def __init__(self, ticket: _Optional[str] = ...) -> None: ...

class CancelRequest(_message.Message):
    __slots__ = ("ticket",)
    TICKET_FIELD_NUMBER: _ClassVar[int]
    ticket: str
    def __init__(self, ticket: _Optional[str] = ...) -> None: ...

class QueueStatsRequest(_message.Message):
    __slots__ = ("app",)
    APP_FIELD_NUMBER: _ClassVar[int]
    app: _common_pb2.AppRef
    def __init__(self, app: _Optional[_Union[_common_pb2.AppRef, _Mapping]] = ...) -> None: ...

class QueueStatsResponse(_message.Message):
    __slots__ = ("depth", "in_flight", "oldest_age_s", "submit_rate", "complete_rate", "dead_letters", "duplicate_executions", "workers")
    DEPTH_FIELD_NUMBER: _ClassVar[int]
    IN_FLIGHT_FIELD_NUMBER: _ClassVar[int]
    OLDEST_AGE_S_FIELD_NUMBER: _ClassVar[int]
    SUBMIT_RATE_FIELD_NUMBER: _ClassVar[int]
    COMPLETE_RATE_FIELD_NUMBER: _ClassVar[int]
    DEAD_LETTERS_FIELD_NUMBER: _ClassVar[int]
    DUPLICATE_EXECUTIONS_FIELD_NUMBER: _ClassVar[int]
    WORKERS_FIELD_NUMBER: _ClassVar[int]
    depth: int
    in_flight: int
    oldest_age_s: float
    submit_rate: float
    complete_rate: float
    dead_letters: int
    duplicate_executions: int
    workers: int
    def __init__(self, depth: _Optional[int] = ..., in_flight: _Optional[int] = ..., oldest_age_s: _Optional[float] = ..., submit_rate: _Optional[float] = ..., complete_rate: _Optional[float] = ..., dead_letters: _Optional[int] = ..., duplicate_executions: _Optional[int] = ..., workers: _Optional[int] = ...) -> None: ...

class WorkerCredentialRequest(_message.Message):
    __slots__ = ("app", "rotate")
    APP_FIELD_NUMBER: _ClassVar[int]
    ROTATE_FIELD_NUMBER: _ClassVar[int]
    app: _common_pb2.AppRef
    rotate: bool
    def __init__(self, app: _Optional[_Union[_common_pb2.AppRef, _Mapping]] = ..., rotate: _Optional[bool] = ...) -> None: ...

class WorkerCredential(_message.Message):
    __slots__ = ("redis", "mode", "sentinel_master", "username", "password")
    REDIS_FIELD_NUMBER: _ClassVar[int]
    MODE_FIELD_NUMBER: _ClassVar[int]
    SENTINEL_MASTER_FIELD_NUMBER: _ClassVar[int]
    USERNAME_FIELD_NUMBER: _ClassVar[int]
    PASSWORD_FIELD_NUMBER: _ClassVar[int]
    redis: _containers.RepeatedScalarFieldContainer[str]
    mode: str
    sentinel_master: str
    username: str
    password: str
    def __init__(self, redis: _Optional[_Iterable[str]] = ..., mode: _Optional[str] = ..., sentinel_master: _Optional[str] = ..., username: _Optional[str] = ..., password: _Optional[str] = ...) -> None: ...
