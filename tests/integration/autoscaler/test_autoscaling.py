"""The autoscaler against a whole real stack: it scales up under load and down after, takes the
burst path, holds a steady load, yields to a person, is capped by quota (and says so in the
app's status), and resumes its history after a SIGKILL. Bounds are loose: the box is shared."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

import pytest

from servefleet import stack
from servefleet.api import keeper_pb2
from servefleet.common.net import async_wait_for
from tests.integration.autoscaler.conftest import Load, Stack, replicas_reach, scrape, total, unique

pytestmark = [pytest.mark.slow, pytest.mark.ray]


def autoscaling(**fields: object) -> dict[str, object]:
    block: dict[str, object] = {
        "target_ongoing_requests": 2,
        "min_replicas": 1,
        "max_replicas": 4,
        "upscale_delay_s": 1,
        "downscale_delay_s": 6,
    }
    return {"autoscaling": {**block, **fields}}


async def test_scales_up_under_load_holds_steady_and_scales_down_after(local_stack: Stack) -> None:
    name = unique("updown")
    # A 12 s downscale window: a shared 2-core box slows the load for seconds at a time.
    await local_stack.submit({"name": name, **autoscaling(downscale_delay_s=12)})
    proxy = await local_stack.proxy(name)
    async with Load(proxy, name, concurrency=8):  # 8 ongoing at target 2: 4 replicas
        scaled = await replicas_reach(local_stack, name, lambda n: n >= 3, timeout=40)
        assert scaled.scaling.by == "autoscaler" and scaled.scaling.reason.startswith("autoscaler (")
        assert scaled.scaling.autoscaled and not scaled.scaling.paused
        await asyncio.sleep(4)  # the ramp's last step, if any
        settled = (await local_stack.autoscaler(name)).scale_events
        await asyncio.sleep(15)  # the load keeps running on this loop meanwhile
        steady = await local_stack.autoscaler(name)
        # A steady load does not flap: at most one correction in 15 s (30 decisions).
        assert steady.scale_events - settled <= 1, local_stack.scale_log()
    stopped = time.monotonic()
    await replicas_reach(local_stack, name, lambda n: n == 1, timeout=12 + 30)
    # Not before the downscale delay: the peak stays in its window that long.
    assert time.monotonic() - stopped >= 12 - 1
    status = local_stack.cli("app", "status", name)
    assert "held by autoscaler" in status.stdout, status.stdout + status.stderr
    await local_stack.delete(name)


async def test_a_burst_takes_the_fast_path(local_stack: Stack) -> None:
    name = unique("burst")
    await local_stack.submit({"name": name, **autoscaling(upscale_delay_s=60)})
    proxy = await local_stack.proxy(name)
    started = time.monotonic()
    async with Load(proxy, name, concurrency=12):  # 12 ongoing: 6x what one replica holds
        # Up to 55 s for the decision (the load and the autoscaler's loop run late on a loaded box),
        # still short of the 60 s upscale delay: more replicas before it ran out can only come from
        # the burst path (its decision is counted below).
        await replicas_reach(local_stack, name, lambda n: n > 1, timeout=55)
    assert time.monotonic() - started < 60, "a burst must not wait out the upscale delay"
    samples = scrape(local_stack_metrics(local_stack, "autoscaler"))
    assert (
        total(samples, "servefleet_autoscaler_decisions_total", app=name, mode="burst", direction="up") >= 1
    )
    await local_stack.delete(name)


async def test_a_person_wins_until_they_hand_back(local_stack: Stack) -> None:
    name = unique("pinned")
    await local_stack.submit({"name": name, **autoscaling(downscale_delay_s=2)})
    pinned = local_stack.cli("app", "scale", name, "3", "--reason", "load test tonight")
    assert pinned.returncode == 0, pinned.stderr
    status = await local_stack.status(name)
    assert status.replicas == 3 and status.scaling.paused and status.scaling.by == "person"
    await asyncio.sleep(6)  # no load: the autoscaler would scale down, but a person pinned it
    assert (await local_stack.status(name)).replicas == 3
    assert (await local_stack.autoscaler(name)).mode == "paused"
    shown = local_stack.cli("app", "status", name)
    assert "autoscaler paused" in shown.stdout and "load test tonight" in shown.stdout, shown.stdout
    resumed = local_stack.cli("app", "scale", name, "--auto")
    assert resumed.returncode == 0, resumed.stderr
    await replicas_reach(local_stack, name, lambda n: n == 1, timeout=40)
    await local_stack.delete(name)


async def test_quota_caps_a_scale_up_with_the_reason_in_app_status(local_stack: Stack) -> None:
    tenant = unique("team")
    created = local_stack.cli("tenant", "create", tenant, "--max-replicas", "2")
    assert created.returncode == 0, created.stderr
    token = local_stack.cli("tenant", "token", tenant).stdout.strip().splitlines()[-1]
    name = unique("capped")
    await local_stack.submit({"name": name, "namespace": tenant, **autoscaling()}, token=token)
    proxy = await local_stack.proxy(name, tenant)
    async with Load(proxy, f"{tenant}/{name}", concurrency=10):
        capped = await _until(local_stack, name, tenant, lambda s: "quota" in s.scaling.reason, timeout=40)
    assert capped.replicas == 2, capped.scaling.reason
    assert f"quota of tenant {tenant!r} exceeded: replicas" in capped.scaling.reason
    shown = local_stack.cli("app", "status", name, "--namespace", tenant, token=token)
    assert "capped at 2 by quota" in shown.stdout, shown.stdout + shown.stderr
    await local_stack.delete(name, tenant)


async def test_sigkill_and_restart_resume_the_history(local_stack: Stack) -> None:
    name = unique("resume")
    await local_stack.submit({"name": name, **autoscaling(mode="proactive", history_window_s=300)})
    await asyncio.sleep(8)  # a few persisted samples (saved every 5 s)
    before = await local_stack.autoscaler(name)
    assert before.history_samples >= 8
    local_stack.kill_autoscaler()  # the stack's supervisor starts it again

    async def resumed() -> object:
        got = await local_stack.autoscaler(name)
        return got if got.history_samples else None

    after = await async_wait_for(resumed, timeout=40, interval=0.3, what="the restarted autoscaler to lead")
    assert isinstance(after, type(before))
    assert after.history_start <= before.history_start + 1e-6  # the same, older samples
    assert after.history_samples >= before.history_samples - 12  # at most one persist interval lost
    await local_stack.delete(name)


def local_stack_metrics(stack_: Stack, part: str) -> str:
    return next(p.metrics for p in stack.load(stack_.state) if p.name == part)


async def _until(
    stack_: Stack,
    name: str,
    namespace: str,
    check: Callable[[keeper_pb2.ApplicationStatus], bool],
    timeout: float,
) -> keeper_pb2.ApplicationStatus:
    async def reached() -> keeper_pb2.ApplicationStatus | None:
        got = await stack_.status(name, namespace)
        return got if check(got) else None

    return await async_wait_for(reached, timeout=timeout, interval=0.3, what=f"{name} status")  # type: ignore[return-value]


async def test_a_pipeline_stage_scales_on_its_own_load_and_the_others_stay(local_stack: Stack) -> None:
    name = unique("staged")
    slow = {
        "name": "slow",
        "import_path": "examples.latency:VariableLatency",
        "init_args": {"min_ms": 50, "max_ms": 50},
        "max_concurrency": 4,
        "max_queued": 16,
        **autoscaling(downscale_delay_s=6),
    }
    front = {
        "name": "front",
        "import_path": "examples.latency:Relay",
        "max_concurrency": 32,
        "max_queued": 32,
    }
    await local_stack.submit(
        {
            "name": name,
            "kind": "pipeline",
            **dict.fromkeys(("import_path", "init_args", "autoscaling", "max_concurrency", "max_queued")),
            "stages": [front, slow],
            "edges": [{"caller": "front", "callee": "slow"}],
        }
    )
    proxy = await local_stack.proxy(name)

    async def slow_reaches(check: Callable[[int], bool], timeout: float) -> keeper_pb2.ApplicationStatus:
        async def reached() -> keeper_pb2.ApplicationStatus | None:
            got = await local_stack.status(name)
            return got if check(got.stage_replicas["slow"]) else None

        return await async_wait_for(reached, timeout=timeout, interval=0.25, what=f"{name}'s slow stage")  # type: ignore[return-value]

    async with Load(proxy, name, concurrency=8) as load:  # 8 ongoing in the slow stage at target 2
        scaled = await slow_reaches(lambda n: n >= 3, timeout=60)
    assert scaled.stage_replicas["front"] == 1, "a stage without a block keeps its count"
    assert scaled.scaling.by == "autoscaler" and load.ok > 0
    state = await local_stack.autoscaler(f"{name}--slow")
    assert state.scale_events >= 1 and state.desired >= 3, local_stack.scale_log()
    assert not (await local_stack.autoscaler(f"{name}--front")).app.name  # not autoscaled
    await slow_reaches(lambda n: n == 1, timeout=6 + 40)  # and back down once idle
    status = local_stack.cli("app", "status", name)
    assert "slow" in status.stdout and "front" in status.stdout, status.stdout + status.stderr
    await local_stack.delete(name)
