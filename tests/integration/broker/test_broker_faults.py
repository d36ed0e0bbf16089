"""Done-when proofs with real Redis and real Ray actors hosting PullWorkers: a worker SIGKILLed
mid-run, Redis killed and restarted from its AOF mid-run, and a poison request."""

from __future__ import annotations

import asyncio
import os
import signal
import uuid
from collections.abc import AsyncIterator

import numpy as np
import pytest
import ray
import redis.asyncio as aioredis
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from servefleet.api import broker_pb2
from servefleet.broker.queue import RedisStreamQueue
from servefleet.common.errors import Unavailable
from servefleet.common.net import async_wait_for, split_address
from servefleet.common.redis_target import RedisTarget
from servefleet.sdk.broker_client import AsyncBrokerClient, RequestFailed
from servefleet.testing import Credentials, RayCluster, RedisProcess, joined_node
from tests.integration.broker.actors import EchoActor, executions_key
from tests.integration.broker.conftest import AS_ADMIN, KINDS, BrokerService, fresh_redis

State = broker_pb2.TicketStatus.State
pytestmark = [pytest.mark.ray, pytest.mark.usefixtures("ray_connected")]


def new_app() -> str:
    return f"test/faults-{uuid.uuid4().hex[:8]}"


def request(i: int, sleep_ms: float = 20.0) -> dict[str, np.ndarray]:
    return {"x": np.array([i], dtype=np.int64), "sleep_ms": np.array([sleep_ms])}


@pytest.fixture
async def counter(redis_server: RedisProcess) -> AsyncIterator[aioredis.Redis]:
    host, port = split_address(redis_server.address)
    client = aioredis.Redis(host=host, port=port)
    yield client
    await client.aclose()


async def executions(counter: aioredis.Redis, app: str) -> dict[str, int]:
    raw = await counter.hgetall(executions_key(app))  # type: ignore[misc]
    return {k.decode(): int(v) for k, v in raw.items()}


async def start_workers(
    redis_address: str | RedisTarget, app: str, n: int, counter_address: str, nodes: list[str] | None = None
) -> tuple[list, list[int]]:
    """``n`` workers (pinned to ``nodes[i % len(nodes)]`` when given, else SPREAD); their pids."""
    actors = [
        EchoActor.options(  # type: ignore[attr-defined]
            scheduling_strategy=NodeAffinitySchedulingStrategy(nodes[i % len(nodes)], soft=False)
        ).remote(redis_address, app, f"w{i}", slots=2, counter_address=counter_address)
        if nodes
        else EchoActor.remote(redis_address, app, f"w{i}", slots=2, counter_address=counter_address)  # type: ignore[attr-defined]
        for i in range(n)
    ]
    pids = await asyncio.gather(*(actor.start.remote() for actor in actors))
    return actors, list(pids)


async def stop_workers(actors: list) -> None:
    for actor in actors:
        ray.kill(actor)


async def check_all_done(client: AsyncBrokerClient, tickets: dict[str, int]) -> dict[str, int]:
    """Every ticket's result, and the right one; returns which execution of each ticket it came from."""
    outputs = await asyncio.gather(*(client.result(t, timeout=180) for t in tickets))
    assert [int(out["y"][0]) for out in outputs] == [2 * i for i in tickets.values()]
    return {t: int(out["run"][0]) for t, out in zip(tickets, outputs, strict=True)}


async def check_exactly_once(
    client: AsyncBrokerClient, counter: aioredis.Redis, app: str, first: dict[str, int], discarded: int
) -> dict[str, int]:
    """One result per ticket: reading it again gives the same execution's answer (no later run
    replaced it), and runs past the first of a ticket are at least the duplicates the broker discarded
    (more when a run died with its worker before storing anything). Returns executions per ticket."""
    outputs = await asyncio.gather(*(client.result(t, timeout=60) for t in first))
    assert {t: int(out["run"][0]) for t, out in zip(first, outputs, strict=True)} == first
    runs = await executions(counter, app)
    assert set(runs) == set(first) and all(runs[t] >= first[t] for t in first)
    assert discarded <= sum(runs.values()) - len(first)
    return runs


@pytest.mark.slow
async def test_sigkill_one_of_three_workers_mid_run_loses_nothing(
    broker: BrokerService, redis_server: RedisProcess, counter: aioredis.Redis
) -> None:
    assert broker.client is not None
    app = new_app()
    actors, pids = await start_workers(broker.redis_address, app, 3, redis_server.address)
    try:
        tickets = {await broker.client.submit(app, request(i, sleep_ms=50)): i for i in range(500)}
        assert len(tickets) == 500

        # Killed while observed running requests (its entries pending), not merely after others'
        # progress: on a starved box the queue once drained before the kill and nothing was reclaimed.
        async def victim_mid_run() -> bool:
            return len(await executions(counter, app)) >= 100 and await actors[0].busy.remote() > 0

        await async_wait_for(victim_mid_run, timeout=120, what="the victim running requests")
        os.kill(pids[0], signal.SIGKILL)
        first = await check_all_done(broker.client, tickets)

        stats = await broker.core.stats(AS_ADMIN, app)
        runs = await check_exactly_once(broker.client, counter, app, first, stats.duplicate_executions)
        statuses = [await broker.core.status(t) for t in tickets]
        duplicates = sum(runs.values()) - len(tickets)
        print(
            f"\nSIGKILL run: 500 results, {sum(runs.values())} executions, {duplicates} duplicate "
            f"executions, {sum(s.deliveries > 1 for s in statuses)} requests reclaimed, "
            f"{stats.duplicate_executions} duplicate results discarded by the broker"
        )
        assert any(s.deliveries > 1 for s in statuses), "the killed worker's requests were reclaimed"
        assert (stats.depth, stats.in_flight, stats.dead_letters) == (0, 0, 0)
    finally:
        await stop_workers(actors)


@pytest.mark.slow
@pytest.mark.parametrize("redis_target", ["single"], indirect=True)  # about Ray, not Redis
async def test_a_lost_ray_node_mid_run_loses_no_ticket(
    broker: BrokerService, redis_server: RedisProcess, counter: aioredis.Redis, ray_cluster: RayCluster
) -> None:
    """Workers on two Ray nodes; SIGKILL the second node's raylet mid-run (its workers die with it):
    the workers on the head reclaim its requests, every ticket gets exactly one result."""
    assert broker.client is not None
    actors: list = []
    with joined_node(ray_cluster, resources={"broker_node": 100}, port_slot=20) as node:
        try:
            head = [n["NodeID"] for n in ray.nodes() if n["Alive"] and "broker_node" not in n["Resources"]]
            [second] = [n["NodeID"] for n in ray.nodes() if n["Alive"] and "broker_node" in n["Resources"]]
            app = new_app()
            actors, _ = await start_workers(
                broker.redis_address, app, 3, redis_server.address, [second, head[0]]
            )
            on_node = [await actors[i].__ray_call__.remote(lambda _: os.getpid()) for i in (0, 2)]
            tickets = {await broker.client.submit(app, request(i, sleep_ms=50)): i for i in range(300)}

            # Lost while its workers are observed running requests (see the SIGKILL test above).
            async def node_mid_run() -> bool:
                if len(await executions(counter, app)) < 60:
                    return False
                return sum(await asyncio.gather(*(actors[i].busy.remote() for i in (0, 2)))) > 0

            await async_wait_for(node_mid_run, timeout=120, what="the node's workers running requests")
            # A lost node takes every process on it at once: its raylet and workers 0 and 2 (a worker
            # left alive would finish what it holds before it noticed, and nothing would be reclaimed).
            for pid in [node.raylet_pid(), *on_node]:
                os.kill(pid, signal.SIGKILL)
            first = await check_all_done(broker.client, tickets)
            stats = await broker.core.stats(AS_ADMIN, app)
            await check_exactly_once(broker.client, counter, app, first, stats.duplicate_executions)
            statuses = [await broker.core.status(t) for t in tickets]
            print(f"\nRay node lost mid-run: {sum(s.deliveries > 1 for s in statuses)} requests reclaimed")
            assert any(s.deliveries > 1 for s in statuses), "the lost node's requests were reclaimed"
        finally:
            await stop_workers(actors)


@pytest.mark.slow
async def test_a_stalled_worker_runs_again_and_its_late_results_are_discarded(
    broker: BrokerService, redis_server: RedisProcess, counter: aioredis.Redis
) -> None:
    """SIGSTOP a worker past the reclaim idle time: the others take over and finish its requests;
    SIGCONT it: its late runs finish too, and the broker keeps the first result of each ticket and
    counts every later one in ``duplicate_executions``, exactly."""
    assert broker.client is not None
    app = new_app()
    actors, pids = await start_workers(broker.redis_address, app, 3, redis_server.address)
    try:
        tickets = {await broker.client.submit(app, request(i, 300.0)): i for i in range(30)}

        async def victim_running() -> bool:
            return await actors[0].busy.remote() > 0  # stalled holding requests, observed

        await async_wait_for(victim_running, timeout=120, what="the victim running requests")
        os.kill(pids[0], signal.SIGSTOP)
        try:
            first = await check_all_done(broker.client, tickets)  # the stalled worker's included
        finally:
            os.kill(pids[0], signal.SIGCONT)

        async def late_runs_settled() -> bool:
            stats = await broker.core.stats(AS_ADMIN, app)
            extra = sum((await executions(counter, app)).values()) - len(tickets)
            return stats.in_flight == 0 and extra > 0 and stats.duplicate_executions == extra

        await async_wait_for(late_runs_settled, timeout=60, what="the stalled worker's late runs settled")
        stats = await broker.core.stats(AS_ADMIN, app)
        runs = await check_exactly_once(broker.client, counter, app, first, stats.duplicate_executions)
        print(
            f"\nSIGSTOP/SIGCONT: {len(tickets)} results, {sum(runs.values())} executions, "
            f"{stats.duplicate_executions} duplicate results discarded"
        )
        assert stats.duplicate_executions > 0
        assert stats.duplicate_executions == sum(runs.values()) - len(tickets)  # none lost, none kept twice
        assert any(run > 1 for run in first.values()), "some ticket's result came from a re-run"
    finally:
        await stop_workers(actors)


@pytest.mark.slow
@pytest.mark.parametrize("kind", KINDS)
async def test_redis_restart_mid_run_loses_no_acknowledged_request(
    redis_server: RedisProcess, counter: aioredis.Redis, credentials: Credentials, kind: str
) -> None:
    """Kill Redis (every node of the cluster) mid-run and start it again from its AOF."""
    redis = fresh_redis(kind)
    service = await BrokerService(redis.target, credentials).start()
    assert service.client is not None
    app = new_app()
    actors, _ = await start_workers(redis.target, app, 3, redis_server.address)
    accepted: dict[str, int] = {}
    refused = 0

    async def submit(i: int) -> None:
        nonlocal refused
        try:
            # 200 ms each on 6 slots: the first 200 take ~7 s to start, so Redis dies mid-run even
            # when Submits are slow (each waits for Redis's fsync; at 40 ms all 200 had started).
            accepted[await service.client.submit(app, request(i, 200.0))] = i  # type: ignore[union-attr]
        except Unavailable:
            refused += 1  # the client was told: not queued

    async def started() -> int:
        return len(await executions(counter, app))

    async def started_at_least(n: int) -> bool:
        return await started() >= n

    try:
        for i in range(200):
            await submit(i)
        await async_wait_for(lambda: started_at_least(30), timeout=120, what="30 requests started")
        # A crash of the Redis process: everything it acknowledged was already in the AOF (written
        # and fsynced before the reply: appendfsync always), so all of it comes back when it restarts.
        await asyncio.to_thread(redis.kill)
        in_progress = await started()
        restart = asyncio.create_task(asyncio.to_thread(redis.start))
        for i in range(200, 300):
            await submit(i)
            if refused and not restart.done():
                await asyncio.sleep(0.05)
        await restart
        await check_all_done(service.client, accepted)
        print(
            f"\nRedis restart with {in_progress} of 200 requests started: {len(accepted)} accepted, "
            f"all done; {refused} refused (UNAVAILABLE) while it was down"
        )
        assert in_progress < 200 <= len(accepted)
    finally:
        await stop_workers(actors)
        await service.stop()
        redis.cleanup()


async def test_poison_request_is_dead_lettered_after_k_tries(
    broker: BrokerService, redis_server: RedisProcess, counter: aioredis.Redis
) -> None:
    assert broker.client is not None
    app = new_app()
    actors, _ = await start_workers(broker.redis_address, app, 2, redis_server.address)
    try:
        good = {await broker.client.submit(app, request(i, 5.0)): i for i in range(20)}
        poison = await broker.client.submit(app, request(-1))
        with pytest.raises(RequestFailed, match="failed 3 times; last: ValueError: poison input"):
            await broker.client.result(poison, timeout=120)
        await check_all_done(broker.client, good)
        assert (await executions(counter, app))[poison] == 3
        raw = RedisTarget.parse(broker.redis_address).client()
        dead = await raw.xrange(RedisStreamQueue.dead_letters(app))
        await raw.aclose()
        assert [fields[b"ticket"].decode() for _, fields in dead] == [poison]
        assert b"poison input" in dead[0][1][b"reason"]
        assert (await broker.core.stats(AS_ADMIN, app)).dead_letters == 1
    finally:
        await stop_workers(actors)
