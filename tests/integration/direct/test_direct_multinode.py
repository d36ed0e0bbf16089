"""``kind: direct`` across two Ray nodes (the session's head + a worker node joined to it for this
module): one C++ direct-ingress replica per node, both serving SDK callers with no proxy; the
worker node lost under that load (its raylet and every process on it SIGKILLed at once) costs no
call: callers' deadlines outlast the replacement, the SDK retries a dead ingress on the live one,
and the lost node's replica is replaced on the head. And the cost a node's death must have: an
app's only replica, pinned to spare nodes, lost with its node: the calls whose deadline ends before
its replacement registers are lost, and only those."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
import ray

from servefleet.api import common_pb2
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
#: A resource only the spare nodes of the single-replica test have (the app's replica needs it).
PINNED = "direct_pinned"


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


async def replaced(
    spec: common_pb2.ApplicationSpec, victim: str, nodes: set[str], count: int
) -> dict[str, dict[str, Any]]:
    """The app's ``count`` ready replicas once ``victim`` is gone and every one runs on ``nodes``."""

    async def done() -> dict[str, dict[str, Any]] | None:
        try:
            now = await asyncio.wait_for(ready_replicas(spec, count), 10)
        except Exception:  # a replica dying (Ray has not noticed yet) or starting meanwhile
            return None
        return now if victim not in now and all(r["node_id"] in nodes for r in now.values()) else None

    found = await async_wait_for(
        done, timeout=180, interval=0.5, what=f"{victim} replaced on {sorted(nodes)}"
    )
    assert isinstance(found, dict)
    return found


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

            after = await replaced(spec, victim, {head}, 2)
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


async def test_the_only_replicas_node_lost_costs_exactly_the_calls_whose_deadline_ended_in_the_outage(
    ray_driver: str,
    ray_cluster: RayCluster,
    discovery_server: DiscoveryProcess,
    ctr_model_path: Path,
    ctr_reference: ctr.FactorizationMachine,
    credentials: Credentials,
) -> None:
    """The cost a node's death must have: the app's only replica (pinned to two spare nodes by a
    resource the head lacks) dies with its node, and nothing can answer until its replacement on the
    other node registers. SDK callers whose deadline (120 s) outlasts that lose nothing; callers with
    a 2 s deadline lose exactly the calls whose deadline ran out in that outage, and no other."""
    spec = direct_spec(ctr_model_path, "ctr-pinned")
    spec.replicas.min = spec.replicas.max = spec.replicas.initial = 1
    spec.resources.custom[PINNED] = 1
    app = f"recs/{spec.name}"
    token = discovery_server.token
    slots = {"direct_node_a": 27, "direct_node_b": 29}
    with contextlib.ExitStack() as nodes:
        joined = {
            marker: nodes.enter_context(
                joined_node(ray_cluster, resources={marker: 1000, PINNED: 10}, port_slot=slot)
            )
            for marker, slot in slots.items()
        }
        node_of = {n["NodeID"]: m for n in ray.nodes() if n["Alive"] for m in slots if m in n["Resources"]}
        await apply_new(spec, discovery_server, credentials)
        try:
            [(victim, info)] = (await ready_replicas(spec, 1)).items()
            [spare] = [node for node, marker in node_of.items() if node != info["node_id"]]
            async with (
                AsyncClient(discovery_server.address, timeout=120.0, token=token) as patient,
                AsyncClient(discovery_server.address, timeout=2.0, token=token) as hasty,
            ):
                await _seen(patient, {info["address"]}, app)
                await _seen(hasty, {info["address"]}, app)
                pid = await ray.get_actor(victim, namespace=RAY_NAMESPACE).__ray_call__.remote(
                    lambda _: os.getpid()
                )
                loads = (
                    CheckedLoad(patient, app, ctr_reference, concurrency=2, batch=16, rtol=1e-5),
                    CheckedLoad(hasty, app, ctr_reference, concurrency=2, batch=16, rtol=1e-5),
                )
                async with loads[0] as slow_to_give_up, loads[1] as quick_to_give_up:
                    await quick_to_give_up.wait_for_requests(100)
                    for process in (joined[node_of[info["node_id"]]].raylet_pid(), pid):
                        os.kill(process, signal.SIGKILL)
                    killed = time.monotonic()
                    [new] = (await replaced(spec, victim, {spare}, 1)).values()
                    await _seen(patient, {new["address"]}, app)
                    back = time.monotonic()
                    await slow_to_give_up.wait_for_requests(100)
                    await quick_to_give_up.wait_for_requests(100)
            outage = back - killed
            print(
                f"\nonly replica's node lost: served again {outage:.1f}s later on the spare node; patient "
                f"(120 s): {slow_to_give_up.ok} ok, failures {sum(slow_to_give_up.failures.values())}; "
                f"hasty (2 s): {quick_to_give_up.ok} ok, {len(quick_to_give_up.failed_at)} failed "
                f"{dict(quick_to_give_up.failures)}"
            )
            assert slow_to_give_up.failures == {} and slow_to_give_up.wrong == 0 and outage < 120
            lost = quick_to_give_up.failed_at
            assert lost and quick_to_give_up.wrong == 0  # a 2 s deadline inside the outage is lost...
            # ...and only those: begun at most one deadline before the kill (in flight on the lost
            # node) and before the new replica was in the view (0.5 s: two clients' watches differ).
            assert all(killed - 2.5 <= began <= back + 0.5 for began in lost)
        finally:
            await masters.remove(AppId.parse(spec).ref())
