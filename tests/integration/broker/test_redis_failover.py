"""Failover of the app's Redis primary under broker load, on a Redis Cluster (3 primaries, one
replica each) and on a Sentinel-managed primary: SIGKILL the primary holding the app's keys while
Submits and workers run; its replica takes over.

The guarantee (README, Async broker): Redis replicates asynchronously, so a write the dead primary
acknowledged but had not yet streamed to its replica is lost with it (its AOF does not help: the
promoted replica is the data from then on). A Submit is therefore lost only if it was accepted
within that replication lag before the kill; every other accepted request completes, and a lost
result or ack only makes its request run again."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Awaitable, Callable

import numpy as np
import pytest
from tritonclient.grpc import service_pb2

from servefleet.broker.keys import AppKeys
from servefleet.broker.worker import PullWorker
from servefleet.common.errors import DeadlineExceeded, NotFound, Unavailable
from servefleet.common.net import async_wait_for, wait_for
from servefleet.common.redis_target import RedisTarget
from servefleet.common.tensors import decode_request, encode_response
from servefleet.testing import Credentials, LocalRedisCluster, LocalSentinel
from tests.integration.broker.conftest import BrokerService

pytestmark = pytest.mark.slow
#: Accepted this long before the kill, a Submit must survive it (the replication lag on loopback is
#: well under a millisecond; this is slack for a loaded machine).
LAG_BOUND_S = 1.0


async def slow_double(request: service_pb2.ModelInferRequest) -> service_pb2.ModelInferResponse:
    await asyncio.sleep(0.02)
    return encode_response(request.model_name, {"y": decode_request(request)["x"] * 2})


async def failover_under_load(
    service: BrokerService,
    target: RedisTarget,
    kill_primary: Callable[[str], Awaitable[None]],
    failed_over: Callable[[], bool],
) -> None:
    """Submit 600 requests from 4 lanes while 2 workers run them; after 150 are accepted,
    ``kill_primary(key)`` kills the primary holding ``key`` (the app's slot); then check every
    accepted request completed with its answer, except ones accepted within the lag before the kill."""
    client = service.client
    assert client is not None
    app = f"test/failover-{uuid.uuid4().hex[:8]}"
    await service.core.register_app(app)
    # A result or ack lost with the primary leaves its entry pending: reclaimed after 2 s, run again.
    workers = [
        PullWorker(target, app, f"w{i}", 4, slow_double, block_ms=200, reclaim_idle_s=2.0) for i in range(2)
    ]
    for worker in workers:
        await worker.start()
    accepted: dict[str, tuple[int, float]] = {}  # ticket -> (x, when accepted)
    refused = 0

    async def submit_loop(lane: int, n: int) -> None:
        nonlocal refused
        for i in range(lane, n, 4):
            try:
                ticket = await client.submit(app, {"x": np.array([i])})
                accepted[ticket] = (i, time.monotonic())
            except Unavailable:
                refused += 1  # told: not queued

    async def under_way() -> bool:
        return len(accepted) >= 150

    try:
        load = asyncio.gather(*(submit_loop(lane, 600) for lane in range(4)))
        await async_wait_for(under_way, timeout=60, what="150 requests accepted")
        await kill_primary(AppKeys(app).config)
        killed_at = time.monotonic()
        await asyncio.to_thread(wait_for, failed_over, timeout=60, interval=0.2, what="the failover")
        await asyncio.wait_for(load, 120)

        reading = asyncio.Semaphore(32)  # callers reading their results, not 600 long polls at once

        async def outcome(ticket: str) -> list[int] | None:
            async with reading:
                # A read the broker could not serve (mid-failover, or slow on a loaded machine): ask
                # again. The contract is about requests, not how fast a read answers.
                give_up = time.monotonic() + 120
                while True:
                    try:
                        return (await client.result(ticket, timeout=30))["y"].tolist()  # type: ignore[no-any-return]
                    except NotFound:
                        return None
                    except (Unavailable, DeadlineExceeded) as exc:
                        if time.monotonic() > give_up:
                            raise AssertionError(f"ticket {ticket} not DONE after 120 s: {exc}") from exc
                        await asyncio.sleep(1.0)

        outcomes = await asyncio.gather(*(outcome(t) for t in accepted))
        lost = [t for t, y in zip(accepted, outcomes, strict=True) if y is None]
        done = {t: y for t, y in zip(accepted, outcomes, strict=True) if y is not None}
        wrong = [t for t, y in done.items() if y != [2 * accepted[t][0]]]
        late = [t for t in lost if accepted[t][1] < killed_at - LAG_BOUND_S or accepted[t][1] > killed_at]
        print(
            f"\nfailover ({target.mode}) of the app's primary under load: {len(accepted)} accepted, "
            f"{refused} refused (UNAVAILABLE) during the failover, {len(lost)} lost (accepted within "
            f"the replication lag before the kill), {sum(w.completed for w in workers)} results stored"
        )
        assert not wrong
        assert not late, "a Submit accepted outside the replication lag before the kill was lost"
        assert len(accepted) - len(lost) >= 450  # the load went on on the promoted replica
    finally:
        for worker in workers:
            await worker.stop()


async def test_failover_of_the_apps_cluster_primary_under_load(credentials: Credentials) -> None:
    """Redis Cluster, 3 primaries with one replica each: the app's primary is SIGKILLed."""
    cluster = LocalRedisCluster(primaries=3, replicas=1, node_timeout_ms=1000).start()
    service = await BrokerService(cluster.target, credentials).start()

    async def kill_primary(key: str) -> None:
        layout = cluster.target.client()
        await layout.initialize()
        port = int(layout.get_node_from_key(key).port)
        await layout.aclose()
        await asyncio.to_thread(next(node for node in cluster.nodes if node.port == port).kill)

    try:
        await failover_under_load(service, cluster.target, kill_primary, cluster.ok)
    finally:
        await service.stop()
        cluster.cleanup()


async def test_failover_of_the_sentinel_managed_primary_under_load(credentials: Credentials) -> None:
    """One primary, one replica, a Sentinel: the primary is SIGKILLed and the Sentinel promotes the
    replica; the broker and the workers follow it."""
    sentinel = LocalSentinel(replicas=1).start()
    service = await BrokerService(sentinel.target, credentials).start()

    async def kill_primary(key: str) -> None:
        await asyncio.to_thread(sentinel.primary.kill)

    try:

        def promoted() -> bool:
            return sentinel.current_primary() is sentinel.replicas[0]

        await failover_under_load(service, sentinel.target, kill_primary, promoted)
    finally:
        await service.stop()
        sentinel.cleanup()
