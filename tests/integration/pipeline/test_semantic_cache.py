"""The cache stage against real Redis, without Ray: entries shared by replicas through Redis (and
its change feed), rebuilt after a restart, capped with LRU eviction and a TTL, isolated per app,
and a Redis outage answered from the model."""

from __future__ import annotations

import asyncio
import secrets
import uuid
from collections.abc import AsyncIterator
from typing import Any

import numpy as np
import pytest
import redis

from servefleet.api import common_pb2
from servefleet.broker.acl import AppUsers, WorkerCredentials, target_of
from servefleet.common.net import async_wait_for
from servefleet.common.redis_target import RedisTarget
from servefleet.semantic_cache.stage import SemanticCacheStage
from servefleet.services import context
from servefleet.testing import RedisProcess


class Model:
    """The model stage's side of the call: answers "answer to <prompt>", counting calls."""

    def __init__(self) -> None:
        self.calls = 0

    async def infer(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        self.calls += 1
        text = f"answer to {bytes(inputs['prompt'][0]).decode()}"
        pieces = [text[i : i + 4] for i in range(0, len(text), 4)]
        return {
            "text": np.array([text.encode()], np.object_),
            "pieces": np.array([p.encode() for p in pieces], np.object_),
        }

    async def stream(self, inputs: dict[str, np.ndarray]) -> AsyncIterator[dict[str, np.ndarray]]:
        out = await self.infer(inputs)
        for piece in out["pieces"]:
            yield {"token": np.array([piece], np.object_)}


def cache(
    address: str | RedisTarget, app: str = "llm", namespace: str = "default", **options: Any
) -> SemanticCacheStage:
    target = RedisTarget.parse(address)
    context.set_deployment(
        context.Deployment(common_pb2.AppRef(namespace=namespace, name=app), "1", target.text)
    )
    return SemanticCacheStage(Model(), redis=target, **options)


async def ask(stage: SemanticCacheStage, text: str) -> tuple[bool, str]:
    out = await stage({"prompt": np.array([text.encode()], np.object_)})
    return bool(out["cache_hit"][0]), bytes(out["text"][0]).decode()


@pytest.fixture
def fresh_redis() -> Any:
    proc = RedisProcess().start()
    yield proc
    proc.cleanup()


@pytest.mark.parametrize("kind", ["single", "cluster"])
async def test_replicas_share_entries_and_a_restarted_one_rebuilds(
    request: pytest.FixtureRequest, kind: str
) -> None:
    """On one Redis and on the session's 3-primary Redis Cluster (the app's keys share one slot)."""
    found = request.getfixturevalue("fresh_redis" if kind == "single" else "redis_cluster")
    app = f"llm-{uuid.uuid4().hex[:8]}"
    a, b = cache(found.target, app), cache(found.target, app)
    assert await ask(a, "What is the capital of France?") == (
        False,
        "answer to What is the capital of France?",
    )

    async def b_sees_it() -> bool:
        return len(b.index) == 1

    await async_wait_for(b_sees_it, timeout=10, what="replica b following the change feed")
    assert await ask(b, "Which city is the capital of France?") == (
        True,
        "answer to What is the capital of France?",
    )
    assert b.model.calls == 0
    restarted = cache(found.target, app)
    assert (await ask(restarted, "What is the capital of France?"))[0]
    for stage in (a, b, restarted):
        stage._sync.cancel()


async def test_cap_evicts_the_least_recently_used_and_entries_expire(fresh_redis: RedisProcess) -> None:
    stage = cache(fresh_redis.address, max_entries=3, ttl_s=60)
    r = redis.Redis.from_url(f"redis://{fresh_redis.address}")
    for topic in ("volcanoes", "glaciers", "deserts"):
        await ask(stage, f"Explain how {topic} form.")
    assert (await ask(stage, "Explain how volcanoes form."))[0]  # touched: the youngest now
    await ask(stage, "Explain how rivers form.")  # one over the cap: glaciers, least recently used, goes
    assert r.zcard("sfc:{default/llm}:lru") == 3
    assert not (await ask(stage, "Explain how glaciers form."))[0]
    assert (await ask(stage, "Explain how volcanoes form."))[0]
    ttls = [r.ttl(key) for key in r.scan_iter("sfc:{default/llm}:e:*")]
    assert ttls and all(0 < ttl <= 60 for ttl in ttls)
    stage._sync.cancel()


async def test_apps_never_share_answers(fresh_redis: RedisProcess) -> None:
    mine, theirs = (
        cache(fresh_redis.address, namespace="acme"),
        cache(fresh_redis.address, namespace="globex"),
    )
    await ask(mine, "What is our refund policy?")
    await asyncio.sleep(0.3)
    assert not (await ask(theirs, "What is our refund policy?"))[0]
    assert (await ask(mine, "What is our refund policy?"))[0]
    mine._sync.cancel()
    theirs._sync.cancel()


async def test_redis_down_answers_from_the_model(fresh_redis: RedisProcess) -> None:
    stage = cache(fresh_redis.address)
    await ask(stage, "How tall is Mount Everest?")
    fresh_redis.kill()
    hit, text = await ask(stage, "How tall is Mount Everest?")
    assert not hit and text == "answer to How tall is Mount Everest?" and stage.errors >= 1
    stage._sync.cancel()


async def test_the_cache_runs_as_its_apps_own_redis_user() -> None:
    """On a Redis that requires auth (as the stack's): the cache gets its app's Redis user (what the
    broker hands the app's replicas) and its every command and key is within that user's rights."""
    redis = RedisProcess(admin_password=secrets.token_hex(16)).start()
    users = AppUsers(redis.target.client(), redis.target.password)
    issuer = WorkerCredentials(RedisTarget((redis.address,)), users)
    ref = common_pb2.AppRef(namespace="default", name="llm")

    async def source() -> RedisTarget:
        return target_of(await issuer.issue("default/llm"))

    try:
        context.set_deployment(context.Deployment(ref, "1", "", source))
        a, b = SemanticCacheStage(Model()), SemanticCacheStage(Model())
        assert not (await ask(a, "What is the capital of France?"))[0]

        async def b_sees_it() -> bool:
            return len(b.index) == 1

        await async_wait_for(b_sees_it, timeout=10, what="replica b following the change feed")
        assert (await ask(b, "Which city is the capital of France?"))[0]
        assert a.errors == b.errors == 0
        for stage in (a, b):
            stage._sync.cancel()
    finally:
        await issuer.close()
        redis.cleanup()
