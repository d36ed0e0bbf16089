from servefleet.api import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class AppState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    APP_STATE_UNSPECIFIED: _ClassVar[AppState]
    PENDING: _ClassVar[AppState]
    DEPLOYING: _ClassVar[AppState]
    RUNNING: _ClassVar[AppState]
    UPDATING: _ClassVar[AppState]
    DEGRADED: _ClassVar[AppState]
    FAILED: _ClassVar[AppState]
    DELETING: _ClassVar[AppState]
    DELETED: _ClassVar[AppState]
APP_STATE_UNSPECIFIED: AppState
PENDING: AppState
DEPLOYING: AppState
RUNNING: AppState
UPDATING: AppState
DEGRADED: AppState
FAILED: AppState
DELETING: AppState
DELETED: AppState

class ClusterPlacement(_message.Message):
    __slots__ = ("cluster", "replicas", "ready_replicas", "version", "shards")
    CLUSTER_FIELD_NUMBER: _ClassVar[int]
    REPLICAS_FIELD_NUMBER: _ClassVar[int]
    READY_REPLICAS_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    SHARDS_FIELD_NUMBER: _ClassVar[int]
    cluster: str
    replicas: int
    ready_replicas: int
    version: str
    shards: _containers.RepeatedCompositeFieldContainer[_common_pb2.ShardStatus]
    def __init__(self, cluster: _Optional[str] = ..., replicas: _Optional[int] = ..., ready_replicas: _Optional[int] = ..., version: _Optional[str] = ..., shards: _Optional[_Iterable[_Union[_common_pb2.ShardStatus, _Mapping]]] = ...) -> None: ...

class Scaling(_message.Message):
    __slots__ = ("by", "reason", "at", "autoscaled", "paused")
    BY_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    AT_FIELD_NUMBER: _ClassVar[int]
    AUTOSCALED_FIELD_NUMBER: _ClassVar[int]
    PAUSED_FIELD_NUMBER: _ClassVar[int]
    by: str
    reason: str
    at: float
    autoscaled: bool
    paused: bool
    def __init__(self, by: _Optional[str] = ..., reason: _Optional[str] = ..., at: _Optional[float] = ..., autoscaled: _Optional[bool] = ..., paused: _Optional[bool] = ...) -> None: ...

class ApplicationStatus(_message.Message):
    __slots__ = ("app", "state", "reason", "spec", "revision", "replicas", "placements", "updated_at", "scaling", "stage_replicas")
    class StageReplicasEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    APP_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    SPEC_FIELD_NUMBER: _ClassVar[int]
    REVISION_FIELD_NUMBER: _ClassVar[int]
    REPLICAS_FIELD_NUMBER: _ClassVar[int]
    PLACEMENTS_FIELD_NUMBER: _ClassVar[int]
    UPDATED_AT_FIELD_NUMBER: _ClassVar[int]
    SCALING_FIELD_NUMBER: _ClassVar[int]
    STAGE_REPLICAS_FIELD_NUMBER: _ClassVar[int]
    app: _common_pb2.AppRef
    state: AppState
    reason: str
    spec: _common_pb2.ApplicationSpec
    revision: int
    replicas: int
    placements: _containers.RepeatedCompositeFieldContainer[ClusterPlacement]
    updated_at: float
    scaling: Scaling
    stage_replicas: _containers.ScalarMap[str, int]
    def __init__(self, app: _Optional[_Union[_common_pb2.AppRef, _Mapping]] = ..., state: _Optional[_Union[AppState, str]] = ..., reason: _Optional[str] = ..., spec: _Optional[_Union[_common_pb2.ApplicationSpec, _Mapping]] = ..., revision: _Optional[int] = ..., replicas: _Optional[int] = ..., placements: _Optional[_Iterable[_Union[ClusterPlacement, _Mapping]]] = ..., updated_at: _Optional[float] = ..., scaling: _Optional[_Union[Scaling, _Mapping]] = ..., stage_replicas: _Optional[_Mapping[str, int]] = ...) -> None: ...

class StatusEvent(_message.Message):
    __slots__ = ("app", "state", "reason", "revision", "at")
    APP_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    REVISION_FIELD_NUMBER: _ClassVar[int]
    AT_FIELD_NUMBER: _ClassVar[int]
    app: _common_pb2.AppRef
    state: AppState
    reason: str
    revision: int
    at: float
    def __init__(self, app: _Optional[_Union[_common_pb2.AppRef, _Mapping]] = ..., state: _Optional[_Union[AppState, str]] = ..., reason: _Optional[str] = ..., revision: _Optional[int] = ..., at: _Optional[float] = ...) -> None: ...

class SubmitApplicationRequest(_message.Message):
    __slots__ = ("spec",)
    SPEC_FIELD_NUMBER: _ClassVar[int]
    spec: _common_pb2.ApplicationSpec
    def __init__(self, spec: _Optional[_Union[_common_pb2.ApplicationSpec, _Mapping]] = ...) -> None: ...

class GetApplicationRequest(_message.Message):
    __slots__ = ("app",)
    APP_FIELD_NUMBER: _ClassVar[int]
    app: _common_pb2.AppRef
    def __init__(self, app: _Optional[_Union[_common_pb2.AppRef, _Mapping]] = ...) -> None: ...

class ListApplicationsRequest(_message.Message):
    __slots__ = ("namespace", "label_selector", "state", "page_size", "page_token")
    class LabelSelectorEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    NAMESPACE_FIELD_NUMBER: _ClassVar[int]
    LABEL_SELECTOR_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    namespace: str
    label_selector: _containers.ScalarMap[str, str]
    state: AppState
    page_size: int
    page_token: str
    def __init__(self, namespace: _Optional[str] = ..., label_selector: _Optional[_Mapping[str, str]] = ..., state: _Optional[_Union[AppState, str]] = ..., page_size: _Optional[int] = ..., page_token: _Optional[str] = ...) -> None: ...

class ListApplicationsResponse(_message.Message):
    __slots__ = ("applications", "next_page_token")
    APPLICATIONS_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    applications: _containers.RepeatedCompositeFieldContainer[ApplicationStatus]
    next_page_token: str
    def __init__(self, applications: _Optional[_Iterable[_Union[ApplicationStatus, _Mapping]]] = ..., next_page_token: _Optional[str] = ...) -> None: ...

class UpdateApplicationRequest(_message.Message):
    __slots__ = ("spec", "expected_revision")
    SPEC_FIELD_NUMBER: _ClassVar[int]
    EXPECTED_REVISION_FIELD_NUMBER: _ClassVar[int]
    spec: _common_pb2.ApplicationSpec
    expected_revision: int
    def __init__(self, spec: _Optional[_Union[_common_pb2.ApplicationSpec, _Mapping]] = ..., expected_revision: _Optional[int] = ...) -> None: ...

class ScaleApplicationRequest(_message.Message):
    __slots__ = ("app", "replicas", "expected_revision", "reason", "by_autoscaler", "resume_autoscaling", "stage")
    APP_FIELD_NUMBER: _ClassVar[int]
    REPLICAS_FIELD_NUMBER: _ClassVar[int]
    EXPECTED_REVISION_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    BY_AUTOSCALER_FIELD_NUMBER: _ClassVar[int]
    RESUME_AUTOSCALING_FIELD_NUMBER: _ClassVar[int]
    STAGE_FIELD_NUMBER: _ClassVar[int]
    app: _common_pb2.AppRef
    replicas: int
    expected_revision: int
    reason: str
    by_autoscaler: bool
    resume_autoscaling: bool
    stage: str
    def __init__(self, app: _Optional[_Union[_common_pb2.AppRef, _Mapping]] = ..., replicas: _Optional[int] = ..., expected_revision: _Optional[int] = ..., reason: _Optional[str] = ..., by_autoscaler: _Optional[bool] = ..., resume_autoscaling: _Optional[bool] = ..., stage: _Optional[str] = ...) -> None: ...

class DeleteApplicationRequest(_message.Message):
    __slots__ = ("app",)
    APP_FIELD_NUMBER: _ClassVar[int]
    app: _common_pb2.AppRef
    def __init__(self, app: _Optional[_Union[_common_pb2.AppRef, _Mapping]] = ...) -> None: ...

class WatchApplicationRequest(_message.Message):
    __slots__ = ("app",)
    APP_FIELD_NUMBER: _ClassVar[int]
    app: _common_pb2.AppRef
    def __init__(self, app: _Optional[_Union[_common_pb2.AppRef, _Mapping]] = ...) -> None: ...

class ClusterInfo(_message.Message):
    __slots__ = ("name", "agent_address", "ray_address", "labels", "capacity", "free", "heartbeat_at", "alive")
    class LabelsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
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
    NAME_FIELD_NUMBER: _ClassVar[int]
    AGENT_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    RAY_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    CAPACITY_FIELD_NUMBER: _ClassVar[int]
    FREE_FIELD_NUMBER: _ClassVar[int]
    HEARTBEAT_AT_FIELD_NUMBER: _ClassVar[int]
    ALIVE_FIELD_NUMBER: _ClassVar[int]
    name: str
    agent_address: str
    ray_address: str
    labels: _containers.ScalarMap[str, str]
    capacity: _containers.ScalarMap[str, float]
    free: _containers.ScalarMap[str, float]
    heartbeat_at: float
    alive: bool
    def __init__(self, name: _Optional[str] = ..., agent_address: _Optional[str] = ..., ray_address: _Optional[str] = ..., labels: _Optional[_Mapping[str, str]] = ..., capacity: _Optional[_Mapping[str, float]] = ..., free: _Optional[_Mapping[str, float]] = ..., heartbeat_at: _Optional[float] = ..., alive: _Optional[bool] = ...) -> None: ...

class RegisterClusterRequest(_message.Message):
    __slots__ = ("cluster",)
    CLUSTER_FIELD_NUMBER: _ClassVar[int]
    cluster: ClusterInfo
    def __init__(self, cluster: _Optional[_Union[ClusterInfo, _Mapping]] = ...) -> None: ...

class RegisterClusterResponse(_message.Message):
    __slots__ = ("heartbeat_interval_s",)
    HEARTBEAT_INTERVAL_S_FIELD_NUMBER: _ClassVar[int]
    heartbeat_interval_s: int
    def __init__(self, heartbeat_interval_s: _Optional[int] = ...) -> None: ...

class ListClustersRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListClustersResponse(_message.Message):
    __slots__ = ("clusters",)
    CLUSTERS_FIELD_NUMBER: _ClassVar[int]
    clusters: _containers.RepeatedCompositeFieldContainer[ClusterInfo]
    def __init__(self, clusters: _Optional[_Iterable[_Union[ClusterInfo, _Mapping]]] = ...) -> None: ...

class Quota(_message.Message):
    __slots__ = ("max_applications", "max_replicas", "max_cpus", "max_gpus")
    MAX_APPLICATIONS_FIELD_NUMBER: _ClassVar[int]
    MAX_REPLICAS_FIELD_NUMBER: _ClassVar[int]
    MAX_CPUS_FIELD_NUMBER: _ClassVar[int]
    MAX_GPUS_FIELD_NUMBER: _ClassVar[int]
    max_applications: int
    max_replicas: int
    max_cpus: float
    max_gpus: float
    def __init__(self, max_applications: _Optional[int] = ..., max_replicas: _Optional[int] = ..., max_cpus: _Optional[float] = ..., max_gpus: _Optional[float] = ...) -> None: ...

class CreateTenantRequest(_message.Message):
    __slots__ = ("tenant", "namespaces", "quota")
    TENANT_FIELD_NUMBER: _ClassVar[int]
    NAMESPACES_FIELD_NUMBER: _ClassVar[int]
    QUOTA_FIELD_NUMBER: _ClassVar[int]
    tenant: str
    namespaces: _containers.RepeatedScalarFieldContainer[str]
    quota: Quota
    def __init__(self, tenant: _Optional[str] = ..., namespaces: _Optional[_Iterable[str]] = ..., quota: _Optional[_Union[Quota, _Mapping]] = ...) -> None: ...

class TenantInfo(_message.Message):
    __slots__ = ("tenant", "namespaces", "quota")
    TENANT_FIELD_NUMBER: _ClassVar[int]
    NAMESPACES_FIELD_NUMBER: _ClassVar[int]
    QUOTA_FIELD_NUMBER: _ClassVar[int]
    tenant: str
    namespaces: _containers.RepeatedScalarFieldContainer[str]
    quota: Quota
    def __init__(self, tenant: _Optional[str] = ..., namespaces: _Optional[_Iterable[str]] = ..., quota: _Optional[_Union[Quota, _Mapping]] = ...) -> None: ...

class IssueTokenRequest(_message.Message):
    __slots__ = ("tenant", "role", "app", "description")
    TENANT_FIELD_NUMBER: _ClassVar[int]
    ROLE_FIELD_NUMBER: _ClassVar[int]
    APP_FIELD_NUMBER: _ClassVar[int]
    DESCRIPTION_FIELD_NUMBER: _ClassVar[int]
    tenant: str
    role: str
    app: _common_pb2.AppRef
    description: str
    def __init__(self, tenant: _Optional[str] = ..., role: _Optional[str] = ..., app: _Optional[_Union[_common_pb2.AppRef, _Mapping]] = ..., description: _Optional[str] = ...) -> None: ...

class IssueTokenResponse(_message.Message):
    __slots__ = ("token", "token_id")
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    TOKEN_ID_FIELD_NUMBER: _ClassVar[int]
    token: str
    token_id: str
    def __init__(self, token: _Optional[str] = ..., token_id: _Optional[str] = ...) -> None: ...

class TokenInfo(_message.Message):
    __slots__ = ("token_id", "tenant", "role", "app", "description", "created_at")
    TOKEN_ID_FIELD_NUMBER: _ClassVar[int]
    TENANT_FIELD_NUMBER: _ClassVar[int]
    ROLE_FIELD_NUMBER: _ClassVar[int]
    APP_FIELD_NUMBER: _ClassVar[int]
    DESCRIPTION_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    token_id: str
    tenant: str
    role: str
    app: _common_pb2.AppRef
    description: str
    created_at: float
    def __init__(self, token_id: _Optional[str] = ..., tenant: _Optional[str] = ..., role: _Optional[str] = ..., app: _Optional[_Union[_common_pb2.AppRef, _Mapping]] = ..., description: _Optional[str] = ..., created_at: _Optional[float] = ...) -> None: ...

class ListTokensRequest(_message.Message):
    __slots__ = ("tenant",)
    TENANT_FIELD_NUMBER: _ClassVar[int]
    tenant: str
    def __init__(self, tenant: _Optional[str] = ...) -> None: ...

class ListTokensResponse(_message.Message):
    __slots__ = ("tokens",)
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    tokens: _containers.RepeatedCompositeFieldContainer[TokenInfo]
    def __init__(self, tokens: _Optional[_Iterable[_Union[TokenInfo, _Mapping]]] = ...) -> None: ...

class RevokeTokenRequest(_message.Message):
    __slots__ = ("token_id",)
    TOKEN_ID_FIELD_NUMBER: _ClassVar[int]
    token_id: str
    def __init__(self, token_id: _Optional[str] = ...) -> None: ...

class RevokeTokenResponse(_message.Message):
    __slots__ = ("token",)
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    token: TokenInfo
    def __init__(self, token: _Optional[_Union[TokenInfo, _Mapping]] = ...) -> None: ...

class SetQuotaRequest(_message.Message):
    __slots__ = ("tenant", "quota")
    TENANT_FIELD_NUMBER: _ClassVar[int]
    QUOTA_FIELD_NUMBER: _ClassVar[int]
    tenant: str
    quota: Quota
    def __init__(self, tenant: _Optional[str] = ..., quota: _Optional[_Union[Quota, _Mapping]] = ...) -> None: ...

class DesiredState(_message.Message):
    __slots__ = ("spec", "replicas", "deleting", "tenant", "created_at", "scaling", "stage_replicas")
    class StageReplicasEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    SPEC_FIELD_NUMBER: _ClassVar[int]
    REPLICAS_FIELD_NUMBER: _ClassVar[int]
    DELETING_FIELD_NUMBER: _ClassVar[int]
    TENANT_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    SCALING_FIELD_NUMBER: _ClassVar[int]
    STAGE_REPLICAS_FIELD_NUMBER: _ClassVar[int]
    spec: _common_pb2.ApplicationSpec
    replicas: int
    deleting: bool
    tenant: str
    created_at: float
    scaling: Scaling
    stage_replicas: _containers.ScalarMap[str, int]
    def __init__(self, spec: _Optional[_Union[_common_pb2.ApplicationSpec, _Mapping]] = ..., replicas: _Optional[int] = ..., deleting: _Optional[bool] = ..., tenant: _Optional[str] = ..., created_at: _Optional[float] = ..., scaling: _Optional[_Union[Scaling, _Mapping]] = ..., stage_replicas: _Optional[_Mapping[str, int]] = ...) -> None: ...

class TokenRecord(_message.Message):
    __slots__ = ("tenant", "role", "created_at", "app", "description")
    TENANT_FIELD_NUMBER: _ClassVar[int]
    ROLE_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    APP_FIELD_NUMBER: _ClassVar[int]
    DESCRIPTION_FIELD_NUMBER: _ClassVar[int]
    tenant: str
    role: str
    created_at: float
    app: _common_pb2.AppRef
    description: str
    def __init__(self, tenant: _Optional[str] = ..., role: _Optional[str] = ..., created_at: _Optional[float] = ..., app: _Optional[_Union[_common_pb2.AppRef, _Mapping]] = ..., description: _Optional[str] = ...) -> None: ...
