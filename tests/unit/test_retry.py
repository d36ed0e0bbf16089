"""The one retry policy: capped exponent, jitter bounds, attempts, deadline, which errors."""

from __future__ import annotations

import asyncio
import random

import grpc
import pytest

from servefleet.common.errors import NotFound, Unavailable
from servefleet.common.retry import Backoff, RetryPolicy, on_status
from servefleet.services.master import REPLICA_START_BACKOFF


def test_ceiling_doubles_then_holds_the_cap_for_any_failure_count() -> None:
    b = Backoff(initial_s=0.1, max_s=2.0)
    assert [b.ceiling(n) for n in range(7)] == pytest.approx([0.0, 0.1, 0.2, 0.4, 0.8, 1.6, 2.0])
    for failures in (1_000, 1_100, 10**6, 10**18):  # 2.0 ** 1024 would raise OverflowError
        assert b.ceiling(failures) == 2.0
        assert 0.0 <= b.delay(failures) <= 2.0
    assert REPLICA_START_BACKOFF.delay(10**9) == 30.0


def test_jitter_draws_the_stated_fraction_of_the_pause() -> None:
    rng = random.Random(7)
    full = [Backoff(1.0, 1.0).delay(1, rng) for _ in range(500)]
    half = [Backoff(1.0, 1.0, jitter=0.5).delay(1, rng) for _ in range(500)]
    assert min(full) < 0.1 and max(full) <= 1.0
    assert min(half) >= 0.5 and max(half) <= 1.0
    assert Backoff(1.0, 1.0, jitter=0.0).delay(3, rng) == 1.0


async def test_run_retries_only_the_named_errors_and_only_as_often_as_allowed() -> None:
    calls = 0

    async def flaky() -> str:
        nonlocal calls
        calls += 1
        if calls < 3:
            raise Unavailable("blip")
        return "ok"

    policy = RetryPolicy(Backoff(0.001, 0.002), attempts=5, retry_on=on_status(grpc.StatusCode.UNAVAILABLE))
    assert await policy.run(flaky) == "ok" and calls == 3

    async def missing() -> str:
        raise NotFound("no such app")

    with pytest.raises(NotFound):
        await policy.run(missing)
    calls = -10
    with pytest.raises(Unavailable):
        await RetryPolicy(Backoff(0.001, 0.001), attempts=2, retry_on=policy.retry_on).run(flaky)
    assert calls == -8


async def test_run_gives_up_at_the_deadline() -> None:
    async def down() -> None:
        raise Unavailable("down")

    loop = asyncio.get_running_loop()
    started = loop.time()
    with pytest.raises(Unavailable):
        await RetryPolicy(Backoff(0.01, 0.05), deadline_s=0.3, retry_on=lambda _: True).run(down)
    assert loop.time() - started < 5.0  # stopped by the deadline, not by an attempt count
