"""Scale benchmark: the measured capacity of each control-plane part on this machine, the inputs of
SCALING.md, each beside the engine it sits on, measured in the same run (median of interleaved reps).

    .venv/bin/python bench/scale.py            # full: 100k endpoints / 1k watchers, 50k apps
    .venv/bin/python bench/scale.py --quick    # 5k endpoints / 50 watchers, 2k apps (< 2 min: 40 s at load 8)
    .venv/bin/python bench/scale.py --parts reconcile   # one part; the others kept from scale.json

- discovery: Register calls/s with the full endpoint set stored and every watcher attached, beside
  raw etcd puts of the same records; endpoint changes delivered per second to the watchers (10 per
  application) for a burst written straight to etcd, beside raw etcd watch streams on the same
  prefixes in the same process;
- keeper: SubmitApplication and UpdateApplication calls/s through a keeper process with the stored
  applications in etcd (its leader reconciling them: they stay PENDING, asking for a label no
  cluster has), beside raw etcd puts of the same DesiredState bytes;
- agents: RegisterCluster heartbeats/s from 1 000+ simulated clusters (a scale model: coroutines in
  this process, each a cluster name with made-up capacity, one gRPC channel; no Ray), beside raw
  etcd puts of the same ClusterInfo;
- reconcile passes: a fresh leader's passes over N RUNNING applications placed on simulated
  clusters (a scale model: the keeper's own Reconciler, in this process, with agents faked
  in-process that report every master at its desired revision; the clock simulated, one
  ``keeper_reconcile_interval_s`` per pass) until every app was checked twice: each pass's time
  against the interval, when every app had its first check, the longest gap between two checks of
  one app, and whether an app changed mid-sweep was the next pass's first step; beside one
  unbounded pass (budget N: every app due at once, as before the per-pass budget);
- broker: Submit calls/s through the broker process (as it is) on one redis-server, beside raw
  XADDs of the same payload;
- proxy: requests/s per core, read from bench/results/proxy.json (bench/proxy.py's measurement).

Every process here shares one machine with the load generator: figures are per process on this
box, at the load average the report quotes. Writes bench/results/scale.json.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import functools
import itertools
import json
import os
import statistics
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import redis.asyncio as aioredis
from _report import RESULTS_DIR, write_report
from aetcd import rpc
from keeper import sustained
from tritonclient.grpc import service_pb2

from servefleet.api import (
    agent_pb2,
    broker_pb2,
    broker_pb2_grpc,
    common_pb2,
    discovery_pb2,
    discovery_pb2_grpc,
    keeper_pb2,
    keeper_pb2_grpc,
)
from servefleet.broker.queue import AppConfig, RedisStreamQueue
from servefleet.common.appid import AppId
from servefleet.common.auth import AGENT
from servefleet.common.channels import aio_channel
from servefleet.common.config import settings
from servefleet.common.etcd import connect_etcd
from servefleet.discovery import names
from servefleet.keeper import placement
from servefleet.keeper.reconciler import Agents, Reconciler
from servefleet.keeper.store import AppRecord, KeeperStore
from servefleet.testing import Credentials, DiscoveryProcess, EtcdProcess, RedisProcess, ServiceProcess

AppState = keeper_pb2.AppState
FULL = {
    "endpoints": 100_000,
    "watchers": 1_000,
    "registrations": 1_000,
    "burst": 1_000,
    "stored_apps": 50_000,
    "keeper_ops": 500,
    "clusters": 2_000,
    "heartbeats": 2_000,
    "pass_sizes": [1_000, 10_000, 50_000],
    "broker_submits": 1_500,
    "keepalives": 3_200,
}
QUICK = {
    "endpoints": 5_000,
    "watchers": 50,
    "registrations": 200,
    "burst": 200,
    "stored_apps": 2_000,
    "keeper_ops": 150,
    "clusters": 1_000,
    "heartbeats": 500,
    "pass_sizes": [1_000, 5_000],
    "broker_submits": 300,
    "keepalives": 640,
}
WATCHERS_PER_APP = 10
APPS_PREFIX, CLUSTERS_PREFIX, RECONCILE_PREFIX = "/scale-apps", "/scale-clusters", "/scale-reconcile"
CONCURRENCY = 32
TXN_OPS = 100  # etcd allows 128 operations per transaction
ATTACH_WAVE = 50  # watchers that open (and read their snapshot) at once


async def interleaved(
    reps: int, ours: Callable[[int], Awaitable[float]], peer: Callable[[int], Awaitable[float]]
) -> tuple[float, float]:
    """Medians of ``reps`` alternating runs of ``ours(rep)`` and ``peer(rep)``."""
    a, b = [], []
    for rep in range(reps):
        a.append(await ours(rep))
        b.append(await peer(rep))
    return statistics.median(a), statistics.median(b)


def endpoint(app: common_pb2.AppRef, i: int) -> discovery_pb2.Endpoint:
    return discovery_pb2.Endpoint(
        id=f"e{i}",
        app=app,
        kind="proxy",
        address=f"127.0.{i // 60000}.1:{1 + i % 60000}",
        labels={"zone": f"z{i % 3}", "node": f"n{i % 997}"},
    )


async def put_batched(client: Any, items: list[tuple[bytes, bytes, int]], per_txn: int = TXN_OPS) -> None:
    """Write (key, value, lease) triples, ``per_txn`` per etcd transaction, 8 transactions at once."""
    tx = client.transactions
    chunks = [items[i : i + per_txn] for i in range(0, len(items), per_txn)]

    async def one(chunk: list[tuple[bytes, bytes, int]]) -> None:
        await client.transaction(
            compare=[], success=[tx.put(k, v, lease=lease) for k, v, lease in chunk], failure=[]
        )

    pending = iter(chunks)

    async def worker() -> None:
        for chunk in pending:
            await one(chunk)

    await asyncio.gather(*(worker() for _ in range(8)))


async def keepalive_rate(
    open_stream: Callable[[int], Any], request: Callable[[int], Any], count: int, workers: int = CONCURRENCY
) -> float:
    """Renewals/s for ``count`` renewals over ``workers`` long-lived streams (write one, read one)."""
    per = count // workers

    async def worker(w: int) -> None:
        call = open_stream(w)
        try:
            for _ in range(per):
                await call.write(request(w))
                await call.read()
        finally:
            call.cancel()

    started = time.perf_counter()
    await asyncio.gather(*(worker(w) for w in range(workers)))
    return per * workers / (time.perf_counter() - started)


#: Failed calls per figure ("what: CODE"): counted and reported, not the end of a run on a busy box.
FAILED: collections.Counter[str] = collections.Counter()


def tolerant(what: str, call: Callable[[int], Awaitable[object]]) -> Callable[[int], Awaitable[None]]:
    """``call`` with a failed RPC counted under ``what`` instead of ending the run."""

    async def run(i: int) -> None:
        try:
            await call(i)
        except grpc.aio.AioRpcError as exc:
            FAILED[f"{what}: {exc.code().name}"] += 1

    return run


class Watchers:
    """Endpoint changes delivered to many watch streams; ``wait(n)`` until each saw ``n`` more."""

    def __init__(self) -> None:
        self.counts: list[int] = []
        self.tasks: list[asyncio.Task[None]] = []
        self.ready = 0

    def add(self, stream: Callable[[], Any], count_changes: Callable[[Any], int]) -> None:
        index = len(self.counts)
        self.counts.append(0)

        async def run() -> None:
            first = True
            async for message in stream():
                if first:
                    self.ready += 1
                    first = False
                    continue
                self.counts[index] += count_changes(message)

        self.tasks.append(asyncio.create_task(run()))

    async def wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while self.ready < len(self.counts):
            if time.monotonic() > deadline:
                raise TimeoutError(f"only {self.ready}/{len(self.counts)} watchers started")
            await asyncio.sleep(0.1)

    async def delivered(self, expected: list[int], timeout: float) -> float:
        """The moment (perf_counter) every watcher's count has reached its expected total."""
        started = time.perf_counter()
        while any(c < e for c, e in zip(self.counts, expected, strict=True)):
            if time.perf_counter() - started > timeout:
                raise TimeoutError("watch events did not all arrive")
            await asyncio.sleep(0.01)
        return time.perf_counter()

    async def close(self) -> None:
        for task in self.tasks:
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)


async def raw_etcd_watch(client: Any, prefix: bytes) -> Any:
    """An etcd watch stream on ``prefix``: its created reply first, then every change (the peer)."""
    await client.connect()
    call = rpc.WatchStub(client.channel).Watch()
    create = rpc.WatchCreateRequest(key=prefix, range_end=prefix[:-1] + bytes([prefix[-1] + 1]))
    await call.write(rpc.WatchRequest(create_request=create))
    try:
        while True:
            reply = await call.read()
            if reply is grpc.aio.EOF:
                return
            yield reply
    finally:
        call.cancel()


async def discovery_figures(etcd: EtcdProcess, p: dict[str, Any], reps: int) -> dict[str, Any]:
    discovery = DiscoveryProcess(etcd.address, start_timeout=120).start()
    client = connect_etcd(etcd.address, timeout=None)  # a bench's preloads and bursts: no deadline
    apps = [AppId.parse(f"scale/app{a}").ref() for a in range(p["watchers"] // WATCHERS_PER_APP)]
    per_app = p["endpoints"] // len(apps)
    channels = [aio_channel(discovery.address, token=discovery.token) for _ in range(8)]
    stubs = [discovery_pb2_grpc.DiscoveryStub(c) for c in channels]
    watchers, peers = Watchers(), Watchers()
    try:
        leases = [(await client.lease(3600)).id for _ in apps]
        started = time.perf_counter()
        await put_batched(
            client,
            [
                (names.endpoint_key(app, f"e{i}"), endpoint(app, i).SerializeToString(), leases[a])
                for a, app in enumerate(apps)
                for i in range(per_app)
            ],
        )
        preload_s = time.perf_counter() - started
        for lease in leases:
            await client.put(names.lease_key(lease), b"*", lease=lease)
        started = time.perf_counter()
        for w in range(p["watchers"]):
            watchers.add(
                functools.partial(
                    stubs[w % len(stubs)].Watch, discovery_pb2.WatchRequest(app=apps[w % len(apps)])
                ),
                lambda event: len(event.endpoints),
            )
            if w % ATTACH_WAVE == ATTACH_WAVE - 1:  # each reads a snapshot: not all at once
                await watchers.wait_ready(timeout=600)
        await watchers.wait_ready(timeout=600)
        attach_s = time.perf_counter() - started
        peer_client = connect_etcd(etcd.address)
        for w in range(p["watchers"]):
            prefix = names.watch_prefix(apps[w % len(apps)])
            peers.add(functools.partial(raw_etcd_watch, peer_client, prefix), lambda reply: len(reply.events))
        await peers.wait_ready(timeout=120)

        async def registrations(rep: int) -> float:
            async def one(i: int) -> None:
                a = i % len(apps)
                request = discovery_pb2.RegisterRequest(
                    endpoint=endpoint(apps[a], per_app + rep * p["registrations"] + i), lease_id=leases[a]
                )
                await stubs[i % len(stubs)].Register(request, timeout=60)

            return await sustained(tolerant("registrations", one), p["registrations"], CONCURRENCY)

        async def raw_puts(rep: int) -> float:
            async def one(i: int) -> None:
                a = i % len(apps)
                n = per_app + (reps + rep) * p["registrations"] + i
                await client.put(
                    names.endpoint_key(apps[a], f"e{n}"),
                    endpoint(apps[a], n).SerializeToString(),
                    lease=leases[a],
                )

            return await sustained(one, p["registrations"], CONCURRENCY)

        register_rate, put_rate = await interleaved(reps, registrations, raw_puts)
        await asyncio.sleep(1.0)  # the registrations' own events drain

        async def burst(rep: int) -> tuple[float, float]:
            """Changes per second delivered to the discovery watchers and to the raw etcd watchers,
            for one burst of updates written straight to etcd (both groups receive every burst)."""
            per = p["burst"] // len(apps)
            items = []
            for a in range(len(apps)):
                for i in range(per):
                    record = endpoint(apps[a], i)
                    record.load_hint = rep + 1.0
                    items.append(
                        (names.endpoint_key(apps[a], f"e{i}"), record.SerializeToString(), leases[a])
                    )
            expected = [[c + per for c in group.counts] for group in (watchers, peers)]
            started = time.perf_counter()
            writing = asyncio.create_task(put_batched(client, items, per_txn=1))  # a revision per change
            done = await asyncio.gather(
                *(
                    group.delivered(want, timeout=600)
                    for group, want in zip((watchers, peers), expected, strict=True)
                )
            )
            await writing
            total = len(items) * WATCHERS_PER_APP
            return total / (done[0] - started), total / (done[1] - started)

        async def renewals(rep: int) -> float:
            """Lease renewals/s over discovery's KeepAlive streams (what every registrant sends
            every TTL/3), one stream per worker."""
            return await keepalive_rate(
                lambda w: stubs[w % len(stubs)].KeepAlive(),
                lambda w: discovery_pb2.KeepAliveRequest(lease_id=leases[w % len(leases)]),
                p["keepalives"],
            )

        async def raw_renewals(rep: int) -> float:
            await client.connect()
            lease_stub = rpc.LeaseStub(client.channel)
            return await keepalive_rate(
                lambda w: lease_stub.LeaseKeepAlive(),
                lambda w: rpc.LeaseKeepAliveRequest(ID=leases[w % len(leases)]),
                p["keepalives"],
            )

        renew_rate, raw_renew_rate = await interleaved(reps, renewals, raw_renewals)
        bursts = [await burst(rep) for rep in range(reps)]
        events_rate = statistics.median(b[0] for b in bursts)
        raw_events_rate = statistics.median(b[1] for b in bursts)
        await peer_client.close()
        return {
            "endpoints_stored": len(apps) * per_app,
            "watchers": p["watchers"],
            "watched_applications": len(apps),
            "preload_s": round(preload_s, 2),
            "watchers_attach_s": round(attach_s, 2),
            "registrations_per_s": round(register_rate, 1),
            "etcd_put_per_s": round(put_rate, 1),
            "ratio_registrations_per_s_vs_etcd_raw": round(register_rate / put_rate, 3),
            "lease_renewals_per_s": round(renew_rate, 1),
            "etcd_lease_renewals_per_s": round(raw_renew_rate, 1),
            "ratio_lease_renewals_per_s_vs_etcd_raw": round(renew_rate / raw_renew_rate, 3),
            "watch_changes_delivered_per_s": round(events_rate, 1),
            "etcd_watch_changes_delivered_per_s": round(raw_events_rate, 1),
            "ratio_watch_changes_per_s_vs_etcd_raw": round(events_rate / raw_events_rate, 3),
        }
    finally:
        await watchers.close()
        await peers.close()
        for channel in channels:
            await channel.close()
        await client.close()
        discovery.cleanup()


def stored_spec(name: str) -> common_pb2.ApplicationSpec:
    spec = common_pb2.ApplicationSpec(
        name=name, namespace="scale", version="1", import_path="examples.iris:IrisClassifier"
    )
    spec.placement.cluster_labels["bench"] = "stored-only"  # no cluster has it: stays PENDING
    return spec


async def preload_apps(store: KeeperStore, count: int) -> float:
    """``count`` applications straight into the keeper's layout (a preload, not a measured figure),
    with the status the reconciler itself would write while no cluster exists, so its first pass
    over them writes nothing and the figures measure the calls, not a start-up storm."""
    items = []
    reason = "unplaceable: " + placement.place(stored_spec("x"), 1, [], {}).reason
    for i in range(count):
        desired = keeper_pb2.DesiredState(spec=stored_spec(f"app-{i}"), replicas=1, tenant="", created_at=1.0)
        status = keeper_pb2.ApplicationStatus(state=AppState.PENDING, reason=reason)
        ref = common_pb2.AppRef(namespace="scale", name=f"app-{i}")
        items.append((store.key("apps", ref.namespace, ref.name, "desired"), desired.SerializeToString(), 0))
        items.append((store.key("apps", ref.namespace, ref.name, "status"), status.SerializeToString(), 0))
    started = time.perf_counter()
    await put_batched(store.client, items)
    return time.perf_counter() - started


def cluster_info(name: str, agent: str = "127.0.0.1:9") -> keeper_pb2.ClusterInfo:
    return keeper_pb2.ClusterInfo(
        name=name,
        agent_address=agent,
        capacity={"CPU": 512.0, "GPU": 8.0, "memory": 2.0e12},
        free={"CPU": 256.0, "GPU": 4.0, "memory": 1.0e12},
        labels={"region": f"r{hash(name) % 4}", "zone": f"z{hash(name) % 12}"},
    )


@dataclass
class KeeperUnderTest:
    store: KeeperStore  # the keeper's own records, for preloads and raw peers
    stub: keeper_pb2_grpc.KeeperStub
    credentials: Credentials


@contextlib.asynccontextmanager
async def keeper_on(
    etcd: EtcdProcess, state: Path, prefix: str, before: Callable[[KeeperStore], Awaitable[object]]
) -> AsyncIterator[KeeperUnderTest]:
    """A keeper process on ``etcd`` under its own key ``prefix`` (its leader reconciles there),
    started once ``before(store)`` has run (a preload it then finds in place)."""
    store = KeeperStore.connect(etcd.address, prefix)
    await before(store)
    keeper = keeper_process(etcd, state, prefix)
    credentials = Credentials(etcd.address, prefix)
    channel = aio_channel(keeper.address)
    try:
        yield KeeperUnderTest(store, keeper_pb2_grpc.KeeperStub(channel), credentials)
    finally:
        await channel.close()
        await credentials.close()
        keeper.cleanup()
        await store.close()


def keeper_process(etcd: EtcdProcess, state: Path, prefix: str) -> ServiceProcess:
    home = state / f"keeper{prefix.replace('/', '-')}"
    home.mkdir(parents=True, exist_ok=True)
    return ServiceProcess(
        "keeper",
        "--etcd",
        etcd.address,
        "--admin-token-file",
        str(home / "admin.token"),
        env={"SERVEFLEET_ETCD_PREFIX": prefix},
        data_dir=home,
        start_timeout=300,
    ).start()


async def keeper_figures(etcd: EtcdProcess, p: dict[str, Any], reps: int, state: Path) -> dict[str, Any]:
    """Submits and updates with the stored applications; no cluster registered (they stay PENDING)."""
    preload: list[float] = []

    async def stored(store: KeeperStore) -> None:
        preload.append(await preload_apps(store, p["stored_apps"]))

    async with keeper_on(etcd, state, APPS_PREFIX, stored) as keeper:
        store, stub = keeper.store, keeper.stub
        admin = [("authorization", f"Bearer {await keeper.credentials.admin()}")]

        async def submits(rep: int) -> float:
            async def one(i: int) -> None:
                request = keeper_pb2.SubmitApplicationRequest(spec=stored_spec(f"new{rep}-{i}"))
                await stub.SubmitApplication(request, metadata=admin, timeout=60)

            return await sustained(tolerant("submits", one), p["keeper_ops"], 16)

        value = keeper_pb2.DesiredState(spec=stored_spec("peer"), replicas=1).SerializeToString()

        async def raw_puts(rep: int) -> float:
            async def one(i: int) -> None:
                await store.client.put(store.key("peer", f"{rep}-{i}"), value)

            return await sustained(one, p["keeper_ops"], 16)

        submit_rate, put_rate = await interleaved(reps, submits, raw_puts)
        revisions: dict[int, int] = {}
        for i in range(p["keeper_ops"]):  # what each update compares against, read before timing
            ref = common_pb2.AppRef(namespace="scale", name=f"app-{i}")
            found = await stub.GetApplication(
                keeper_pb2.GetApplicationRequest(app=ref), metadata=admin, timeout=60
            )
            revisions[i] = found.revision

        async def updates(rep: int) -> float:
            async def one(i: int) -> None:
                spec = stored_spec(f"app-{i}")
                spec.version = f"{rep}-{i}"
                reply = await stub.UpdateApplication(
                    keeper_pb2.UpdateApplicationRequest(spec=spec, expected_revision=revisions[i]),
                    metadata=admin,
                    timeout=60,
                )
                revisions[i] = reply.revision

            return await sustained(tolerant("updates", one), p["keeper_ops"], 16)

        update_rate, update_put_rate = await interleaved(reps, updates, raw_puts)
        await store.client.delete_prefix(store.key("peer"))
        return {
            "stored_applications": p["stored_apps"],
            "preload_s": round(preload[0], 2),
            "submit_per_s": round(submit_rate, 1),
            "update_per_s": round(update_rate, 1),
            "etcd_put_per_s": round(statistics.median([put_rate, update_put_rate]), 1),
            "ratio_submit_per_s_vs_etcd_raw": round(submit_rate / put_rate, 3),
            "ratio_update_per_s_vs_etcd_raw": round(update_rate / update_put_rate, 3),
        }


async def heartbeat_figures(etcd: EtcdProcess, p: dict[str, Any], reps: int, state: Path) -> dict[str, Any]:
    """RegisterCluster from the simulated clusters to a keeper of its own (no apps stored there)."""

    async def nothing(store: KeeperStore) -> None:
        return None

    async with keeper_on(etcd, state, CLUSTERS_PREFIX, nothing) as keeper:
        store, stub = keeper.store, keeper.stub
        as_agent = [("authorization", f"Bearer {await keeper.credentials.issue(AGENT)}")]
        names_ = [f"sim-{c}" for c in range(p["clusters"])]

        async def heartbeats(rep: int) -> float:
            async def one(i: int) -> None:
                info = cluster_info(names_[i % len(names_)])
                await stub.RegisterCluster(
                    keeper_pb2.RegisterClusterRequest(cluster=info), metadata=as_agent, timeout=60
                )

            return await sustained(tolerant("heartbeats", one), p["heartbeats"], CONCURRENCY)

        async def raw_cluster_puts(rep: int) -> float:
            async def one(i: int) -> None:
                info = cluster_info(names_[i % len(names_)])
                await store.client.put(store.key("peer-clusters", info.name), info.SerializeToString())

            return await sustained(one, p["heartbeats"], CONCURRENCY)

        heartbeat_rate, heartbeat_put_rate = await interleaved(reps, heartbeats, raw_cluster_puts)
        return {
            "simulated_clusters": p["clusters"],
            "heartbeats_per_s": round(heartbeat_rate, 1),
            "etcd_cluster_put_per_s": round(heartbeat_put_rate, 1),
            "ratio_heartbeats_per_s_vs_etcd_raw": round(heartbeat_rate / heartbeat_put_rate, 3),
            "heartbeats_needed_per_s_at_2s_interval": round(p["clusters"] / 2.0, 1),
        }


class SimulatedAgents(Agents):
    """In-process stand-ins for cluster agents (the scale model): every master reports the
    revision, version and replicas it was asked for, at once, without gRPC or Ray. Records the
    (simulated) clock of each app's check."""

    def __init__(self, records: dict[str, AppRecord], clock: Callable[[], float]) -> None:
        super().__init__()
        self.records = records
        self.clock = clock
        self.checks: dict[str, list[float]] = collections.defaultdict(list)

    async def state(self, address: str, ref: common_pb2.AppRef) -> agent_pb2.MasterStatus | None:
        key = AppId.parse(ref).key
        self.checks[key].append(self.clock())
        record = self.records[key]
        return agent_pb2.MasterStatus(
            app=ref,
            revision=record.revision,
            version=record.desired.spec.version,
            replicas=record.desired.replicas,
            ready_replicas=record.desired.replicas,
        )

    async def masters(self, address: str) -> list[agent_pb2.MasterStatus]:
        return []  # a newly seen cluster runs nothing stale


class CountedWrites:
    """Stands in for the leader's fenced status write during the passes: counted, never sent (a
    pass that wanted to write would measure etcd instead of the pass)."""

    def __init__(self) -> None:
        self.calls = 0

    async def __call__(self, *_: object, **__: object) -> bool:
        self.calls += 1
        return True


def running_records(n: int, clusters: list[str]) -> dict[str, AppRecord]:
    """``n`` apps RUNNING at their desired revision, one replica set each on a simulated cluster."""
    records: dict[str, AppRecord] = {}
    for i in range(n):
        placed = [
            keeper_pb2.ClusterPlacement(
                cluster=clusters[i % len(clusters)], replicas=2, ready_replicas=2, version="1"
            )
        ]
        record = AppRecord(
            keeper_pb2.DesiredState(spec=stored_spec(f"run-{i}"), replicas=2),
            revision=10 + i,
            status=keeper_pb2.ApplicationStatus(
                state=AppState.RUNNING,
                reason="2 replica(s) ready on 1 cluster(s)",
                revision=10 + i,
                placements=placed,
            ),
        )
        records[AppId.parse(record.ref).key] = record
    return records


@dataclass
class Sweep:
    """Passes of one leader from its first (every app due) until every app was checked twice."""

    pass_s: list[float]  # wall time of each pass: run_once plus the steps it started
    first_all_checked_s: float  # simulated clock when the last app got its first check
    worst_recheck_s: float  # longest simulated gap between two checks of one app
    changed_first: bool  # an app updated mid-sweep was the next pass's first step
    agent_calls: int
    status_writes: int


async def sweep(
    store: KeeperStore, records: dict[str, AppRecord], start: float, budget: int, checks_each: int = 2
) -> Sweep:
    """A fresh leader's passes at the interval until every app was checked ``checks_each`` times
    (the clock is simulated from ``start``: a pass follows the last at once in wall time, the
    reconciler sees ``keeper_reconcile_interval_s`` go by)."""
    interval = settings.keeper_reconcile_interval_s
    now = [start]
    agents = SimulatedAgents(records, lambda: now[0])
    writes, counted = store.write_status, CountedWrites()
    store.write_status = counted  # type: ignore[method-assign]
    reconciler = Reconciler(store, agents, interval_s=interval, budget=budget, clock=lambda: now[0])
    reconciler.load(records.values())
    changed, changed_first, times = next(reversed(records)), False, []
    try:
        while min((len(agents.checks.get(k, ())) for k in records), default=checks_each) < checks_each:
            if now[0] - start >= 30 * settings.keeper_steady_check_s:
                raise RuntimeError("sweep did not check every app twice in 30 steady intervals")
            if len(times) == 1:  # an update to the last app the resync would reach
                reconciler.queue.changed(changed)
            started = time.perf_counter()
            await reconciler.run_once(b"fence")
            if len(times) == 1:
                changed_first = next(iter(reconciler._inflight), None) == changed
            await asyncio.gather(*reconciler._inflight.values())
            times.append(time.perf_counter() - started)
            now[0] += interval
            await asyncio.sleep(0)  # the steps' done callbacks
    finally:
        store.write_status = writes  # type: ignore[method-assign]
        await agents.close()
    checks = [agents.checks[k] for k in records]
    return Sweep(
        pass_s=times,
        first_all_checked_s=max(c[0] for c in checks) - start,
        worst_recheck_s=max((b - a for c in checks for a, b in itertools.pairwise(c)), default=0.0),
        changed_first=changed_first,
        agent_calls=sum(len(c) for c in checks),
        status_writes=counted.calls,
    )


async def reconcile_figures(etcd: EtcdProcess, p: dict[str, Any], reps: int) -> dict[str, Any]:
    """Pass times of the leader's reconciler over N RUNNING apps on ``p["clusters"]`` simulated
    clusters (stored in etcd, read every pass as the leader does): the bounded passes
    (``keeper_reconcile_budget``) of a fresh leader until every app was checked twice, beside
    one unbounded pass (a budget of N: every app in one pass, as before the budget), interleaved."""
    store = KeeperStore.connect(etcd.address, RECONCILE_PREFIX)
    clusters = [f"sim-{c}" for c in range(p["clusters"])]
    budget, interval = settings.keeper_reconcile_budget, settings.keeper_reconcile_interval_s
    rows = {}
    start = time.time()
    for name in clusters:  # stamped ahead of the simulated clock: alive through every sweep
        info = cluster_info(name)
        info.heartbeat_at = start + 3600.0
        await store.put_cluster(info)
    try:
        for n in p["pass_sizes"]:
            records = running_records(n, clusters)
            bounded: list[Sweep] = []
            unbounded: list[float] = []
            for _ in range(reps):
                bounded.append(await sweep(store, records, start, budget))
                one = await sweep(store, records, start, max(n, budget), checks_each=1)
                unbounded.append(max(one.pass_s))
            worst = statistics.median(max(s.pass_s) for s in bounded)
            rows[str(n)] = {
                "pass_max_s": round(worst, 4),
                # the first also sweeps every newly seen cluster (one ListMasters each): O(clusters)
                "pass_first_s": round(statistics.median(s.pass_s[0] for s in bounded), 4),
                "pass_max_after_first_s": round(statistics.median(max(s.pass_s[1:]) for s in bounded), 4),
                "pass_median_s": round(statistics.median(statistics.median(s.pass_s) for s in bounded), 4),
                "passes_per_sweep": statistics.median(len(s.pass_s) for s in bounded),
                "all_checked_after_s": round(statistics.median(s.first_all_checked_s for s in bounded), 1),
                "worst_recheck_s": round(statistics.median(s.worst_recheck_s for s in bounded), 1),
                "changed_app_first_in_next_pass": all(s.changed_first for s in bounded),
                "pass_max_vs_interval": round(worst / interval, 3),
                "unbounded_pass_s": round(statistics.median(unbounded), 3),
                "ratio_pass_max_s_vs_unbounded": round(worst / statistics.median(unbounded), 3),
                "status_writes": sum(s.status_writes for s in bounded),
            }
    finally:
        await store.close()
    return {
        "simulated_clusters": len(clusters),
        "budget_per_pass": budget,
        "interval_s": interval,
        "steady_check_s": settings.keeper_steady_check_s,
        "passes": rows,
    }


async def broker_figures(p: dict[str, Any], reps: int) -> dict[str, Any]:
    redis_proc, etcd = RedisProcess().start(), EtcdProcess().start()
    broker = ServiceProcess("broker", "--redis", redis_proc.address, "--etcd", etcd.address).start()
    credentials = Credentials(etcd.address)
    admin = [("authorization", f"Bearer {await credentials.admin()}")]
    channel = aio_channel(broker.address)
    stub = broker_pb2_grpc.BrokerStub(channel)
    host, port = redis_proc.address.rsplit(":", 1)
    client = aioredis.Redis(host=host, port=int(port))
    payload = service_pb2.ModelInferRequest(model_name="scale").SerializeToString()
    queue = RedisStreamQueue(redis_proc.address)
    for q in range(16):  # what a deployment's pull worker does when it starts
        await queue.register_app(AppId.parse(f"scale/q{q}").key, AppConfig(max_stream_length=1_000_000))
    await queue.close()
    try:

        async def submits(rep: int) -> float:
            async def one(i: int) -> None:
                request = broker_pb2.SubmitRequest(
                    app=common_pb2.AppRef(namespace="scale", name=f"q{i % 16}"), infer_request=payload
                )
                await stub.Submit(request, metadata=admin, timeout=60)

            return await sustained(tolerant("broker submits", one), p["broker_submits"], CONCURRENCY)

        async def xadds(rep: int) -> float:
            async def one(i: int) -> None:
                await client.xadd(
                    f"peer:{i % 16}", {"ticket": f"{rep}-{i}", "payload": payload}, maxlen=10_000
                )

            return await sustained(one, p["broker_submits"], CONCURRENCY)

        submit_rate, xadd_rate = await interleaved(reps, submits, xadds)
        return {
            "submits_per_s": round(submit_rate, 1),
            "redis_xadd_per_s": round(xadd_rate, 1),
            "ratio_submits_per_s_vs_redis_raw": round(submit_rate / xadd_rate, 3),
            "redis_primaries": 1,
        }
    finally:
        await client.aclose()
        await channel.close()
        await credentials.close()
        broker.cleanup()
        etcd.cleanup()
        redis_proc.cleanup()


def proxy_figures() -> dict[str, Any]:
    """bench/proxy.py's and bench/direct_ingress.py's last runs, per core of the box they ran on."""
    out: dict[str, Any] = {}
    for name, path, pick in (
        ("proxy", RESULTS_DIR / "proxy.json", lambda f: max(v["rps"] for v in f["servefleet"].values())),
        ("direct_ingress", RESULTS_DIR / "direct_ingress.json", lambda f: f["direct"]["b1"]["rps"]),
    ):
        if not path.exists():
            continue
        report = json.loads(path.read_text())
        cpus = report["machine"]["cpus"]
        rps = pick(report["figures"])
        out[name] = {
            "best_rps": round(rps, 1),
            "cpus_of_the_box": cpus,
            "rps_per_core": round(rps / cpus, 1),
            "measured": report["date"],
            "load_average_1m": report["machine"].get("load_average_1m"),
            "note": "load generator, server and model share the box: a lower bound per core",
        }
    return out


PARTS = ("discovery", "keeper", "heartbeats", "reconcile", "broker")


async def run(args: argparse.Namespace, state: Path) -> dict[str, Any]:
    p = QUICK if args.quick else FULL
    loads: dict[str, list[float]] = {}
    seconds: dict[str, float] = {}
    figures: dict[str, Any] = {}
    wanted = set(args.parts)

    async def part(name: str, work: Callable[[], Awaitable[dict[str, Any]]]) -> None:
        """One part's figures, with the 1-minute load average before and after and its wall time."""
        if name not in wanted:
            return
        before, started = os.getloadavg()[0], time.monotonic()
        figures[name] = await work()
        loads[name] = [round(before, 2), round(os.getloadavg()[0], 2)]
        seconds[name] = round(time.monotonic() - started, 1)
        print(f"{name}: {seconds[name]}s, load {loads[name]}", flush=True)

    if wanted & {"discovery", "keeper", "heartbeats", "reconcile"}:
        etcd = EtcdProcess().start()
        try:
            await part("discovery", lambda: discovery_figures(etcd, p, args.reps))
            await part("keeper", lambda: keeper_figures(etcd, p, args.reps, state))
            await part("heartbeats", lambda: heartbeat_figures(etcd, p, args.reps, state))
            await part("reconcile", lambda: reconcile_figures(etcd, p, args.reps))
        finally:
            etcd.cleanup()
    await part("broker", lambda: broker_figures(p, args.reps))
    figures["proxy"] = proxy_figures()
    figures["failed_calls"] = dict(FAILED)
    used = {"quick": args.quick, "reps": args.reps, **p, "seconds_per_part": seconds}
    return {"settings": used, "figures": figures, "load_1m": loads}


def carry_over(result: dict[str, Any], loads: dict[str, list[float]], parts: list[str]) -> None:
    """Figures of the parts not run this time, from the last report (each says when it ran)."""
    path = RESULTS_DIR / "scale.json"
    if not path.exists():
        return
    last = json.loads(path.read_text())
    per_part = last["machine"].get("load_average_1m_before_after_per_part", {})
    for name in PARTS:
        if name in parts or name not in last["figures"]:
            continue
        result["figures"][name] = {
            **last["figures"][name],
            "measured": last["figures"][name].get("measured", last["date"]),
        }
        loads[name] = per_part.get(name, [])
        result["settings"]["seconds_per_part"].setdefault(
            name, last["settings"]["seconds_per_part"].get(name)
        )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="smaller sets, under 2 minutes")
    parser.add_argument("--reps", type=int, default=3, help="interleaved repetitions per figure (median)")
    parser.add_argument(
        "--parts",
        type=lambda v: [x for x in v.split(",") if x],
        default=list(PARTS),
        help=f"comma-separated subset of {','.join(PARTS)}; the others' figures are kept from the "
        "last scale.json (full runs only), each with the date it was measured",
    )
    args = parser.parse_args()
    unknown = set(args.parts) - set(PARTS)
    if unknown:
        parser.error(f"--parts: unknown {', '.join(sorted(unknown))}; choose from {', '.join(PARTS)}")
    import tempfile

    state = Path(tempfile.mkdtemp(prefix="sf-scale-"))
    started = time.monotonic()
    result = asyncio.run(run(args, state))
    result["settings"]["wall_s"] = round(time.monotonic() - started, 1)
    loads = result.pop("load_1m")
    if not args.quick and set(args.parts) != set(PARTS):
        carry_over(result, loads, args.parts)
        result["settings"]["parts_run"] = args.parts
    path = write_report("scale", result, load_average_1m_before_after_per_part=loads)
    print(json.dumps(result["figures"], indent=2))
    print(f"wrote {path} in {result['settings']['wall_s']}s")


if __name__ == "__main__":
    main()
