"""A real discovery process for tests and benchmarks (same port across restarts)."""

from __future__ import annotations

import sys
from pathlib import Path

from servefleet.common import health
from servefleet.testing import ManagedProcess


class DiscoveryProcess(ManagedProcess):
    """``python -m servefleet.discovery`` against ``etcd`` (host:port) on a fixed free port."""

    name = "discovery"

    def __init__(self, etcd: str, data_dir: Path | None = None) -> None:
        super().__init__(data_dir)
        self.etcd = etcd

    def argv(self) -> list[str]:
        return [sys.executable, "-m", "servefleet.discovery", "--listen", self.address, "--etcd", self.etcd]

    def healthy(self) -> bool:
        return health.grpc_health(self.address)[0]
