"""Failover of one Redis Cluster primary under broker load (3 primaries, one replica each): SIGKILL
the primary holding the app's slot while Submits and workers run; its replica takes over.

The guarantee (README, Async broker): Redis replicates asynchronously, so a write the dead primary
acknowledged but had not yet streamed to its replica is lost with it (its AOF does not help: the
promoted replica is the data from then on). A Submit is therefore lost only if it was accepted
within that replication lag before the kill; every other accepted request completes, and a lost
result or ack only makes its request run again."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator

import numpy as np
import pytest
from tritonclient.grpc import service_pb2

from servefleet.broker.keys import AppKeys
from servefleet.broker.worker import PullWorker
from servefleet.common.errors import NotFound, Unavailable
from servefleet.common.net import async_wait_for
from servefleet.common.tensors import decode_request, encode_response
from servefleet.testing import Credentials, LocalRedisCluster
from tests.integration.broker.conftest import BrokerService

pytestmark = pytest.mark.slow
#: Accepted this long before the kill, a Submit must survive it (the replication lag on loopback is
#: well under a millisecond; this is slack for a loaded machine).
LAG_BOUND_S = 1.0


async def slow_double(request: service_pb2.ModelInferRequest) -> service_pb2.ModelInferResponse:
    await asyncio.sleep(0.02)
    return encode_response(request.model_name, {"y": decode_request(request)["x"] * 2})


@pytest.fixture
async def replicated(credentials: Credentials) -> AsyncIterator[tuple[LocalRedisCluster, BrokerService]]:
    cluster = LocalRedisCluster(primaries=3, replicas=1, node_timeout_ms=1000).start()
    service = await BrokerService(cluster.target, credentials).start()
    yield cluster, service
    await service.stop()
    cluster.cleanup()


async def test_failover_of_the_apps_primary_under_load_loses_no_request_past_the_lag(
    replicated: tuple[LocalRedisCluster, BrokerService],
) -> None:
    cluster, service = replicated
    client = service.client
    assert client is not None
    app = f"test/failover-{uuid.uuid4().hex[:8]}"
    await service.core.register_app(app)
    # A result or ack lost with the primary leaves its entry pending: reclaimed after 2 s, run again.
    workers = [
        PullWorker(cluster.target, app, f"w{i}", 4, slow_double, block_ms=200, reclaim_idle_s=2.0)
        for i in range(2)
    ]
    for worker in workers:
        await worker.start()
    accepted: dict[str, tuple[int, float]] = {}  # ticket -> (x, when accepted)
    refused = 0
    killed_at = 0.0

    async def submit_loop(lane: int, n: int) -> None:
        nonlocal refused
        for i in range(lane, n, 4):
            try:
                ticket = await client.submit(app, {"x": np.array([i])})
                accepted[ticket] = (i, time.monotonic())
            except Unavailable:
                refused += 1  # told: not queued

    try:
        load = asyncio.gather(*(submit_loop(lane, 600) for lane in range(4)))

        async def under_way() -> bool:
            return len(accepted) >= 150

        await async_wait_for(under_way, timeout=60, what="150 requests accepted")
        layout = cluster.target.client()
        await layout.initialize()
        port = int(layout.get_node_from_key(AppKeys(app).config).port)
        await layout.aclose()
        primary = next(node for node in cluster.nodes if node.port == port)
        await asyncio.to_thread(primary.kill)
        killed_at = time.monotonic()
        await load

        async def outcome(ticket: str) -> list[int] | None:
            try:
                return (await client.result(ticket, timeout=120))["y"].tolist()  # type: ignore[no-any-return]
            except NotFound:
                return None

        outcomes = await asyncio.gather(*(outcome(t) for t in accepted))
        lost = [t for t, y in zip(accepted, outcomes, strict=True) if y is None]
        wrong = [
            t for t, y in zip(accepted, outcomes, strict=True) if y is not None and y != [2 * accepted[t][0]]
        ]
        late = [t for t in lost if accepted[t][1] < killed_at - LAG_BOUND_S or accepted[t][1] > killed_at]
        print(
            f"\nfailover of the app's primary under load: {len(accepted)} accepted, {refused} refused "
            f"(UNAVAILABLE) during the failover, {len(lost)} lost (accepted within the replication lag "
            f"before the kill), {sum(w.completed for w in workers)} results stored by the workers"
        )
        assert not wrong
        assert not late, "a Submit accepted outside the replication lag before the kill was lost"
        assert len(accepted) - len(lost) >= 450  # the load went on on the promoted replica
        assert cluster.ok()
    finally:
        for worker in workers:
            await worker.stop()
