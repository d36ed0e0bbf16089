"""The autoscaler's loop, without gRPC: read each autoscaled app's load, decide, scale, remember.

Every ``interval_s`` of wall-clock time (ticks sit on a fixed grid, so a slow tick does not
shift the next one) it lists the apps with an ``autoscaling`` block from the keeper, reads one
load :class:`~servefleet.autoscaler.policy.Sample` per app from its parts' own metrics, asks the
app's policy, and calls the keeper's Scale when the decision differs from the count the keeper
holds. Backends sit behind three small interfaces (:class:`Apps`, :class:`LoadReader`,
:class:`HistoryStore`), so unit tests drive this class with fakes and a fake clock.

Precedence: an app a person pinned (``scaling.paused``) is left alone (mode ``paused``); the
keeper refuses the autoscaler's Scale for it anyway, so a race cannot override the person.
History (samples, measured start-up time, scale events) is saved every ``persist_s`` and loaded
when this autoscaler becomes leader, so a restart resumes with the forecast's history.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from prometheus_client import Counter, Gauge

from servefleet.api import autoscaler_pb2, common_pb2, keeper_pb2
from servefleet.autoscaler.policy import Config, Decision, History, Proactive, Reactive, Sample
from servefleet.common import metrics
from servefleet.common.appid import AppId
from servefleet.common.errors import ServefleetError
from servefleet.pipeline_spec import STAGE_SEPARATOR, entry_stage, stage_app, stage_counts, stage_spec

log = logging.getLogger(__name__)

#: EWMA weight of a new start-up measurement.
STARTUP_ALPHA = 0.5
#: After the keeper capped or refused a count, ask for the same count again only this much later.
RETRY_SAME_S = 30.0

DECISIONS = Counter(
    "servefleet_autoscaler_decisions_total",
    "Scale calls the autoscaler made, by app, the policy that decided and direction.",
    ["app", "mode", "direction"],
    registry=metrics.REGISTRY,
)
REFUSED = Counter(
    "servefleet_autoscaler_refused_total",
    "Scale calls the keeper refused or capped (quota, paused by a person, ...).",
    ["app", "code"],
    registry=metrics.REGISTRY,
)
GAUGES = {
    name: Gauge(f"servefleet_autoscaler_{name}", help, ["app"], registry=metrics.REGISTRY)
    for name, help in (
        ("replicas", "Replicas per cluster the keeper holds."),
        ("desired_replicas", "Replicas per cluster the policy asks for."),
        ("ongoing", "Ongoing requests per cluster (running + queued + refused demand + backlog)."),
        ("arrival_rate", "Requests per second arriving, per cluster."),
        ("forecast_error", "Relative error of recent arrival-rate forecasts (proactive mode)."),
        ("startup_seconds", "Replica start-up time in use (measured once a scale-up completes)."),
        ("history_samples", "Load samples kept for the app."),
    )
}
LEADING = Gauge("servefleet_autoscaler_leading", "1 while this autoscaler leads.", registry=metrics.REGISTRY)


class Apps(Protocol):
    """The keeper side: which apps are autoscaled, and its Scale call."""

    async def autoscaled(self) -> list[keeper_pb2.ApplicationStatus]: ...

    async def scale(
        self, app: common_pb2.AppRef, replicas: int, reason: str, stage: str = ""
    ) -> keeper_pb2.ApplicationStatus: ...


class LoadReader(Protocol):
    """One load sample per app from its parts' metrics (None: nothing reported this time)."""

    async def read(self, status: keeper_pb2.ApplicationStatus, now: float) -> Sample | None: ...


class HistoryStore(Protocol):
    async def load(self) -> dict[str, dict[str, Any]]: ...

    async def save(self, key: str, state: dict[str, Any], fence: bytes) -> None: ...

    async def forget(self, key: str) -> None: ...


@dataclass
class AppState:
    """What the autoscaler keeps per app (all of it persisted, except the policy objects)."""

    config: Config
    history: History
    startup_s: float = 0.0  # measured; 0 until a scale-up completed
    scale_events: int = 0
    pending_up: tuple[float, int] | None = None  # (when, count) of a scale-up not yet ready
    last: Decision = field(default_factory=lambda: Decision(0, "hold", "starting"))
    error: float = 0.0
    replicas: int = 0
    refused: tuple[int, float] | None = None  # (count, when) the keeper last capped or refused
    saved_at: float = 0.0

    @property
    def startup_in_use(self) -> float:
        return self.startup_s or self.config.startup_s

    def dump(self) -> dict[str, Any]:
        return {
            "samples": [s.as_list() for s in self.history.samples],
            "startup_s": self.startup_s,
            "scale_events": self.scale_events,
        }

    def restore(self, data: Mapping[str, Any]) -> None:
        for values in data.get("samples", []):
            self.history.add(Sample.from_list(values))
        self.startup_s = float(data.get("startup_s", 0.0))
        self.scale_events = int(data.get("scale_events", 0))


@dataclass(frozen=True)
class Unit:
    """What one policy scales: an app, or one autoscaled stage of a pipeline (which runs as its
    own app, ``name--stage``, with its own replicas, metrics and count held by the keeper)."""

    key: str  # state and history: ``ns/app``, or ``ns/app--stage``
    status: keeper_pb2.ApplicationStatus  # as its load is read: a stage's is its stage app's
    app: common_pb2.AppRef  # what the keeper's Scale names
    stage: str = ""


def units(statuses: list[keeper_pb2.ApplicationStatus]) -> list[Unit]:
    """The autoscaled apps, a pipeline expanded into its stages that have an autoscaling block."""
    found = []
    for status in statuses:
        key = AppId.parse(status.app).key
        if status.spec.kind != "pipeline":
            found.append(Unit(key, status, status.app))
            continue
        entry, counts = entry_stage(status.spec), stage_counts(status.spec, status.stage_replicas)
        for stage in status.spec.stages:
            if not stage.HasField("autoscaling"):
                continue
            view = keeper_pb2.ApplicationStatus(
                app=stage_app(status.app, stage.name, entry=stage.name == entry),
                state=status.state,
                spec=stage_spec(status.spec, stage.name),
                replicas=counts[stage.name],
                placements=status.placements,
                scaling=status.scaling,
            )
            found.append(Unit(f"{key}{STAGE_SEPARATOR}{stage.name}", view, status.app, stage.name))
    return found


class Autoscaler:
    """Decides and scales every autoscaled app; ``run`` is what the leader runs."""

    def __init__(
        self,
        apps: Apps,
        loads: LoadReader,
        store: HistoryStore,
        *,
        interval_s: float = 1.0,
        persist_s: float = 5.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.apps = apps
        self.loads = loads
        self.store = store
        self.interval_s = interval_s
        self.persist_s = persist_s
        self.clock = clock
        self.states: dict[str, AppState] = {}
        self._saved: dict[str, dict[str, Any]] = {}
        self.leading = False

    async def run(self, fence: bytes) -> None:
        """Until cancelled (leadership lost): load the saved history, then tick on a steady grid."""
        self.leading = True
        LEADING.set(1)
        try:
            self._saved = await self.store.load()
            self.states.clear()
            loop = asyncio.get_running_loop()
            next_at = loop.time()
            while True:
                try:
                    await self.tick(fence)
                except ServefleetError as exc:  # keeper or discovery unreachable: next tick again
                    log.warning("autoscaler tick failed: %s", exc)
                next_at += self.interval_s
                if next_at < loop.time():  # overran: skip the missed ticks rather than bunch them
                    next_at = loop.time()
                await asyncio.sleep(next_at - loop.time())
        finally:
            self.leading = False
            LEADING.set(0)

    async def tick(self, fence: bytes = b"") -> None:
        """One pass over every autoscaled app (public for tests: a fake clock steps it)."""
        now = self.clock()
        found = units(await self.apps.autoscaled())
        reads = (self.loads.read(u.status, now) for u in found)
        samples = await asyncio.gather(*reads, return_exceptions=True)
        seen = set()
        for unit, sample in zip(found, samples, strict=True):
            key = unit.key
            seen.add(key)
            state = self._state(key, unit.status.spec.autoscaling)
            if isinstance(sample, BaseException):
                log.warning("load of %s not read: %s", key, sample)
            elif sample is not None:
                state.history.add(sample)
                self._measure_startup(state, sample)
            await self._act(unit, state, now)
            if now - state.saved_at >= self.persist_s:
                await self.store.save(key, state.dump(), fence)
                state.saved_at = now
        for key in set(self.states) - seen:  # deleted, or its autoscaling block removed
            del self.states[key]
            await self.store.forget(key)

    def _state(self, key: str, block: common_pb2.AutoscalingConfig) -> AppState:
        config = Config.from_proto(block)
        state = self.states.get(key)
        if state is None:
            state = self.states[key] = AppState(config, History(config.history_window_s))
            if key in self._saved:
                state.restore(self._saved.pop(key))
        elif state.config != config:  # the spec's block changed: same history, new rules
            state.config = config
            state.history.window_s = config.history_window_s
        return state

    def decide(self, state: AppState, current: int) -> Decision:
        config = state.config
        if config.mode == "proactive":
            policy = Proactive(config)
            state.error = policy.error(state.history, state.startup_in_use)
            return policy.decide(state.history, current, startup_s=state.startup_in_use, error=state.error)
        return Reactive(config).decide(state.history, current)

    async def _act(self, unit: Unit, state: AppState, now: float) -> None:
        key, status = unit.key, unit.status
        current = status.replicas
        state.replicas = current
        if status.scaling.paused:
            state.last = Decision(current, "paused", f"pinned by a person: {status.scaling.reason}")
        else:
            state.last = self.decide(state, current)
        self._export(status.app, state)
        desired = state.last.desired
        if state.last.mode == "paused" or desired == current:
            return
        if (
            state.refused is not None
            and state.refused[0] == desired
            and now - state.refused[1] < RETRY_SAME_S
        ):
            return  # the keeper said no to this count moments ago
        direction = "up" if desired > current else "down"
        reason = f"autoscaler ({state.last.mode}): {current} -> {desired}: {state.last.reason}"
        try:
            after = await self.apps.scale(unit.app, desired, reason, unit.stage)
        except ServefleetError as exc:
            REFUSED.labels(AppId.parse(status.app).model_name, exc.code.name).inc()
            state.refused = (desired, now)
            log.info("scale of %s to %d refused: %s", key, desired, exc)
            return
        DECISIONS.labels(AppId.parse(status.app).model_name, state.last.mode, direction).inc()
        now_at = after.stage_replicas[unit.stage] if unit.stage else after.replicas
        if now_at != desired:  # capped by quota: the keeper's reason says so
            REFUSED.labels(AppId.parse(status.app).model_name, "RESOURCE_EXHAUSTED").inc()
            state.refused = (desired, now)
        else:
            state.refused = None
        if now_at != current:
            state.scale_events += 1
            state.pending_up = (now, now_at) if now_at > current else None
        state.replicas = now_at
        log.info("scaled %s from %d to %d: %s", key, current, now_at, reason)

    def _measure_startup(self, state: AppState, sample: Sample) -> None:
        """A scale-up is complete when as many replicas report load as were asked for."""
        if state.pending_up is None or sample.replicas < state.pending_up[1]:
            return
        took = sample.t - state.pending_up[0]
        state.startup_s = (
            took if not state.startup_s else state.startup_s + STARTUP_ALPHA * (took - state.startup_s)
        )
        state.pending_up = None

    def _export(self, ref: common_pb2.AppRef, state: AppState) -> None:
        app = AppId.parse(ref).model_name
        last = state.history.last
        values = {
            "replicas": state.replicas,
            "desired_replicas": state.last.desired,
            "ongoing": last.ongoing if last else 0.0,
            "arrival_rate": last.arrival_rate if last else 0.0,
            "forecast_error": state.error,
            "startup_seconds": state.startup_in_use,
            "history_samples": len(state.history),
        }
        for name, value in values.items():
            GAUGES[name].labels(app).set(value)

    def state(self, app: common_pb2.AppRef | None = None) -> autoscaler_pb2.AutoscalerState:
        """What the autoscaler knows now (all apps, or one): for `GetState` and tests."""
        out = autoscaler_pb2.AutoscalerState(leading=self.leading)
        for key, state in sorted(self.states.items()):
            namespace, _, name = key.partition("/")
            if app is not None and app.name and (app.namespace or "default", app.name) != (namespace, name):
                continue
            last = state.history.last
            out.apps.append(
                autoscaler_pb2.AppAutoscalerState(
                    app=common_pb2.AppRef(namespace=namespace, name=name),
                    mode=state.last.mode,
                    replicas=state.replicas,
                    desired=state.last.desired,
                    reason=state.last.reason,
                    history_samples=len(state.history),
                    history_start=state.history.samples[0].t if len(state.history) else 0.0,
                    forecast_error=state.error,
                    startup_s=state.startup_in_use,
                    scale_events=state.scale_events,
                    ongoing=last.ongoing if last else 0.0,
                    arrival_rate=last.arrival_rate if last else 0.0,
                )
            )
        return out
