"""Two keeper processes on one etcd: both serve, one leads the reconcile loop, the other takes
over when the leader is SIGKILLed."""

from __future__ import annotations

import grpc

from servefleet.api import common_pb2, keeper_pb2, keeper_pb2_grpc
from servefleet.common.appid import AppId
from servefleet.common.net import async_wait_for
from servefleet.keeper.store import KeeperStore
from tests.integration.keeper.conftest import Procs, bearer

AppState = keeper_pb2.AppState


async def test_follower_serves_and_takes_over_when_the_leader_dies(procs: Procs) -> None:
    first, first_address = procs.keeper(name="keeper-1")
    second, second_address = procs.keeper(name="keeper-2")
    store = KeeperStore.connect(procs.etcd.address, procs.prefix)
    try:
        leader = (await async_wait_for(store.leader, timeout=30, what="a leader")).decode()  # type: ignore[attr-defined]
        assert leader.startswith((first_address, second_address))
        leading, follower = (
            (first, second_address) if leader.startswith(first_address) else (second, first_address)
        )
        md = bearer(procs.admin_token())
        async with grpc.aio.insecure_channel(follower) as channel:
            stub = keeper_pb2_grpc.KeeperStub(channel)
            before = common_pb2.ApplicationSpec(name="before", import_path="examples.iris:IrisClassifier")
            await stub.SubmitApplication(keeper_pb2.SubmitApplicationRequest(spec=before), metadata=md)
            got = await stub.GetApplication(
                keeper_pb2.GetApplicationRequest(app=AppId.parse(before).ref()), metadata=md
            )
            assert got.state == AppState.PENDING  # the follower serves reads and writes
            leading.kill()

            async def follower_leads() -> bool:
                return (await store.leader()).decode().startswith(follower)

            await async_wait_for(follower_leads, timeout=30, what="the follower to take the lead")
            after = common_pb2.ApplicationSpec(name="after", import_path="examples.iris:IrisClassifier")
            await stub.SubmitApplication(keeper_pb2.SubmitApplicationRequest(spec=after), metadata=md)

            async def reconciled() -> str:
                got = await stub.GetApplication(
                    keeper_pb2.GetApplicationRequest(app=AppId.parse(after).ref()), metadata=md
                )
                return got.reason if got.reason.startswith("unplaceable") else ""

            reason = await async_wait_for(reconciled, timeout=30, what="the new leader to reconcile")
            assert "no cluster is registered" in str(reason)
    finally:
        await store.close()
