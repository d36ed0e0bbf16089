"""The reconcile pass's work queue (``PassQueue``) and the reconciler's use of it, without etcd."""

from __future__ import annotations

import asyncio
import itertools
import math

import pytest

from servefleet.api import agent_pb2, common_pb2, keeper_pb2
from servefleet.common.appid import AppId
from servefleet.keeper.reconciler import Agents, Reconciler
from servefleet.keeper.store import AppRecord
from servefleet.keeper.workqueue import PassQueue

AppState = keeper_pb2.AppState
INTERVAL, EVERY = 1.0, 5.0


def queue(n: int, budget: int) -> PassQueue:
    q = PassQueue(budget=budget, every_s=EVERY, resync_per_s=budget / INTERVAL)
    for i in range(n):
        q.add(f"ns/a{i}", changed=False)
    return q


def test_a_pass_takes_at_most_the_budget_and_the_resync_covers_every_key() -> None:
    q, seen = queue(1000, budget=100), set()
    for p in range(10):
        taken = q.take(now=p * INTERVAL)
        assert len(taken) == 100
        seen.update(taken)
    assert len(seen) == 1000  # 10 passes of 100: each key once, oldest first
    assert q.take(now=10 * INTERVAL)[0] == "ns/a0"  # then again from the oldest visit


def test_keys_within_the_budget_are_resynced_every_every_s_and_no_more() -> None:
    q = queue(300, budget=100)
    assert [len(q.take(now=p * INTERVAL)) for p in range(7)] == [100, 100, 100, 0, 0, 100, 100]


def test_a_changed_key_goes_first_even_mid_resync() -> None:
    q = queue(1000, budget=100)
    q.take(now=0.0)
    q.changed("ns/a999")  # not yet visited by the resync
    q.add("ns/new")
    taken = q.take(now=INTERVAL)
    assert taken[:2] == ["ns/a999", "ns/new"]
    assert len(taken) == 100


def test_changes_past_the_budget_cannot_starve_the_resync() -> None:
    n, budget = 1000, 100
    q = queue(n, budget)
    hot = [f"ns/hot{c}" for c in range(2 * budget)]  # twice the budget changed every pass
    last: dict[str, list[float]] = {}
    bound = math.ceil((n + len(hot)) / q.reserve)  # passes a due key waits at most
    for p in range(3 * bound):
        for key in hot:
            q.changed(key)
        taken = q.take(now=p * INTERVAL)
        assert len(taken) == budget
        assert set(taken[: budget - q.reserve]) <= set(hot)  # changes first...
        for key in taken:
            last.setdefault(key, []).append(p * INTERVAL)
    for i in range(n):  # ...yet every stored key is resynced, at most EVERY + bound passes apart
        visits = last[f"ns/a{i}"]
        assert len(visits) >= 2
        assert max(b - a for a, b in itertools.pairwise(visits)) <= EVERY + bound * INTERVAL


def test_retries_come_after_changes_and_resync_is_paced_between_close_passes() -> None:
    q = queue(1000, budget=100)
    q.retry("ns/a5")
    q.changed("ns/a7")
    assert q.take(now=0.0)[:2] == ["ns/a7", "ns/a5"]
    assert len(q.take(now=INTERVAL)) == 100
    # Woken again a tenth of an interval later: the resync slice has earned only a tenth.
    assert len(q.take(now=1.1 * INTERVAL)) == 10
    q.discard("ns/a0")
    assert "ns/a0" not in q and len(q) == 999


class FakeStore:
    """The reconciler's view of the store in a pass: clusters and fenced status writes."""

    def __init__(self, clusters: list[keeper_pb2.ClusterInfo]) -> None:
        self.infos = clusters
        self.writes = 0

    async def clusters(self) -> list[keeper_pb2.ClusterInfo]:
        return [keeper_pb2.ClusterInfo.FromString(c.SerializeToString()) for c in self.infos]

    async def write_status(self, *_: object, **__: object) -> bool:
        self.writes += 1
        return True


class ReportingAgents(Agents):
    """Every master at the revision it was asked for, at once; counts the calls."""

    def __init__(self, records: dict[str, AppRecord]) -> None:
        super().__init__()
        self.records, self.calls = records, 0

    async def state(self, address: str, ref: common_pb2.AppRef) -> agent_pb2.MasterStatus | None:
        self.calls += 1
        record = self.records[AppId.parse(ref).key]
        return agent_pb2.MasterStatus(
            app=ref, revision=record.revision, version="1", replicas=1, ready_replicas=1
        )

    async def masters(self, address: str) -> list[agent_pb2.MasterStatus]:
        return []


def running(i: int) -> AppRecord:
    spec = common_pb2.ApplicationSpec(name=f"a{i}", namespace="ns", version="1")
    placed = [keeper_pb2.ClusterPlacement(cluster="c0", replicas=1, ready_replicas=1, version="1")]
    status = keeper_pb2.ApplicationStatus(
        state=AppState.RUNNING,
        reason="1 replica(s) ready on 1 cluster(s)",
        revision=10 + i,
        placements=placed,
    )
    return AppRecord(keeper_pb2.DesiredState(spec=spec, replicas=1), 10 + i, status)


@pytest.mark.asyncio
async def test_reconciler_checks_at_most_the_budget_per_pass_and_a_changed_app_first() -> None:
    now = [1000.0]
    cluster = keeper_pb2.ClusterInfo(name="c0", agent_address="127.0.0.1:9", heartbeat_at=now[0])
    records = {f"ns/a{i}": running(i) for i in range(2000)}
    agents = ReportingAgents(records)
    store = FakeStore([cluster])
    reconciler = Reconciler(store, agents, interval_s=INTERVAL, budget=300, clock=lambda: now[0])  # type: ignore[arg-type]
    reconciler.load(records.values())
    try:
        for _ in range(3):
            await reconciler.run_once(b"fence")
            await asyncio.gather(*reconciler._inflight.values())
            now[0] += INTERVAL
        assert agents.calls == 900  # 3 passes x the budget, not 3 x 2,000
        # An update to an app the resync has not reached yet: taken first in the next pass.
        records["ns/a1999"].desired.spec.version = "2"
        records["ns/a1999"].revision += 1000
        reconciler.queue.changed("ns/a1999")
        await reconciler.run_once(b"fence")
        assert next(iter(reconciler._inflight)) == "ns/a1999"
        await asyncio.gather(*reconciler._inflight.values())
        assert agents.calls == 1200
    finally:
        await agents.close()


@pytest.mark.asyncio
async def test_a_new_lead_starts_from_its_own_snapshot() -> None:
    agents = ReportingAgents({})
    reconciler = Reconciler(FakeStore([]), agents, interval_s=INTERVAL, budget=10)  # type: ignore[arg-type]
    try:
        reconciler.load([running(0), running(1)])
        reconciler._alive = {"c0"}
        reconciler.load([running(1)])  # a0 deleted while this keeper followed
        assert "ns/a0" not in reconciler.queue and "ns/a1" in reconciler.queue
        assert reconciler._alive is None  # every cluster is swept again by the new lead
    finally:
        await agents.close()
