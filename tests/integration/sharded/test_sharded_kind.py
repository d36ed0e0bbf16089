"""``kind: sharded`` end to end on two Ray nodes and real discovery: a 1M-row CTR table split over
shard actors (each holding only its part), a router registered in discovery, the SDK calling it.

One app (hash, 4 shards x 2 replicas, 24 MiB table budget per shard actor) serves the exactness,
memory, hedging and SIGKILL tests in that order; resharding uses its own app (range 2 -> 4)."""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import AsyncIterator
from pathlib import Path

import numpy as np
import pytest
import ray

from servefleet.api import common_pb2
from servefleet.common.appid import AppId
from servefleet.common.config import settings
from servefleet.common.errors import InvalidArgument
from servefleet.common.net import async_wait_for
from servefleet.direct import INPUT_NAME, OUTPUT_NAME, ctr
from servefleet.sdk import AsyncClient
from servefleet.services.actors import RAY_NAMESPACE
from servefleet.services.agent import masters
from servefleet.testing import DiscoveryProcess
from tests.integration.sharded.conftest import (
    FIELDS,
    ROWS,
    CheckedLoad,
    apply,
    router_of,
    settled,
    sharded_spec,
)

pytestmark = [pytest.mark.ray, pytest.mark.slow]
APP = "recs/ctr-sharded"
TABLE_BYTES = ROWS * 4 * (1 + 16)


@pytest.fixture(scope="module")
async def sharded(
    two_nodes: list[str], discovery_server: DiscoveryProcess, table_path: Path
) -> AsyncIterator[common_pb2.ApplicationSpec]:
    spec = sharded_spec("ctr-sharded", table_path, shards=4, replicas=2, partitioning="hash")
    await apply(spec, discovery_server)
    await settled(spec)
    yield spec
    await masters.remove(AppId.parse(spec).ref())


async def test_scores_equal_the_unsharded_reference_for_batches_of_1_to_1000(
    sharded: common_pb2.ApplicationSpec, client: AsyncClient, reference: ctr.FactorizationMachine
) -> None:
    rng = np.random.default_rng(5)
    for batch in (1, 2, 3, 7, 16, 64, 100, 257, 512, 999, 1000):
        ids = rng.integers(0, ROWS, size=(batch, FIELDS), dtype=np.int64)
        out = await client.infer(APP, {INPUT_NAME: ids})
        assert np.array_equal(out[OUTPUT_NAME], reference.score(ids)), f"batch {batch}"
    stats = await router_of(sharded).stats.remote()
    assert all(s["lookups"] > 0 for s in stats["shards"])  # the batches reached every shard
    if settings.shard_router_cpp:  # and C++ answered them
        assert stats["cpp"]["codes"].get(0, 0) >= 11, stats["cpp"]
    if settings.shard_lookup_cpp:  # and the shards' C++ answered their lookups
        status = await masters.status(AppId.parse(sharded).ref())
        assert status is not None
        actors = [ray.get_actor(s.replica, namespace=RAY_NAMESPACE) for s in status.shards]
        shard_stats = [await a.stats.remote() for a in actors]
        assert sum(s["cpp"]["codes"].get(0, 0) for s in shard_stats) >= stats["lookups"] // 2, shard_stats
    endpoints = await client.endpoints(APP)
    assert [e.kind for e in endpoints] == ["proxy"] and endpoints[0].labels["router"] == "sharded"


async def test_a_key_out_of_range_is_invalid_argument(
    sharded: common_pb2.ApplicationSpec, client: AsyncClient
) -> None:
    ids = np.zeros((4, FIELDS), dtype=np.int64)
    ids[3, 5] = ROWS + 7
    with pytest.raises(
        InvalidArgument, match=rf"feature id {ROWS + 7} at example 3, field 5 is outside \[0, {ROWS}\)"
    ):
        await client.infer(APP, {INPUT_NAME: ids})


async def test_each_shard_actor_holds_a_quarter_of_the_table_on_two_nodes(
    sharded: common_pb2.ApplicationSpec, two_nodes: list[str]
) -> None:
    status = await masters.status(AppId.parse(sharded).ref())
    assert status is not None and len(status.shards) == 8
    assert {s.shard for s in status.shards} == {0, 1, 2, 3}
    assert len({s.node_id for s in status.shards}) == 2  # spread over both nodes
    for shard in status.shards:
        # hash parts hold their keys too (8 bytes a row): (68 + 8) / 68 of a quarter.
        assert 0.9 * TABLE_BYTES / 4 < shard.table_bytes < 1.25 * TABLE_BYTES / 4
        assert 0.95 * shard.table_bytes < shard.resident_bytes <= shard.table_bytes + 3 * 8192
        assert shard.resident_bytes < sharded.resources.memory


async def test_an_unsharded_table_over_the_actor_memory_limit_is_refused_precisely(
    two_nodes: list[str], discovery_server: DiscoveryProcess, table_path: Path
) -> None:
    spec = sharded_spec("ctr-whole", table_path, shards=1, replicas=1)
    await apply(spec, discovery_server)
    try:

        async def refused() -> str | None:
            status = await masters.status(AppId.parse(spec).ref())
            return status.error if status is not None and "memory limit" in status.error else None

        error = await async_wait_for(refused, timeout=120, interval=0.3, what="the whole table refused")
        assert "needs 68.0 MiB of table, above its memory limit 24.0 MiB" in str(error)
        assert "raise spec.sharding.shards" in str(error)
        status = await masters.status(AppId.parse(spec).ref())
        assert status is not None and status.ready_replicas == 0
    finally:
        await masters.remove(AppId.parse(spec).ref())


async def test_one_slow_replica_is_hedged_and_its_tail_cut_against_hedging_off(
    sharded: common_pb2.ApplicationSpec, client: AsyncClient, reference: ctr.FactorizationMachine
) -> None:
    # Orderings, not wall-clock bounds: on a loaded 2-core box a window's p99 is set by scheduling
    # noise (once 208 ms against a 203 ms bound of "2x the healthy p99"; once 886 ms in one hedged
    # window beside two CPU hogs). So the slow replica is made slower than the box's own tail (10x
    # its median, and at least the healthy p99), hedging on and off alternate in windows of the same
    # router, and the tail compared is the share of requests that took longer than that delay: off,
    # every request whose shard-0 lookup went to the slow replica is in it; on, only those a hedge
    # could not rescue (a starved box's stalls hit both kinds of window alike).
    router = router_of(sharded)
    status = await masters.status(AppId.parse(sharded).ref())
    assert status is not None
    slow_name = next(s.replica for s in status.shards if s.shard == 0)
    slow = ray.get_actor(slow_name, namespace=RAY_NAMESPACE)
    budget = (await router.stats.remote())["hedge_budget"]
    windows: dict[str, list[list[float]]] = {"healthy": [], "on": [], "off": []}
    async with CheckedLoad(client, APP, reference, concurrency=4) as load:

        async def window(name: str) -> None:
            start = len(load.latencies)
            await load.wait_for_requests(150)
            windows[name].append(load.latencies[start:])

        await load.wait_for_requests(100)  # warm: every replica has latency samples
        await window("healthy")
        p50 = (await router.stats.remote())["shards"][0]["p50_ms"][slow_name] / 1000
        healthy = float(np.percentile(windows["healthy"][0], 99))
        delay = max(9 * p50, healthy)
        await slow.inject_delay.remote(delay)  # its lookups now take >= 10x as long
        try:
            before = (await router.stats.remote())["shards"][0]
            for hedging in ("on", "off", "on", "off"):
                await router.set_hedge_budget.remote(budget if hedging == "on" else 0.0)
                await window(hedging)
            after = (await router.stats.remote())["shards"][0]
        finally:
            await router.set_hedge_budget.remote(budget)
            await slow.inject_delay.remote(0.0)
    assert load.failures == {} and load.wrong == 0
    hedges, lookups = after["hedges"] - before["hedges"], after["lookups"] - before["lookups"]

    def tail(name: str) -> float:
        pooled = [x for w in windows[name] for x in w]
        return sum(x >= delay for x in pooled) / len(pooled)

    def p99s(name: str) -> list[float]:
        return [round(float(np.percentile(w, 99)) * 1e3, 1) for w in windows[name]]

    print(
        f"p99 healthy {healthy * 1e3:.1f} ms; one replica slowed by {delay * 1e3:.1f} ms: hedging on "
        f"p99 {p99s('on')} ms, {tail('on'):.1%} over the delay; off p99 {p99s('off')} ms, "
        f"{tail('off'):.1%} over it; shard 0 hedges {hedges}/{lookups} lookups (the extra load)"
    )
    assert 0 < hedges <= budget * lookups + 10  # counted, and bounded by the budget
    assert tail("on") < tail("off")  # hedging cuts the tail the slow replica makes


async def test_sigkill_of_a_shard_replica_under_load_fails_no_request(
    sharded: common_pb2.ApplicationSpec, client: AsyncClient, reference: ctr.FactorizationMachine
) -> None:
    status = await masters.status(AppId.parse(sharded).ref())
    assert status is not None
    victim_name = next(s.replica for s in status.shards if s.shard == 2)
    victim = ray.get_actor(victim_name, namespace=RAY_NAMESPACE)
    pid = (await victim.stats.remote())["pid"]
    async with CheckedLoad(client, APP, reference, concurrency=4) as load:
        await load.wait_for_requests(50)
        os.kill(pid, signal.SIGKILL)
        await load.wait_for_requests(100)

        async def replaced() -> bool:
            now = await masters.status(AppId.parse(sharded).ref())
            names = {s.replica for s in now.shards if s.ready} if now else set()
            return (
                now is not None and victim_name not in names and len(names) == 8 and now.ready_replicas == 2
            )

        await async_wait_for(replaced, timeout=180, interval=0.3, what="the killed replica replaced")
        await load.wait_for_requests(100)
    assert load.failures == {} and load.wrong == 0 and load.ok >= 250


async def test_resharding_2_to_4_under_load_fails_no_request_and_answers_the_same(
    two_nodes: list[str],
    discovery_server: DiscoveryProcess,
    table_path: Path,
    client: AsyncClient,
    reference: ctr.FactorizationMachine,
) -> None:
    spec = sharded_spec("ctr-reshard", table_path, shards=2, replicas=1, memory="48Mi", partitioning="range")
    app = "recs/ctr-reshard"
    await apply(spec, discovery_server)
    try:
        await settled(spec)
        router = router_of(spec)
        async with CheckedLoad(client, app, reference, concurrency=3) as load:
            await load.wait_for_requests(50)
            wider = sharded_spec(
                "ctr-reshard", table_path, shards=4, replicas=1, memory="48Mi", partitioning="range"
            )
            await apply(wider, discovery_server, revision=2)
            await settled(wider)
            assert (await router.stats.remote())["layout"] == "range-4"
            await load.wait_for_requests(50)
        assert load.failures == {} and load.wrong == 0 and load.ok >= 100
        status = await masters.status(AppId.parse(spec).ref())
        assert status is not None and sorted(s.shard for s in status.shards) == [0, 1, 2, 3]
        await asyncio.sleep(0)
    finally:
        await masters.remove(AppId.parse(spec).ref())
