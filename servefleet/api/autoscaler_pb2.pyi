from servefleet.api import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class GetAutoscalerStateRequest(_message.Message):
    __slots__ = ("app",)
    APP_FIELD_NUMBER: _ClassVar[int]
    app: _common_pb2.AppRef
    def __init__(self, app: _Optional[_Union[_common_pb2.AppRef, _Mapping]] = ...) -> None: ...

class AppAutoscalerState(_message.Message):
    __slots__ = ("app", "mode", "replicas", "desired", "reason", "history_samples", "history_start", "forecast_error", "startup_s", "scale_events", "ongoing", "arrival_rate")
    APP_FIELD_NUMBER: _ClassVar[int]
    MODE_FIELD_NUMBER: _ClassVar[int]
    REPLICAS_FIELD_NUMBER: _ClassVar[int]
    DESIRED_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    HISTORY_SAMPLES_FIELD_NUMBER: _ClassVar[int]
    HISTORY_START_FIELD_NUMBER: _ClassVar[int]
    FORECAST_ERROR_FIELD_NUMBER: _ClassVar[int]
    STARTUP_S_FIELD_NUMBER: _ClassVar[int]
    SCALE_EVENTS_FIELD_NUMBER: _ClassVar[int]
    ONGOING_FIELD_NUMBER: _ClassVar[int]
    ARRIVAL_RATE_FIELD_NUMBER: _ClassVar[int]
    app: _common_pb2.AppRef
    mode: str
    replicas: int
    desired: int
    reason: str
    history_samples: int
    history_start: float
    forecast_error: float
    startup_s: float
    scale_events: int
    ongoing: float
    arrival_rate: float
    def __init__(self, app: _Optional[_Union[_common_pb2.AppRef, _Mapping]] = ..., mode: _Optional[str] = ..., replicas: _Optional[int] = ..., desired: _Optional[int] = ..., reason: _Optional[str] = ..., history_samples: _Optional[int] = ..., history_start: _Optional[float] = ..., forecast_error: _Optional[float] = ..., startup_s: _Optional[float] = ..., scale_events: _Optional[int] = ..., ongoing: _Optional[float] = ..., arrival_rate: _Optional[float] = ...) -> None: ...

class AutoscalerState(_message.Message):
    __slots__ = ("leading", "apps")
    LEADING_FIELD_NUMBER: _ClassVar[int]
    APPS_FIELD_NUMBER: _ClassVar[int]
    leading: bool
    apps: _containers.RepeatedCompositeFieldContainer[AppAutoscalerState]
    def __init__(self, leading: _Optional[bool] = ..., apps: _Optional[_Iterable[_Union[AppAutoscalerState, _Mapping]]] = ...) -> None: ...
