"""The control plane end to end: real etcd, discovery, a keeper and two real Ray clusters (one CPU
each), each with its cluster agent, all as processes; the data plane from ``services.agent.masters``."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np
import pytest
import tritonclient.grpc as tc
import yaml
from click.testing import CliRunner, Result

from servefleet.api import (
    agent_pb2,
    agent_pb2_grpc,
    discovery_pb2,
    discovery_pb2_grpc,
    keeper_pb2,
    keeper_pb2_grpc,
)
from servefleet.cli.main import cli
from servefleet.common.channels import sync_channel
from servefleet.common.net import free_port, wait_for
from servefleet.spec import load_spec
from servefleet.testing import EtcdProcess, RayCluster, ServiceProcess
from tests.integration.keeper.conftest import Procs, bearer

pytestmark = [pytest.mark.slow, pytest.mark.ray]
AppState = keeper_pb2.AppState
IRIS = Path(__file__).resolve().parents[3] / "examples" / "iris.yaml"


@dataclass
class Fleet:
    procs: Procs
    clusters: dict[str, RayCluster]
    keeper_port: int
    keeper_proc: ServiceProcess
    discovery: str
    agents: dict[str, ServiceProcess]
    agent_addresses: dict[str, str]

    @property
    def keeper(self) -> str:
        return f"127.0.0.1:{self.keeper_port}"

    def stub(self) -> keeper_pb2_grpc.KeeperStub:
        return keeper_pb2_grpc.KeeperStub(grpc.insecure_channel(self.keeper))

    def md(self) -> list[tuple[str, str]]:
        return bearer(self.procs.admin_token())

    def restart_agent(self, name: str) -> str:
        self.agents[name].kill()
        self.agents[name], address = self.procs.agent(
            ray=self.clusters[name].address, keeper=self.keeper, discovery=self.discovery, cluster=name
        )
        self.agent_addresses[name] = address
        return address

    def masters(self, app: str) -> dict[str, agent_pb2.MasterStatus]:
        """Cluster -> the app's master as that cluster's agent reports it (what the keeper has done)."""
        found = {}
        for name, address in self.agent_addresses.items():
            with sync_channel(address, token=self.procs.admin_token()) as channel:
                listed = agent_pb2_grpc.ClusterAgentStub(channel).ListMasters(
                    agent_pb2.ListMastersRequest(), timeout=30
                )
            found.update((name, m) for m in listed.masters if m.app.name == app)
        return found

    def kill_keeper_once_applied(self, app: str, revision: int, state: int) -> None:
        """SIGKILL the keeper after its reconciler has observably acted on ``revision`` (an agent's
        master holds it) while the app still reads ``state``: a kill in the middle, not before."""

        def applied() -> bool:
            return any(m.revision == revision for m in self.masters(app).values())

        wait_for(applied, timeout=60, interval=0.05, what=f"{app} revision {revision} applied by an agent")
        assert self.status(app).state == state, "converged before the kill: not a kill mid-way"
        self.keeper_proc.kill()

    def restart_keeper(self) -> None:
        self.keeper_proc, _ = self.procs.keeper(self.keeper_port)

    def status(self, name: str) -> keeper_pb2.ApplicationStatus:
        ref = keeper_pb2.GetApplicationRequest(app={"namespace": "default", "name": name})
        return self.stub().GetApplication(ref, metadata=self.md(), timeout=10)

    def wait_state(
        self, name: str, state: int, version: str, timeout: float = 240
    ) -> keeper_pb2.ApplicationStatus:
        def reached() -> keeper_pb2.ApplicationStatus | None:
            try:
                got = self.status(name)
            except grpc.RpcError:
                return None  # the keeper may be restarting
            placed = got.placements and all(p.version == version for p in got.placements)
            return got if got.state == state and placed else None

        try:
            return wait_for(
                reached, timeout=timeout, interval=0.5, what=f"{name} {AppState.Name(state)} v{version}"
            )  # type: ignore[return-value]
        except TimeoutError:
            last = self.status(name)
            raise AssertionError(
                f"{name}: {AppState.Name(last.state)} {last.reason}\n{self.keeper_proc.tail()}"
            ) from None

    def gone(self, name: str) -> bool:
        try:
            self.status(name)
        except grpc.RpcError as exc:
            return exc.code() == grpc.StatusCode.NOT_FOUND  # type: ignore[attr-defined,no-any-return]
        return False


def named_actors(ray_address: str) -> list[str]:
    """Names of every data-plane actor on a Ray cluster, asked from a fresh driver."""
    code = (
        f"import json, ray; ray.init(address={ray_address!r}, logging_level='ERROR', log_to_driver=False);"
        "print(json.dumps(sorted(a['name'] for a in ray.util.list_named_actors(all_namespaces=True)"
        " if a['namespace'] == 'servefleet')))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True
    )
    return json.loads(out.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]


def actors_of(names: list[str], app: str) -> dict[str, int]:
    counts = {"master": 0, "replica": 0, "proxy": 0}
    for name in names:
        kind, _, rest = name.partition(":")
        if rest.startswith(f"default/{app}"):
            counts[kind] = counts.get(kind, 0) + 1
    return counts


@pytest.fixture(scope="module")
def fleet(etcd: EtcdProcess) -> Iterator[Fleet]:
    procs = Procs(etcd)
    clusters = {name: RayCluster(num_cpus=1).start() for name in ("east", "west")}
    try:
        discovery_address = procs.service("discovery", "--etcd", etcd.address, name="discovery").address
        port = free_port()
        keeper_proc, _ = procs.keeper(port)
        started = {
            name: procs.agent(
                ray=cluster.address, keeper=f"127.0.0.1:{port}", discovery=discovery_address, cluster=name
            )
            for name, cluster in clusters.items()
        }
        agents = {name: child for name, (child, _) in started.items()}
        addresses = {name: address for name, (_, address) in started.items()}
        fleet = Fleet(procs, clusters, port, keeper_proc, discovery_address, agents, addresses)

        def both_alive() -> bool:
            found = fleet.stub().ListClusters(
                keeper_pb2.ListClustersRequest(), metadata=fleet.md(), timeout=10
            )
            return sorted(c.name for c in found.clusters if c.alive) == ["east", "west"]

        wait_for(both_alive, timeout=60, interval=0.5, what="both clusters registered")
        yield fleet
    finally:
        procs.stop()
        for cluster in clusters.values():
            cluster.cleanup()


def iris(name: str, version: str = "1", spread: int = 2):  # type: ignore[no-untyped-def]
    spec = load_spec(IRIS)
    spec.name, spec.version = name, version
    spec.replicas.initial = spec.replicas.min = 1
    spec.placement.spread = spread
    return spec


def infer(address: str, model: str) -> np.ndarray:
    client = tc.InferenceServerClient(url=address)
    features = tc.InferInput("features", [2, 4], "FP32")
    features.set_data_from_numpy(np.array([[5.0, 3.4, 1.5, 0.2], [6.7, 3.0, 5.6, 2.1]], dtype=np.float32))
    return client.infer(model, [features], client_timeout=30).as_numpy("label")  # type: ignore[no-any-return]


def test_spread_app_answers_through_both_clusters_and_delete_removes_everything(fleet: Fleet) -> None:
    stub = fleet.stub()
    stub.SubmitApplication(
        keeper_pb2.SubmitApplicationRequest(spec=iris("spread")), metadata=fleet.md(), timeout=10
    )
    running = fleet.wait_state("spread", AppState.RUNNING, "1")
    assert sorted(p.cluster for p in running.placements) == ["east", "west"]
    resolver = discovery_pb2_grpc.DiscoveryStub(
        sync_channel(fleet.discovery, token=fleet.procs.admin_token())
    )

    def proxies() -> list[discovery_pb2.Endpoint] | None:
        found = resolver.Resolve(
            discovery_pb2.ResolveRequest(app={"namespace": "default", "name": "spread"}, kind="proxy"),
            timeout=10,
        ).endpoints
        return list(found) if {e.labels["cluster"] for e in found} == {"east", "west"} else None

    endpoints = wait_for(proxies, timeout=60, interval=0.5, what="proxies of both clusters in discovery")
    for endpoint in endpoints:  # type: ignore[attr-defined]
        assert infer(endpoint.address, "spread").tolist() == [0, 2], endpoint.labels["cluster"]

    # An agent killed and restarted finds the master that kept running, and the app stays served.
    restarted = fleet.restart_agent("east")
    masters = agent_pb2_grpc.ClusterAgentStub(
        sync_channel(restarted, token=fleet.procs.admin_token())
    ).ListMasters(agent_pb2.ListMastersRequest(), timeout=30)
    assert [(m.app.name, m.revision, m.ready_replicas) for m in masters.masters] == [
        ("spread", running.revision, 1)
    ]
    assert fleet.wait_state("spread", AppState.RUNNING, "1").revision == running.revision

    stub.DeleteApplication(
        keeper_pb2.DeleteApplicationRequest(app=running.app), metadata=fleet.md(), timeout=10
    )
    wait_for(lambda: fleet.gone("spread"), timeout=120, interval=0.5, what="spread deleted")
    for name, cluster in fleet.clusters.items():
        assert actors_of(named_actors(cluster.address), "spread") == {
            "master": 0,
            "replica": 0,
            "proxy": 0,
        }, name


def test_keeper_sigkill_mid_deploy_and_mid_update_converges_without_duplicates(fleet: Fleet) -> None:
    stub = fleet.stub()
    submitted = stub.SubmitApplication(
        keeper_pb2.SubmitApplicationRequest(spec=iris("crashy")), metadata=fleet.md(), timeout=10
    )
    fleet.kill_keeper_once_applied("crashy", submitted.revision, AppState.DEPLOYING)  # mid-deploy
    fleet.restart_keeper()
    fleet.wait_state("crashy", AppState.RUNNING, "1")

    current = fleet.status("crashy")
    assert current.revision == submitted.revision
    stub = fleet.stub()
    update = keeper_pb2.UpdateApplicationRequest(
        spec=iris("crashy", version="2"), expected_revision=current.revision
    )
    updated = stub.UpdateApplication(update, metadata=fleet.md(), timeout=10)
    fleet.kill_keeper_once_applied("crashy", updated.revision, AppState.UPDATING)  # mid-update
    fleet.restart_keeper()
    final = fleet.wait_state("crashy", AppState.RUNNING, "2")
    assert final.spec.version == "2" and final.replicas == 1

    def settled(address: str) -> dict[str, int] | None:
        counts = actors_of(named_actors(address), "crashy")
        return counts if counts["replica"] == 1 else None

    for name, cluster in fleet.clusters.items():
        counts = wait_for(
            lambda c=cluster: settled(c.address), timeout=90, interval=1, what=f"{name} drained"
        )
        assert counts == {"master": 1, "replica": 1, "proxy": 1}, (name, counts)
    stub.DeleteApplication(
        keeper_pb2.DeleteApplicationRequest(app=final.app), metadata=fleet.md(), timeout=10
    )
    wait_for(lambda: fleet.gone("crashy"), timeout=120, interval=0.5, what="crashy deleted")


def test_cli_deploy_follows_to_running_and_lists_endpoints(fleet: Fleet, tmp_path: Path) -> None:
    state = fleet.procs.workdir
    (state / "stack.json").write_text(
        json.dumps({"keeper": fleet.keeper, "discovery": fleet.discovery, "parts": []})
    )
    data = yaml.safe_load(IRIS.read_text())
    data.update(name="viacli", replicas=1)
    spec_file = tmp_path / "viacli.yaml"
    spec_file.write_text(yaml.safe_dump(data))

    def cli_run(*args: str) -> Result:
        return CliRunner().invoke(cli, [*args, "--state-dir", str(state)], env={"SERVEFLEET_TOKEN": None})

    deployed = cli_run("app", "deploy", str(spec_file), "--timeout", "240")
    assert deployed.exit_code == 0, deployed.output
    assert "DEPLOYING" in deployed.output and "RUNNING" in deployed.output

    def listed() -> list[dict[str, object]]:
        return json.loads(cli_run("app", "endpoints", "viacli", "-o", "json").output)  # type: ignore[no-any-return]

    endpoints = wait_for(listed, timeout=60, interval=0.5, what="viacli endpoints")
    assert {e["kind"] for e in endpoints} == {"proxy"}  # type: ignore[attr-defined,index]
    assert endpoints[0]["labels"]["cluster"] in fleet.clusters  # type: ignore[index]
    # `app infer` learns the input datatypes from the endpoint's ModelMetadata and calls via the SDK.
    called = cli_run(
        "app",
        "infer",
        "viacli",
        "-i",
        "features=[[5.1, 3.5, 1.4, 0.2], [6.7, 3.0, 5.2, 2.3]]",
        "--requests",
        "5",
        "-o",
        "json",
    )
    assert called.exit_code == 0, called.output
    outputs = {row["output"]: row for row in json.loads(called.stdout)}
    assert outputs["label"]["value"] == [0, 2] and outputs["scores"]["shape"] == [2, 3]
    refused = cli_run("app", "infer", "viacli", "-i", "petals=[[1.0]]")
    assert refused.exit_code != 0 and "NAME one of ['features']" in refused.output
    data["version"] = "2"
    spec_file.write_text(yaml.safe_dump(data))
    updated = cli_run("app", "update", str(spec_file), "--timeout", "240")
    assert updated.exit_code == 0, updated.output
    assert [p.version for p in fleet.status("viacli").placements] == ["2"]  # it waited for the rollout
    deleted = cli_run("app", "delete", "viacli", "--wait", "--timeout", "120")
    assert deleted.exit_code == 0 and "DELETED" in deleted.output, deleted.output
