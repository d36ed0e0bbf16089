"""Pipeline fixtures: a second Ray node joined to the session's head, carrying the custom resource
``{accelerator: 1}`` (it stands for a GPU node: the model stage asks for it, the cache stage does
not), plus the data plane's discovery and Ray-driver fixtures.

The second node is a plain ``ray start --address=<head>`` on its own ports, started with
servefleet.testing's launcher; it lives for this package only, so other tests keep one node.
"""

from __future__ import annotations

import os
import sys
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import pytest
import ray

from servefleet import stack
from servefleet.api import agent_pb2, common_pb2
from servefleet.common import health
from servefleet.common.appid import AppId
from servefleet.common.net import async_wait_for, free_port, wait_for
from servefleet.services.agent import masters
from servefleet.spec import load_spec
from servefleet.testing import DiscoveryProcess, ManagedProcess, RayCluster, RedisProcess

# The data plane's fixtures (a discovery process, this process as a Ray driver), shared, not copied.
from tests.integration.dataplane.conftest import CLUSTER, EXAMPLES, discovery_server, ray_driver

__all__ = ["discovery_server", "ray_driver"]

#: Room for the model stages of the pipelines one test runs side by side (one replica asks for 1).
ACCELERATOR = {"accelerator": 4.0}

# `ray start --address` refuses to join when RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0, which servefleet
# sets to keep Ray on loopback (servefleet/__init__.py). Lift only that refusal, so the node joins
# on 127.0.0.1 like the head: the CLI sees the flag on, address resolution still sees it off.
_RAY_START = """
import sys, types
import ray._private.ray_constants as constants
from ray.scripts import scripts

class _Joinable(types.ModuleType):
    ENABLE_RAY_CLUSTER = True
    def __getattr__(self, name):
        return getattr(constants, name)

scripts.ray_constants = _Joinable("ray_constants")
sys.exit(scripts.main())
"""


class RayWorkerNode(ManagedProcess):
    """``ray start --address=<head> --block`` with its own ports and custom resources."""

    name = "ray-worker"
    start_timeout = 60.0

    def __init__(self, head: RayCluster, resources: dict[str, float], num_cpus: int = 2) -> None:
        super().__init__()
        self.head = head
        self.resources = resources
        self.num_cpus = num_cpus
        self.helper_ports = {name: free_port() for name in stack.PORTS if name.startswith("ray_")}
        low = head.worker_ports[1] + 1  # right after the head's range, below the ephemeral range
        self.worker_ports = (low, low + 99)

    def argv(self) -> list[str]:
        import json

        ports = self.helper_ports
        return [
            sys.executable,
            "-c",
            _RAY_START,
            "start",
            f"--address={self.head.address}",
            "--block",
            "--node-ip-address=127.0.0.1",
            f"--num-cpus={self.num_cpus}",
            "--num-gpus=0",
            f"--resources={json.dumps(self.resources)}",
            "--disable-usage-stats",
            f"--dashboard-agent-listen-port={ports['ray_dashboard_agent']}",
            f"--dashboard-agent-grpc-port={ports['ray_dashboard_grpc']}",
            f"--node-manager-port={ports['ray_node_manager']}",
            f"--object-manager-port={ports['ray_object_manager']}",
            f"--metrics-export-port={ports['ray_metrics']}",
            f"--runtime-env-agent-port={ports['ray_runtime_env']}",
            f"--min-worker-port={self.worker_ports[0]}",
            f"--max-worker-port={self.worker_ports[1]}",
        ]

    def env(self) -> dict[str, str]:
        return {
            **os.environ,
            "PYTHONPATH": os.pathsep.join(sys.path),
            "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
        }

    def healthy(self) -> bool:
        log = (self.data_dir / f"{self.name}.log").read_text(errors="replace")
        return "Ray runtime started" in log and health.ray_health(self.head.address)[0]


@pytest.fixture(scope="package")
def accelerator_node(ray_cluster: RayCluster, ray_driver: str) -> Iterator[str]:
    """The node id of a second Ray node carrying ``{accelerator: 1}``."""
    node = RayWorkerNode(ray_cluster, ACCELERATOR).start()

    def joined() -> str | None:
        for entry in ray.nodes():
            if entry["Alive"] and entry["Resources"].get("accelerator"):
                return str(entry["NodeID"])
        return None

    node_id = wait_for(joined, timeout=60, interval=0.2, what="accelerator node in the cluster")
    yield str(node_id)
    node.cleanup()


@pytest.fixture(scope="package")
def cache_redis() -> Iterator[RedisProcess]:
    """The pipeline's Redis (cache entries), its own so killing it never touches other tests."""
    proc = RedisProcess().start()
    yield proc
    proc.cleanup()


def pipeline_spec(example: str = "llm", **init_args: Any) -> common_pb2.ApplicationSpec:
    """The example pipeline, small and fast for tests; ``init_args`` go to the cache stage."""
    spec = load_spec(EXAMPLES / f"{example}.yaml")
    for stage in spec.stages:
        stage.resources.num_cpus = 0.1  # several pipelines (and rollouts) fit on two small nodes
        if stage.name == "model":
            stage.init_args.update({"dim": 64, "layers": 2, "heads": 4, "max_tokens": 16, "eos": False})
        if stage.name == "cache":
            stage.init_args.update(init_args)
    return load_spec(spec)


async def deploy_pipeline(
    spec: common_pb2.ApplicationSpec, discovery: str, redis: str, revision: int = 1
) -> None:
    await masters.apply(spec, 1, revision, cluster=CLUSTER, discovery=discovery, redis=redis)

    async def settled() -> bool:
        status = await masters.status(AppId.parse(spec).ref())
        return (
            status is not None
            and not status.updating
            and status.revision == revision
            and status.version == spec.version
            and status.ready_replicas == status.replicas
            and len(status.proxy_addresses) == spec.proxies
        )

    await async_wait_for(settled, timeout=180, interval=0.2, what=f"pipeline {spec.name} deployed")


@pytest.fixture
async def pipelines(
    accelerator_node: str, discovery_server: DiscoveryProcess, cache_redis: RedisProcess
) -> AsyncIterator[Callable[..., Any]]:
    """``await pipelines(spec)`` deploys and waits; every pipeline deployed is removed afterwards."""
    apps: list[common_pb2.AppRef] = []

    async def _deploy(spec: common_pb2.ApplicationSpec, revision: int = 1) -> agent_pb2.MasterStatus:
        apps.append(AppId.parse(spec).ref())
        await deploy_pipeline(spec, discovery_server.address, cache_redis.address, revision)
        status = await masters.status(AppId.parse(spec).ref())
        assert status is not None
        return status

    yield _deploy
    for app in apps:
        await masters.remove(app)
