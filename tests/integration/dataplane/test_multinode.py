"""The data plane across two Ray nodes (the session's head + a worker node joined to it for this
module): replicas and proxies spread over both, proxies reach replicas on the other node by Ray
call, and SIGKILL of the worker node's raylet under load costs no request while its replica is
replaced on a node still alive."""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import Iterator
from typing import Any

import pytest
import ray

from servefleet.common.appid import AppId
from servefleet.common.net import async_wait_for
from servefleet.services.actors import RAY_NAMESPACE, proxy_prefix
from servefleet.services.agent import masters
from servefleet.testing import RayCluster, RayWorkerNode, joined_node

from .conftest import Load, example_spec, x_input

pytestmark = [pytest.mark.ray, pytest.mark.slow]


@pytest.fixture(scope="module")
def worker_node(ray_driver: str, ray_cluster: RayCluster) -> Iterator[RayWorkerNode]:
    with joined_node(ray_cluster, resources={"worker_node": 1000}, port_slot=15) as node:
        yield node


def worker_node_id() -> str:
    [node] = [n["NodeID"] for n in ray.nodes() if n["Alive"] and "worker_node" in n["Resources"]]
    return str(node)


async def replica_nodes(app: Any) -> dict[str, str]:
    """Ready replica -> the Ray node it runs on (a replica dying meanwhile is left out)."""

    async def node(name: str) -> str:
        info = await ray.get_actor(name, namespace=RAY_NAMESPACE).ready.remote()
        return str(info["node_id"])

    names = list(await masters.replica_stats(app))
    found = await asyncio.gather(*(asyncio.wait_for(node(n), 10) for n in names), return_exceptions=True)
    return {n: f for n, f in zip(names, found, strict=True) if isinstance(f, str)}


async def proxy_nodes(app: Any, count: int) -> dict[str, str]:
    """Proxy address -> the Ray node it runs on."""
    found = {}
    for i in range(count):
        proxy = ray.get_actor(proxy_prefix(app) + str(i), namespace=RAY_NAMESPACE)
        found[await proxy.address.remote()] = str((await proxy.stats.remote())["node_id"])
    return found


def head_node_id() -> str:
    [head] = [n["NodeID"] for n in ray.nodes() if n["Alive"] and "node:__internal_head__" in n["Resources"]]
    return str(head)


async def test_replicas_and_proxies_spread_over_both_nodes_and_serve_across_them(
    deployed: Any, worker_node: RayWorkerNode
) -> None:
    spec = example_spec("latency", name="latency-2nodes")
    status = await deployed(spec, 2)
    app = AppId.parse(spec).ref()
    assert len({n["NodeID"] for n in ray.nodes() if n["Alive"]}) >= 2
    replicas = await replica_nodes(app)
    proxies = await proxy_nodes(app, spec.proxies)
    assert len(set(replicas.values())) == 2, replicas  # one replica per node
    assert len(set(proxies.values())) == 2, proxies  # one proxy per node
    assert set(proxies) == set(status.proxy_addresses)
    for address in proxies:  # each proxy serves both replicas: its own by gRPC, the other by Ray call
        async with Load(address, spec.name, lambda: [x_input()], concurrency=4) as load:
            await load.wait_for_requests(100)
        assert not load.failures and load.ok >= 100
    served = {name: stats["served"] for name, stats in (await masters.replica_stats(app)).items()}
    assert all(count > 0 for count in served.values()), served


async def test_sigkill_of_the_worker_nodes_raylet_under_load_loses_no_request(
    deployed: Any, worker_node: RayWorkerNode
) -> None:
    spec = example_spec("latency", name="latency-nodeloss")
    await deployed(spec, 2)
    app = AppId.parse(spec).ref()
    head, lost = head_node_id(), worker_node_id()
    before = await replica_nodes(app)
    assert len(set(before.values())) == 2 and lost in before.values(), before
    on_head = [a for a, node in (await proxy_nodes(app, spec.proxies)).items() if node == head]
    try:
        async with Load(on_head[0], spec.name, lambda: [x_input()], concurrency=8) as load:
            await load.wait_for_requests(100)
            os.kill(worker_node.raylet_pid(), signal.SIGKILL)  # the node is lost

            async def replaced_elsewhere() -> bool:
                now = await replica_nodes(app)
                try:  # the lost node's proxy too: replaced on a node still alive
                    status = await masters.status(app)  # a master being restarted: a timeout
                    proxies = await proxy_nodes(app, spec.proxies)
                except Exception:
                    return False
                return (
                    len(now) == 2
                    and lost not in now.values()
                    and lost not in proxies.values()
                    and status is not None
                    and status.ready_replicas == 2
                )

            await async_wait_for(
                replaced_elsewhere, timeout=180, interval=0.5, what="replica and proxy replaced"
            )
            await load.wait_for_requests(100)
        print(
            f"\nworker raylet SIGKILL under load: {load.ok} ok, failures {dict(load.failures)}, "
            f"slowest {load.slowest_s:.2f}s"
        )
        assert not load.failures
        assert load.slowest_s < load.timeout_s
    finally:
        worker_node.kill()
