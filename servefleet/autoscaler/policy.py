"""Scaling policies: pure functions of (config, load history, current count, time) -> a decision.

No I/O, no clock of their own: the time is the newest sample's wall-clock timestamp or what the
caller passes, so a unit test replays a trace through them deterministically, and a restarted
autoscaler that reloads its history decides exactly as the old one would have.

Windows are measured in wall-clock seconds over sample timestamps, never in ticks, so a slow
tick cannot stretch a delay (Ray Serve's delays drift that way: ray-project/ray#62004).

- :class:`Reactive` holds ``target_ongoing_requests`` per replica. Up: the *least* load seen over
  the last ``upscale_delay_s`` is above what the replicas hold. Burst (Knative's panic window):
  the mean over a short window passes ``burst_factor`` x capacity, so it scales up at once. Down:
  the *peak* load over the last ``downscale_delay_s`` fits fewer replicas (and an async app's
  backlog is draining), judged only over a window in which no replica started or stopped (load
  read while replicas start is not steady). Between these thresholds nothing moves, so a steady
  load does not flap.
- :class:`Proactive` forecasts the arrival rate over the next start-up time + horizon
  (:mod:`forecast`), turns it into replicas with Little's law (rate x service time / target), and
  scales so replicas are ready before the load arrives; it never goes below what runs now, lets a
  burst through the reactive fast path, and acts reactively while its forecast error is above
  ``max_forecast_error`` (or until it has enough history).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass

import numpy as np

from servefleet.api import common_pb2
from servefleet.autoscaler.forecast import forecast

#: Spare share a scale-down must leave (hysteresis against flapping at a replica boundary).
DOWNSCALE_TOLERANCE = 0.2
#: Forecast error below this many requests per second per sample is noise, not error.
ERROR_FLOOR_RPS = 1.0
#: Points at which the forecast error is evaluated (each a forecast from older history).
ERROR_POINTS = 5


@dataclass(frozen=True)
class Config:
    """The spec's ``autoscaling`` block, defaults filled (``servefleet.spec`` validated it)."""

    target: float
    min_replicas: int
    max_replicas: int
    upscale_delay_s: float = 3.0
    downscale_delay_s: float = 60.0
    mode: str = "reactive"
    burst_factor: float = 2.0
    history_window_s: float = 600.0
    horizon_s: float = 30.0
    startup_s: float = 10.0
    season_s: float = 0.0
    max_forecast_error: float = 0.5

    @classmethod
    def from_proto(cls, config: common_pb2.AutoscalingConfig) -> Config:
        return cls(
            target=config.target_ongoing_requests,
            min_replicas=config.min_replicas,
            max_replicas=config.max_replicas,
            upscale_delay_s=config.upscale_delay_s,
            downscale_delay_s=config.downscale_delay_s,
            mode=config.mode or "reactive",
            burst_factor=config.burst_factor,
            history_window_s=config.history_window_s,
            horizon_s=config.forecast_horizon_s,
            startup_s=config.startup_s,
            season_s=config.season_s,
            max_forecast_error=config.max_forecast_error,
        )

    @property
    def burst_window_s(self) -> float:
        return max(1.0, self.upscale_delay_s / 3)

    def clamp(self, replicas: int) -> int:
        return max(self.min_replicas, min(self.max_replicas, replicas))

    def need(self, ongoing: float, headroom: float = 0.0) -> int:
        """Replicas that hold ``ongoing`` requests at the target (with ``headroom`` spare)."""
        return math.ceil(ongoing * (1 + headroom) / self.target - 1e-9)


@dataclass(frozen=True)
class Sample:
    """An app's load at one wall-clock instant, as its parts' own metrics report it."""

    t: float
    ongoing: float  # running + queued on replicas, + demand they refused, + broker backlog
    arrival_rate: float  # requests per second arriving
    service_s: float = 0.0  # mean seconds a request holds a replica (0: unknown yet)
    replicas: int = 0  # replicas reporting load
    backlog: float = 0.0  # broker queue depth (async apps)
    drain_rate: float = 0.0  # broker completions per second (async apps)

    def as_list(self) -> list[float]:
        return list(asdict(self).values())

    @classmethod
    def from_list(cls, values: Sequence[float]) -> Sample:
        t, ongoing, rate, service, replicas, backlog, drain = values
        return cls(t, ongoing, rate, service, int(replicas), backlog, drain)


class History:
    """Samples of one app, oldest first, kept for ``window_s`` seconds."""

    def __init__(self, window_s: float, samples: Iterable[Sample] = ()) -> None:
        self.window_s = window_s
        self.samples: list[Sample] = sorted(samples, key=lambda s: s.t)

    def add(self, sample: Sample) -> None:
        if self.samples and sample.t <= self.samples[-1].t:
            return  # never out of order (a clock step back): keep the newer history
        self.samples.append(sample)
        cut = sample.t - self.window_s
        while self.samples and self.samples[0].t < cut:
            self.samples.pop(0)

    def __len__(self) -> int:
        return len(self.samples)

    @property
    def last(self) -> Sample | None:
        return self.samples[-1] if self.samples else None

    @property
    def span_s(self) -> float:
        return self.samples[-1].t - self.samples[0].t if self.samples else 0.0

    def since(self, start: float) -> list[Sample]:
        return [s for s in self.samples if s.t >= start]

    def covers(self, start: float) -> bool:
        """Whether the history reaches back to ``start`` (a window judged only when complete)."""
        return bool(self.samples) and self.samples[0].t <= start

    def before(self, end: float) -> list[Sample]:
        return [s for s in self.samples if s.t <= end]


@dataclass(frozen=True)
class Decision:
    desired: int
    #: What decided: "reactive", "burst", "proactive" or "hold" (bounded: a metrics label).
    mode: str
    reason: str


class Reactive:
    """Hold the target per replica: delayed up, burst fast path, slow and hysteretic down."""

    def __init__(self, config: Config) -> None:
        self.config = config

    def decide(self, history: History, current: int) -> Decision:
        cfg, last = self.config, history.last
        if last is None:
            return Decision(cfg.clamp(current), "hold", "no load sample yet")
        now, capacity = last.t, current * cfg.target
        if cfg.clamp(current) != current:
            return Decision(
                cfg.clamp(current),
                "reactive",
                f"{current} is outside [{cfg.min_replicas}, {cfg.max_replicas}]",
            )
        burst = [s.ongoing for s in history.since(now - cfg.burst_window_s)]
        burst_load = float(np.mean(burst))
        if burst_load > cfg.burst_factor * capacity and cfg.clamp(cfg.need(max(burst))) > current:
            return Decision(
                cfg.clamp(cfg.need(max(burst))),
                "burst",
                f"burst: {burst_load:.1f} ongoing is past {cfg.burst_factor:g}x what {current} replica(s) "
                f"hold at {cfg.target:g} each; scaling up at once",
            )
        up = history.since(now - cfg.upscale_delay_s)
        if history.covers(now - cfg.upscale_delay_s) or cfg.upscale_delay_s == 0:
            low = min(s.ongoing for s in up)
            if low > capacity and cfg.clamp(cfg.need(low)) > current:
                return Decision(
                    cfg.clamp(cfg.need(low)),
                    "reactive",
                    f"at least {low:.1f} ongoing for {cfg.upscale_delay_s:g}s, above {current} x "
                    f"target {cfg.target:g}",
                )
        down = history.since(now - cfg.downscale_delay_s)
        # Load read while replicas start (or stop) is not steady: judge a window without changes.
        settled = len({s.replicas for s in down}) == 1
        if history.covers(now - cfg.downscale_delay_s) and settled:
            peak = max(s.ongoing for s in down)
            fits = cfg.clamp(cfg.need(peak, DOWNSCALE_TOLERANCE))
            if fits < current:
                if last.backlog > 0 and last.drain_rate <= last.arrival_rate:
                    return Decision(
                        current,
                        "hold",
                        f"backlog of {last.backlog:.0f} not draining ({last.drain_rate:.1f}/s done, "
                        f"{last.arrival_rate:.1f}/s arriving)",
                    )
                return Decision(
                    fits,
                    "reactive",
                    f"peak {peak:.1f} ongoing over the last {cfg.downscale_delay_s:g}s "
                    f"fits {fits} replica(s)",
                )
        return Decision(current, "hold", f"{last.ongoing:.1f} ongoing within target for {current}")


class Proactive:
    """Forecast-driven: replicas ready a start-up time ahead of the load; reactive as a floor,
    for bursts, and whenever the forecast is not trustworthy."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.reactive = Reactive(config)

    def lead_s(self, startup_s: float) -> float:
        return startup_s + self.config.horizon_s

    def min_history_s(self, startup_s: float) -> float:
        cfg = self.config
        return min(cfg.history_window_s / 2, max(2 * self.lead_s(startup_s), cfg.upscale_delay_s))

    def trend_window_s(self, startup_s: float) -> float:
        """Seconds of history the trend is fitted over: a line extrapolated a lead time ahead
        needs at least twice that much behind it, or per-tick noise dominates its slope."""
        cfg = self.config
        return max(3 * cfg.horizon_s, 4 * cfg.upscale_delay_s, 2 * self.lead_s(startup_s))

    def predict(
        self, samples: Sequence[Sample], at: Sequence[float] | np.ndarray, startup_s: float
    ) -> np.ndarray:
        return forecast(
            [s.t for s in samples],
            [s.arrival_rate for s in samples],
            at,
            season_s=self.config.season_s,
            trend_window_s=self.trend_window_s(startup_s),
        )

    def error(self, history: History, startup_s: float) -> float:
        """Weighted relative error of forecasts made one lead time before each of the last few
        samples against the rate then measured (0 when it cannot be judged yet)."""
        lead = self.lead_s(startup_s)
        if history.last is None or history.span_s < lead + self.min_history_s(startup_s) / 2:
            return 0.0
        points = history.since(history.last.t - lead)[-ERROR_POINTS:]
        # The measured rate is a Poisson count per tick: compare against its mean over a
        # smoothing window, or counting noise reads as forecast error.
        smooth = self.trend_window_s(startup_s) / 4
        predicted, actual = [], []
        for point in points:
            past = history.before(point.t - lead)
            if len(past) < 3:
                continue
            predicted.append(float(self.predict(past, [point.t], startup_s)[0]))
            window = [s.arrival_rate for s in history.since(point.t - smooth) if s.t <= point.t]
            actual.append(float(np.mean(window)))
        if not actual:
            return 0.0
        miss = float(np.abs(np.subtract(predicted, actual)).sum())
        return miss / max(float(np.sum(actual)), ERROR_FLOOR_RPS * len(actual))

    def decide(self, history: History, current: int, *, startup_s: float, error: float) -> Decision:
        cfg, reactive = self.config, self.reactive.decide(history, current)
        last = history.last
        if last is None or reactive.mode == "burst":
            return reactive
        if history.span_s < self.min_history_s(startup_s):
            return _prefixed(
                reactive,
                f"proactive warming up ({history.span_s:.0f}s of "
                f"{self.min_history_s(startup_s):.0f}s history)",
            )
        if error > cfg.max_forecast_error:
            return _prefixed(reactive, f"forecast error {error:.2f} > {cfg.max_forecast_error:g}")
        service = [s.service_s for s in history.since(last.t - cfg.horizon_s) if s.service_s > 0]
        if not service:
            return _prefixed(reactive, "service time not measured yet")
        service_s, lead = float(np.mean(service)), self.lead_s(startup_s)
        peak = float(self.predict(history.samples, np.linspace(last.t, last.t + lead, 8), startup_s).max())
        recent = float(np.mean([s.ongoing for s in history.since(last.t - max(cfg.upscale_delay_s, 1.0))]))
        # Up as soon as the forecast needs it (a rise in the load now goes up through the
        # reactive path, with its delay: one noisy sample is no reason); down only when the
        # forecast and the load now both fit fewer replicas with spare (hysteresis).
        up = cfg.need(peak * service_s)
        down = max(cfg.need(peak * service_s, DOWNSCALE_TOLERANCE), cfg.need(recent, DOWNSCALE_TOLERANCE))
        desired = cfg.clamp(up if up > current else down if down < current else current)
        desired = max(desired, reactive.desired) if reactive.desired > current else desired
        why = (
            f"forecast peak {peak:.1f} req/s x {service_s * 1000:.0f} ms over the next {lead:.0f}s "
            f"(start-up {startup_s:.0f}s + horizon {cfg.horizon_s:g}s), {recent:.1f} ongoing now"
        )
        return Decision(desired, "proactive" if desired != current else "hold", why)


def _prefixed(decision: Decision, why: str) -> Decision:
    return Decision(decision.desired, decision.mode, f"{why}: reactive: {decision.reason}")
