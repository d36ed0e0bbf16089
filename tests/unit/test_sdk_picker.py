"""Picking and the client-side endpoint set, with an injected clock and random source."""

from __future__ import annotations

import collections
import random

from servefleet.api import discovery_pb2
from servefleet.common.errors import InvalidArgument, Unavailable
from servefleet.common.retry import Backoff
from servefleet.sdk.client import INFER_RETRY, NO_RETRY
from servefleet.sdk.picker import Picker
from servefleet.sdk.watch import EndpointSet

Event = discovery_pb2.WatchEvent


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def ep(i: int, **kwargs: object) -> discovery_pb2.Endpoint:
    return discovery_pb2.Endpoint(id=f"e{i}", address=f"h:{i}", kind="proxy", **kwargs)  # type: ignore[arg-type]


def picker(clock: Clock, **kwargs: object) -> Picker:
    return Picker(clock=clock, rng=random.Random(7), **kwargs)  # type: ignore[arg-type]


def split(p: Picker, endpoints: list[discovery_pb2.Endpoint], n: int = 2000) -> collections.Counter[str]:
    return collections.Counter(p.pick(endpoints).id for _ in range(n))  # type: ignore[union-attr]


def test_lower_latency_and_fewer_in_flight_win() -> None:
    clock = Clock()
    p = picker(clock)
    endpoints = [ep(1), ep(2)]
    p.started("h:1"), p.succeeded("h:1", 0.010)
    p.started("h:2"), p.succeeded("h:2", 0.001)
    assert split(p, endpoints)["e2"] == 2000
    for _ in range(20):
        p.started("h:2")  # 21 x 1 ms > 1 x 10 ms
    assert split(p, endpoints)["e1"] == 2000


def test_slow_endpoint_decays_and_gets_probed_again() -> None:
    clock = Clock()
    p = picker(clock, decay_s=1.0)
    p.started("h:1"), p.succeeded("h:1", 0.100)
    p.started("h:2"), p.succeeded("h:2", 0.001)
    clock.now += 10  # idle for ten decay times: its estimate fell below the fast one's
    p.started("h:2"), p.succeeded("h:2", 0.001)
    assert p.pick([ep(1), ep(2)]).id == "e1"  # type: ignore[union-attr]


def test_a_timeout_counts_as_a_slow_sample() -> None:
    clock = Clock()
    p = picker(clock)
    p.started("h:1"), p.succeeded("h:1", 0.001)
    p.started("h:2"), p.succeeded("h:2", 0.002)
    p.started("h:1"), p.failed("h:1", unavailable=False, latency_s=1.0)
    assert p.stats["h:1"].latency_s == 1.0 and p.stats["h:1"].backoff_until == 0.0
    assert split(p, [ep(1), ep(2)])["e2"] == 2000


def test_weights_shift_the_split() -> None:
    counts = split(picker(Clock()), [ep(1, weight=3.0), ep(2), ep(3)], 3000)
    assert counts["e1"] > counts["e2"] + counts["e3"]


def test_zone_preference_falls_back_when_the_zone_is_unusable() -> None:
    clock = Clock()
    p = picker(clock, zone="a")
    endpoints = [ep(1, labels={"zone": "a"}), ep(2, labels={"zone": "b"}), ep(3)]
    assert split(p, endpoints)["e1"] == 2000
    p.started("h:1"), p.failed("h:1", unavailable=True)
    assert split(p, endpoints)["e1"] == 0
    assert p.pick(endpoints, exclude={"h:2", "h:3"}).id == "e1"  # type: ignore[union-attr]


def test_failed_endpoint_backs_off_then_returns() -> None:
    clock = Clock()
    p = picker(clock, backoff=Backoff(initial_s=1.0, max_s=5.0, jitter=0.5))
    endpoints = [ep(1), ep(2)]
    p.started("h:1"), p.failed("h:1", unavailable=True)
    assert split(p, endpoints)["e1"] == 0
    clock.now += 1.0
    assert split(p, endpoints)["e1"] > 0
    p.started("h:2"), p.failed("h:2", unavailable=False)  # an answered error is not a dead endpoint
    assert p.stats["h:2"].backoff_until == 0.0 and p.stats["h:2"].in_flight == 0
    assert p.pick(endpoints, exclude={"h:1", "h:2"}) is None


def test_infer_retry_policy_retries_unavailable_only_until_the_deadline() -> None:
    assert INFER_RETRY.attempts is None  # bounded by the caller's deadline, not a count
    assert all(0 <= INFER_RETRY.backoff.delay(a) <= 0.5 for a in range(10) for _ in range(50))
    assert INFER_RETRY.retries(Unavailable("gone"))
    assert not INFER_RETRY.retries(InvalidArgument("bad input"))
    assert not NO_RETRY.allows(1)


def test_thousands_of_failures_do_not_overflow_the_backoff() -> None:
    """The picker's backoff once computed ``0.5 * 2 ** (failures - 1)``: OverflowError after ~1000."""
    clock = Clock()
    p = picker(clock)
    for _ in range(5000):
        p.started("h:1"), p.failed("h:1", unavailable=True)
    assert p.stats["h:1"].failures == 5000
    assert clock.now + 2.5 <= p.stats["h:1"].backoff_until <= clock.now + 5.0  # the cap, half-jittered


def test_endpoint_set_applies_snapshot_and_deltas() -> None:
    s = EndpointSet()
    assert s.apply(Event(type=Event.SNAPSHOT, endpoints=[ep(1), ep(2)], revision=5)) == []
    s.apply(Event(type=Event.ADDED, endpoints=[ep(3)], revision=6))
    s.apply(Event(type=Event.UPDATED, endpoints=[ep(3, load_hint=1.0)], revision=7))
    removed = s.apply(Event(type=Event.REMOVED, endpoints=[discovery_pb2.Endpoint(id="e1")], revision=8))
    assert [e.address for e in removed] == ["h:1"]
    assert sorted(s.endpoints) == ["e2", "e3"] and s.endpoints["e3"].load_hint == 1.0
    assert s.revision == 8 and s.synced
    # A fresh (e.g. compacted) snapshot replaces the set and reports what vanished.
    gone = s.apply(Event(type=Event.SNAPSHOT, endpoints=[ep(3)], revision=20, compacted=True))
    assert [e.id for e in gone] == ["e2"] and list(s.endpoints) == ["e3"]
