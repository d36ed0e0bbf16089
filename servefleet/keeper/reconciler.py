"""The leader's reconcile loop: make every cluster run what etcd says, and say how it went.

Each pass takes a bounded slice of the applications (``workqueue.PassQueue``: changed ones first,
then a paced resync slice that is each RUNNING app's steady check) and, per application, takes the
next idempotent step: place it (sticky: the chosen clusters are stored in its status), ask each
placed cluster's agent to apply the desired revision unless the master there already reports
it, summarise what the masters report into one state, and, for deletions, remove it everywhere
before forgetting it. A placed cluster silent past ``keeper_cluster_failover_after_s`` is replaced
by another eligible one (labels, free resources; the app's replicas and so its quota unchanged),
and a cluster that heartbeats again after being silent is swept of masters it runs for apps no
longer placed there. Nothing is kept only in memory, so a keeper killed between any two steps
is replaced by one that simply takes the next step again; applying a revision twice is a no-op
on the agent side.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
from collections.abc import Callable, Collection, Coroutine, Iterable, Iterator, Mapping
from typing import Any

import grpc
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from servefleet.api import agent_pb2, agent_pb2_grpc, common_pb2, keeper_pb2
from servefleet.common.appid import AppId
from servefleet.common.channels import ChannelCache
from servefleet.common.config import settings
from servefleet.keeper import placement
from servefleet.keeper.store import AppRecord, KeeperStore, cancel_watch
from servefleet.keeper.workqueue import PassQueue
from servefleet.pipeline_spec import replicas_wanted

log = logging.getLogger(__name__)

AppState = keeper_pb2.AppState
#: States in which the app has served before: missing readiness now means an update, not a deploy.
_SERVED = (AppState.RUNNING, AppState.UPDATING, AppState.DEGRADED)


class Agents:
    """One gRPC channel per cluster agent address, reused across passes, calling with ``token``
    (the keeper's own, role keeper: agents answer nobody else but admins)."""

    def __init__(self, timeout_s: float = 60.0, read_timeout_s: float = 10.0, *, token: str = "") -> None:
        self.timeout_s = timeout_s
        #: Reads answer at once from a live agent; a hung one (paused, partitioned) must not hold
        #: an app's reconcile step for long, or moving it off that cluster would wait too.
        self.read_timeout_s = min(read_timeout_s, timeout_s)
        # Agents answer keepers and admins only: every call carries this keeper's own token.
        self.token = token
        self._channels = ChannelCache(token=token, tls=True)

    def stub(self, address: str) -> agent_pb2_grpc.ClusterAgentStub:
        return self._channels.stub(address, agent_pb2_grpc.ClusterAgentStub)

    async def state(self, address: str, ref: common_pb2.AppRef) -> agent_pb2.MasterStatus | None:
        try:
            return await self.stub(address).GetApplicationState(
                agent_pb2.GetApplicationStateRequest(app=ref), timeout=self.read_timeout_s
            )
        except grpc.aio.AioRpcError as exc:
            if exc.code() == grpc.StatusCode.NOT_FOUND:
                return None
            raise

    async def apply(
        self,
        address: str,
        spec: common_pb2.ApplicationSpec,
        replicas: int,
        revision: int,
        stages: Mapping[str, int] | None = None,
    ) -> agent_pb2.MasterStatus:
        request = agent_pb2.ApplyApplicationRequest(
            spec=spec, replicas=replicas, revision=revision, stage_replicas=stages or {}
        )
        return await self.stub(address).ApplyApplication(request, timeout=self.timeout_s)

    async def masters(self, address: str) -> list[agent_pb2.MasterStatus]:
        reply = await self.stub(address).ListMasters(
            agent_pb2.ListMastersRequest(), timeout=self.read_timeout_s
        )
        return list(reply.masters)

    async def remove(self, address: str, ref: common_pb2.AppRef) -> None:
        await self.stub(address).RemoveApplication(
            agent_pb2.RemoveApplicationRequest(app=ref), timeout=self.timeout_s
        )

    async def close(self) -> None:
        await self._channels.close()


def _fingerprint(clusters: Iterable[keeper_pb2.ClusterInfo]) -> int:
    """Changes when anything placement reads changes (heartbeat times aside)."""
    return hash(
        tuple(
            (
                c.name,
                c.alive,
                tuple(sorted(c.labels.items())),
                tuple(sorted(c.capacity.items())),
                tuple(sorted(c.free.items())),
            )
            for c in sorted(clusters, key=lambda c: c.name)
        )
    )


def _one_line(error: str, limit: int = 300) -> str:
    """The line of a (possibly multi-line, traceback-carrying) error that says what went wrong."""
    lines = [line.strip() for line in error.splitlines() if line.strip()]
    text = lines[-1] if lines else error
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _unchanged(
    record: AppRecord, state: int, reason: str, placements: list[keeper_pb2.ClusterPlacement]
) -> bool:
    old = record.status
    return (
        old.state == state
        and old.reason == reason
        and old.revision == record.revision
        and list(old.placements) == placements
    )


def _settled(record: AppRecord) -> bool:
    """RUNNING at its desired revision: nothing to do for it until its next steady check."""
    return record.status.state == AppState.RUNNING and record.status.revision == record.revision


def summarize(
    record: AppRecord, observed: Mapping[str, agent_pb2.MasterStatus | str]
) -> tuple[int, str, list[keeper_pb2.ClusterPlacement]]:
    """One state and reason from what each placed cluster reports (a string: why it can't)."""
    spec, revision = record.desired.spec, record.revision
    want = replicas_wanted(spec, record.desired.replicas, record.desired.stage_replicas)
    placements: list[keeper_pb2.ClusterPlacement] = []
    unreachable, failed, behind = [], [], []
    for cluster, seen in sorted(observed.items()):
        if isinstance(seen, str):
            unreachable.append(f"cluster {cluster}: {seen}")
            placements.append(keeper_pb2.ClusterPlacement(cluster=cluster))
            continue
        placements.append(
            keeper_pb2.ClusterPlacement(
                cluster=cluster,
                replicas=seen.replicas,
                ready_replicas=seen.ready_replicas,
                version=seen.version,
                shards=seen.shards,
            )
        )
        if seen.error and seen.ready_replicas == 0:
            failed.append(f"cluster {cluster}: {_one_line(seen.error)}")
        elif (
            seen.revision != revision
            or seen.updating
            or seen.version != spec.version
            or seen.ready_replicas < want
        ):
            behind.append(
                f"cluster {cluster}: {seen.ready_replicas}/{want} ready at version {seen.version or '-'}"
            )
    previous = record.status.state
    if failed:
        return AppState.FAILED, "; ".join(failed + unreachable), placements
    if unreachable:
        state = AppState.DEGRADED if previous in _SERVED else previous
        return state, "; ".join(unreachable + behind), placements
    if behind:
        state = AppState.UPDATING if previous in _SERVED else AppState.DEPLOYING
        return state, "; ".join(behind), placements
    return AppState.RUNNING, f"{want} replica(s) ready on {len(observed)} cluster(s)", placements


class ReplicaCountCollector(Collector):
    """Desired and ready replicas per app (summed over clusters) from the leader's cache, read
    when scraped; a follower exports none (its cache is not kept current)."""

    def __init__(self, reconciler: Reconciler, leading: asyncio.Event) -> None:
        self.reconciler = reconciler
        self.leading = leading

    def collect(self) -> Iterator[GaugeMetricFamily]:
        desired = GaugeMetricFamily(
            "servefleet_app_replicas_desired", "Replicas the keeper wants, over all clusters.", labels=["app"]
        )
        ready = GaugeMetricFamily(
            "servefleet_app_replicas_ready",
            "Ready replicas the masters report, over all clusters.",
            labels=["app"],
        )
        if self.leading.is_set():
            for record in list(self.reconciler._apps.values()):  # a copy: the loop thread mutates it
                name = [AppId.parse(record.ref).model_name]
                placed = record.status.placements
                held = record.desired
                want = replicas_wanted(held.spec, held.replicas, held.stage_replicas)
                desired.add_metric(name, want * max(1, len(placed)))
                ready.add_metric(name, sum(p.ready_replicas for p in placed))
        yield desired
        yield ready


class Reconciler:
    """Runs while this keeper leads; every write is fenced on the leader key."""

    def __init__(
        self,
        store: KeeperStore,
        agents: Agents,
        *,
        interval_s: float | None = None,
        budget: int | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.store = store
        self.agents = agents
        self.interval_s = settings.keeper_reconcile_interval_s if interval_s is None else interval_s
        self.clock = clock
        self.steady_s = settings.keeper_steady_check_s
        self.budget = settings.keeper_reconcile_budget if budget is None else budget
        self.queue = self._new_queue()
        self._wake = asyncio.Event()
        self._apps: dict[str, AppRecord] = {}
        self._inflight: dict[str, asyncio.Task[None]] = {}
        #: app -> (revision, registry fingerprint) when it last fit nowhere: no retry until one moves.
        self._unplaceable: dict[str, tuple[int, int]] = {}
        self._registry = 0
        #: Clusters alive / silent past failover at the last pass (None before the first); an app
        #: placed on one whose state moved is taken as changed, one alive again is swept.
        self._alive: set[str] | None = None
        self._lost: set[str] = set()

    def _new_queue(self) -> PassQueue:
        """What each pass looks at: changed apps first, then a paced resync slice (steady checks):
        at most ``budget`` apps a pass, ``budget`` per interval on average for the resync."""
        return PassQueue(
            budget=self.budget, every_s=self.steady_s, resync_per_s=self.budget / self.interval_s
        )

    def load(self, records: Iterable[AppRecord]) -> None:
        """Start a lead from a snapshot: every app due for its resync, the unsettled ones retried
        first, every cluster seen anew (nothing kept from an earlier lead of this keeper)."""
        self._apps = {AppId.parse(r.ref).key: r for r in records}
        self.queue = self._new_queue()
        self._alive, self._lost = None, set()
        for key, record in self._apps.items():
            self.queue.add(key, changed=False)
            if not _settled(record):
                self.queue.retry(key)

    async def run(self, fence: bytes) -> None:
        """Reconcile until cancelled: at once on any desired-state change, else every interval.

        Applications are read once, then kept current from an etcd watch, so a pass over thousands
        of them reads nothing from etcd. A broken watch ends the run (and this keeper's lead); the
        next leader starts from a fresh snapshot."""
        records, revision = await self.store.all_apps()
        self.load(records)
        watch = await self.store.watch_apps(revision)
        follower = asyncio.create_task(self._follow(watch))
        try:
            while not follower.done():
                self._wake.clear()
                await self.run_once(fence)
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), self.interval_s)
            follower.result()
            raise RuntimeError("the etcd watch on applications ended")
        finally:
            follower.cancel()
            await cancel_watch(watch)
            for task in self._inflight.values():
                task.cancel()
            await asyncio.gather(*self._inflight.values(), return_exceptions=True)
            self._inflight.clear()

    async def _follow(self, watch: Any) -> None:
        async for event in watch:
            key, kind = self.store.parse_app_key(event.kv.key)
            self._apply(key, kind, event)
            if kind == "desired":
                self._wake.set()
        self._wake.set()

    def _apply(self, key: str, kind: str, event: Any) -> None:
        """One watch event into the cache; never older than what is there (mod revisions only grow)."""
        record, mod = self._apps.get(key), int(event.kv.mod_revision)
        if kind == "desired":
            if event.kind == "DELETE":
                self._apps.pop(key, None)
                self.queue.discard(key)
                self._unplaceable.pop(key, None)
            elif record is None:
                desired = keeper_pb2.DesiredState.FromString(event.kv.value)
                self._apps[key] = AppRecord(desired, mod, keeper_pb2.ApplicationStatus())
                self.queue.add(key)
            elif mod > record.revision:
                record.desired, record.revision = keeper_pb2.DesiredState.FromString(event.kv.value), mod
                self.queue.changed(key)
        elif kind == "status" and event.kind == "PUT" and record is not None and mod > record.status_revision:
            record.status, record.status_revision = (
                keeper_pb2.ApplicationStatus.FromString(event.kv.value),
                mod,
            )

    async def run_once(self, fence: bytes) -> None:
        """Start one step for each app this pass takes (changed ones first, at most the budget)
        that has none in flight; its cost depends on the budget and the clusters, not on how many
        apps are stored."""
        now = self.clock()
        clusters = {c.name: c for c in await self.store.clusters()}
        for c in clusters.values():
            c.alive = placement.alive(c, now, settings.keeper_cluster_dead_after_s)
        free: dict[str, dict[str, float]] = {}
        registry, self._registry = self._registry, _fingerprint(clusters.values())
        if registry != self._registry:
            for key in self._unplaceable:  # something placement reads moved: they may fit now
                self.queue.retry(key)
        lost = {
            c.name
            for c in clusters.values()
            if now - c.heartbeat_at > settings.keeper_cluster_failover_after_s
        }
        alive = {c.name for c in clusters.values() if c.alive}
        for name in alive - (self._alive or set()):  # back (or first seen by this leader): sweep it
            if not self._busy(f"sweep:{name}"):
                self._start(f"sweep:{name}", self._sweep(clusters[name]))
        if self._alive is None:  # a new leader: apps on clusters already silent go first
            self._clusters_moved(set(clusters) - alive)
        else:
            self._clusters_moved((alive ^ self._alive) | (lost - self._lost))
        self._alive, self._lost = alive, lost
        for key in self.queue.take(now):
            cached = self._apps.get(key)
            if cached is None or self._busy(key):
                continue  # a step in flight: when it ends, _stepped takes the app again if needed
            if not cached.status.placements and self._unplaceable.get(key) == (
                cached.revision,
                self._registry,
            ):
                continue  # nothing it depends on changed since it last fit nowhere
            # A step works on a snapshot: the watch may swap the cached record's fields meanwhile.
            record = AppRecord(cached.desired, cached.revision, cached.status, cached.status_revision)
            step = self._next_step(record, clusters, free, fence, lost)
            if step is not None:
                self._start(key, step, record.revision)

    def _clusters_moved(self, names: set[str]) -> None:
        """Apps placed on clusters that went silent, came back or were lost: changed, so they are
        re-summarised or moved in the next pass, not at their next resync. A scan of the cache,
        only in a pass where some cluster's state moved."""
        if not names:
            return
        for key, record in self._apps.items():
            if any(p.cluster in names for p in record.status.placements):
                self.queue.changed(key)

    def _start(self, key: str, step: Coroutine[Any, Any, object], revision: int | None = None) -> None:
        task = asyncio.create_task(self._logged(key, step))
        self._inflight[key] = task
        task.add_done_callback(functools.partial(self._stepped, key, revision))

    def _stepped(self, key: str, revision: int | None, task: asyncio.Task[None]) -> None:
        """A step ended: take the app again next pass if it changed meanwhile or is not settled."""
        if self._inflight.get(key) is task:
            del self._inflight[key]
        cached = self._apps.get(key)
        if revision is None or cached is None or task.cancelled():
            return
        if cached.revision != revision:
            self.queue.changed(key)
            self._wake.set()
        elif not _settled(cached) and self._unplaceable.get(key) != (revision, self._registry):
            self.queue.retry(key)

    def _busy(self, key: str) -> bool:
        task = self._inflight.get(key)
        return task is not None and not task.done()

    def _next_step(
        self,
        record: AppRecord,
        clusters: Mapping[str, keeper_pb2.ClusterInfo],
        free: dict[str, dict[str, float]],
        fence: bytes,
        lost: Collection[str] = (),
    ) -> Coroutine[Any, Any, object] | None:
        """What to do for one app; placement is decided here, synchronously, so apps placed in one
        pass book resources in turn, and an app that still fits nowhere costs no task."""
        if record.desired.deleting:
            return self._delete(record, clusters, fence)
        placed = [p.cluster for p in record.status.placements]
        gone = [c for c in placed if c in lost]
        if gone:
            others = [c for name, c in clusters.items() if name not in placed]
            spec, replicas = record.desired.spec, record.desired.replicas
            decision = placement.place(spec, replicas, others, free, wanted=len(gone))
            if decision.clusters:
                kept = [c for c in placed if c not in gone]
                return self._move(record, clusters, kept, gone, decision.clusters, fence)
            log.warning(
                "cannot move an app off a silent cluster",
                extra={"app": AppId.parse(record.ref).key, "clusters": gone, "reason": decision.reason},
            )
        if placed:
            return self._converge(record, clusters, placed, fence)
        decision = placement.place(record.desired.spec, record.desired.replicas, clusters.values(), free)
        if decision.clusters:
            self._unplaceable.pop(AppId.parse(record.ref).key, None)
            return self._place(record, clusters, decision.clusters, fence)
        reason = f"unplaceable: {decision.reason}"
        self._unplaceable[AppId.parse(record.ref).key] = (record.revision, self._registry)
        if _unchanged(record, AppState.PENDING, reason, []):
            return None
        return self._write(record, AppState.PENDING, reason, [], fence)

    @staticmethod
    async def _logged(key: str, step: Coroutine[Any, Any, object]) -> None:
        try:
            await step
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("reconcile step failed", extra={"app": key})

    async def _place(
        self,
        record: AppRecord,
        clusters: Mapping[str, keeper_pb2.ClusterInfo],
        placed: list[str],
        fence: bytes,
    ) -> None:
        # Store the choice before acting on it, so a restarted keeper applies to the same clusters.
        chosen = [keeper_pb2.ClusterPlacement(cluster=c) for c in placed]
        if await self._write(record, AppState.DEPLOYING, f"placed on {', '.join(placed)}", chosen, fence):
            await self._converge(record, clusters, placed, fence)

    async def _move(
        self,
        record: AppRecord,
        clusters: Mapping[str, keeper_pb2.ClusterInfo],
        kept: list[str],
        gone: list[str],
        to: list[str],
        fence: bytes,
    ) -> None:
        """Re-place the app from silent clusters onto ``to``; stored first, like a placement."""
        placed = kept + to
        reason = f"cluster(s) {', '.join(gone)} silent: moved to {', '.join(to)}"
        chosen = [p for p in record.status.placements if p.cluster in kept]
        chosen += [keeper_pb2.ClusterPlacement(cluster=c) for c in to]
        log.warning(
            "moving application off silent clusters", extra={"app": AppId.parse(record.ref).key, "to": to}
        )
        if await self._write(record, AppState.DEGRADED, reason, chosen, fence):
            await self._converge(record, clusters, placed, fence)

    async def _sweep(self, cluster: keeper_pb2.ClusterInfo) -> None:
        """Remove the masters ``cluster`` runs for apps not placed there (moved away while it was
        silent, or deleted meanwhile): their replicas and proxies would serve a stale copy."""
        for master in await self.agents.masters(cluster.agent_address):
            cached = self._apps.get(AppId.parse(master.app).key)
            if cached is not None and cluster.name in {p.cluster for p in cached.status.placements}:
                continue
            if cached is not None and not cached.status.placements and not cached.desired.deleting:
                continue  # not placed yet: its first placement may still choose this cluster
            log.warning(
                "removing a stale master", extra={"app": AppId.parse(master.app).key, "cluster": cluster.name}
            )
            await self.agents.remove(cluster.agent_address, master.app)

    async def _converge(
        self,
        record: AppRecord,
        clusters: Mapping[str, keeper_pb2.ClusterInfo],
        placed: list[str],
        fence: bytes,
    ) -> None:
        if len(placed) == 1:  # the common case, without gather's task per cluster (profiled)
            seen = [await self._drive(record, clusters.get(placed[0]))]
        else:
            seen = await asyncio.gather(*(self._drive(record, clusters.get(c)) for c in placed))
        state, reason, placements = summarize(record, dict(zip(placed, seen, strict=True)))
        await self._write(record, state, reason, placements, fence)

    async def _drive(
        self, record: AppRecord, cluster: keeper_pb2.ClusterInfo | None
    ) -> agent_pb2.MasterStatus | str:
        """Bring one cluster to the desired revision: apply only when its master reports another."""
        if cluster is None:
            return "not registered"
        if not cluster.alive:
            return "agent not heartbeating"
        try:
            seen = await self.agents.state(cluster.agent_address, record.ref)
            if seen is None or seen.revision != record.revision:
                want = record.desired
                seen = await self.agents.apply(
                    cluster.agent_address, want.spec, want.replicas, record.revision, want.stage_replicas
                )
            return seen
        except grpc.aio.AioRpcError as exc:
            return f"{exc.code().name}: {exc.details()}"

    async def _delete(
        self, record: AppRecord, clusters: Mapping[str, keeper_pb2.ClusterInfo], fence: bytes
    ) -> None:
        waiting: list[str] = []
        for p in record.status.placements:
            cluster = clusters.get(p.cluster)
            if cluster is None:
                continue  # never registered again: nothing there to remove
            try:
                await self.agents.remove(cluster.agent_address, record.ref)
            except grpc.aio.AioRpcError as exc:
                waiting.append(f"cluster {p.cluster}: {exc.code().name}: {exc.details()}")
        placements = list(record.status.placements)
        if waiting:
            await self._write(
                record, AppState.DELETING, "waiting to remove: " + "; ".join(waiting), placements, fence
            )
            return
        if await self._write(record, AppState.DELETED, "removed from every cluster", [], fence):
            if await self.store.remove_app(record.ref, revision=record.revision, fence=fence):
                revoked = await self.store.revoke_app_tokens(record.ref)
                gone = {"app": AppId.parse(record.ref).key, "tokens_revoked": revoked}
                log.info("application deleted", extra=gone)

    async def _write(
        self,
        record: AppRecord,
        state: int,
        reason: str,
        placements: list[keeper_pb2.ClusterPlacement],
        fence: bytes,
    ) -> bool:
        """Store the status when anything in it changed; False when the fence or revision moved."""
        old = record.status
        if _unchanged(record, state, reason, placements):
            return True
        status = keeper_pb2.ApplicationStatus(
            state=state,  # type: ignore[arg-type]
            reason=reason,
            revision=record.revision,
            placements=placements,
            updated_at=self.clock(),
        )
        if not await self.store.write_status(record.ref, status, revision=record.revision, fence=fence):
            return False
        record.status = status
        cached = self._apps.get(AppId.parse(record.ref).key)
        if cached is not None and cached.revision == record.revision:
            cached.status = status  # before the watch echoes it: the next pass must see placements
        if state != old.state:
            log.info(
                "application state",
                extra={"app": AppId.parse(record.ref).key, "state": AppState.Name(state), "reason": reason},
            )
        return True
