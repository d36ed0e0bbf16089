"""The Triton example deployed through the keeper, as a user does it: `servefleet app deploy`,
`app endpoints` (kind triton), tritonclient sync and asyncio, the SDK and `app infer` all answer;
ModelMetadata matches the repository's config; bad input is Triton's INVALID_ARGUMENT; a broken
repository FAILs with Triton's reason in `app status`; delete leaves no tritonserver."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import ray
import tritonclient.grpc as tritongrpc
import tritonclient.grpc.aio as tritonaio
import yaml
from click.testing import CliRunner, Result
from tritonclient.utils import InferenceServerException

from servefleet.cli.main import cli
from servefleet.common.errors import InvalidArgument
from servefleet.common.net import wait_for
from servefleet.sdk import Client
from servefleet.services.actors import RAY_NAMESPACE, REPLICA_PREFIX
from servefleet.testing import RayCluster
from tests.integration.keeper.conftest import Procs
from tests.integration.triton.conftest import EXAMPLE, MODEL, add_sub_inputs, broken_repository, pid_alive

pytestmark = [pytest.mark.ray, pytest.mark.slow]
SPEC = EXAMPLE.parent / "triton.yaml"
#: What examples/triton/models/add_sub/config.pbtxt declares, as ModelMetadata reports it.
CONFIG_TENSORS = {
    "inputs": [("INPUT0", "FP32", ["-1"]), ("INPUT1", "FP32", ["-1"])],
    "outputs": [("OUTPUT0", "FP32", ["-1"]), ("OUTPUT1", "FP32", ["-1"])],
}


def run(state: Path, *args: str) -> Result:
    return CliRunner().invoke(cli, [*args, "--state-dir", str(state)], env={"SERVEFLEET_TOKEN": None})


def tritonserver_pids(app: str) -> list[int]:
    """The tritonserver and stub pids of every replica of ``default/app``, from the actors."""
    names = [
        a["name"]
        for a in ray.util.list_named_actors(all_namespaces=True)
        if a["namespace"] == RAY_NAMESPACE and a["name"].startswith(f"{REPLICA_PREFIX}default/{app}:")
    ]
    return [
        pid for name in names for pid in ray.get(ray.get_actor(name, namespace=RAY_NAMESPACE).pids.remote())
    ]


async def test_the_example_through_the_keeper(
    procs: Procs,
    ray_cluster: RayCluster,
    ray_driver: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    roots = os.pathsep.join([str(EXAMPLE.parents[1]), str(tmp_path)])
    env = procs.env()
    monkeypatch.setattr(procs, "env", lambda: {**env, "SERVEFLEET_KEEPER_ALLOWED_ROOTS": roots})
    _, keeper = procs.keeper()
    # Its own discovery, on the keeper's etcd prefix: there it finds the tokens this keeper issues.
    discovery = procs.service("discovery", "--etcd", procs.etcd.address, name="discovery").address
    procs.agent(ray=ray_cluster.address, keeper=keeper, discovery=discovery, cluster="tri")
    state = procs.workdir
    (state / "stack.json").write_text(json.dumps({"keeper": keeper, "discovery": discovery, "parts": []}))

    deployed = run(state, "app", "deploy", str(SPEC), "--timeout", "240")
    assert deployed.exit_code == 0, deployed.output
    endpoints = json.loads(run(state, "app", "endpoints", "add-sub", "-o", "json").output)
    assert len(endpoints) == 2 and {e["kind"] for e in endpoints} == {"triton"}
    assert all(e["labels"]["models"] == MODEL and e["labels"]["cluster"] == "tri" for e in endpoints)
    pids = tritonserver_pids("add-sub")
    assert len(pids) == 4 and all(pid_alive(pid) for pid in pids)  # 2 servers, 2 stubs

    a, b = np.arange(6, dtype=np.float32), np.linspace(0, 1, 6, dtype=np.float32)
    for endpoint in endpoints:
        sync = tritongrpc.InferenceServerClient(endpoint["address"])
        result = sync.infer(MODEL, add_sub_inputs(a, b))
        np.testing.assert_allclose(result.as_numpy("OUTPUT0"), a + b)
        metadata = sync.get_model_metadata(MODEL, as_json=True)
        for key, tensors in CONFIG_TENSORS.items():
            assert [(t["name"], t["datatype"], t["shape"]) for t in metadata[key]] == tensors
        assert metadata["platform"] == "python" and metadata["versions"] == ["1"]
        sync.close()
        aio = tritonaio.InferenceServerClient(endpoint["address"])
        result = await aio.infer(MODEL, add_sub_inputs(a, b))
        np.testing.assert_allclose(result.as_numpy("OUTPUT1"), a - b)
        with pytest.raises(InferenceServerException) as info:  # Triton's own check of the datatype
            await aio.infer(MODEL, [*add_sub_inputs(a, b)[:1], _int_input("INPUT1", 6)])
        assert info.value.status() == "StatusCode.INVALID_ARGUMENT", info.value
        await aio.close()

    with Client(discovery, token=procs.admin_token()) as client:
        out = client.infer("add-sub", {"INPUT0": a, "INPUT1": b})
        np.testing.assert_allclose(out["OUTPUT0"], a + b)
        with pytest.raises(InvalidArgument, match="must match"):  # the model's own INVALID_ARG
            client.infer("add-sub", {"INPUT0": a, "INPUT1": b[:3]})
    called = run(state, "app", "infer", "add-sub", "-i", "INPUT0=[1, 2]", "-i", "INPUT1=[3, 5]", "-o", "json")
    assert called.exit_code == 0, called.output
    assert {r["output"]: r["value"] for r in json.loads(called.output)} == {
        "OUTPUT0": [4, 7],
        "OUTPUT1": [-2, -3],
    }

    # A repository Triton refuses: FAILED, with Triton's own reason in `app status`.
    broken = tmp_path / "broken.yaml"
    spec = {"name": "broken", "kind": "triton", "model_repository": str(broken_repository(tmp_path))}
    broken.write_text(yaml.safe_dump(spec))
    failed = run(state, "app", "deploy", str(broken), "--timeout", "240")
    assert failed.exit_code == 1 and "FAILED" in failed.output, failed.output
    status = run(state, "app", "status", "broken", "-o", "json")
    assert "failed to read text proto" in status.output and "config.pbtxt" in status.output, status.output

    for app in ("add-sub", "broken"):
        deleted = run(state, "app", "delete", app, "--wait", "--timeout", "120")
        assert deleted.exit_code == 0, deleted.output
    wait_for(lambda: not any(pid_alive(pid) for pid in pids), timeout=30, what=f"tritonservers {pids} gone")


def _int_input(name: str, size: int) -> tritongrpc.InferInput:
    tensor = tritongrpc.InferInput(name, [size], "INT32")
    tensor.set_data_from_numpy(np.zeros(size, dtype=np.int32))
    return tensor
