"""Autoscaling policies, forecast and loop, replayed on synthetic traces with a fake clock."""

from __future__ import annotations

import math
import random
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest

from servefleet.api import common_pb2, keeper_pb2
from servefleet.autoscaler.core import Autoscaler
from servefleet.autoscaler.forecast import forecast
from servefleet.autoscaler.policy import Config, Decision, History, Proactive, Reactive, Sample
from servefleet.common.errors import FailedPrecondition, InvalidArgument
from servefleet.spec import load_spec

SERVICE_S = 0.05  # each request holds a slot 50 ms


def config(**overrides: Any) -> Config:
    values: dict[str, Any] = {
        "target": 4.0,
        "min_replicas": 1,
        "max_replicas": 20,
        "upscale_delay_s": 3.0,
        "downscale_delay_s": 30.0,
        "horizon_s": 10.0,
        "startup_s": 5.0,
        "history_window_s": 600.0,
    }
    return Config(**{**values, **overrides})


def replay(
    decide: Callable[[History, int], Decision],
    rate: Callable[[float], float],
    *,
    seconds: int,
    start_replicas: int = 1,
    startup_s: float = 0.0,
    window_s: float = 600.0,
) -> tuple[list[int], list[Decision]]:
    """A 1 Hz replay: load = rate x service time (Little's law); decided counts become ready
    ``startup_s`` later. Returns the ready count per second and every decision."""
    history, ready, pending = History(window_s), start_replicas, []  # pending: (ready_at, count)
    held, counts, decisions = start_replicas, [], []
    for t in range(seconds):
        pending_now = [c for at, c in pending if at <= t]
        if pending_now:
            ready = pending_now[-1]
            pending = [(at, c) for at, c in pending if at > t]
        lam = rate(t)
        history.add(
            Sample(t=float(t), ongoing=lam * SERVICE_S, arrival_rate=lam, service_s=SERVICE_S, replicas=ready)
        )
        decision = decide(history, held)
        decisions.append(decision)
        if decision.desired != held:
            if decision.desired > held:
                pending.append((t + startup_s, decision.desired))
            else:
                ready = decision.desired
            held = decision.desired
        counts.append(ready)
    return counts, decisions


def events(decisions: list[Decision], start: int = 1) -> int:
    held, n = start, 0
    for d in decisions:
        if d.desired != held:
            n, held = n + 1, d.desired
    return n


# -- reactive -----------------------------------------------------------------------------------


def test_reactive_scales_up_after_the_delay_and_down_after_the_long_one() -> None:
    cfg = config()
    # 140 req/s x 50 ms = 7 ongoing (under the burst factor of 1 replica) -> 2 replicas at target 4.
    counts, decisions = replay(
        lambda h, c: Reactive(cfg).decide(h, c), lambda t: 140 if 10 <= t < 70 else 60, seconds=160
    )
    first_up = next(i for i, d in enumerate(decisions) if d.desired > 1)
    assert 10 + cfg.upscale_delay_s <= first_up <= 10 + cfg.upscale_delay_s + 1  # wall-clock delay, not ticks
    assert max(counts) == 2 and decisions[first_up].mode == "reactive"
    first_down = next(i for i, d in enumerate(decisions) if i > first_up and d.desired < 2)
    assert first_down >= 70 + cfg.downscale_delay_s - 1  # the peak stays in the window that long
    assert counts[-1] == 1


def test_reactive_burst_scales_up_at_once() -> None:
    cfg = config(upscale_delay_s=20.0, burst_factor=2.0)
    _, decisions = replay(
        lambda h, c: Reactive(cfg).decide(h, c), lambda t: 1000 if t >= 30 else 20, seconds=40
    )
    burst = next(i for i, d in enumerate(decisions) if d.desired > 1)
    assert burst <= 31, "a burst must not wait out the 20 s upscale delay"
    assert decisions[burst].mode == "burst" and decisions[burst].desired == math.ceil(1000 * SERVICE_S / 4)


def test_reactive_steady_noisy_load_does_not_flap() -> None:
    cfg = config()
    noise = random.Random(7)
    _, decisions = replay(
        lambda h, c: Reactive(cfg).decide(h, c),
        lambda t: 300 * (1 + 0.15 * noise.uniform(-1, 1)),
        seconds=900,
    )
    assert events(decisions) <= 3, [d.desired for d in decisions if d.mode != "hold"]


def test_reactive_holds_while_an_async_backlog_is_not_draining() -> None:
    cfg = config(downscale_delay_s=5.0)
    history = History(600)
    for t in range(10):
        history.add(Sample(float(t), ongoing=1.0, arrival_rate=5.0, backlog=40.0, drain_rate=2.0))
    decision = Reactive(cfg).decide(history, 4)
    assert decision.desired == 4 and "not draining" in decision.reason


# -- forecast and proactive ---------------------------------------------------------------------


def test_forecast_follows_a_trend_and_a_season() -> None:
    t = np.arange(0, 120.0)
    line = forecast(t, 10 + 2 * t, [130.0])
    assert line[0] == pytest.approx(10 + 2 * 130, rel=0.02)
    season = 60.0
    wave = 100 + 50 * np.sin(2 * np.pi * t / season)
    ahead = forecast(t, wave, [135.0], season_s=season)
    assert ahead[0] == pytest.approx(100 + 50 * np.sin(2 * np.pi * 135 / season), abs=8)


def diurnal(t: float) -> float:
    """Two compressed days of 120 s each: night 40 req/s, day peak 600 req/s."""
    return 40 + 560 * max(0.0, math.sin(2 * math.pi * t / 120)) ** 2


def test_proactive_is_ready_before_the_load_and_reactive_is_late() -> None:
    base = config(season_s=120.0, history_window_s=300.0, startup_s=6.0, downscale_delay_s=20.0)
    proactive = Proactive(base)

    def decide_proactive(history: History, current: int) -> Decision:
        return proactive.decide(history, current, startup_s=6.0, error=proactive.error(history, 6.0))

    reactive = Reactive(base)
    p_counts, _ = replay(decide_proactive, diurnal, seconds=480, startup_s=6.0, window_s=300)
    r_counts, _ = replay(
        lambda h, c: reactive.decide(h, c), diurnal, seconds=480, startup_s=6.0, window_s=300
    )

    def short(counts: list[int]) -> float:
        """Ongoing-seconds beyond what the ready replicas hold at target (over the second day)."""
        return sum(max(0.0, diurnal(t) * SERVICE_S - counts[t] * base.target) for t in range(240, 480))

    def provisioned(counts: list[int]) -> float:
        return float(sum(counts[240:480]))

    assert short(p_counts) < 0.5 * short(r_counts), (short(p_counts), short(r_counts))
    assert provisioned(p_counts) < 1.2 * provisioned(r_counts)


def test_proactive_falls_back_to_reactive_when_the_forecast_is_wrong() -> None:
    cfg = config(season_s=60.0, history_window_s=200.0, startup_s=5.0, max_forecast_error=0.3)
    proactive = Proactive(cfg)
    history = History(200)
    rng = random.Random(3)
    for t in range(200):  # no pattern at all: jumps between 20 and 400 req/s
        lam = rng.choice([20, 400])
        history.add(Sample(float(t), ongoing=lam * SERVICE_S, arrival_rate=lam, service_s=SERVICE_S))
    error = proactive.error(history, 5.0)
    assert error > cfg.max_forecast_error
    decision = proactive.decide(history, 3, startup_s=5.0, error=error)
    assert decision.reason.startswith(f"forecast error {error:.2f}") and "reactive" in decision.reason


def test_proactive_trusts_a_ramp_read_as_poisson_counts() -> None:
    """Rates measured per 0.5 s tick are Poisson counts: that counting noise is not forecast
    error, so a smooth ramp keeps the forecast in charge (it was reactive most of the time)."""
    cfg = config(upscale_delay_s=0.5, horizon_s=1.0, history_window_s=60.0, max_forecast_error=0.5)
    proactive, history, rng = Proactive(cfg), History(60), np.random.default_rng(5)
    errors = []
    for tick in range(80):  # 40 s ramp from 5 to 30 req/s
        t, lam = tick * 0.5, 5 + 25 * tick / 80
        measured = rng.poisson(lam * 0.5) / 0.5
        history.add(Sample(t, ongoing=measured * SERVICE_S, arrival_rate=measured, service_s=SERVICE_S))
        if t >= 15:
            errors.append(proactive.error(history, 2.0))
    assert np.mean(np.array(errors) <= cfg.max_forecast_error) > 0.9, errors


def test_proactive_warms_up_reactively() -> None:
    proactive = Proactive(config())
    history = History(600)
    history.add(Sample(0.0, ongoing=3.0, arrival_rate=60.0, service_s=SERVICE_S))
    assert "warming up" in proactive.decide(history, 1, startup_s=5.0, error=0.0).reason


# -- spec ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("block", "message"),
    [
        ({"min_replicas": 1, "max_replicas": 3}, "spec.autoscaling.target_ongoing_requests: required"),
        ({"target_ongoing_requests": 2, "min_replicas": 0, "max_replicas": 3}, "min_replicas: must be >= 1"),
        ({"target_ongoing_requests": 2, "min_replicas": 4, "max_replicas": 3}, "max_replicas: 3 is below"),
        (
            {"target_ongoing_requests": 2, "min_replicas": 1, "max_replicas": 3, "mode": "magic"},
            "mode: 'magic'",
        ),
        (
            {"target_ongoing_requests": 2, "min_replicas": 1, "max_replicas": 3, "season_s": 900},
            "season_s: 900 is longer than history_window_s 600",
        ),
        (
            {"target_ongoing_requests": 2, "min_replicas": 1, "max_replicas": 3, "forecast_horizon_s": 700},
            "forecast_horizon_s: 700 must be shorter",
        ),
        (
            {"target_ongoing_requests": 2, "min_replicas": 1, "max_replicas": 3, "burst_factor": 0.5},
            "burst_factor",
        ),
        (
            {"target_ongoing_requests": 2, "min_replicas": 1, "max_replicas": 3, "upscale_delay_s": -1},
            "upscale_delay_s",
        ),
    ],
)
def test_autoscaling_block_is_validated_precisely(block: dict[str, Any], message: str) -> None:
    with pytest.raises(InvalidArgument, match=message.replace("(", r"\(")):
        load_spec({"name": "a", "import_path": "m:C", "autoscaling": block})


def test_autoscaling_block_sets_the_replica_range_and_defaults() -> None:
    spec = load_spec(
        {
            "name": "a",
            "import_path": "m:C",
            "autoscaling": {"target_ongoing_requests": 2, "min_replicas": 2, "max_replicas": 6},
        }
    )
    assert (spec.replicas.min, spec.replicas.max, spec.replicas.initial) == (2, 6, 2)
    assert spec.autoscaling.mode == "reactive" and spec.autoscaling.downscale_delay_s == 60
    with pytest.raises(InvalidArgument, match=r"outside spec.replicas \[1, 4\]"):
        load_spec(
            {
                "name": "a",
                "import_path": "m:C",
                "replicas": {"min": 1, "max": 4},
                "autoscaling": {"target_ongoing_requests": 2, "min_replicas": 1, "max_replicas": 6},
            }
        )


# -- the loop, with fakes -----------------------------------------------------------------------


class FakeApps:
    """One autoscaled app; Scale caps at ``quota`` replicas and refuses while paused."""

    def __init__(self, block: common_pb2.AutoscalingConfig, *, quota: int = 100) -> None:
        spec = load_spec(
            {"name": "app", "import_path": "m:C", "autoscaling": {}} | {"autoscaling": _dict(block)}
        )
        self.status = keeper_pb2.ApplicationStatus(
            app=common_pb2.AppRef(namespace="default", name="app"), spec=spec
        )
        self.status.replicas = spec.replicas.initial
        self.status.scaling.autoscaled = True
        self.quota = quota
        self.calls: list[tuple[int, str]] = []

    async def autoscaled(self) -> list[keeper_pb2.ApplicationStatus]:
        return [self.status]

    async def scale(
        self, app: common_pb2.AppRef, replicas: int, reason: str, stage: str = ""
    ) -> keeper_pb2.ApplicationStatus:
        assert not stage
        if self.status.scaling.paused:
            raise FailedPrecondition("paused")
        self.calls.append((replicas, reason))
        self.status.replicas = min(replicas, self.quota)
        return self.status


def _dict(block: common_pb2.AutoscalingConfig) -> dict[str, Any]:
    from google.protobuf import json_format

    return json_format.MessageToDict(block, preserving_proto_field_name=True)


class FakeLoads:
    def __init__(self, apps: FakeApps, rate: Callable[[float], float]) -> None:
        self.apps, self.rate = apps, rate

    async def read(self, status: keeper_pb2.ApplicationStatus, now: float) -> Sample:
        lam = self.rate(now)
        return Sample(now, lam * SERVICE_S, lam, SERVICE_S, replicas=status.replicas)


class FakeStore:
    def __init__(self) -> None:
        self.saved: dict[str, dict[str, Any]] = {}

    async def load(self) -> dict[str, dict[str, Any]]:
        return {k: dict(v) for k, v in self.saved.items()}

    async def save(self, key: str, state: dict[str, Any], fence: bytes) -> None:
        self.saved[key] = state

    async def forget(self, key: str) -> None:
        self.saved.pop(key, None)


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


def block(**fields: Any) -> common_pb2.AutoscalingConfig:
    return common_pb2.AutoscalingConfig(
        target_ongoing_requests=4,
        min_replicas=1,
        max_replicas=10,
        upscale_delay_s=2,
        downscale_delay_s=10,
        **fields,
    )


async def test_loop_scales_through_the_keeper_and_a_restart_resumes_history() -> None:
    apps, clock, store = FakeApps(block(mode="proactive")), Clock(), FakeStore()
    loads = FakeLoads(apps, lambda t: 400.0)  # 20 ongoing: 5 replicas
    scaler = Autoscaler(apps, loads, store, persist_s=5.0, clock=clock)
    for _ in range(20):
        await scaler.tick(b"fence")
        clock.now += 1.0
    assert apps.status.replicas == 5 and apps.calls[0][1].startswith("autoscaler (")
    samples = len(scaler.states["default/app"].history)
    assert "default/app" in store.saved

    again = Autoscaler(apps, loads, store, clock=clock)  # a new process: history from the store
    again._saved = await store.load()
    await again.tick(b"fence")
    resumed = again.state().apps[0]
    assert resumed.history_samples >= samples - 5  # at most one persist interval lost
    assert resumed.scale_events == 1


async def test_loop_leaves_a_pinned_app_alone_and_reports_a_quota_cap() -> None:
    apps, clock = FakeApps(block(), quota=3), Clock()
    scaler = Autoscaler(apps, FakeLoads(apps, lambda t: 400.0), FakeStore(), clock=clock)
    for _ in range(5):
        await scaler.tick()
        clock.now += 1.0
    assert apps.status.replicas == 3 and len(apps.calls) == 1  # capped, and not asked again at once
    apps.status.scaling.paused = True
    apps.status.scaling.reason = "pinned by a person"
    await scaler.tick()
    assert scaler.state().apps[0].mode == "paused" and len(apps.calls) == 1


class FakePipeline:
    """A pipeline whose model stage autoscales and whose cache stage does not."""

    def __init__(self) -> None:
        spec = load_spec(
            {
                "name": "llm",
                "kind": "pipeline",
                "inputs": [{"name": "prompt", "datatype": "BYTES", "shape": [1]}],
                "stages": [
                    {"name": "cache", "import_path": "a:Cache", "replicas": 2},
                    {"name": "model", "import_path": "a:Model", "autoscaling": _dict(block())},
                ],
                "edges": [{"caller": "cache", "callee": "model"}],
            }
        )
        self.status = keeper_pb2.ApplicationStatus(
            app=common_pb2.AppRef(namespace="default", name="llm"), spec=spec
        )
        self.status.stage_replicas.update({"cache": 2, "model": 1})
        self.calls: list[tuple[str, int]] = []

    async def autoscaled(self) -> list[keeper_pb2.ApplicationStatus]:
        return [self.status]

    async def scale(
        self, app: common_pb2.AppRef, replicas: int, reason: str, stage: str = ""
    ) -> keeper_pb2.ApplicationStatus:
        assert app == self.status.app
        self.calls.append((stage, replicas))
        self.status.stage_replicas[stage] = replicas
        return self.status


class StageLoads:
    """Every stage app is busy (20 ongoing); records which apps' load was read."""

    def __init__(self) -> None:
        self.read_apps: set[str] = set()

    async def read(self, status: keeper_pb2.ApplicationStatus, now: float) -> Sample:
        self.read_apps.add(status.app.name)
        return Sample(now, 400.0 * SERVICE_S, 400.0, SERVICE_S, replicas=status.replicas)


async def test_a_pipeline_scales_only_its_autoscaled_stages_each_from_its_own_load() -> None:
    apps, loads, clock = FakePipeline(), StageLoads(), Clock()
    scaler = Autoscaler(apps, loads, FakeStore(), clock=clock)
    for _ in range(5):
        await scaler.tick()
        clock.now += 1.0
    assert loads.read_apps == {"llm--model"}  # the model stage's own app; the cache has no block
    assert apps.calls and {stage for stage, _ in apps.calls} == {"model"}
    assert apps.status.stage_replicas["model"] == 5 and apps.status.stage_replicas["cache"] == 2
    assert [a.app.name for a in scaler.state().apps] == ["llm--model"]
