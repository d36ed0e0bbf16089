from servefleet.api import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ApplyApplicationRequest(_message.Message):
    __slots__ = ("spec", "replicas", "revision", "stage_replicas")
    class StageReplicasEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    SPEC_FIELD_NUMBER: _ClassVar[int]
    REPLICAS_FIELD_NUMBER: _ClassVar[int]
    REVISION_FIELD_NUMBER: _ClassVar[int]
    STAGE_REPLICAS_FIELD_NUMBER: _ClassVar[int]
    spec: _common_pb2.ApplicationSpec
    replicas: int
    revision: int
    stage_replicas: _containers.ScalarMap[str, int]
    def __init__(self, spec: _Optional[_Union[_common_pb2.ApplicationSpec, _Mapping]] = ..., replicas: _Optional[int] = ..., revision: _Optional[int] = ..., stage_replicas: _Optional[_Mapping[str, int]] = ...) -> None: ...

class MasterStatus(_message.Message):
    __slots__ = ("app", "version", "replicas", "ready_replicas", "updating", "revision", "error", "proxy_addresses", "shards")
    APP_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    REPLICAS_FIELD_NUMBER: _ClassVar[int]
    READY_REPLICAS_FIELD_NUMBER: _ClassVar[int]
    UPDATING_FIELD_NUMBER: _ClassVar[int]
    REVISION_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    PROXY_ADDRESSES_FIELD_NUMBER: _ClassVar[int]
    SHARDS_FIELD_NUMBER: _ClassVar[int]
    app: _common_pb2.AppRef
    version: str
    replicas: int
    ready_replicas: int
    updating: bool
    revision: int
    error: str
    proxy_addresses: _containers.RepeatedScalarFieldContainer[str]
    shards: _containers.RepeatedCompositeFieldContainer[_common_pb2.ShardStatus]
    def __init__(self, app: _Optional[_Union[_common_pb2.AppRef, _Mapping]] = ..., version: _Optional[str] = ..., replicas: _Optional[int] = ..., ready_replicas: _Optional[int] = ..., updating: _Optional[bool] = ..., revision: _Optional[int] = ..., error: _Optional[str] = ..., proxy_addresses: _Optional[_Iterable[str]] = ..., shards: _Optional[_Iterable[_Union[_common_pb2.ShardStatus, _Mapping]]] = ...) -> None: ...

class RemoveApplicationRequest(_message.Message):
    __slots__ = ("app",)
    APP_FIELD_NUMBER: _ClassVar[int]
    app: _common_pb2.AppRef
    def __init__(self, app: _Optional[_Union[_common_pb2.AppRef, _Mapping]] = ...) -> None: ...

class RemoveApplicationResponse(_message.Message):
    __slots__ = ("removed",)
    REMOVED_FIELD_NUMBER: _ClassVar[int]
    removed: bool
    def __init__(self, removed: _Optional[bool] = ...) -> None: ...

class GetApplicationStateRequest(_message.Message):
    __slots__ = ("app",)
    APP_FIELD_NUMBER: _ClassVar[int]
    app: _common_pb2.AppRef
    def __init__(self, app: _Optional[_Union[_common_pb2.AppRef, _Mapping]] = ...) -> None: ...

class ListMastersRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListMastersResponse(_message.Message):
    __slots__ = ("masters",)
    MASTERS_FIELD_NUMBER: _ClassVar[int]
    masters: _containers.RepeatedCompositeFieldContainer[MasterStatus]
    def __init__(self, masters: _Optional[_Iterable[_Union[MasterStatus, _Mapping]]] = ...) -> None: ...

class CapacityRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class CapacityResponse(_message.Message):
    __slots__ = ("capacity", "free")
    class CapacityEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    class FreeEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    CAPACITY_FIELD_NUMBER: _ClassVar[int]
    FREE_FIELD_NUMBER: _ClassVar[int]
    capacity: _containers.ScalarMap[str, float]
    free: _containers.ScalarMap[str, float]
    def __init__(self, capacity: _Optional[_Mapping[str, float]] = ..., free: _Optional[_Mapping[str, float]] = ...) -> None: ...
