"""Session fixtures that own real etcd, Redis and Ray processes on free loopback ports."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Iterator

# Tests assert on whole traces they start themselves: record every trace started here (the
# default samples 1 % of new traces). Set before servefleet reads its settings; Ray workers of
# the session's cluster inherit it.
os.environ.setdefault("SERVEFLEET_TRACE_SAMPLE_RATIO", "1")

import pytest

from servefleet.testing import (
    Credentials,
    EtcdCluster,
    EtcdProcess,
    LocalRedisCluster,
    RayCluster,
    RedisProcess,
)


@pytest.fixture(scope="session")
def etcd() -> Iterator[EtcdProcess]:
    proc = EtcdProcess().start()
    yield proc
    proc.cleanup()


@pytest.fixture(scope="session")
def etcd_cluster() -> Iterator[EtcdCluster]:
    """A real 3-member etcd cluster; a test that kills a member starts it again before it ends."""
    cluster = EtcdCluster(3).start()
    yield cluster
    cluster.cleanup()


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisProcess]:
    proc = RedisProcess().start()
    yield proc
    proc.cleanup()


@pytest.fixture(scope="session")
def redis_cluster() -> Iterator[LocalRedisCluster]:
    """A 3-primary Redis Cluster (no replicas), for the tests that run on one Redis and on a cluster."""
    cluster = LocalRedisCluster(primaries=3).start()
    yield cluster
    cluster.cleanup()


@pytest.fixture(scope="session")
def ray_cluster() -> Iterator[RayCluster]:
    """One small Ray cluster shared by the session; tests connect with ray.init(address=...)."""
    cluster = RayCluster(num_cpus=2).start()
    yield cluster
    cluster.cleanup()


@pytest.fixture(scope="session")
async def credentials(etcd: EtcdProcess) -> AsyncIterator[Credentials]:
    """Tokens in the session etcd's keeper records: every service started on it accepts them."""
    found = Credentials(etcd.address)
    yield found
    await found.close()


@pytest.fixture(scope="session")
async def admin_token(credentials: Credentials) -> str:
    return await credentials.admin()
