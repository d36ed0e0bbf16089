"""Replica choice for one proxy: power of two choices on the in-flight count this proxy sent,
replicas on the proxy's own node first, full replicas never chosen (the caller then answers
RESOURCE_EXHAUSTED instead of queueing without bound)."""

from __future__ import annotations

import random
from collections.abc import Iterable, Sequence, Set
from dataclasses import dataclass

from servefleet.services.routing import ReplicaInfo


@dataclass
class Slot:
    """A replica and the requests this proxy has in flight on it."""

    info: ReplicaInfo
    in_flight: int = 0

    @property
    def full(self) -> bool:
        return self.in_flight >= self.info.capacity


class Router:
    def __init__(self, node_id: str, *, rng: random.Random | None = None) -> None:
        self.node_id = node_id
        self._rng = rng or random.Random()
        self._slots: dict[str, Slot] = {}

    def update(self, replicas: Iterable[ReplicaInfo]) -> None:
        """Replace the replica set; counters of replicas still present carry over."""
        self._slots = {r.name: self._slots.get(r.name, Slot(r)) for r in replicas}

    def forget(self, name: str) -> None:
        """Drop a replica found dead; the master's next table confirms or re-adds it."""
        self._slots.pop(name, None)

    def __len__(self) -> int:
        return len(self._slots)

    @property
    def slots(self) -> Sequence[Slot]:
        return list(self._slots.values())

    def choose(self, exclude: Set[str] = frozenset()) -> Slot | None:
        """A non-full replica not in ``exclude``: the less loaded of two random picks, local first."""
        pool = [s for s in self._slots.values() if s.info.name not in exclude and not s.full]
        local = [s for s in pool if s.info.node_id == self.node_id]
        pool = local or pool
        if len(pool) <= 1:
            return pool[0] if pool else None
        a, b = self._rng.sample(pool, 2)
        return a if a.in_flight <= b.in_flight else b
