"""``kind: direct`` across two Ray nodes (the session's head + a worker node joined to it for this
module): one C++ direct-ingress replica per node, both serving SDK callers with no proxy; the
worker node lost under that load (its raylet and every process on it SIGKILLed at once) costs no
call: callers' deadlines outlast the replacement, the SDK retries a dead ingress on the live one,
and the lost node's replica is replaced on the head."""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import ray

from servefleet.common.appid import AppId
from servefleet.common.net import async_wait_for
from servefleet.direct import ctr
from servefleet.sdk import AsyncClient
from servefleet.services.actors import RAY_NAMESPACE
from servefleet.services.agent import masters
from servefleet.testing import Credentials, DiscoveryProcess, RayCluster, RayWorkerNode, joined_node
from tests.integration.sharded.conftest import CheckedLoad

from .test_direct_kind import _seen, apply_new, direct_spec, ready_replicas

pytestmark = [pytest.mark.ray, pytest.mark.slow]
NAME = "ctr-2nodes"
APP = f"recs/{NAME}"
NODE_RESOURCE = "direct_worker_node"


@pytest.fixture(scope="module")
def worker_node(ray_driver: str, ray_cluster: RayCluster) -> Iterator[RayWorkerNode]:
    with joined_node(ray_cluster, resources={NODE_RESOURCE: 1000}, port_slot=25) as node:
        yield node


@pytest.fixture
async def client(discovery_server: DiscoveryProcess) -> AsyncIterator[AsyncClient]:
    # 60 s: longer than losing a node takes to be noticed and its replica replaced here.
    async with AsyncClient(discovery_server.address, timeout=60.0, token=discovery_server.token) as client:
        yield client


def node_ids() -> tuple[str, str]:
    """(head, this module's worker node)."""
    alive = [n for n in ray.nodes() if n["Alive"]]
    [head] = [n["NodeID"] for n in alive if "node:__internal_head__" in n["Resources"]]
    [worker] = [n["NodeID"] for n in alive if NODE_RESOURCE in n["Resources"]]
    return str(head), str(worker)


async def test_worker_node_lost_under_sdk_load_replaces_its_direct_replica_on_the_head_losing_no_call(
    worker_node: RayWorkerNode,
    discovery_server: DiscoveryProcess,
    client: AsyncClient,
    ctr_model_path: Path,
    ctr_reference: ctr.FactorizationMachine,
    credentials: Credentials,
) -> None:
    spec = direct_spec(ctr_model_path, NAME)
    await apply_new(spec, discovery_server, credentials)
    try:
        head, lost = node_ids()
        before = await ready_replicas(spec)
        assert sorted(r["node_id"] for r in before.values()) == sorted([head, lost]), before  # SPREAD
        await _seen(client, {r["address"] for r in before.values()}, APP)
        [(victim, doomed)] = [(n, r) for n, r in before.items() if r["node_id"] == lost]
        pid = await ray.get_actor(victim, namespace=RAY_NAMESPACE).__ray_call__.remote(lambda _: os.getpid())
        async with CheckedLoad(client, APP, ctr_reference, concurrency=4, batch=16, rtol=1e-5) as load:
            await load.wait_for_requests(200)
            for process in (worker_node.raylet_pid(), pid):  # a lost node takes every process on it
                os.kill(process, signal.SIGKILL)
            killed = asyncio.get_running_loop().time()

            async def replaced_on_the_head() -> dict[str, dict[str, str]] | None:
                try:
                    now = await asyncio.wait_for(ready_replicas(spec), 10)
                except Exception:  # a replica dying or starting meanwhile
                    return None
                return now if all(r["node_id"] == head for r in now.values()) else None

            after = await async_wait_for(
                replaced_on_the_head, timeout=180, interval=0.5, what="the lost replica replaced on the head"
            )
            assert isinstance(after, dict) and victim not in after
            await _seen(client, {r["address"] for r in after.values()}, APP)  # the lost one left discovery
            moved_s = asyncio.get_running_loop().time() - killed
            await load.wait_for_requests(200)
        print(
            f"\nworker node lost under direct load: replaced on the head and both in the SDK's view "
            f"{moved_s:.1f}s after the SIGKILL; {load.ok} calls ok, failures {dict(load.failures)}, "
            f"wrong {load.wrong}, slowest {max(load.latencies):.2f}s (deadline 60s); lost {doomed['address']}"
        )
        assert load.failures == {} and load.wrong == 0 and load.ok >= 400
    finally:
        await masters.remove(AppId.parse(spec).ref())
