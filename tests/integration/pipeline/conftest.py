"""Pipeline fixtures: a second Ray node joined to the session's head, carrying the custom resource
``accelerator`` (it stands for a GPU node: the model stage asks for it, the cache stage does
not), plus the data plane's discovery and Ray-driver fixtures.

The second node is servefleet.testing's ``RayWorkerNode`` (``ray start --address=<head>`` on its
own ports); it lives for this package only, so other tests keep one node.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import pytest
import ray

from servefleet.api import agent_pb2, common_pb2
from servefleet.common.appid import AppId
from servefleet.common.auth import ENDPOINT
from servefleet.common.net import async_wait_for, wait_for
from servefleet.services.agent import masters
from servefleet.spec import load_spec
from servefleet.testing import Credentials, DiscoveryProcess, RayCluster, RayWorkerNode, RedisProcess

# The data plane's fixtures (a discovery process, this process as a Ray driver), shared, not copied.
from tests.integration.dataplane.conftest import CLUSTER, EXAMPLES, discovery_server, ray_driver

__all__ = ["discovery_server", "ray_driver"]

#: Room for the model stages of the pipelines one test runs side by side (one replica asks for 1).
ACCELERATOR = {"accelerator": 4.0}


@pytest.fixture(scope="package")
def accelerator_node(ray_cluster: RayCluster, ray_driver: str) -> Iterator[str]:
    """The node id of a second Ray node carrying ``accelerator``."""
    node = RayWorkerNode(ray_cluster, resources=ACCELERATOR, port_slot=45).start()

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
    spec: common_pb2.ApplicationSpec, discovery: str, redis: str, credentials: Credentials, revision: int = 1
) -> None:
    """Apply as the cluster agent does: with the pipeline's endpoint token (it serves every stage)."""
    token = await credentials.issue(ENDPOINT, app=AppId.parse(spec).key)
    await masters.apply(
        spec, 1, revision, cluster=CLUSTER, discovery=discovery, redis=redis, credential=token
    )

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
    accelerator_node: str,
    discovery_server: DiscoveryProcess,
    cache_redis: RedisProcess,
    credentials: Credentials,
) -> AsyncIterator[Callable[..., Any]]:
    """``await pipelines(spec)`` deploys and waits; every pipeline deployed is removed afterwards."""
    apps: list[common_pb2.AppRef] = []

    async def _deploy(spec: common_pb2.ApplicationSpec, revision: int = 1) -> agent_pb2.MasterStatus:
        apps.append(AppId.parse(spec).ref())
        await deploy_pipeline(spec, discovery_server.address, cache_redis.address, credentials, revision)
        status = await masters.status(AppId.parse(spec).ref())
        assert status is not None
        return status

    yield _deploy
    for app in apps:
        await masters.remove(app)
