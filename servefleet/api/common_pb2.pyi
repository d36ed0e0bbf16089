from google.protobuf import struct_pb2 as _struct_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class AppRef(_message.Message):
    __slots__ = ("namespace", "name")
    NAMESPACE_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    namespace: str
    name: str
    def __init__(self, namespace: _Optional[str] = ..., name: _Optional[str] = ...) -> None: ...

class TensorSpec(_message.Message):
    __slots__ = ("name", "datatype", "shape")
    NAME_FIELD_NUMBER: _ClassVar[int]
    DATATYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    name: str
    datatype: str
    shape: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, name: _Optional[str] = ..., datatype: _Optional[str] = ..., shape: _Optional[_Iterable[int]] = ...) -> None: ...

class Resources(_message.Message):
    __slots__ = ("num_cpus", "num_gpus", "memory", "custom")
    class CustomEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    NUM_CPUS_FIELD_NUMBER: _ClassVar[int]
    NUM_GPUS_FIELD_NUMBER: _ClassVar[int]
    MEMORY_FIELD_NUMBER: _ClassVar[int]
    CUSTOM_FIELD_NUMBER: _ClassVar[int]
    num_cpus: float
    num_gpus: float
    memory: int
    custom: _containers.ScalarMap[str, float]
    def __init__(self, num_cpus: _Optional[float] = ..., num_gpus: _Optional[float] = ..., memory: _Optional[int] = ..., custom: _Optional[_Mapping[str, float]] = ...) -> None: ...

class RuntimeEnv(_message.Message):
    __slots__ = ("pip", "env_vars")
    class EnvVarsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    PIP_FIELD_NUMBER: _ClassVar[int]
    ENV_VARS_FIELD_NUMBER: _ClassVar[int]
    pip: _containers.RepeatedScalarFieldContainer[str]
    env_vars: _containers.ScalarMap[str, str]
    def __init__(self, pip: _Optional[_Iterable[str]] = ..., env_vars: _Optional[_Mapping[str, str]] = ...) -> None: ...

class ReplicaRange(_message.Message):
    __slots__ = ("min", "max", "initial")
    MIN_FIELD_NUMBER: _ClassVar[int]
    MAX_FIELD_NUMBER: _ClassVar[int]
    INITIAL_FIELD_NUMBER: _ClassVar[int]
    min: int
    max: int
    initial: int
    def __init__(self, min: _Optional[int] = ..., max: _Optional[int] = ..., initial: _Optional[int] = ...) -> None: ...

class BatchingConfig(_message.Message):
    __slots__ = ("max_batch_size", "batch_wait_timeout_ms")
    MAX_BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    BATCH_WAIT_TIMEOUT_MS_FIELD_NUMBER: _ClassVar[int]
    max_batch_size: int
    batch_wait_timeout_ms: float
    def __init__(self, max_batch_size: _Optional[int] = ..., batch_wait_timeout_ms: _Optional[float] = ...) -> None: ...

class AsyncConfig(_message.Message):
    __slots__ = ("enabled", "max_stream_length", "max_deliveries", "result_ttl_s")
    ENABLED_FIELD_NUMBER: _ClassVar[int]
    MAX_STREAM_LENGTH_FIELD_NUMBER: _ClassVar[int]
    MAX_DELIVERIES_FIELD_NUMBER: _ClassVar[int]
    RESULT_TTL_S_FIELD_NUMBER: _ClassVar[int]
    enabled: bool
    max_stream_length: int
    max_deliveries: int
    result_ttl_s: int
    def __init__(self, enabled: _Optional[bool] = ..., max_stream_length: _Optional[int] = ..., max_deliveries: _Optional[int] = ..., result_ttl_s: _Optional[int] = ...) -> None: ...

class PlacementConstraints(_message.Message):
    __slots__ = ("cluster_labels", "spread")
    class ClusterLabelsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    CLUSTER_LABELS_FIELD_NUMBER: _ClassVar[int]
    SPREAD_FIELD_NUMBER: _ClassVar[int]
    cluster_labels: _containers.ScalarMap[str, str]
    spread: int
    def __init__(self, cluster_labels: _Optional[_Mapping[str, str]] = ..., spread: _Optional[int] = ...) -> None: ...

class TritonConfig(_message.Message):
    __slots__ = ("model_repository", "args")
    class ArgsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    MODEL_REPOSITORY_FIELD_NUMBER: _ClassVar[int]
    ARGS_FIELD_NUMBER: _ClassVar[int]
    model_repository: str
    args: _containers.ScalarMap[str, str]
    def __init__(self, model_repository: _Optional[str] = ..., args: _Optional[_Mapping[str, str]] = ...) -> None: ...

class ShardingConfig(_message.Message):
    __slots__ = ("shards", "replicas_per_shard", "partitioning", "key_input", "table", "merge")
    SHARDS_FIELD_NUMBER: _ClassVar[int]
    REPLICAS_PER_SHARD_FIELD_NUMBER: _ClassVar[int]
    PARTITIONING_FIELD_NUMBER: _ClassVar[int]
    KEY_INPUT_FIELD_NUMBER: _ClassVar[int]
    TABLE_FIELD_NUMBER: _ClassVar[int]
    MERGE_FIELD_NUMBER: _ClassVar[int]
    shards: int
    replicas_per_shard: int
    partitioning: str
    key_input: str
    table: str
    merge: str
    def __init__(self, shards: _Optional[int] = ..., replicas_per_shard: _Optional[int] = ..., partitioning: _Optional[str] = ..., key_input: _Optional[str] = ..., table: _Optional[str] = ..., merge: _Optional[str] = ...) -> None: ...

class ShardStatus(_message.Message):
    __slots__ = ("shard", "replica", "node_id", "layout", "rows", "table_bytes", "resident_bytes", "ready")
    SHARD_FIELD_NUMBER: _ClassVar[int]
    REPLICA_FIELD_NUMBER: _ClassVar[int]
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    LAYOUT_FIELD_NUMBER: _ClassVar[int]
    ROWS_FIELD_NUMBER: _ClassVar[int]
    TABLE_BYTES_FIELD_NUMBER: _ClassVar[int]
    RESIDENT_BYTES_FIELD_NUMBER: _ClassVar[int]
    READY_FIELD_NUMBER: _ClassVar[int]
    shard: int
    replica: str
    node_id: str
    layout: str
    rows: int
    table_bytes: int
    resident_bytes: int
    ready: bool
    def __init__(self, shard: _Optional[int] = ..., replica: _Optional[str] = ..., node_id: _Optional[str] = ..., layout: _Optional[str] = ..., rows: _Optional[int] = ..., table_bytes: _Optional[int] = ..., resident_bytes: _Optional[int] = ..., ready: _Optional[bool] = ...) -> None: ...

class AutoscalingConfig(_message.Message):
    __slots__ = ("target_ongoing_requests", "min_replicas", "max_replicas", "upscale_delay_s", "downscale_delay_s", "mode", "burst_factor", "history_window_s", "forecast_horizon_s", "startup_s", "season_s", "max_forecast_error")
    TARGET_ONGOING_REQUESTS_FIELD_NUMBER: _ClassVar[int]
    MIN_REPLICAS_FIELD_NUMBER: _ClassVar[int]
    MAX_REPLICAS_FIELD_NUMBER: _ClassVar[int]
    UPSCALE_DELAY_S_FIELD_NUMBER: _ClassVar[int]
    DOWNSCALE_DELAY_S_FIELD_NUMBER: _ClassVar[int]
    MODE_FIELD_NUMBER: _ClassVar[int]
    BURST_FACTOR_FIELD_NUMBER: _ClassVar[int]
    HISTORY_WINDOW_S_FIELD_NUMBER: _ClassVar[int]
    FORECAST_HORIZON_S_FIELD_NUMBER: _ClassVar[int]
    STARTUP_S_FIELD_NUMBER: _ClassVar[int]
    SEASON_S_FIELD_NUMBER: _ClassVar[int]
    MAX_FORECAST_ERROR_FIELD_NUMBER: _ClassVar[int]
    target_ongoing_requests: float
    min_replicas: int
    max_replicas: int
    upscale_delay_s: float
    downscale_delay_s: float
    mode: str
    burst_factor: float
    history_window_s: float
    forecast_horizon_s: float
    startup_s: float
    season_s: float
    max_forecast_error: float
    def __init__(self, target_ongoing_requests: _Optional[float] = ..., min_replicas: _Optional[int] = ..., max_replicas: _Optional[int] = ..., upscale_delay_s: _Optional[float] = ..., downscale_delay_s: _Optional[float] = ..., mode: _Optional[str] = ..., burst_factor: _Optional[float] = ..., history_window_s: _Optional[float] = ..., forecast_horizon_s: _Optional[float] = ..., startup_s: _Optional[float] = ..., season_s: _Optional[float] = ..., max_forecast_error: _Optional[float] = ...) -> None: ...

class ApplicationSpec(_message.Message):
    __slots__ = ("name", "namespace", "version", "import_path", "init_args", "working_dir", "runtime_env", "inputs", "outputs", "resources", "replicas", "max_concurrency", "max_queued", "proxies", "kind", "batching", "async_mode", "placement", "labels", "triton", "sharding", "stages", "edges", "autoscaling")
    class LabelsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    NAME_FIELD_NUMBER: _ClassVar[int]
    NAMESPACE_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    IMPORT_PATH_FIELD_NUMBER: _ClassVar[int]
    INIT_ARGS_FIELD_NUMBER: _ClassVar[int]
    WORKING_DIR_FIELD_NUMBER: _ClassVar[int]
    RUNTIME_ENV_FIELD_NUMBER: _ClassVar[int]
    INPUTS_FIELD_NUMBER: _ClassVar[int]
    OUTPUTS_FIELD_NUMBER: _ClassVar[int]
    RESOURCES_FIELD_NUMBER: _ClassVar[int]
    REPLICAS_FIELD_NUMBER: _ClassVar[int]
    MAX_CONCURRENCY_FIELD_NUMBER: _ClassVar[int]
    MAX_QUEUED_FIELD_NUMBER: _ClassVar[int]
    PROXIES_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    BATCHING_FIELD_NUMBER: _ClassVar[int]
    ASYNC_MODE_FIELD_NUMBER: _ClassVar[int]
    PLACEMENT_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    TRITON_FIELD_NUMBER: _ClassVar[int]
    SHARDING_FIELD_NUMBER: _ClassVar[int]
    STAGES_FIELD_NUMBER: _ClassVar[int]
    EDGES_FIELD_NUMBER: _ClassVar[int]
    AUTOSCALING_FIELD_NUMBER: _ClassVar[int]
    name: str
    namespace: str
    version: str
    import_path: str
    init_args: _struct_pb2.Struct
    working_dir: str
    runtime_env: RuntimeEnv
    inputs: _containers.RepeatedCompositeFieldContainer[TensorSpec]
    outputs: _containers.RepeatedCompositeFieldContainer[TensorSpec]
    resources: Resources
    replicas: ReplicaRange
    max_concurrency: int
    max_queued: int
    proxies: int
    kind: str
    batching: BatchingConfig
    async_mode: AsyncConfig
    placement: PlacementConstraints
    labels: _containers.ScalarMap[str, str]
    triton: TritonConfig
    sharding: ShardingConfig
    stages: _containers.RepeatedCompositeFieldContainer[ApplicationSpec]
    edges: _containers.RepeatedCompositeFieldContainer[StageEdge]
    autoscaling: AutoscalingConfig
    def __init__(self, name: _Optional[str] = ..., namespace: _Optional[str] = ..., version: _Optional[str] = ..., import_path: _Optional[str] = ..., init_args: _Optional[_Union[_struct_pb2.Struct, _Mapping]] = ..., working_dir: _Optional[str] = ..., runtime_env: _Optional[_Union[RuntimeEnv, _Mapping]] = ..., inputs: _Optional[_Iterable[_Union[TensorSpec, _Mapping]]] = ..., outputs: _Optional[_Iterable[_Union[TensorSpec, _Mapping]]] = ..., resources: _Optional[_Union[Resources, _Mapping]] = ..., replicas: _Optional[_Union[ReplicaRange, _Mapping]] = ..., max_concurrency: _Optional[int] = ..., max_queued: _Optional[int] = ..., proxies: _Optional[int] = ..., kind: _Optional[str] = ..., batching: _Optional[_Union[BatchingConfig, _Mapping]] = ..., async_mode: _Optional[_Union[AsyncConfig, _Mapping]] = ..., placement: _Optional[_Union[PlacementConstraints, _Mapping]] = ..., labels: _Optional[_Mapping[str, str]] = ..., triton: _Optional[_Union[TritonConfig, _Mapping]] = ..., sharding: _Optional[_Union[ShardingConfig, _Mapping]] = ..., stages: _Optional[_Iterable[_Union[ApplicationSpec, _Mapping]]] = ..., edges: _Optional[_Iterable[_Union[StageEdge, _Mapping]]] = ..., autoscaling: _Optional[_Union[AutoscalingConfig, _Mapping]] = ...) -> None: ...

class StageEdge(_message.Message):
    __slots__ = ("caller", "callee")
    CALLER_FIELD_NUMBER: _ClassVar[int]
    CALLEE_FIELD_NUMBER: _ClassVar[int]
    caller: str
    callee: str
    def __init__(self, caller: _Optional[str] = ..., callee: _Optional[str] = ...) -> None: ...
