"""Endpoint picking: power of two choices over a peak-EWMA latency cost.

Each endpoint's cost is its decaying peak latency times (in-flight + 1), divided by its weight.
Two candidates are drawn (weighted by ``Endpoint.weight``), the cheaper one wins. The latency
estimate decays toward zero while an endpoint is idle, so a slow endpoint that stopped getting
traffic is probed again now and then instead of being starved forever (Finagle's PeakEWMA).
Endpoints in the caller's zone are preferred while any of them is usable; an endpoint that just
failed sits out a short, jittered, growing backoff.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass

from servefleet.api import discovery_pb2
from servefleet.common.retry import Backoff

#: How long an endpoint that just failed sits out: at least half the capped, doubling pause, so
#: it really does sit out (not full jitter).
ENDPOINT_BACKOFF = Backoff(initial_s=0.5, max_s=5.0, jitter=0.5)
#: Cost of an endpoint nothing is known about yet, when no other endpoint has been measured.
_DEFAULT_LATENCY_S = 0.001


@dataclass
class EndpointStats:
    in_flight: int = 0
    latency_s: float = 0.0  # peak EWMA, as of ``stamp``
    stamp: float = 0.0
    samples: int = 0
    failures: int = 0  # consecutive
    backoff_until: float = 0.0


class Picker:
    """Chooses one endpoint per request and learns from each request's outcome.

    Stats are keyed by address: an address is one server, whatever apps it serves.
    """

    def __init__(
        self,
        *,
        zone: str = "",
        decay_s: float = 10.0,
        backoff: Backoff = ENDPOINT_BACKOFF,
        clock: Callable[[], float] = time.monotonic,
        rng: random.Random | None = None,
    ) -> None:
        self.zone = zone
        self._decay_s = decay_s
        self._backoff = backoff
        self._clock = clock
        self._rng = rng or random.Random()
        self.stats: dict[str, EndpointStats] = {}

    def _stats(self, address: str) -> EndpointStats:
        stats = self.stats.get(address)
        if stats is None:
            stats = self.stats[address] = EndpointStats(stamp=self._clock())
        return stats

    def _latency(self, stats: EndpointStats, now: float) -> float:
        return stats.latency_s * math.exp(-max(0.0, now - stats.stamp) / self._decay_s)

    def cost(self, endpoint: discovery_pb2.Endpoint, *, unknown_s: float | None = None) -> float:
        now = self._clock()
        stats = self._stats(endpoint.address)
        latency = self._latency(stats, now) if stats.samples else (unknown_s or _DEFAULT_LATENCY_S)
        return (latency + 1e-6) * (stats.in_flight + 1) / (endpoint.weight or 1.0)

    def _usable(
        self, endpoints: Sequence[discovery_pb2.Endpoint], exclude: Collection[str]
    ) -> list[discovery_pb2.Endpoint]:
        now = self._clock()
        fresh = [e for e in endpoints if e.address not in exclude]
        healthy = [e for e in fresh if self._stats(e.address).backoff_until <= now]
        # When every candidate is backing off, trying one beats failing the request outright.
        pool = healthy or fresh
        if self.zone:
            local = [e for e in pool if e.labels.get("zone") == self.zone]
            pool = local or pool
        return pool

    def pick(
        self, endpoints: Sequence[discovery_pb2.Endpoint], *, exclude: Collection[str] = ()
    ) -> discovery_pb2.Endpoint | None:
        """The endpoint for the next request, never one whose address is in ``exclude``."""
        pool = self._usable(endpoints, exclude)
        if len(pool) <= 1:
            return pool[0] if pool else None
        weights = [e.weight or 1.0 for e in pool]
        first = self._rng.choices(range(len(pool)), weights)[0]
        rest = [i for i in range(len(pool)) if i != first]
        second = self._rng.choices(rest, [weights[i] for i in rest])[0]
        known = [self._latency(s, self._clock()) for s in self.stats.values() if s.samples]
        unknown = sum(known) / len(known) if known else None
        a, b = pool[first], pool[second]
        return a if self.cost(a, unknown_s=unknown) <= self.cost(b, unknown_s=unknown) else b

    def started(self, address: str) -> None:
        self._stats(address).in_flight += 1

    def _observe(self, stats: EndpointStats, latency_s: float, now: float) -> None:
        if not stats.samples or latency_s > stats.latency_s:
            stats.latency_s = latency_s  # peak: react to a slowdown at once
        else:
            w = math.exp(-max(0.0, now - stats.stamp) / self._decay_s)
            stats.latency_s = stats.latency_s * w + latency_s * (1 - w)
        stats.stamp = now
        stats.samples += 1

    def succeeded(self, address: str, latency_s: float) -> None:
        stats = self._stats(address)
        stats.in_flight = max(0, stats.in_flight - 1)
        self._observe(stats, latency_s, self._clock())
        stats.failures = 0
        stats.backoff_until = 0.0

    def failed(self, address: str, *, unavailable: bool, latency_s: float | None = None) -> None:
        """Record a finished request that failed; ``unavailable`` ones put the address on backoff,
        ``latency_s`` (a request that ran out of time) counts as a latency sample."""
        stats = self._stats(address)
        stats.in_flight = max(0, stats.in_flight - 1)
        if latency_s is not None:
            self._observe(stats, latency_s, self._clock())
        if not unavailable:
            return
        stats.failures += 1
        stats.backoff_until = self._clock() + self._backoff.delay(stats.failures, self._rng)

    def forget(self, addresses: Collection[str]) -> None:
        for address in addresses:
            self.stats.pop(address, None)
