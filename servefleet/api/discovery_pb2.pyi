from servefleet.api import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Endpoint(_message.Message):
    __slots__ = ("id", "app", "version", "kind", "address", "labels", "weight", "load_hint")
    class LabelsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    ID_FIELD_NUMBER: _ClassVar[int]
    APP_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_FIELD_NUMBER: _ClassVar[int]
    LOAD_HINT_FIELD_NUMBER: _ClassVar[int]
    id: str
    app: _common_pb2.AppRef
    version: str
    kind: str
    address: str
    labels: _containers.ScalarMap[str, str]
    weight: float
    load_hint: float
    def __init__(self, id: _Optional[str] = ..., app: _Optional[_Union[_common_pb2.AppRef, _Mapping]] = ..., version: _Optional[str] = ..., kind: _Optional[str] = ..., address: _Optional[str] = ..., labels: _Optional[_Mapping[str, str]] = ..., weight: _Optional[float] = ..., load_hint: _Optional[float] = ...) -> None: ...

class RegisterRequest(_message.Message):
    __slots__ = ("endpoint", "ttl_s", "lease_id")
    ENDPOINT_FIELD_NUMBER: _ClassVar[int]
    TTL_S_FIELD_NUMBER: _ClassVar[int]
    LEASE_ID_FIELD_NUMBER: _ClassVar[int]
    endpoint: Endpoint
    ttl_s: int
    lease_id: int
    def __init__(self, endpoint: _Optional[_Union[Endpoint, _Mapping]] = ..., ttl_s: _Optional[int] = ..., lease_id: _Optional[int] = ...) -> None: ...

class RegisterResponse(_message.Message):
    __slots__ = ("endpoint_id", "lease_id", "ttl_s", "revision")
    ENDPOINT_ID_FIELD_NUMBER: _ClassVar[int]
    LEASE_ID_FIELD_NUMBER: _ClassVar[int]
    TTL_S_FIELD_NUMBER: _ClassVar[int]
    REVISION_FIELD_NUMBER: _ClassVar[int]
    endpoint_id: str
    lease_id: int
    ttl_s: int
    revision: int
    def __init__(self, endpoint_id: _Optional[str] = ..., lease_id: _Optional[int] = ..., ttl_s: _Optional[int] = ..., revision: _Optional[int] = ...) -> None: ...

class KeepAliveRequest(_message.Message):
    __slots__ = ("lease_id",)
    LEASE_ID_FIELD_NUMBER: _ClassVar[int]
    lease_id: int
    def __init__(self, lease_id: _Optional[int] = ...) -> None: ...

class KeepAliveResponse(_message.Message):
    __slots__ = ("lease_id", "ttl_s")
    LEASE_ID_FIELD_NUMBER: _ClassVar[int]
    TTL_S_FIELD_NUMBER: _ClassVar[int]
    lease_id: int
    ttl_s: int
    def __init__(self, lease_id: _Optional[int] = ..., ttl_s: _Optional[int] = ...) -> None: ...

class DeregisterRequest(_message.Message):
    __slots__ = ("app", "endpoint_id", "lease_id")
    APP_FIELD_NUMBER: _ClassVar[int]
    ENDPOINT_ID_FIELD_NUMBER: _ClassVar[int]
    LEASE_ID_FIELD_NUMBER: _ClassVar[int]
    app: _common_pb2.AppRef
    endpoint_id: str
    lease_id: int
    def __init__(self, app: _Optional[_Union[_common_pb2.AppRef, _Mapping]] = ..., endpoint_id: _Optional[str] = ..., lease_id: _Optional[int] = ...) -> None: ...

class DeregisterResponse(_message.Message):
    __slots__ = ("revision",)
    REVISION_FIELD_NUMBER: _ClassVar[int]
    revision: int
    def __init__(self, revision: _Optional[int] = ...) -> None: ...

class ResolveRequest(_message.Message):
    __slots__ = ("app", "kind", "label_filter")
    class LabelFilterEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    APP_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    LABEL_FILTER_FIELD_NUMBER: _ClassVar[int]
    app: _common_pb2.AppRef
    kind: str
    label_filter: _containers.ScalarMap[str, str]
    def __init__(self, app: _Optional[_Union[_common_pb2.AppRef, _Mapping]] = ..., kind: _Optional[str] = ..., label_filter: _Optional[_Mapping[str, str]] = ...) -> None: ...

class ResolveResponse(_message.Message):
    __slots__ = ("endpoints", "revision")
    ENDPOINTS_FIELD_NUMBER: _ClassVar[int]
    REVISION_FIELD_NUMBER: _ClassVar[int]
    endpoints: _containers.RepeatedCompositeFieldContainer[Endpoint]
    revision: int
    def __init__(self, endpoints: _Optional[_Iterable[_Union[Endpoint, _Mapping]]] = ..., revision: _Optional[int] = ...) -> None: ...

class WatchRequest(_message.Message):
    __slots__ = ("app", "from_revision")
    APP_FIELD_NUMBER: _ClassVar[int]
    FROM_REVISION_FIELD_NUMBER: _ClassVar[int]
    app: _common_pb2.AppRef
    from_revision: int
    def __init__(self, app: _Optional[_Union[_common_pb2.AppRef, _Mapping]] = ..., from_revision: _Optional[int] = ...) -> None: ...

class WatchEvent(_message.Message):
    __slots__ = ("type", "endpoints", "revision", "compacted")
    class Type(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        TYPE_UNSPECIFIED: _ClassVar[WatchEvent.Type]
        SNAPSHOT: _ClassVar[WatchEvent.Type]
        ADDED: _ClassVar[WatchEvent.Type]
        UPDATED: _ClassVar[WatchEvent.Type]
        REMOVED: _ClassVar[WatchEvent.Type]
    TYPE_UNSPECIFIED: WatchEvent.Type
    SNAPSHOT: WatchEvent.Type
    ADDED: WatchEvent.Type
    UPDATED: WatchEvent.Type
    REMOVED: WatchEvent.Type
    TYPE_FIELD_NUMBER: _ClassVar[int]
    ENDPOINTS_FIELD_NUMBER: _ClassVar[int]
    REVISION_FIELD_NUMBER: _ClassVar[int]
    COMPACTED_FIELD_NUMBER: _ClassVar[int]
    type: WatchEvent.Type
    endpoints: _containers.RepeatedCompositeFieldContainer[Endpoint]
    revision: int
    compacted: bool
    def __init__(self, type: _Optional[_Union[WatchEvent.Type, str]] = ..., endpoints: _Optional[_Iterable[_Union[Endpoint, _Mapping]]] = ..., revision: _Optional[int] = ..., compacted: _Optional[bool] = ...) -> None: ...
