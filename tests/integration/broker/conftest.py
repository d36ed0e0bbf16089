"""Broker fixtures: the broker service in-process over a real Redis, and the session's Ray."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator

import pytest
import ray

from servefleet.broker.acl import AppUsers, WorkerCredentials
from servefleet.broker.core import BrokerCore
from servefleet.broker.queue import RedisStreamQueue
from servefleet.broker.servicer import broker_server
from servefleet.common.auth import ADMIN, Principal
from servefleet.common.redis_target import RedisTarget
from servefleet.common.server import GrpcServer
from servefleet.sdk.broker_client import AsyncBrokerClient
from servefleet.testing import Credentials, LocalRedisCluster, RayCluster, RedisProcess

#: The caller a test is when it calls the broker core directly.
AS_ADMIN = Principal(ADMIN, ADMIN)


class BrokerService:
    """A started broker (core + gRPC server) over one Redis, checking tokens of ``credentials``,
    and a client of it with an admin token (``token``)."""

    def __init__(self, redis_address: str | RedisTarget, credentials: Credentials) -> None:
        self.redis_address = redis_address
        self.credentials = credentials
        # As the entry point builds it: a Redis that requires auth gets per-app worker users.
        target = RedisTarget.parse(redis_address)
        users = AppUsers(target.client(max_connections=4), target.password) if target.password else None
        public = target.with_credential("", "")
        self.core = BrokerCore(RedisStreamQueue(target), WorkerCredentials(public, users))
        self.server: GrpcServer = broker_server(self.core, "127.0.0.1:0", credentials.authenticator())
        self.client: AsyncBrokerClient | None = None
        self.token = ""

    async def start(self) -> BrokerService:
        await self.server.start()
        self.token = await self.credentials.admin()
        self.client = AsyncBrokerClient(self.server.address, token=self.token)
        return self

    async def stop(self) -> None:
        assert self.client is not None
        await self.client.close()
        await self.server.stop(0)
        await self.core.close()


#: The Redis deployments the broker's tests run on (each test once per kind).
KINDS = ("single", "cluster")


@pytest.fixture(params=KINDS)
def redis_target(request: pytest.FixtureRequest) -> RedisTarget:
    """The session's one Redis, or its 3-primary Redis Cluster."""
    found: RedisProcess | LocalRedisCluster = request.getfixturevalue(
        "redis_server" if request.param == "single" else "redis_cluster"
    )
    return found.target


def fresh_redis(kind: str) -> RedisProcess | LocalRedisCluster:
    """A Redis of ``kind`` of the test's own (to kill and restart), started."""
    return RedisProcess().start() if kind == "single" else LocalRedisCluster(primaries=3).start()


@pytest.fixture
async def broker(redis_target: RedisTarget, credentials: Credentials) -> AsyncIterator[BrokerService]:
    service = await BrokerService(redis_target, credentials).start()
    yield service
    await service.stop()


@pytest.fixture(scope="session")
def ray_connected(ray_cluster: RayCluster) -> Iterator[None]:
    """This process as a driver of the session's Ray cluster (once per session)."""
    if not ray.is_initialized():
        ray.init(address=ray_cluster.address)
    yield
