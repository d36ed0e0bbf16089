"""A real discovery process for tests and benchmarks (same port across restarts)."""

from __future__ import annotations

from pathlib import Path

from servefleet.testing import ServiceProcess


class DiscoveryProcess(ServiceProcess):
    """``python -m servefleet.discovery`` against ``etcd`` (host:port) on a fixed free port."""

    def __init__(self, etcd: str, data_dir: Path | None = None) -> None:
        super().__init__("discovery", "--etcd", etcd, data_dir=data_dir)
        self.etcd = etcd
