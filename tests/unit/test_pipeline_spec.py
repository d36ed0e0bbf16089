"""kind: pipeline specs: stages validated as deployments, edges as a DAG with one entry, derived
top-level fields, and the deployment each stage runs."""

from __future__ import annotations

from typing import Any

import pytest

from servefleet.common.errors import InvalidArgument
from servefleet.pipeline_spec import (
    autoscaled,
    entry_stage,
    pipeline_of,
    replicas_wanted,
    stage_counts,
    stage_spec,
)
from servefleet.spec import load_spec


def pipeline(**overrides: Any) -> dict[str, Any]:
    data: dict[str, Any] = {
        "name": "llm",
        "kind": "pipeline",
        "inputs": [{"name": "prompt", "datatype": "BYTES", "shape": [1]}],
        "stages": [
            {"name": "cache", "import_path": "a:Cache", "replicas": 2, "resources": {"num_cpus": 0.5}},
            {"name": "model", "import_path": "a:Model", "resources": {"custom": {"accelerator": 1}}},
        ],
        "edges": [{"caller": "cache", "callee": "model"}],
    }
    data.update(overrides)
    return data


def test_stages_take_deployment_fields_and_the_pipeline_derives_its_totals() -> None:
    spec = load_spec(pipeline())
    cache, model = spec.stages
    assert cache.replicas.initial == 2 and model.replicas.initial == 1
    assert model.resources.num_cpus == 0.1  # a stage gets a deployment's defaults
    assert spec.resources.num_cpus == pytest.approx(1.1)
    assert spec.resources.custom["accelerator"] == 1
    assert (spec.replicas.min, spec.replicas.max) == (1, 1)
    assert load_spec(spec) == spec  # validating again changes nothing


def test_stage_specs_run_under_the_pipeline_with_their_edges() -> None:
    spec = load_spec(pipeline(version="3", namespace="team"))
    assert entry_stage(spec) == "cache"
    entry, model = stage_spec(spec, "cache"), stage_spec(spec, "model")
    assert (entry.name, entry.namespace, entry.version, entry.proxies) == ("llm", "team", "3", spec.proxies)
    assert [t.name for t in entry.inputs] == ["prompt"]
    assert [(e.caller, e.callee) for e in entry.edges] == [("cache", "model")]
    assert (model.name, model.proxies, list(model.edges)) == ("llm--model", 0, [])
    assert pipeline_of(model.name) == pipeline_of(entry.name) == "llm"


def test_a_new_pipeline_version_is_every_stages() -> None:
    spec = load_spec(pipeline())
    spec.version = "2"
    assert stage_spec(load_spec(spec), "model").version == "2"


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"stages": []}, "spec.stages: a pipeline needs at least one stage"),
        ({"import_path": "a:B"}, "spec.import_path: set it on a stage"),
        ({"edges": [{"caller": "cache", "callee": "gpu"}]}, r"spec.edges\[0\].callee: 'gpu' is not a stage"),
        ({"edges": [{"caller": "cache", "callee": "cache"}]}, "cannot call itself"),
        ({"edges": []}, "exactly one stage must be called by no other"),
        (
            {"edges": [{"caller": "cache", "callee": "model"}, {"caller": "model", "callee": "cache"}]},
            "exactly one stage must be called by no other",
        ),
    ],
)
def test_bad_pipelines_are_refused_naming_the_field(change: dict[str, Any], message: str) -> None:
    with pytest.raises(InvalidArgument, match=message):
        load_spec(pipeline(**change))


def test_stage_errors_name_the_stage() -> None:
    data = pipeline()
    data["stages"][1]["import_path"] = "nope"
    with pytest.raises(InvalidArgument, match=r"spec.stages\[1\].import_path: 'nope' is not 'module:Class'"):
        load_spec(data)
    data = pipeline()
    data["stages"][1]["version"] = "9"
    with pytest.raises(InvalidArgument, match=r"spec.stages\[1\].version: stages take the pipeline's"):
        load_spec(data)


def test_cycles_and_unreachable_stages_are_refused() -> None:
    data = pipeline()
    data["stages"].append({"name": "judge", "import_path": "a:Judge"})
    data["edges"] += [{"caller": "model", "callee": "judge"}, {"caller": "judge", "callee": "model"}]
    with pytest.raises(InvalidArgument, match="cycle cache -> model -> judge -> model"):
        load_spec(data)


def test_only_pipelines_have_stages() -> None:
    with pytest.raises(InvalidArgument, match="only kind 'pipeline' has stages"):
        load_spec({"name": "x", "import_path": "a:B", "edges": [{"caller": "a", "callee": "b"}]})


def test_stages_autoscale_each_by_its_own_block_and_the_pipeline_has_none() -> None:
    data = pipeline()
    data["stages"][1]["autoscaling"] = {"min_replicas": 1, "max_replicas": 3, "target_ongoing_requests": 2}
    spec = load_spec(data)
    model = spec.stages[1]
    assert (model.replicas.min, model.replicas.max) == (1, 3)
    assert model.HasField("autoscaling") and not spec.stages[0].HasField("autoscaling")
    assert autoscaled(spec)
    data["stages"][1]["autoscaling"] = {"min_replicas": 3, "max_replicas": 1, "target_ongoing_requests": 2}
    with pytest.raises(InvalidArgument, match=r"spec.stages\[1\].autoscaling"):
        load_spec(data)
    data = pipeline()
    data["autoscaling"] = {"min_replicas": 1, "max_replicas": 3}
    with pytest.raises(InvalidArgument, match=r"spec.autoscaling: a pipeline autoscales per stage"):
        load_spec(data)


def test_stage_counts_keep_what_is_held_within_each_stage_range() -> None:
    data = pipeline()
    data["stages"][1]["replicas"] = {"min": 1, "max": 4, "initial": 2}
    spec = load_spec(data)
    assert stage_counts(spec, {}) == {"cache": spec.stages[0].replicas.initial, "model": 2}
    assert stage_counts(spec, {"model": 3, "gone": 9})["model"] == 3
    assert stage_counts(spec, {"model": 9})["model"] == 4
    # What the keeper waits for before RUNNING: every stage's replicas, not the derived count 1.
    assert replicas_wanted(spec, 1, {"model": 3}) == spec.stages[0].replicas.initial + 3
