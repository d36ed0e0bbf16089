"""Workers authenticate as their app's service: on a Redis that requires auth, a worker gets its
app's own Redis user from the broker with the app's endpoint token, and that user reaches its app's
keys and channel only (NOPERM for any other app's, the admin's, and every other command). Rotation,
a Redis restart (which forgets users) and the removal of a deleted app's user, against real Redis."""

from __future__ import annotations

import asyncio
import secrets
import uuid
from collections.abc import AsyncIterator

import grpc
import numpy as np
import pytest
from redis.exceptions import AuthenticationError, NoPermissionError
from tritonclient.grpc import service_pb2

from servefleet.api import broker_pb2, broker_pb2_grpc
from servefleet.broker.__main__ import app_exists
from servefleet.broker.acl import target_of
from servefleet.broker.keys import AppKeys
from servefleet.broker.worker import PullWorker, from_broker
from servefleet.common.appid import AppId
from servefleet.common.auth import ENDPOINT
from servefleet.common.channels import aio_channel
from servefleet.common.redis_target import RedisTarget
from servefleet.common.tensors import decode_request, encode_response
from servefleet.testing import Credentials, RedisProcess
from tests.integration.broker.conftest import BrokerService

Code = grpc.StatusCode


async def doubler(request: service_pb2.ModelInferRequest) -> service_pb2.ModelInferResponse:
    return encode_response(request.model_name, {"y": decode_request(request)["x"] * 2})


@pytest.fixture
async def secured(credentials: Credentials) -> AsyncIterator[tuple[RedisProcess, BrokerService]]:
    """A Redis that admits only the broker's admin user, and a broker over it."""
    redis = RedisProcess(admin_password=secrets.token_hex(16)).start()
    service = await BrokerService(redis.target, credentials).start()
    yield redis, service
    await service.stop()
    redis.cleanup()


async def ask(
    service: BrokerService, token: str, app: str, rotate: bool = False
) -> broker_pb2.WorkerCredential:
    async with aio_channel(service.server.address, token=token) as channel:
        request = broker_pb2.WorkerCredentialRequest(app=AppId.parse(app).ref(), rotate=rotate)
        return await broker_pb2_grpc.BrokerStub(channel).GetWorkerCredential(request, timeout=10)


async def code_of(service: BrokerService, token: str, app: str) -> Code:
    try:
        await ask(service, token, app)
    except grpc.aio.AioRpcError as exc:
        return exc.code()
    return Code.OK


async def test_a_worker_reaches_its_own_apps_keys_only(
    secured: tuple[RedisProcess, BrokerService], credentials: Credentials
) -> None:
    redis, service = secured
    assert service.client is not None
    run = uuid.uuid4().hex[:6]
    mine, theirs = f"acme-{run}/web", f"globex-{run}/api"
    tokens = {app: await credentials.issue(ENDPOINT, app=app) for app in (mine, theirs)}
    tenant = await credentials.tenant(f"acme-{run}")
    # Only the app's own endpoint token (or an admin) gets the app's credential.
    assert await code_of(service, tokens[mine], theirs) == Code.PERMISSION_DENIED
    assert await code_of(service, tenant, mine) == Code.PERMISSION_DENIED
    assert await code_of(service, "", mine) == Code.UNAUTHENTICATED
    with pytest.raises(AuthenticationError):  # no anonymous access to the stack's Redis
        await RedisTarget((redis.address,)).client().ping()

    # Both apps' workers pull through their own users; the broker serves both.
    workers = [
        PullWorker(from_broker(service.server.address, tokens[app], app), app, "w1", 2, doubler)
        for app in (mine, theirs)
    ]
    for worker in workers:
        await worker.start()
    try:
        for app in (mine, theirs):
            ticket = await service.client.submit(app, {"x": np.array([21])})
            assert (await service.client.result(ticket, timeout=30))["y"].tolist() == [42]

        # With app A's credential, app B's keys and channel, the admin's keys and any other
        # command answer NOPERM; A's own keys work.
        own = target_of(await ask(service, tokens[mine], mine)).client()
        foreign, admin_key = AppKeys(theirs), f"sf:acl:{{{theirs}}}:generation"
        assert await own.exists(AppKeys(mine).config) == 1
        refused = {
            "read B's config": own.hgetall(foreign.config),
            "read B's stream": own.xrange(foreign.stream(1)),
            "write B's config": own.hset(foreign.config, "max_stream_length", 1),
            "pull B's work": own.xreadgroup("workers", "spy", {foreign.stream(1): ">"}, count=1),
            "publish on B's channel": own.publish(foreign.events, "x DONE"),
            "read the admin's keys": own.get(admin_key),
            "list keys": own.keys("*"),
            "flush": own.flushall(),
            "manage users": own.acl_list(),
        }
        for what, call in refused.items():
            with pytest.raises(NoPermissionError):
                await call
                pytest.fail(what)
        await own.aclose()
    finally:
        for worker in workers:
            await worker.stop()


async def test_rotation_restart_and_deletion(
    secured: tuple[RedisProcess, BrokerService], credentials: Credentials
) -> None:
    redis, service = secured
    assert service.client is not None
    app = f"acme-{uuid.uuid4().hex[:6]}/web"
    token = await credentials.issue(ENDPOINT, app=app)
    worker = PullWorker(from_broker(service.server.address, token, app), app, "w1", 2, doubler, block_ms=200)
    await worker.start()
    try:
        old = await ask(service, token, app)
        # Rotation: the old password stops working (its connections are dropped), the worker asks
        # again by itself and keeps serving.
        new = await ask(service, token, app, rotate=True)
        assert new.password != old.password
        with pytest.raises(AuthenticationError):
            await target_of(old).client().ping()
        ticket = await service.client.submit(app, {"x": np.array([1])})
        assert (await service.client.result(ticket, timeout=60))["y"].tolist() == [2]

        # A Redis restart forgets every user made at run time: the worker is refused, asks the
        # broker again (which makes the user anew) and serves what was queued before the crash
        # (or had served it just before: its result is kept, Redis has an AOF). A request submitted
        # after the restart can only be served once the worker has its user again.
        queued = await service.client.submit(app, {"x": np.array([5])})
        await asyncio.to_thread(redis.kill)
        await asyncio.to_thread(redis.start)
        assert (await service.client.result(queued, timeout=60))["y"].tolist() == [10]
        after = await service.client.submit(app, {"x": np.array([7])})
        assert (await service.client.result(after, timeout=60))["y"].tolist() == [14]

    finally:
        await worker.stop()
    # The app is not in the keeper (deleted; here never submitted there): a sweep removes its user.
    # (Deleting an app also revokes its endpoint token, so its workers cannot get a new user.)
    assert service.core.credentials is not None
    assert await service.core.credentials.sweep(app_exists(credentials.store.client)) == [app]
    with pytest.raises(AuthenticationError):
        await target_of(new).client().ping()
