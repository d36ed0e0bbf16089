"""Each service's gRPC health follows what it cannot work without: the keeper reads NOT_SERVING
while etcd is down, the broker while Redis is down, and both SERVING again once it is back."""

from __future__ import annotations

import pytest

from servefleet.common import health
from servefleet.common.net import wait_for
from servefleet.testing import EtcdProcess, ManagedProcess, RedisProcess, ServiceProcess


@pytest.mark.parametrize(
    ("module", "flag", "dependency"),
    [("keeper", "--etcd", EtcdProcess), ("broker", "--redis", RedisProcess)],
)
def test_health_reads_not_serving_while_the_dependency_is_down(
    module: str, flag: str, dependency: type[ManagedProcess], etcd: EtcdProcess
) -> None:
    backend = dependency().start()
    tokens = ["--etcd", etcd.address] if module == "broker" else []  # the broker checks tokens there
    service = ServiceProcess(module, flag, backend.address, *tokens).start()
    try:
        assert health.grpc_health(service.address) == (True, "SERVING")
        backend.kill()
        wait_for(
            lambda: health.grpc_health(service.address) == (False, "NOT_SERVING"),
            timeout=20,
            what=f"{module} NOT_SERVING without {backend.name}",
        )
        backend.start()  # same data dir: a restart, not a new backend
        wait_for(
            lambda: health.grpc_health(service.address) == (True, "SERVING"),
            timeout=30,
            what=f"{module} SERVING with {backend.name} back",
        )
    finally:
        service.cleanup()
        backend.cleanup()
