"""Discovery service over real etcd, through its gRPC API: register, resolve, watch, bad input."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import aetcd
import grpc
import pytest

from servefleet.api import common_pb2, discovery_pb2, discovery_pb2_grpc
from servefleet.common import health
from servefleet.common.channels import aio_channel
from servefleet.common.net import wait_for
from servefleet.discovery.registration import registration
from servefleet.testing import Credentials, DiscoveryProcess, EtcdProcess

Event = discovery_pb2.WatchEvent


@pytest.fixture
async def stub(
    discovery: DiscoveryProcess, admin_token: str
) -> AsyncIterator[discovery_pb2_grpc.DiscoveryStub]:
    async with aio_channel(discovery.address, token=admin_token) as channel:
        yield discovery_pb2_grpc.DiscoveryStub(channel)


def endpoint(app: str, port: int, **kwargs: object) -> discovery_pb2.Endpoint:
    namespace, _, name = app.rpartition("/")
    ref = common_pb2.AppRef(namespace=namespace, name=name)
    fields: dict[str, object] = {"kind": "proxy", "address": f"127.0.0.1:{port}", **kwargs}
    return discovery_pb2.Endpoint(app=ref, **fields)  # type: ignore[arg-type]


async def register(
    stub: discovery_pb2_grpc.DiscoveryStub, ep: discovery_pb2.Endpoint, ttl_s: int = 5
) -> discovery_pb2.RegisterResponse:
    return await stub.Register(discovery_pb2.RegisterRequest(endpoint=ep, ttl_s=ttl_s))


async def test_register_resolve_filters_and_deregister(stub: discovery_pb2_grpc.DiscoveryStub) -> None:
    a = await register(stub, endpoint("t1/m", 1001, labels={"zone": "a"}))
    b = await register(stub, endpoint("t1/m", 1002, labels={"zone": "b"}, kind="direct"))
    await register(stub, endpoint("t1/other", 1003))
    app = common_pb2.AppRef(namespace="t1", name="m")

    everything = await stub.Resolve(discovery_pb2.ResolveRequest(app=app))
    assert {e.id for e in everything.endpoints} == {a.endpoint_id, b.endpoint_id}
    assert everything.revision >= b.revision
    zoned = await stub.Resolve(discovery_pb2.ResolveRequest(app=app, label_filter={"zone": "a"}))
    assert [e.address for e in zoned.endpoints] == ["127.0.0.1:1001"]
    direct = await stub.Resolve(discovery_pb2.ResolveRequest(app=app, kind="direct"))
    assert [e.id for e in direct.endpoints] == [b.endpoint_id]

    await stub.Deregister(
        discovery_pb2.DeregisterRequest(app=app, endpoint_id=a.endpoint_id, lease_id=a.lease_id)
    )
    left = await stub.Resolve(discovery_pb2.ResolveRequest(app=app))
    assert [e.id for e in left.endpoints] == [b.endpoint_id]
    alive = stub.KeepAlive()
    await alive.write(discovery_pb2.KeepAliveRequest(lease_id=a.lease_id))
    assert (await alive.read()).ttl_s == 0  # revoked lease: the registrant must register again
    await alive.write(discovery_pb2.KeepAliveRequest(lease_id=b.lease_id))
    assert (await alive.read()).ttl_s > 0
    alive.cancel()


async def test_watch_snapshot_then_ordered_deltas_and_exact_resume(
    stub: discovery_pb2_grpc.DiscoveryStub,
) -> None:
    app = common_pb2.AppRef(namespace="t2", name="m")
    first = await register(stub, endpoint("t2/m", 2001))
    watch = stub.Watch(discovery_pb2.WatchRequest(app=app))
    snapshot = await watch.read()
    assert snapshot.type == Event.SNAPSHOT and not snapshot.compacted
    assert [e.id for e in snapshot.endpoints] == [first.endpoint_id]

    second = await register(stub, endpoint("t2/m", 2002))
    updated = endpoint("t2/m", 2002, id=second.endpoint_id, load_hint=0.5)
    await stub.Register(discovery_pb2.RegisterRequest(endpoint=updated, lease_id=second.lease_id))
    await register(stub, endpoint("t2/noise", 2003))  # another app: not in this stream
    await stub.Deregister(discovery_pb2.DeregisterRequest(app=app, endpoint_id=first.endpoint_id))
    deltas = [await watch.read() for _ in range(3)]
    watch.cancel()
    assert [(e.type, e.endpoints[0].id) for e in deltas] == [
        (Event.ADDED, second.endpoint_id),
        (Event.UPDATED, second.endpoint_id),
        (Event.REMOVED, first.endpoint_id),
    ]
    assert deltas[1].endpoints[0].load_hint == 0.5
    revisions = [e.revision for e in deltas]
    assert revisions == sorted(revisions) and revisions[0] > snapshot.revision

    # Resuming after the first delta replays exactly the two later ones: no gap, no duplicate.
    resumed = stub.Watch(discovery_pb2.WatchRequest(app=app, from_revision=deltas[0].revision))
    again = [await resumed.read() for _ in range(2)]
    assert again == deltas[1:]
    await register(stub, endpoint("t2/m", 2004))
    assert (await resumed.read()).type == Event.ADDED
    resumed.cancel()


async def test_watch_namespace_prefix_and_unknown_app(stub: discovery_pb2_grpc.DiscoveryStub) -> None:
    unknown = stub.Watch(discovery_pb2.WatchRequest(app=common_pb2.AppRef(name="never-registered")))
    event = await unknown.read()
    assert event.type == Event.SNAPSHOT and list(event.endpoints) == []
    unknown.cancel()
    await register(stub, endpoint("t3/a", 3001))
    await register(stub, endpoint("t3/b", 3002))
    namespace = stub.Watch(discovery_pb2.WatchRequest(app=common_pb2.AppRef(namespace="t3")))
    snapshot = await namespace.read()
    assert sorted(e.app.name for e in snapshot.endpoints) == ["a", "b"]
    namespace.cancel()


async def test_compacted_revision_gets_flagged_fresh_snapshot(
    stub: discovery_pb2_grpc.DiscoveryStub, etcd: EtcdProcess
) -> None:
    app = common_pb2.AppRef(namespace="t4", name="m")
    old = await register(stub, endpoint("t4/m", 4001))
    new = await register(stub, endpoint("t4/m", 4002))
    host, port = etcd.address.split(":")
    async with aetcd.Client(host=host, port=int(port)) as client:
        await client.compact(new.revision)
    watch = stub.Watch(discovery_pb2.WatchRequest(app=app, from_revision=old.revision - 1))
    event = await watch.read()
    watch.cancel()
    assert event.type == Event.SNAPSHOT and event.compacted
    assert {e.id for e in event.endpoints} == {old.endpoint_id, new.endpoint_id}
    # A revision this etcd never reached (its data was replaced): also a fresh, flagged snapshot.
    future = stub.Watch(discovery_pb2.WatchRequest(app=app, from_revision=new.revision + 10**9))
    event = await future.read()
    future.cancel()
    assert event.type == Event.SNAPSHOT and event.compacted and len(event.endpoints) == 2


@pytest.mark.parametrize(
    ("request_", "words"),
    [
        (discovery_pb2.RegisterRequest(endpoint=endpoint("t5/m", 1)), None),
        (
            discovery_pb2.RegisterRequest(endpoint=discovery_pb2.Endpoint(kind="proxy", address="h:1")),
            "application name: required",
        ),
        (discovery_pb2.RegisterRequest(endpoint=endpoint("t5/bad name", 1)), "must be 1-63 lowercase"),
        (discovery_pb2.RegisterRequest(endpoint=endpoint("t5/m", 1, address="no-port")), "not host:port"),
        (discovery_pb2.RegisterRequest(endpoint=endpoint("t5/m", 1, kind="")), "kind is empty"),
        (discovery_pb2.RegisterRequest(endpoint=endpoint("t5/m", 1, weight=-1)), "weight"),
        (
            discovery_pb2.RegisterRequest(endpoint=endpoint("t5/m", 1), ttl_s=100000),
            "ttl_s 100000 is out of range",
        ),
        (discovery_pb2.RegisterRequest(endpoint=endpoint("t5/m", 1, id="a/b")), "endpoint id"),
    ],
)
async def test_register_bad_input_is_invalid_argument(
    stub: discovery_pb2_grpc.DiscoveryStub, request_: discovery_pb2.RegisterRequest, words: str | None
) -> None:
    if words is None:  # the control case registers fine
        assert (await stub.Register(request_)).lease_id > 0
        return
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await stub.Register(request_)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert words in (info.value.details() or "")


async def test_other_bad_input_is_invalid_argument(stub: discovery_pb2_grpc.DiscoveryStub) -> None:
    calls = [
        stub.Resolve(discovery_pb2.ResolveRequest(app=common_pb2.AppRef(namespace="x"))),
        stub.Deregister(discovery_pb2.DeregisterRequest()),
    ]
    for call in calls:
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await call
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    watch = stub.Watch(discovery_pb2.WatchRequest(app=common_pb2.AppRef(name="-bad-")))
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await watch.read()
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    alive = stub.KeepAlive()
    await alive.write(discovery_pb2.KeepAliveRequest(lease_id=0))
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await alive.read()
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_two_instances_share_state_through_etcd(
    discovery: DiscoveryProcess, etcd: EtcdProcess, admin_token: str
) -> None:
    other = DiscoveryProcess(etcd.address).start()
    try:  # Each read is bounded: a missed event fails in 30 s, naming the read, not at the suite's timeout.
        async with aio_channel(other.address, token=admin_token) as channel:
            watch = discovery_pb2_grpc.DiscoveryStub(channel).Watch(
                discovery_pb2.WatchRequest(app=common_pb2.AppRef(namespace="t6", name="m"))
            )
            assert (await asyncio.wait_for(watch.read(), 30)).type == Event.SNAPSHOT
            async with registration(
                discovery.address, endpoint("t6/m", 6001), ttl_s=2, token=admin_token
            ) as reg:
                added = await asyncio.wait_for(watch.read(), 30)
                assert added.type == Event.ADDED and added.endpoints[0].id == reg.endpoint_id
                await reg.update(load_hint=2.0, labels={"zone": "z"})
                updated = await asyncio.wait_for(watch.read(), 30)
                assert updated.type == Event.UPDATED and updated.endpoints[0].labels["zone"] == "z"
            # Leaving the block deregisters at once, not after the TTL.
            removed = await asyncio.wait_for(watch.read(), 30)
            assert removed.type == Event.REMOVED and removed.endpoints[0].id == reg.endpoint_id
            watch.cancel()
    finally:
        other.cleanup()


async def test_health_follows_etcd_and_calls_say_unavailable() -> None:
    own_etcd = EtcdProcess().start()
    own = DiscoveryProcess(own_etcd.address).start()
    tokens = Credentials(own_etcd.address)
    try:
        async with aio_channel(own.address, token=await tokens.admin()) as channel:
            stub = discovery_pb2_grpc.DiscoveryStub(channel)
            own_etcd.kill()
            await asyncio.to_thread(
                wait_for, lambda: not health.grpc_health(own.address)[0], timeout=20, what="NOT_SERVING"
            )
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await stub.Resolve(discovery_pb2.ResolveRequest(app=common_pb2.AppRef(name="m")))
            assert info.value.code() == grpc.StatusCode.UNAVAILABLE
            assert "etcd unavailable" in (info.value.details() or "")
            await asyncio.to_thread(own_etcd.start)
            await asyncio.to_thread(
                wait_for, lambda: health.grpc_health(own.address)[0], timeout=20, what="SERVING"
            )
            assert (
                await stub.Resolve(discovery_pb2.ResolveRequest(app=common_pb2.AppRef(name="m")))
            ).revision > 0
    finally:
        await tokens.close()
        own.cleanup()
        own_etcd.cleanup()
