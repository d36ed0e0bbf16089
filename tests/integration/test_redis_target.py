"""The platform's Redis clients on a real 3-primary Redis Cluster: callers past ``max_connections``
wait for a connection instead of failing, as they do on one Redis (redis-py's cluster pool raises
MaxConnectionsError: the broker answered concurrent GetResults UNAVAILABLE in a hog run)."""

from __future__ import annotations

import asyncio

from servefleet.common.redis_target import RedisTarget
from servefleet.testing import LocalRedisCluster


async def test_a_burst_past_max_connections_waits_beside_a_subscription_on_the_same_node(
    redis_cluster: LocalRedisCluster,
) -> None:
    client = RedisTarget.parse(redis_cluster.address, mode="cluster").client(max_connections=8)
    try:
        await client.set("{burst}key", b"1")
        # The broker's event listener holds one connection of a node's pool for as long as it
        # listens; this one listens on the node that serves the burst's slot.
        pubsub = client.pubsub(ignore_subscribe_messages=True)
        await pubsub.psubscribe("{burst}*")

        async def pipelined() -> list[bytes]:
            pipe = client.pipeline(transaction=False)
            pipe.get("{burst}key")
            pipe.get("{burst}key")
            return list(await pipe.execute())

        replies = await asyncio.gather(
            *(client.get("{burst}key") if i % 2 else pipelined() for i in range(500)),
            return_exceptions=True,
        )
        failed = [r for r in replies if isinstance(r, BaseException)]
        assert not failed, f"{len(failed)} of 500 failed: {sorted({type(e).__name__ for e in failed})}"
        assert replies.count(b"1") == 250 and replies.count([b"1", b"1"]) == 250
        node = client.get_node_from_key("{burst}key")
        assert len(node._connections) <= 8 + client.SUBSCRIPTION_RESERVE
        await pubsub.aclose()
    finally:
        await client.aclose()
