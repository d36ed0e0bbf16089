"""The fixtures themselves: real processes, healthy, and a killed one really gone."""

from __future__ import annotations

from servefleet.common import health
from servefleet.testing import EtcdProcess, RedisProcess


def test_etcd_and_redis_answer(etcd: EtcdProcess, redis_server: RedisProcess) -> None:
    assert health.etcd_health(etcd.address)[0]
    assert health.redis_health(redis_server.address)[0]


def test_killed_redis_restarts_on_same_data_dir() -> None:
    proc = RedisProcess().start()
    try:
        proc.kill()
        assert not health.redis_health(proc.address)[0]
        proc.start()
        assert health.redis_health(proc.address)[0]
    finally:
        proc.cleanup()
