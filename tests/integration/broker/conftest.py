"""Broker fixtures: the broker service in-process over a real Redis, and the session's Ray."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator

import pytest
import ray

from servefleet.broker.core import BrokerCore
from servefleet.broker.queue import RedisStreamQueue
from servefleet.broker.servicer import broker_server
from servefleet.common.server import GrpcServer
from servefleet.sdk.broker_client import AsyncBrokerClient
from servefleet.testing import RayCluster, RedisProcess


class BrokerService:
    """A started broker (core + gRPC server) over one Redis, and a client of it."""

    def __init__(self, redis_address: str) -> None:
        self.redis_address = redis_address
        self.core = BrokerCore(RedisStreamQueue(redis_address))
        self.server: GrpcServer = broker_server(self.core, "127.0.0.1:0")
        self.client: AsyncBrokerClient | None = None

    async def start(self) -> BrokerService:
        await self.server.start()
        self.client = AsyncBrokerClient(self.server.address)
        return self

    async def stop(self) -> None:
        assert self.client is not None
        await self.client.close()
        await self.server.stop(0)
        await self.core.close()


@pytest.fixture
async def broker(redis_server: RedisProcess) -> AsyncIterator[BrokerService]:
    service = await BrokerService(redis_server.address).start()
    yield service
    await service.stop()


@pytest.fixture(scope="session")
def ray_connected(ray_cluster: RayCluster) -> Iterator[None]:
    """This process as a driver of the session's Ray cluster (once per session)."""
    if not ray.is_initialized():
        ray.init(address=ray_cluster.address)
    yield
