"""Application specs: YAML / mappings <-> ``common_pb2.ApplicationSpec``, checked field by field.

One module for the keeper (validates submissions), the cluster agent and the data plane, so a spec
means the same everywhere. ``validate`` fills every default, so code downstream never guesses what
an unset field means. Errors are ``InvalidArgument`` naming the field, e.g.
``spec.inputs[0].datatype: 'FP8' is not a KServe v2 datatype``.

A relative ``working_dir`` in a YAML file is resolved against the file's folder. The YAML keys are
the proto field names (``replicas`` may also be a plain integer, ``memory`` a
size such as ``512Mi``, ``max_batch_size`` / ``batch_wait_timeout_ms`` may sit at top level
instead of under ``batching``, and ``model_repository`` / ``triton_args`` at top level instead of
under ``triton``). Unknown keys are refused, so a typo never silently means a default.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml
from google.protobuf import json_format

from servefleet.api import common_pb2
from servefleet.common.appid import DEFAULT_NAMESPACE, check_name
from servefleet.common.errors import InvalidArgument
from servefleet.common.tensors import DTYPES
from servefleet.pipeline_spec import STAGE_SEPARATOR

DEFAULT_VERSION = "1"
DEFAULT_KIND = "python"
#: Kinds the platform knows; only "python" is served by the data plane today.
KINDS = ("python", "direct", "triton", "sharded", "pipeline")
#: kind "sharded": how keys map to shards, and how the router merges looked-up rows.
PARTITIONINGS = ("range", "hash")
MERGES = ("ctr",)
DEFAULT_MAX_CONCURRENCY = 8
DEFAULT_MAX_QUEUED = 32
#: Two proxies per cluster, spread over its nodes: one proxy dying (or its node) never leaves an
#: app without an entry point while Ray restarts it.
DEFAULT_PROXIES = 2
#: CPU share a replica asks Ray for when the spec names none (small: models here are light).
DEFAULT_NUM_CPUS = 0.1
DEFAULT_BATCH_WAIT_MS = 5.0
AUTOSCALING_MODES = ("reactive", "proactive")
#: Defaults of the autoscaling block (a zero field takes these).
AUTOSCALING_DEFAULTS = {
    "upscale_delay_s": 3.0,
    "downscale_delay_s": 60.0,
    "burst_factor": 2.0,
    "history_window_s": 600.0,
    "forecast_horizon_s": 30.0,
    "startup_s": 10.0,
    "max_forecast_error": 0.5,
}

_TRITON_BOOL = r"true|false"
_TRITON_MODELS = r"\*|[A-Za-z0-9_.-]+(,[A-Za-z0-9_.-]+)*"
#: tritonserver flags a ``kind: triton`` spec may set (``triton_args``), each with the values it
#: takes. Ports, addresses and paths belong to the bootstrapper: a spec never names files here.
TRITON_ARGS: dict[str, str] = {
    "log-verbose": r"[0-9]",
    "log-info": _TRITON_BOOL,
    "log-warning": _TRITON_BOOL,
    "log-error": _TRITON_BOOL,
    "log-format": r"default|ISO8601",
    "model-control-mode": r"none|poll|explicit",
    "load-model": _TRITON_MODELS,  # comma-separated; each becomes one --load-model
    "repository-poll-secs": r"[1-9][0-9]{0,4}",
    "strict-model-config": _TRITON_BOOL,
    "exit-timeout-secs": r"[0-9]{1,4}",
    "model-load-thread-count": r"[1-9][0-9]?",
    "rate-limit": r"off|execution_count",
}

_IMPORT_RE = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_][\w.]*$")
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]i?)?B?\s*$", re.IGNORECASE)
_SIZE_UNITS = {
    "": 1,
    "k": 10**3,
    "m": 10**6,
    "g": 10**9,
    "t": 10**12,
    "ki": 2**10,
    "mi": 2**20,
    "gi": 2**30,
    "ti": 2**40,
}

ApplicationSpec = common_pb2.ApplicationSpec


def load_spec(source: str | Path | Mapping[str, Any] | ApplicationSpec) -> ApplicationSpec:
    """A validated spec from a YAML file path, a mapping, or a message (copied, then validated)."""
    if isinstance(source, ApplicationSpec):
        spec = ApplicationSpec()
        spec.CopyFrom(source)
        return validate(spec)
    if isinstance(source, str | Path):
        path = Path(source)
        try:
            data = yaml.safe_load(path.read_text())
        except OSError as exc:
            raise InvalidArgument(f"spec file {str(path)!r}: {exc.strerror or exc}") from None
        except yaml.YAMLError as exc:
            raise InvalidArgument(f"spec file {str(path)!r} is not valid YAML: {exc}") from None
        for deployment in [data, *data.get("stages", [])] if isinstance(data, dict) else []:
            if isinstance(deployment, dict) and _is_local_relative(deployment.get("working_dir")):
                deployment["working_dir"] = str((path.parent / deployment["working_dir"]).resolve())
        source = data
    if not isinstance(source, Mapping):
        raise InvalidArgument(f"spec: expected a mapping, got {type(source).__name__}")
    return validate(from_dict(source))


def from_dict(data: Mapping[str, Any]) -> ApplicationSpec:
    """Parse a mapping into a spec (no defaults filled; call ``validate`` for that)."""
    data = _shorthands(data, "spec")
    _check_keys(data, ApplicationSpec.DESCRIPTOR, "spec")
    spec = ApplicationSpec()
    try:
        json_format.ParseDict(data, spec, ignore_unknown_fields=False)
    except json_format.ParseError as exc:
        raise InvalidArgument(_parse_error(str(exc))) from None
    return spec


def _shorthands(data: Mapping[str, Any], path: str) -> dict[str, Any]:
    """The YAML shorthands (integer replicas, ``512Mi``, top-level batching, ``async``) spelled out,
    in the spec and in each pipeline stage."""
    data = dict(data)
    if isinstance(data.get("stages"), list):
        data["stages"] = [
            _shorthands(_mapping(stage, f"{path}.stages[{i}]"), f"{path}.stages[{i}]")
            for i, stage in enumerate(data["stages"])
        ]
    batching = dict(_mapping(data.pop("batching", None) or {}, f"{path}.batching"))
    for key in ("max_batch_size", "batch_wait_timeout_ms"):
        if key in data:
            batching[key] = data.pop(key)
    if batching:
        data["batching"] = batching
    if "replicas" in data and isinstance(data["replicas"], int) and not isinstance(data["replicas"], bool):
        data["replicas"] = {"initial": data["replicas"]}
    if "async" in data and "async_mode" not in data:
        data["async_mode"] = data.pop("async")
    triton = dict(_mapping(data.pop("triton", None) or {}, "spec.triton"))
    if "model_repository" in data:
        triton["model_repository"] = data.pop("model_repository")
    if "triton_args" in data:
        triton["args"] = data.pop("triton_args")
    if isinstance(triton.get("args"), Mapping):
        triton["args"] = {str(k): _scalar_str(v) for k, v in triton["args"].items()}
    if triton:
        data["triton"] = triton
    resources = data.get("resources")
    if isinstance(resources, Mapping) and "memory" in resources:
        data["resources"] = {
            **resources,
            "memory": parse_size(resources["memory"], f"{path}.resources.memory"),
        }
    runtime_env = data.get("runtime_env")
    if isinstance(runtime_env, Mapping) and isinstance(runtime_env.get("env_vars"), Mapping):
        env = {str(k): _scalar_str(v) for k, v in runtime_env["env_vars"].items()}
        data["runtime_env"] = {**runtime_env, "env_vars": env}
    if isinstance(data.get("labels"), Mapping):
        data["labels"] = {str(k): _scalar_str(v) for k, v in data["labels"].items()}
    return data


def validate(spec: ApplicationSpec) -> ApplicationSpec:
    """Check every field and fill defaults in place; returns ``spec``. Raises InvalidArgument."""
    if not spec.name:
        raise InvalidArgument("spec.name: required")
    check_name(spec.name, "spec.name")
    if STAGE_SEPARATOR in spec.name:
        raise InvalidArgument(f"spec.name: {spec.name!r}: '--' is reserved for pipeline stages (app--stage)")
    spec.namespace = spec.namespace or DEFAULT_NAMESPACE
    check_name(spec.namespace, "spec.namespace")
    spec.version = spec.version or DEFAULT_VERSION
    spec.kind = spec.kind or DEFAULT_KIND
    if spec.kind not in KINDS:
        raise InvalidArgument(f"spec.kind: {spec.kind!r} is not one of {', '.join(KINDS)}")
    if spec.kind == "pipeline":
        from servefleet.pipeline_spec import check_pipeline  # it validates each stage with this module

        check_pipeline(spec)
    elif spec.stages or spec.edges:
        raise InvalidArgument(f"spec.stages: only kind 'pipeline' has stages (kind is {spec.kind!r})")
    if spec.kind == "python" and not spec.import_path:
        raise InvalidArgument("spec.import_path: required for kind 'python' (module:Class)")
    if spec.import_path and not _IMPORT_RE.match(spec.import_path):
        raise InvalidArgument(f"spec.import_path: {spec.import_path!r} is not 'module:Class'")
    _check_triton(spec)
    for field, tensors in (("inputs", spec.inputs), ("outputs", spec.outputs)):
        _check_tensors(tensors, f"spec.{field}")
    _check_resources(spec.resources)
    _check_sharding(spec)
    autoscaled = spec.HasField("autoscaling")
    if autoscaled:  # the replica range defaults to the autoscaler's
        _check_autoscaling_range(spec.autoscaling)
        spec.replicas.min = spec.replicas.min or spec.autoscaling.min_replicas
        spec.replicas.max = spec.replicas.max or spec.autoscaling.max_replicas
    _check_replicas(spec.replicas)
    if autoscaled:
        _check_autoscaling(spec.autoscaling, spec.replicas)
    # Triton endpoints are called directly; its proxies are only for clients that know no other.
    proxies = 0 if spec.kind == "triton" else DEFAULT_PROXIES
    for field, default in (("max_concurrency", DEFAULT_MAX_CONCURRENCY), ("proxies", proxies)):
        value = getattr(spec, field)
        if value < 0:
            raise InvalidArgument(f"spec.{field}: must be positive, got {value}")
        setattr(spec, field, value or default)
    if spec.max_queued < 0:
        raise InvalidArgument(f"spec.max_queued: must be >= 0, got {spec.max_queued}")
    spec.max_queued = spec.max_queued or DEFAULT_MAX_QUEUED  # proto3 cannot tell 0 from unset
    _check_batching(spec.batching)
    _check_async(spec.async_mode)
    if spec.placement.spread < 0:
        raise InvalidArgument(f"spec.placement.spread: must be >= 0, got {spec.placement.spread}")
    for i, pkg in enumerate(spec.runtime_env.pip):
        if not pkg.strip():
            raise InvalidArgument(f"spec.runtime_env.pip[{i}]: empty package name")
    return spec


def spec_to_dict(spec: ApplicationSpec) -> dict[str, Any]:
    """The spec as a YAML-friendly mapping (proto field names, unset fields left out)."""
    data = json_format.MessageToDict(spec, preserving_proto_field_name=True)
    if "init_args" in data:
        data["init_args"] = struct_to_python(spec.init_args)
    if "memory" in data.get("resources", {}):
        data["resources"]["memory"] = int(data["resources"]["memory"])
    for tensors in (data.get("inputs", []), data.get("outputs", [])):
        for tensor in tensors:
            tensor["shape"] = [int(d) for d in tensor.get("shape", [])]
    return data


def struct_to_python(struct: Any) -> dict[str, Any]:
    """init_args as Python values; Struct numbers are doubles, so whole numbers come back as int."""
    return {k: _unfloat(v) for k, v in json_format.MessageToDict(struct).items()}


def actors_per_replica(spec: ApplicationSpec) -> int:
    """Actors one replica of the app runs: a sharded app's replica count is per shard."""
    return max(spec.sharding.shards, 1) if spec.kind == "sharded" else 1


def parse_size(value: Any, field: str) -> int:
    """Bytes from an int or a size string (``512Mi``, ``2G``, ``1024``)."""
    if isinstance(value, bool):
        raise InvalidArgument(f"{field}: expected a size, got {value!r}")
    if isinstance(value, int | float):
        if value < 0:
            raise InvalidArgument(f"{field}: must be >= 0, got {value}")
        return int(value)
    match = _SIZE_RE.match(str(value))
    if not match:
        raise InvalidArgument(f"{field}: {value!r} is not a size such as 512Mi, 2G or 1048576")
    return int(float(match.group(1)) * _SIZE_UNITS[(match.group(2) or "").lower()])


def _is_local_relative(path: Any) -> bool:
    """A working_dir written relative to the spec file (not absolute, not a URL)."""
    return isinstance(path, str) and bool(path) and "://" not in path and not Path(path).is_absolute()


def _unfloat(value: Any) -> Any:
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, list):
        return [_unfloat(v) for v in value]
    if isinstance(value, dict):
        return {k: _unfloat(v) for k, v in value.items()}
    return value


def _scalar_str(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def _mapping(value: Any, field: str) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        raise InvalidArgument(f"{field}: expected a mapping, got {type(value).__name__}")
    return value


def _check_keys(data: Mapping[str, Any], descriptor: Any, path: str) -> None:
    """Refuse keys the message has no field for, naming the full path (typos must not pass)."""
    fields = descriptor.fields_by_name
    for key, value in data.items():
        field = fields.get(key)
        if field is None:
            known = ", ".join(sorted(fields))
            raise InvalidArgument(f"{path}: unknown key {key!r} (known: {known})")
        sub = field.message_type
        if sub is None or sub.GetOptions().map_entry or sub.full_name.startswith("google.protobuf"):
            continue
        if field.is_repeated:
            if not isinstance(value, list):
                raise InvalidArgument(f"{path}.{key}: expected a list, got {type(value).__name__}")
            for i, item in enumerate(value):
                _check_keys(_mapping(item, f"{path}.{key}[{i}]"), sub, f"{path}.{key}[{i}]")
        else:
            _check_keys(_mapping(value, f"{path}.{key}"), sub, f"{path}.{key}")


def _parse_error(message: str) -> str:
    """json_format's "Failed to parse X field: why" as "spec.X: why" (X is the innermost field)."""
    match = re.match(r"Failed to parse (\S+) field: (.*)", message, re.DOTALL)
    return f"spec.{match.group(1)}: {match.group(2)}" if match else f"spec: {message}"


def _check_tensors(tensors: Any, path: str) -> None:
    seen: set[str] = set()
    for i, tensor in enumerate(tensors):
        where = f"{path}[{i}]"
        if not tensor.name:
            raise InvalidArgument(f"{where}.name: required")
        if tensor.name in seen:
            raise InvalidArgument(f"{where}.name: {tensor.name!r} appears twice")
        seen.add(tensor.name)
        if tensor.datatype not in DTYPES:
            raise InvalidArgument(f"{where}.datatype: {tensor.datatype!r} is not a KServe v2 datatype")
        for j, dim in enumerate(tensor.shape):
            if dim < -1:
                raise InvalidArgument(f"{where}.shape[{j}]: {dim} (use -1 for a variable dimension)")


def _check_triton(spec: ApplicationSpec) -> None:
    """``kind: triton`` needs a model repository that stays inside working_dir when relative, and
    only allow-listed server flags; other kinds may not carry Triton settings."""
    triton = spec.triton
    if spec.kind != "triton":
        if spec.HasField("triton"):
            raise InvalidArgument(f"spec.model_repository: only for kind 'triton' (kind is {spec.kind!r})")
        return
    if spec.import_path:
        raise InvalidArgument("spec.import_path: not for kind 'triton' (Triton loads model_repository)")
    if spec.batching.max_batch_size > 1:
        raise InvalidArgument(
            "spec.batching: not for kind 'triton' (batch in the model's config.pbtxt: dynamic_batching)"
        )
    if spec.async_mode.enabled:
        raise InvalidArgument("spec.async_mode: kind 'triton' serves over gRPC only (no broker pull)")
    if spec.runtime_env.pip:
        raise InvalidArgument(
            "spec.runtime_env.pip: Triton's python backend runs models in the Triton environment "
            "(SERVEFLEET_TRITON_ENV, made by scripts/install.sh), not in the actor's; install there"
        )
    if not triton.model_repository:
        raise InvalidArgument("spec.model_repository: required for kind 'triton' (a Triton model repository)")
    path = Path(triton.model_repository)
    if "://" in triton.model_repository:
        raise InvalidArgument(f"spec.model_repository: {triton.model_repository!r} must be a local path")
    if not path.is_absolute():
        if not spec.working_dir:
            raise InvalidArgument(
                f"spec.model_repository: {triton.model_repository!r} is relative, so it needs a "
                "working_dir to be relative to (or give an absolute path)"
            )
        if ".." in path.parts:
            raise InvalidArgument(
                f"spec.model_repository: {triton.model_repository!r} must stay inside working_dir (no '..')"
            )
    for key, value in triton.args.items():
        pattern = TRITON_ARGS.get(key)
        if pattern is None:
            raise InvalidArgument(
                f"spec.triton_args: {key!r} is not allowed (allowed: {', '.join(sorted(TRITON_ARGS))}; "
                "ports, addresses and paths are set by servefleet)"
            )
        if not re.fullmatch(pattern, value):
            raise InvalidArgument(f"spec.triton_args.{key}: {value!r} does not match {pattern!r}")


def _check_resources(resources: common_pb2.Resources) -> None:
    for field in ("num_cpus", "num_gpus", "memory"):
        if getattr(resources, field) < 0:
            raise InvalidArgument(f"spec.resources.{field}: must be >= 0, got {getattr(resources, field)}")
    for name, amount in resources.custom.items():
        if amount < 0:
            raise InvalidArgument(f"spec.resources.custom.{name}: must be >= 0, got {amount}")
    if resources.num_cpus == 0:
        resources.num_cpus = DEFAULT_NUM_CPUS


def _check_replicas(replicas: common_pb2.ReplicaRange) -> None:
    for field in ("min", "max", "initial"):
        if getattr(replicas, field) < 0:
            raise InvalidArgument(f"spec.replicas.{field}: must be >= 0, got {getattr(replicas, field)}")
    if replicas.max and replicas.min > replicas.max:
        raise InvalidArgument(f"spec.replicas: min {replicas.min} is above max {replicas.max}")
    replicas.initial = replicas.initial or max(replicas.min, 1)
    replicas.min = replicas.min or min(1, replicas.initial)
    replicas.max = replicas.max or max(replicas.initial, replicas.min)
    if not replicas.min <= replicas.initial <= replicas.max:
        raise InvalidArgument(
            f"spec.replicas.initial: {replicas.initial} is outside [{replicas.min}, {replicas.max}]"
        )


def _check_sharding(spec: ApplicationSpec) -> None:
    """kind sharded needs its table and layout; ``replicas`` then counts replicas *per shard*
    (``sharding.replicas_per_shard`` is its initial value, so the two cannot disagree)."""
    sharding = spec.sharding
    if spec.kind != "sharded":
        if spec.HasField("sharding"):
            raise InvalidArgument(f"spec.sharding: only for kind 'sharded' (this app is {spec.kind!r})")
        return
    if sharding.shards < 1:
        raise InvalidArgument(f"spec.sharding.shards: must be >= 1, got {sharding.shards}")
    if sharding.replicas_per_shard < 0:
        raise InvalidArgument(
            f"spec.sharding.replicas_per_shard: must be >= 1, got {sharding.replicas_per_shard}"
        )
    initial = spec.replicas.initial
    if sharding.replicas_per_shard and initial and sharding.replicas_per_shard != initial:
        raise InvalidArgument(
            f"spec.sharding.replicas_per_shard {sharding.replicas_per_shard} disagrees with "
            f"spec.replicas.initial {initial} (for kind 'sharded' replicas counts replicas per shard)"
        )
    spec.replicas.initial = initial or sharding.replicas_per_shard or max(spec.replicas.min, 1)
    sharding.replicas_per_shard = spec.replicas.initial
    sharding.partitioning = sharding.partitioning or PARTITIONINGS[0]
    if sharding.partitioning not in PARTITIONINGS:
        raise InvalidArgument(
            f"spec.sharding.partitioning: {sharding.partitioning!r} is not one of {', '.join(PARTITIONINGS)}"
        )
    sharding.merge = sharding.merge or MERGES[0]
    if sharding.merge not in MERGES:
        raise InvalidArgument(f"spec.sharding.merge: {sharding.merge!r} is not one of {', '.join(MERGES)}")
    if not sharding.table or not Path(sharding.table).is_absolute():
        raise InvalidArgument(
            f"spec.sharding.table: {sharding.table!r} must be the absolute path of the table file "
            "(e.g. one written by python -m servefleet.direct.ctr), readable on every node"
        )
    keys = [t for t in spec.inputs if t.datatype == "INT64"]
    if not sharding.key_input:
        sharding.key_input = keys[0].name if len(keys) == 1 else "feature_ids"
    named = {t.name: t for t in spec.inputs}
    if named and sharding.key_input not in named:
        raise InvalidArgument(f"spec.sharding.key_input: {sharding.key_input!r} is not one of spec.inputs")
    if named and named[sharding.key_input].datatype != "INT64":
        raise InvalidArgument(
            f"spec.sharding.key_input: input {sharding.key_input!r} is "
            f"{named[sharding.key_input].datatype}; keys must be INT64"
        )


def _check_autoscaling_range(config: common_pb2.AutoscalingConfig) -> None:
    """The required fields, checked before they fill the replica range."""
    where = "spec.autoscaling"
    if not config.target_ongoing_requests > 0:
        raise InvalidArgument(
            f"{where}.target_ongoing_requests: required, > 0 (ongoing requests per replica to hold), "
            f"got {config.target_ongoing_requests:g}"
        )
    if config.min_replicas < 1:
        raise InvalidArgument(
            f"{where}.min_replicas: must be >= 1 (no scaling to zero), got {config.min_replicas}"
        )
    if config.max_replicas < config.min_replicas:
        raise InvalidArgument(
            f"{where}.max_replicas: {config.max_replicas} is below min_replicas {config.min_replicas}"
        )


def _check_autoscaling(config: common_pb2.AutoscalingConfig, replicas: common_pb2.ReplicaRange) -> None:
    """The rest of the autoscaling block: ranges, defaults, and what proactive mode needs."""
    where = "spec.autoscaling"
    if config.min_replicas < replicas.min or config.max_replicas > replicas.max:
        raise InvalidArgument(
            f"{where}: [{config.min_replicas}, {config.max_replicas}] is outside spec.replicas "
            f"[{replicas.min}, {replicas.max}]; widen spec.replicas or leave its min/max out"
        )
    config.mode = config.mode or AUTOSCALING_MODES[0]
    if config.mode not in AUTOSCALING_MODES:
        raise InvalidArgument(f"{where}.mode: {config.mode!r} is not one of {', '.join(AUTOSCALING_MODES)}")
    for field in (*AUTOSCALING_DEFAULTS, "season_s"):
        if getattr(config, field) < 0:
            raise InvalidArgument(f"{where}.{field}: must be >= 0, got {getattr(config, field):g}")
    for field, default in AUTOSCALING_DEFAULTS.items():
        setattr(config, field, getattr(config, field) or default)
    if config.burst_factor <= 1:
        raise InvalidArgument(
            f"{where}.burst_factor: must be > 1 (a multiple of the target), got {config.burst_factor:g}"
        )
    if config.forecast_horizon_s >= config.history_window_s:
        raise InvalidArgument(
            f"{where}.forecast_horizon_s: {config.forecast_horizon_s:g} must be shorter than "
            f"history_window_s {config.history_window_s:g}"
        )
    if config.season_s and config.season_s > config.history_window_s:
        raise InvalidArgument(
            f"{where}.season_s: {config.season_s:g} is longer than history_window_s "
            f"{config.history_window_s:g}; the forecast needs at least one full season of history"
        )


def _check_batching(batching: common_pb2.BatchingConfig) -> None:
    if batching.max_batch_size < 0:
        raise InvalidArgument(f"spec.batching.max_batch_size: must be >= 0, got {batching.max_batch_size}")
    if batching.batch_wait_timeout_ms < 0:
        raise InvalidArgument(
            f"spec.batching.batch_wait_timeout_ms: must be >= 0, got {batching.batch_wait_timeout_ms}"
        )
    if batching.max_batch_size > 1 and batching.batch_wait_timeout_ms == 0:
        batching.batch_wait_timeout_ms = DEFAULT_BATCH_WAIT_MS


def _check_async(config: common_pb2.AsyncConfig) -> None:
    for field in ("max_stream_length", "max_deliveries", "result_ttl_s"):
        if getattr(config, field) < 0:
            raise InvalidArgument(f"spec.async_mode.{field}: must be >= 0, got {getattr(config, field)}")
