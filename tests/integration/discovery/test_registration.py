"""registration(): waits for discovery, rejects bad input at once, and heals a lost lease."""

from __future__ import annotations

import asyncio

import aetcd
import pytest

from servefleet.api import discovery_pb2, discovery_pb2_grpc
from servefleet.common.appid import AppId
from servefleet.common.channels import aio_channel
from servefleet.common.errors import InvalidArgument
from servefleet.common.net import async_wait_for
from servefleet.discovery.registration import registration
from servefleet.testing import DiscoveryProcess, EtcdProcess


def endpoint(app: str, address: str = "127.0.0.1:7001") -> discovery_pb2.Endpoint:
    return discovery_pb2.Endpoint(app=AppId.parse(app).ref(), kind="proxy", address=address)


async def resolve_ids(address: str, app: str, token: str) -> list[str]:
    async with aio_channel(address, token=token) as channel:
        reply = await discovery_pb2_grpc.DiscoveryStub(channel).Resolve(
            discovery_pb2.ResolveRequest(app=AppId.parse(app).ref()), wait_for_ready=True, timeout=10
        )
    return [e.id for e in reply.endpoints]


async def test_bad_input_fails_at_once(discovery: DiscoveryProcess, admin_token: str) -> None:
    with pytest.raises(InvalidArgument, match="not host:port"):
        async with registration(discovery.address, endpoint("r1", address="nowhere"), token=admin_token):
            pass
    with pytest.raises(InvalidArgument, match="ttl_s"):
        async with registration(discovery.address, endpoint("r1"), ttl_s=-3, token=admin_token):
            pass


async def test_waits_for_discovery_that_starts_later(etcd: EtcdProcess, admin_token: str) -> None:
    late = DiscoveryProcess(etcd.address)
    try:

        async def enter() -> list[str]:
            async with registration(late.address, endpoint("r2"), token=admin_token) as reg:
                return [reg.endpoint_id, *await resolve_ids(late.address, "r2", admin_token)]

        entering = asyncio.create_task(enter())
        await asyncio.sleep(0.5)  # the helper is retrying against a closed port meanwhile
        assert not entering.done()
        await asyncio.to_thread(late.start)
        endpoint_id, *listed = await asyncio.wait_for(entering, 30)
        assert listed == [endpoint_id]
        assert await resolve_ids(late.address, "r2", admin_token) == []  # leaving deregistered it
    finally:
        late.cleanup()


async def test_lost_lease_is_healed_with_the_same_id(
    discovery: DiscoveryProcess, etcd: EtcdProcess, admin_token: str
) -> None:
    async with registration(discovery.address, endpoint("r3"), ttl_s=2, token=admin_token) as reg:
        first_lease = reg.lease_id
        host, port = etcd.address.split(":")
        async with aetcd.Client(host=host, port=int(port)) as client:
            await client.revoke_lease(first_lease)  # as if the process had been paused past its TTL
        assert await resolve_ids(discovery.address, "r3", admin_token) == []

        async def healed() -> bool:
            # Discovery lists the record as soon as Register is stored; the helper learns the new
            # lease when the reply reaches it, which on a loaded machine may come a moment later.
            listed = await resolve_ids(discovery.address, "r3", admin_token) == [reg.endpoint_id]
            return listed and reg.lease_id not in (0, first_lease)

        await async_wait_for(healed, timeout=10, what="re-registration under a new lease")


async def test_discovery_down_past_the_ttl_then_back_re_registers(
    etcd: EtcdProcess, admin_token: str
) -> None:
    own = DiscoveryProcess(etcd.address).start()
    try:
        async with registration(own.address, endpoint("r4"), ttl_s=1, token=admin_token) as reg:
            first_lease = reg.lease_id
            own.kill()  # no keep-alive reaches etcd now: the lease lapses, the record goes
            host, port = etcd.address.split(":")
            async with aetcd.Client(host=host, port=int(port)) as client:

                async def lapsed() -> bool:
                    return (await client.get_lease_info(first_lease, keys=False)).TTL < 0  # -1: gone

                await async_wait_for(lapsed, timeout=10, what="the lease to lapse")
            await asyncio.to_thread(own.start)

            async def back() -> bool:
                return await resolve_ids(own.address, "r4", admin_token) == [reg.endpoint_id]

            await async_wait_for(back, timeout=15, what="re-registration after the restart")
            assert reg.lease_id != first_lease
    finally:
        own.cleanup()
