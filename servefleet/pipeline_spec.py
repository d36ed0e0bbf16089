"""``kind: pipeline``: an application made of stages, each a deployment of its own, joined by edges.

```yaml
name: llm
kind: pipeline
inputs: [{name: prompt, datatype: BYTES, shape: [1]}]
stages:
  - {name: cache, import_path: servefleet.semantic_cache.stage:SemanticCacheStage, replicas: 2}
  - {name: model, import_path: servefleet.llm.stage:GeneratorStage, resources: {custom: {accelerator: 1}}}
edges: [{caller: cache, callee: model}]
```

Rules (``check_pipeline``, called by ``spec.validate``): every stage is a Python deployment with a
unique name and any deployment field (import_path, init_args, resources, replicas, batching, ...);
namespace, version and kind come from the pipeline. Edges name stages, form no cycle, and leave
exactly one stage that nobody calls: the *entry*, which the app's proxies (and the broker, in async
mode) send requests to; every stage is reachable from it. The pipeline's own ``inputs``/``outputs``
and ``async_mode`` are the entry's.

Derived at top level (recomputed on every validation; a value written there is replaced), so the
keeper's placement counts what the stages ask for: the pipeline counts as one replica whose
resources are the sum over stages of resources x initial replicas. Each stage scales within its own
``replicas`` range (``app scale NAME N --stage S``, or the autoscaler from the stage's
``autoscaling`` block); the keeper holds the counts (``stage_replicas``) and quota counts them.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping

from servefleet.api import common_pb2
from servefleet.common.errors import InvalidArgument

#: Separates the pipeline's name from a stage's in the stage's app name (``llm--model``);
#: ``spec.validate`` refuses it in application names, so a stage never collides with an app.
STAGE_SEPARATOR = "--"
#: Deployment fields that belong to stages, not to the pipeline.
_STAGE_ONLY = ("import_path", "init_args", "working_dir", "runtime_env", "batching")
_INHERITED = ("namespace", "version")


def check_pipeline(spec: common_pb2.ApplicationSpec) -> None:
    """Validate stages and edges, fill each stage's defaults and the derived top-level fields."""
    from servefleet.spec import validate  # spec.validate calls this module

    if not spec.stages:
        raise InvalidArgument("spec.stages: a pipeline needs at least one stage")
    for field in _STAGE_ONLY:
        if (
            spec.HasField(field)
            if field in ("init_args", "runtime_env", "batching")
            else getattr(spec, field)
        ):
            raise InvalidArgument(
                f"spec.{field}: set it on a stage (spec.stages[i].{field}), not the pipeline"
            )
    if spec.HasField("autoscaling"):  # the pipeline's own count is derived (1): stages scale
        raise InvalidArgument(
            "spec.autoscaling: a pipeline autoscales per stage; set spec.stages[i].autoscaling"
        )
    seen: set[str] = set()
    for i, stage in enumerate(spec.stages):
        where = f"spec.stages[{i}]"
        if stage.stages or stage.edges:
            raise InvalidArgument(f"{where}: a stage cannot be a pipeline itself")
        if stage.kind not in ("", "python"):
            raise InvalidArgument(f"{where}.kind: stages are Python deployments, got {stage.kind!r}")
        for field in _INHERITED:
            value = getattr(stage, field)
            if value and value != getattr(spec, field):
                raise InvalidArgument(f"{where}.{field}: stages take the pipeline's {field}; leave it unset")
            setattr(stage, field, getattr(spec, field))
        try:
            validate(stage)
        except InvalidArgument as exc:
            raise InvalidArgument(str(exc).replace("spec.", f"{where}.", 1)) from None
        for field in _INHERITED:  # kept unset: a new pipeline version is every stage's
            stage.ClearField(field)
        if stage.name in seen:
            raise InvalidArgument(f"{where}.name: {stage.name!r} appears twice")
        if len(spec.name) + len(STAGE_SEPARATOR) + len(stage.name) > 63:
            raise InvalidArgument(
                f"{where}.name: its app {spec.name}{STAGE_SEPARATOR}{stage.name} is over 63 characters"
            )
        seen.add(stage.name)
    _check_edges(spec, seen)
    _derive(spec)


def entry_stage(spec: common_pb2.ApplicationSpec) -> str:
    """The stage no edge calls (validated specs have exactly one)."""
    callees = {edge.callee for edge in spec.edges}
    return next(s.name for s in spec.stages if s.name not in callees)


def stage_app(pipeline: common_pb2.AppRef, stage: str, *, entry: bool) -> common_pb2.AppRef:
    """The app a stage runs as: the pipeline itself for the entry, ``name--stage`` for the others."""
    name = pipeline.name if entry else f"{pipeline.name}{STAGE_SEPARATOR}{stage}"
    return common_pb2.AppRef(namespace=pipeline.namespace, name=name)


def stage_spec(spec: common_pb2.ApplicationSpec, stage: str) -> common_pb2.ApplicationSpec:
    """What a stage's master and replicas run: the stage's deployment under its stage app's name,
    with the pipeline's interface and proxies on the entry (none elsewhere) and the edges it calls."""
    entry = entry_stage(spec)
    derived = common_pb2.ApplicationSpec()
    derived.CopyFrom(next(s for s in spec.stages if s.name == stage))
    app = stage_app(common_pb2.AppRef(namespace=spec.namespace, name=spec.name), stage, entry=stage == entry)
    derived.name = app.name
    derived.namespace, derived.version = spec.namespace, spec.version
    derived.labels.update(spec.labels)
    if stage == entry:
        derived.proxies = spec.proxies
        derived.async_mode.CopyFrom(spec.async_mode)
        if not derived.inputs and not derived.outputs:
            derived.inputs.extend(spec.inputs)
            derived.outputs.extend(spec.outputs)
    else:
        derived.proxies = 0  # reached only by its callers, through their stage handles
    derived.edges.extend(edge for edge in spec.edges if edge.caller == stage)
    return derived


def served_apps(spec: common_pb2.ApplicationSpec, ref: common_pb2.AppRef) -> list[common_pb2.AppRef]:
    """The apps an application's endpoints register under: itself, and a pipeline's stage apps."""
    entry = entry_stage(spec) if spec.kind == "pipeline" else ""
    stages = [stage_app(ref, s.name, entry=s.name == entry) for s in spec.stages if s.name != entry]
    return [ref, *stages]


def autoscaled(spec: common_pb2.ApplicationSpec) -> bool:
    """Whether the autoscaler drives the app: its own block, or (a pipeline) any stage's."""
    return spec.HasField("autoscaling") or any(s.HasField("autoscaling") for s in spec.stages)


def stage_counts(spec: common_pb2.ApplicationSpec, held: Mapping[str, int]) -> dict[str, int]:
    """Replicas per cluster of every stage: the count held (scaled by a person or the
    autoscaler) kept within the stage's current range, else the stage's initial count."""
    counts = {}
    for stage in spec.stages:
        rng = stage.replicas
        counts[stage.name] = min(max(held.get(stage.name, rng.initial), rng.min), rng.max)
    return counts


def replicas_wanted(spec: common_pb2.ApplicationSpec, replicas: int, held: Mapping[str, int]) -> int:
    """Replicas per cluster the app runs: its count, or the sum of a pipeline's stage counts
    (what its master reports as ready when every stage is)."""
    return sum(stage_counts(spec, held).values()) if spec.kind == "pipeline" else replicas


def pipeline_of(stage_app_name: str) -> str:
    """The pipeline's name from a stage app's name (``llm--model`` -> ``llm``; ``llm`` -> ``llm``)."""
    return stage_app_name.partition(STAGE_SEPARATOR)[0]


def _check_edges(spec: common_pb2.ApplicationSpec, names: set[str]) -> None:
    calls: dict[str, list[str]] = defaultdict(list)
    pairs: set[tuple[str, str]] = set()
    for i, edge in enumerate(spec.edges):
        where = f"spec.edges[{i}]"
        for field in ("caller", "callee"):
            value = getattr(edge, field)
            if value not in names:
                raise InvalidArgument(f"{where}.{field}: {value!r} is not a stage (stages: {sorted(names)})")
        if edge.caller == edge.callee:
            raise InvalidArgument(f"{where}: stage {edge.caller!r} cannot call itself")
        if (edge.caller, edge.callee) in pairs:
            raise InvalidArgument(f"{where}: {edge.caller!r} -> {edge.callee!r} appears twice")
        pairs.add((edge.caller, edge.callee))
        calls[edge.caller].append(edge.callee)
    callees = {edge.callee for edge in spec.edges}
    entries = [s.name for s in spec.stages if s.name not in callees]
    if len(entries) != 1:
        raise InvalidArgument(
            f"spec.edges: exactly one stage must be called by no other (the entry); found {entries or 'none'}"
        )
    reached: set[str] = set()
    _walk(entries[0], calls, reached, ())
    missing = sorted(names - reached)
    if missing:
        raise InvalidArgument(
            f"spec.edges: stage(s) {missing} cannot be reached from the entry {entries[0]!r}"
        )


def _walk(stage: str, calls: dict[str, list[str]], reached: set[str], path: tuple[str, ...]) -> None:
    if stage in path:
        raise InvalidArgument(f"spec.edges: cycle {' -> '.join((*path, stage))}")
    reached.add(stage)
    for callee in calls[stage]:
        _walk(callee, calls, reached, (*path, stage))


def _derive(spec: common_pb2.ApplicationSpec) -> None:
    """Top-level resources and replicas from the stages (what quota and placement read)."""
    total = common_pb2.Resources()
    for stage in spec.stages:
        count = stage.replicas.initial
        total.num_cpus += stage.resources.num_cpus * count
        total.num_gpus += stage.resources.num_gpus * count
        total.memory += stage.resources.memory * count
        for name, amount in stage.resources.custom.items():
            total.custom[name] = total.custom.get(name, 0.0) + amount * count
    spec.resources.CopyFrom(total)
    spec.replicas.CopyFrom(common_pb2.ReplicaRange(min=1, max=1, initial=1))
