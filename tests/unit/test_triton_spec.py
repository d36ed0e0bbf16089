"""``kind: triton`` specs: the repository path rules, the triton_args allow-list, the keeper's
roots, and which model_name the SDK sends to a Triton endpoint."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from servefleet.api import common_pb2, discovery_pb2
from servefleet.common.errors import InvalidArgument
from servefleet.keeper.policy import check_sources
from servefleet.sdk.client import served_model
from servefleet.spec import load_spec, spec_to_dict

EXAMPLE = Path(__file__).parents[2] / "examples" / "triton.yaml"


def _triton(**fields: Any) -> dict[str, Any]:
    return {"name": "t", "kind": "triton", "working_dir": "/srv/app", "model_repository": "models", **fields}


def test_the_example_loads_with_its_repository_inside_working_dir() -> None:
    spec = load_spec(EXAMPLE)
    assert spec.kind == "triton" and spec.working_dir == str(EXAMPLE.parent / "triton")
    assert spec.triton.model_repository == "models" and dict(spec.triton.args) == {"log-verbose": "0"}
    assert (Path(spec.working_dir) / "models" / "add_sub" / "config.pbtxt").is_file()
    assert spec.proxies == 0  # Triton endpoints are called directly unless proxies are asked for
    assert load_spec(spec_to_dict(spec)) == spec


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (_triton(model_repository=""), "spec.model_repository: required for kind 'triton'"),
        (_triton(working_dir=""), "is relative, so it needs a working_dir"),
        (_triton(model_repository="../other"), "must stay inside working_dir"),
        (_triton(model_repository="s3://bucket/models"), "must be a local path"),
        (_triton(triton_args={"grpc-port": 9000}), "'grpc-port' is not allowed"),
        (
            _triton(triton_args={"model-repository": "/etc"}),
            "ports, addresses and paths are set by servefleet",
        ),
        (_triton(triton_args={"log-verbose": "loud"}), "spec.triton_args.log-verbose: 'loud' does not match"),
        (_triton(triton_args={"load-model": "a b"}), "spec.triton_args.load-model"),
        (_triton(import_path="m:M"), "spec.import_path: not for kind 'triton'"),
        (_triton(max_batch_size=8), "dynamic_batching"),
        (_triton(runtime_env={"pip": ["scipy"]}), "runs models in the Triton environment"),
        (_triton(async_mode={"enabled": True}), "no broker pull"),
        ({"name": "p", "import_path": "m:M", "model_repository": "/m"}, "only for kind 'triton'"),
    ],
)
def test_bad_triton_specs_name_the_field(data: dict[str, Any], message: str) -> None:
    with pytest.raises(InvalidArgument) as info:
        load_spec(data)
    assert message in str(info.value)


def test_allowed_args_and_absolute_repositories() -> None:
    args = {
        "model-control-mode": "explicit",
        "load-model": "a,b",
        "log-verbose": 1,
        "strict-model-config": True,
    }
    spec = load_spec(_triton(working_dir="", model_repository="/srv/models", triton_args=args, proxies=2))
    assert dict(spec.triton.args) == {
        "model-control-mode": "explicit",
        "load-model": "a,b",
        "log-verbose": "1",
        "strict-model-config": "true",
    }
    assert spec.proxies == 2


def test_keeper_keeps_absolute_repositories_under_its_roots(tmp_path: Path) -> None:
    inside = load_spec(_triton(working_dir="", model_repository=str(tmp_path / "models")))
    check_sources(inside, roots=[tmp_path], allow_urls=False)
    relative = load_spec(_triton(working_dir=str(tmp_path / "app")))
    check_sources(relative, roots=[tmp_path], allow_urls=False)
    outside = load_spec(_triton(working_dir="", model_repository="/etc/models"))
    with pytest.raises(InvalidArgument, match=r"spec\.model_repository: '/etc/models' resolves to"):
        check_sources(outside, roots=[tmp_path], allow_urls=False)


def test_the_sdk_sends_a_triton_endpoints_repository_model_name() -> None:
    app = common_pb2.AppRef(namespace="ml", name="add-sub")

    def endpoint(kind: str, models: str = "") -> discovery_pb2.Endpoint:
        return discovery_pb2.Endpoint(kind=kind, labels={"models": models} if models else {})

    assert served_model(endpoint("proxy"), app) == "ml/add-sub"
    assert served_model(endpoint("triton"), app) == "ml/add-sub"  # no models label: the app's name
    assert served_model(endpoint("triton", "add_sub"), app) == "add_sub"
    assert served_model(endpoint("triton", "ml/add-sub,other"), app) == "ml/add-sub"
    with pytest.raises(InvalidArgument, match=r"serves Triton models \['a', 'b'\]: pass model=NAME"):
        served_model(endpoint("triton", "a,b"), app)
