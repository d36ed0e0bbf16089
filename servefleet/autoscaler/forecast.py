"""Arrival-rate forecast from recent history: trend plus (optional) seasonality, in numpy.

With a season ``P`` and at least one season of history the forecast is *seasonal naive with
drift*: the rate one season before the target time, shifted by how much the level moved since
then. Without one (or before a full season is recorded) it is a least-squares line through the
recent samples. Both are cheap, deterministic, and wrong in known ways (bursts are not
predictable), which is why the proactive policy tracks the error and falls back to reactive.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def forecast(
    times: Sequence[float],
    rates: Sequence[float],
    at: Sequence[float] | np.ndarray,
    *,
    season_s: float = 0.0,
    trend_window_s: float = 60.0,
) -> np.ndarray:
    """The expected arrival rate at each time in ``at`` from samples ``(times, rates)`` (times
    ascending, seconds); never negative. Fewer than 3 samples: the last rate held flat."""
    t = np.asarray(times, dtype=float)
    y = np.asarray(rates, dtype=float)
    targets = np.asarray(at, dtype=float)
    if len(t) < 3:
        return np.full(targets.shape, y[-1] if len(y) else 0.0)
    now = t[-1]
    level_window = max(trend_window_s / 4, 3 * float(np.median(np.diff(t))))
    if season_s > 0 and now - t[0] >= season_s:
        # Level now vs one season earlier, both as means over a short window (noise-robust drift).
        level_now = _mean_between(t, y, now - level_window, now)
        level_then = _mean_between(t, y, now - season_s - level_window, now - season_s)
        past = np.interp(targets - season_s, t, y)
        return np.maximum(past + (level_now - level_then), 0.0)
    recent = t >= now - trend_window_s
    if recent.sum() < 3:
        recent = np.zeros(len(t), dtype=bool)
        recent[-3:] = True
    slope, intercept = np.polyfit(t[recent] - now, y[recent], 1)
    return np.maximum(intercept + slope * (targets - now), 0.0)


def _mean_between(t: np.ndarray, y: np.ndarray, start: float, end: float) -> float:
    inside = (t >= start) & (t <= end)
    if inside.any():
        return float(y[inside].mean())
    return float(np.interp((start + end) / 2, t, y))
