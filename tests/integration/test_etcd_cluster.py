"""Every part over a 3-member etcd cluster: losing its leader under load fails no call.

The stated retry is the parts' own etcd client (``servefleet.common.etcd.ETCD_RETRY``): each etcd
call that meets a dead member or an election tries again on another member, so the keeper's
submits and discovery's registrations and resolves pause for about one election and succeed."""

from __future__ import annotations

import asyncio
import time

import aetcd
from aetcd import rpc

from servefleet.api import common_pb2, discovery_pb2, discovery_pb2_grpc
from servefleet.common.appid import AppId
from servefleet.common.auth import ADMIN, Principal
from servefleet.common.channels import aio_channel
from servefleet.common.net import async_wait_for, split_address
from servefleet.keeper.core import Keeper
from servefleet.keeper.store import KeeperStore
from servefleet.testing import DiscoveryProcess, EtcdCluster, EtcdProcess

WORKERS = 4


def spec(name: str) -> common_pb2.ApplicationSpec:
    return common_pb2.ApplicationSpec(name=name, namespace="etcd3", import_path="examples.echo:Echo")


async def member_view(member: EtcdProcess) -> tuple[int, int]:
    """(keys, revision) as this member alone serves them (a serializable read: its own copy)."""
    host, port = split_address(member.address)
    async with aetcd.Client(host=host, port=port, timeout=2) as client:
        reply = await client.kvstub.Range(
            rpc.RangeRequest(key=b"\0", range_end=b"\0", count_only=True, serializable=True), timeout=2
        )
    return int(reply.count), int(reply.header.revision)


async def test_killing_the_etcd_leader_under_load_fails_no_call(etcd_cluster: EtcdCluster) -> None:
    discovery = DiscoveryProcess(etcd_cluster.address).start()
    store = KeeperStore.connect(etcd_cluster.address)
    keeper, admin = Keeper(store), Principal(ADMIN, ADMIN)
    channel = aio_channel(discovery.address, token=discovery.token)
    stub = discovery_pb2_grpc.DiscoveryStub(channel)
    submitted: list[str] = []
    registered: list[str] = []
    failures: list[str] = []
    slowest = 0.0
    stop = asyncio.Event()

    async def timed(what: str, call: object) -> None:
        nonlocal slowest
        started = time.monotonic()
        try:
            await call  # type: ignore[misc]
        except Exception as exc:
            failures.append(f"{what}: {exc!r}")
        slowest = max(slowest, time.monotonic() - started)

    async def submits(worker: int) -> None:
        for i in range(10_000):
            if stop.is_set():
                return
            name = f"a{worker}-{i}"
            await timed(f"submit {name}", keeper.submit(admin, spec(name)))
            submitted.append(name)

    async def register_and_resolve(worker: int) -> None:
        app = AppId.parse(f"etcd3/r{worker}").ref()
        for i in range(10_000):
            if stop.is_set():
                return
            endpoint = discovery_pb2.Endpoint(id=f"e{i}", app=app, kind="proxy", address="127.0.0.1:9")
            request = discovery_pb2.RegisterRequest(endpoint=endpoint, ttl_s=60)
            await timed(f"register r{worker}/e{i}", stub.Register(request, timeout=30))
            registered.append(f"r{worker}/e{i}")
            await timed(f"resolve r{worker}", stub.Resolve(discovery_pb2.ResolveRequest(app=app), timeout=30))

    async def lose_the_leader() -> EtcdProcess:
        await asyncio.sleep(1.5)
        victim = etcd_cluster.leader()
        victim.kill()
        await asyncio.sleep(6.0)  # an election and its aftermath, under load
        stop.set()
        return victim

    try:
        *_, victim = await asyncio.gather(
            *(submits(w) for w in range(WORKERS)),
            *(register_and_resolve(w) for w in range(WORKERS)),
            lose_the_leader(),
        )
        assert not failures, failures[:5]
        assert len(submitted) > 20 and len(registered) > 20
        # Consistent: every submitted app is stored once, every registered endpoint resolves.
        page = await store.list_apps(["etcd3"])
        assert sorted(AppId.parse(r.ref).name for r in page.apps) == sorted(submitted)
        for worker in range(WORKERS):
            app = AppId.parse(f"etcd3/r{worker}").ref()
            found = await stub.Resolve(discovery_pb2.ResolveRequest(app=app), timeout=10)
            ids = {f"r{worker}/{e.id}" for e in found.endpoints}
            assert ids == {r for r in registered if r.startswith(f"r{worker}/")}
        # The lost member comes back on its data and catches up: all three hold the same copy.
        victim.start()

        async def agree() -> bool:
            views = {await member_view(m) for m in etcd_cluster.members}
            return len(views) == 1

        await async_wait_for(agree, timeout=30, interval=0.5, what="the three members to agree")
        print(f"slowest call {slowest:.2f}s over {len(submitted)} submits, {len(registered)} registrations")
    finally:
        stop.set()
        await channel.close()
        await store.close()
        discovery.cleanup()
        for member in etcd_cluster.members:
            if member.proc is None or member.proc.poll() is not None:
                member.start()
