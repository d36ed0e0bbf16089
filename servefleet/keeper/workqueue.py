"""Which applications one reconcile pass looks at: a bounded slice, changed ones first.

The shape of a Kubernetes controller's work queue plus its periodic resync. A pass takes, in order:

1. ``changed`` keys, in the order they changed: a watch event on their desired state, a cluster they
   are placed on went silent or came back;
2. ``retry`` keys: a step that left the app short of settled (deploying, degraded, deleting, failed
   to reach an agent), an unplaceable app once the cluster registry moved;
3. the resync slice: the keys whose last visit is the oldest, once it is ``every_s`` old (for a
   RUNNING app that visit is its steady check).

At most ``budget`` keys a pass; while resync keys are due, at least ``reserve`` of them, so changes
arriving faster than the budget cannot starve the resync. The resync slice is also paced: it may
take ``resync_per_s`` keys per second of clock on average (credit capped at ``budget``), so passes
woken often by changes do not multiply the steady checks. Every operation costs O(1) per key it
adds or returns: a pass costs the same with 500 applications stored as with 50,000.

What it guarantees (tests/unit/test_reconcile_queue.py): a key marked changed is taken in the next
pass unless ``budget - reserve`` or more keys changed before it; once due, a key waits at most
``ceil(n / reserve)`` passes (passes at least ``reserve / resync_per_s`` apart), whatever else changes.
"""

from __future__ import annotations

import math
from collections import OrderedDict


class PassQueue:
    """Keys (``namespace/name``) of the stored applications and what each pass takes of them."""

    def __init__(
        self, *, budget: int, every_s: float, resync_per_s: float, reserve: int | None = None
    ) -> None:
        if budget < 1:
            raise ValueError(f"budget must be at least 1, got {budget}")
        self.budget = budget
        self.every_s = every_s
        self.resync_per_s = resync_per_s
        self.reserve = max(1, budget // 4) if reserve is None else max(1, min(reserve, budget))
        self._changed: dict[str, None] = {}  # insertion-ordered sets
        self._retry: dict[str, None] = {}
        self._unvisited: dict[str, None] = {}  # new keys: resynced before any visited one
        #: key -> clock of its last visit, oldest first.
        self._visited: OrderedDict[str, float] = OrderedDict()
        self._credit = float(budget)
        self._last_take: float | None = None

    def __len__(self) -> int:
        return len(self._unvisited) + len(self._visited)

    def __contains__(self, key: object) -> bool:
        return key in self._unvisited or key in self._visited

    def add(self, key: str, *, changed: bool = True) -> None:
        """A key now stored: due for resync at once, and (by default) changed."""
        if key not in self:
            self._unvisited[key] = None
        if changed:
            self.changed(key)

    def changed(self, key: str) -> None:
        """Take ``key`` first in the next pass (behind keys changed before it)."""
        if key not in self:
            self.add(key, changed=False)
        self._retry.pop(key, None)
        self._changed.setdefault(key, None)

    def retry(self, key: str) -> None:
        """Take ``key`` in the next pass, after the changed keys."""
        if key in self and key not in self._changed:
            self._retry.setdefault(key, None)

    def discard(self, key: str) -> None:
        """A key no longer stored."""
        self._unvisited.pop(key, None)
        self._visited.pop(key, None)
        self._changed.pop(key, None)
        self._retry.pop(key, None)

    def pending(self) -> int:
        """Keys waiting in the changed and retry queues (what the next passes owe besides resync)."""
        return len(self._changed) + len(self._retry)

    def take(self, now: float) -> list[str]:
        """The keys of one pass, at most ``budget``; each is marked visited at ``now``."""
        if self._last_take is not None:
            elapsed = max(0.0, now - self._last_take)
            self._credit = min(float(self.budget), self._credit + elapsed * self.resync_per_s)
        self._last_take = now
        picked: list[str] = []
        resync = min(self.budget, math.floor(self._credit))
        held = min(self.reserve, resync) if self._due(now) else 0
        self._drain(picked, now, self.budget - held)
        before = len(picked)
        while len(picked) < self.budget and len(picked) - before < resync and self._due(now):
            key = next(iter(self._unvisited or self._visited))
            self._visit(key, now)
            picked.append(key)
        self._credit -= len(picked) - before
        self._drain(picked, now, self.budget)  # what the resync slice left unused
        return picked

    def _due(self, now: float) -> bool:
        if self._unvisited:
            return True
        if not self._visited:
            return False
        return now - next(iter(self._visited.values())) >= self.every_s

    def _drain(self, picked: list[str], now: float, limit: int) -> None:
        for queue in (self._changed, self._retry):
            while queue and len(picked) < limit:
                key = next(iter(queue))
                del queue[key]
                self._visit(key, now)
                picked.append(key)

    def _visit(self, key: str, now: float) -> None:
        self._unvisited.pop(key, None)
        self._visited[key] = now
        self._visited.move_to_end(key)
