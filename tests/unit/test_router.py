"""Replica choice: power of two choices on in-flight, local node first, full replicas skipped."""

from __future__ import annotations

import random

from servefleet.services.router import Router
from servefleet.services.routing import ReplicaInfo


def info(name: str, node: str = "n1", capacity: int = 4) -> ReplicaInfo:
    return ReplicaInfo(name=name, handle=object(), node_id=node, version="1", capacity=capacity)


def test_less_loaded_of_two_wins() -> None:
    router = Router("n1", rng=random.Random(0))
    router.update([info("a"), info("b")])
    busy = {s.info.name: s for s in router.slots}
    busy["a"].in_flight = 3
    assert all(router.choose().info.name == "b" for _ in range(20))  # type: ignore[union-attr]


def test_local_replicas_first_then_remote_when_local_full() -> None:
    router = Router("n1", rng=random.Random(0))
    router.update([info("local", "n1", capacity=1), info("remote", "n2")])
    assert router.choose().info.name == "local"  # type: ignore[union-attr]
    router.slots[0].in_flight = 1
    assert router.choose().info.name == "remote"  # type: ignore[union-attr]


def test_full_or_excluded_replicas_are_never_chosen() -> None:
    router = Router("n1")
    router.update([info("a", capacity=1), info("b", capacity=1)])
    router.slots[0].in_flight = 1
    assert router.choose(exclude={"b"}) is None


def test_update_keeps_counters_and_forget_drops() -> None:
    router = Router("n1")
    router.update([info("a"), info("b")])
    router.slots[0].in_flight = 2
    router.update([info("a"), info("c")])
    assert {s.info.name: s.in_flight for s in router.slots} == {"a": 2, "c": 0}
    router.forget("a")
    assert len(router) == 1
