"""The spec parser: the documented YAML keys load, defaults are filled, bad fields are named."""

from __future__ import annotations

from pathlib import Path

import pytest

from servefleet.api import common_pb2
from servefleet.common.errors import InvalidArgument
from servefleet.spec import (
    DEFAULT_NUM_CPUS,
    load_spec,
    spec_to_dict,
    struct_to_python,
)

FULL = """
name: iris
namespace: team-a
version: "2"
import_path: examples.iris:IrisClassifier
init_args: {hidden: 3, scale: 0.5, labels: [a, b]}
working_dir: ./examples
runtime_env:
  pip: [requests]
  env_vars: {MODE: fast, THREADS: 2}
inputs:
  - {name: features, datatype: FP32, shape: [-1, 4]}
outputs:
  - {name: label, datatype: INT64, shape: [-1]}
resources: {num_cpus: 0.5, num_gpus: 0, memory: 512Mi, custom: {cpu_node: 1}}
replicas: {min: 1, max: 4, initial: 2}
max_concurrency: 4
max_queued: 8
proxies: 2
kind: python
max_batch_size: 16
batch_wait_timeout_ms: 2
async_mode: {enabled: true, max_stream_length: 100}
placement: {cluster_labels: {region: eu}, spread: 2}
labels: {team: a}
"""


def _minimal(**extra: object) -> dict[str, object]:
    return {"name": "m", "import_path": "pkg.mod:Model", **extra}


def test_every_documented_key_loads_from_yaml(tmp_path: Path) -> None:
    path = tmp_path / "app.yaml"
    path.write_text(FULL)
    spec = load_spec(path)
    assert (spec.name, spec.namespace, spec.version) == ("iris", "team-a", "2")
    assert struct_to_python(spec.init_args) == {"hidden": 3, "scale": 0.5, "labels": ["a", "b"]}
    assert dict(spec.runtime_env.env_vars) == {"MODE": "fast", "THREADS": "2"}
    assert list(spec.runtime_env.pip) == ["requests"]
    assert list(spec.inputs[0].shape) == [-1, 4]
    assert spec.resources.memory == 512 * 2**20
    assert dict(spec.resources.custom) == {"cpu_node": 1.0}
    assert (spec.replicas.min, spec.replicas.max, spec.replicas.initial) == (1, 4, 2)
    assert (spec.max_concurrency, spec.max_queued, spec.proxies) == (4, 8, 2)
    assert spec.batching.max_batch_size == 16 and spec.batching.batch_wait_timeout_ms == 2
    assert spec.async_mode.enabled and spec.placement.spread == 2


def test_round_trip_through_dict(tmp_path: Path) -> None:
    path = tmp_path / "app.yaml"
    path.write_text(FULL)
    spec = load_spec(path)
    assert load_spec(spec_to_dict(spec)) == spec


def test_defaults_are_filled() -> None:
    spec = load_spec(_minimal())
    assert spec.namespace == "default" and spec.kind == "python" and spec.version == "1"
    assert (spec.replicas.min, spec.replicas.initial, spec.replicas.max) == (1, 1, 1)
    assert spec.max_concurrency > 0 and spec.max_queued > 0 and spec.proxies == 2
    assert spec.resources.num_cpus == DEFAULT_NUM_CPUS


def test_replicas_as_integer_and_batching_default_wait() -> None:
    spec = load_spec(_minimal(replicas=3, batching={"max_batch_size": 8}))
    assert (spec.replicas.initial, spec.replicas.max) == (3, 3)
    assert spec.batching.batch_wait_timeout_ms > 0


def test_message_input_is_copied_not_mutated() -> None:
    original = common_pb2.ApplicationSpec(name="m", import_path="a:B")
    spec = load_spec(original)
    assert spec.namespace == "default" and original.namespace == ""


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (_minimal(inputs=[{"name": "x", "datatype": "FP8"}]), "spec.inputs[0].datatype: 'FP8' is not"),
        (_minimal(outputs=[{"name": "y", "datatype": "FP32", "shape": [-3]}]), "spec.outputs[0].shape[0]"),
        (_minimal(inputs=[{"name": "x", "datatype": "FP32"}] * 2), "spec.inputs[1].name: 'x' appears twice"),
        (_minimal(replica=2), "spec: unknown key 'replica'"),
        (_minimal(resources={"cpus": 1}), "spec.resources: unknown key 'cpus'"),
        (_minimal(resources={"memory": "lots"}), "spec.resources.memory: 'lots' is not a size"),
        (_minimal(resources={"num_gpus": -1}), "spec.resources.num_gpus: must be >= 0"),
        (_minimal(max_concurrency="many"), "spec.max_concurrency"),
        (_minimal(replicas={"min": 3, "max": 2}), "spec.replicas: min 3 is above max 2"),
        (_minimal(kind="cobol"), "spec.kind: 'cobol' is not one of"),
        (_minimal(name="Bad_Name"), "spec.name: 'Bad_Name' must be"),
        ({"import_path": "a:B"}, "spec.name: required"),
        ({"name": "m"}, "spec.import_path: required"),
        (_minimal(import_path="no_colon"), "spec.import_path: 'no_colon' is not 'module:Class'"),
        (_minimal(inputs={"x": 1}), "spec.inputs: expected a list"),
    ],
)
def test_bad_specs_name_the_field(data: dict[str, object], message: str) -> None:
    with pytest.raises(InvalidArgument) as info:
        load_spec(data)
    assert message in str(info.value)


def test_unreadable_file_is_invalid_argument(tmp_path: Path) -> None:
    with pytest.raises(InvalidArgument, match=r"missing\.yaml"):
        load_spec(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: [unclosed")
    with pytest.raises(InvalidArgument, match="not valid YAML"):
        load_spec(bad)


def test_relative_working_dir_resolves_against_the_spec_file(tmp_path: Path) -> None:
    (tmp_path / "code").mkdir()
    path = tmp_path / "app.yaml"
    path.write_text("name: m\nimport_path: mod:M\nworking_dir: code\n")
    assert load_spec(path).working_dir == str(tmp_path / "code")


@pytest.mark.parametrize("name", ["iris", "latency", "greeter", "streaming"])
def test_example_specs_load(name: str) -> None:
    spec = load_spec(Path(__file__).parents[2] / "examples" / f"{name}.yaml")
    assert spec.inputs and spec.outputs
