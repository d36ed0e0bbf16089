"""Real discovery and endpoint processes for discovery and SDK integration tests."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from servefleet.common import health
from servefleet.common.auth import TOKEN_ENV
from servefleet.testing import DiscoveryProcess, EtcdProcess, ManagedProcess

SERVER = Path(__file__).with_name("endpoint_server.py")
#: Lease TTL of test endpoints: short, so "gone within TTL + 1 s" is quick to observe.
TTL_S = 2


class EndpointProcess(ManagedProcess):
    """``endpoint_server.py``: a KServe v2 server that registers itself with discovery."""

    name = "endpoint"

    def __init__(
        self,
        discovery: DiscoveryProcess,
        app: str,
        endpoint_id: str,
        *,
        delay_ms: float = 0.0,
        zone: str = "",
    ) -> None:
        super().__init__()
        self.discovery, self.app, self.endpoint_id = discovery.address, app, endpoint_id
        self.token = discovery.token
        self.delay_ms, self.zone = delay_ms, zone

    def env(self) -> dict[str, str]:
        return {**super().env(), TOKEN_ENV: self.token}

    def argv(self) -> list[str]:
        return [
            sys.executable,
            str(SERVER),
            "--discovery",
            self.discovery,
            "--app",
            self.app,
            "--id",
            self.endpoint_id,
            "--listen",
            self.address,
            "--ttl",
            str(TTL_S),
            "--delay-ms",
            str(self.delay_ms),
            "--zone",
            self.zone,
        ]

    def healthy(self) -> bool:
        return health.grpc_health(self.address)[0]


@pytest.fixture
def discovery(etcd: EtcdProcess) -> Iterator[DiscoveryProcess]:
    proc = DiscoveryProcess(etcd.address).start()
    yield proc
    proc.cleanup()


@pytest.fixture
def endpoints() -> Iterator[list[EndpointProcess]]:
    """Collects the endpoint processes a test starts and cleans them up afterwards."""
    started: list[EndpointProcess] = []
    yield started
    for proc in started:
        proc.resume()
        proc.cleanup()
