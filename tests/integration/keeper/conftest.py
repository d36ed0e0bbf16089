"""Keeper fixtures: an in-process keeper (real etcd, real gRPC, built as the entry point builds it)
on its own etcd prefix per test, and keepers and agents as child processes where a test must kill
them (``testing.ServiceProcess``)."""

from __future__ import annotations

import os
import sys
import tempfile
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import pytest

from servefleet.api import keeper_pb2_grpc
from servefleet.common.config import grpc_options
from servefleet.keeper.core import Keeper
from servefleet.keeper.service import build_keeper
from servefleet.keeper.store import KeeperStore
from servefleet.testing import EtcdProcess, ServiceProcess


def bearer(token: str) -> list[tuple[str, str]]:
    return [("authorization", f"Bearer {token}")]


@dataclass
class KeeperClient:
    """A Keeper stub that sends one token on every call."""

    channel: grpc.aio.Channel
    token: str

    @property
    def stub(self) -> keeper_pb2_grpc.KeeperStub:
        return keeper_pb2_grpc.KeeperStub(self.channel)

    def md(self) -> list[tuple[str, str]]:
        return bearer(self.token)


@dataclass
class InProcessKeeper:
    address: str
    store: KeeperStore
    keeper: Keeper
    admin_token: str
    prefix: str
    channels: list[grpc.aio.Channel] = field(default_factory=list)

    def client(self, token: str | None = None) -> KeeperClient:
        channel = grpc.aio.insecure_channel(self.address, options=grpc_options())
        self.channels.append(channel)
        return KeeperClient(channel, self.admin_token if token is None else token)


@pytest.fixture
async def keeper(etcd: EtcdProcess) -> AsyncIterator[InProcessKeeper]:
    """A leading keeper on a fresh etcd prefix, reconciling every 0.2 s."""
    prefix = f"/test-{uuid.uuid4().hex[:8]}"
    store = KeeperStore.connect(etcd.address, prefix)
    service = await build_keeper(
        store, "127.0.0.1:0", leader_ttl_s=2, reconcile_interval_s=0.2, agent_timeout_s=30
    )
    await service.server.start()
    running = InProcessKeeper(service.server.address, store, service.keeper, service.admin_token, prefix)
    yield running
    for channel in running.channels:
        await channel.close()
    await service.server.stop(0)
    await service.close()
    await store.client.delete_prefix(f"{prefix}/".encode())
    await store.close()


@dataclass
class Procs:
    """Keepers and agents a test starts as processes; all stopped at teardown."""

    etcd: EtcdProcess
    prefix: str = field(default_factory=lambda: f"/test-{uuid.uuid4().hex[:8]}")
    workdir: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="sf-keeper-")))
    started: list[ServiceProcess] = field(default_factory=list)

    @property
    def token_file(self) -> Path:
        return self.workdir / "admin.token"

    def env(self) -> dict[str, str]:
        return {
            **os.environ,
            "SERVEFLEET_ETCD_PREFIX": self.prefix,
            "SERVEFLEET_KEEPER_LEADER_TTL_S": "2",
            "SERVEFLEET_KEEPER_RECONCILE_INTERVAL_S": "0.3",
            "SERVEFLEET_KEEPER_HEARTBEAT_INTERVAL_S": "1",
            "SERVEFLEET_KEEPER_CLUSTER_FAILOVER_AFTER_S": "10",
            "SERVEFLEET_KEEPER_ALLOWED_ROOTS": str(Path(__file__).resolve().parents[3]),
            "SERVEFLEET_LOG_FORMAT": "text",
            "PYTHONPATH": os.pathsep.join(sys.path),
        }

    def service(self, module: str, *flags: str, name: str, port: int | None = None) -> ServiceProcess:
        """``python -m servefleet.<module>`` with this test's environment, stopped at teardown."""
        child = ServiceProcess(
            module, *flags, data_dir=self.workdir, port=port, env=self.env(), name=name, start_timeout=120
        )
        self.started.append(child)
        child.start()
        return child

    def keeper(self, port: int | None = None, name: str = "keeper") -> tuple[ServiceProcess, str]:
        flags = ("--etcd", self.etcd.address, "--admin-token-file", str(self.token_file))
        child = self.service("keeper", *flags, name=name, port=port)
        return child, child.address

    def agent(
        self, *, ray: str, keeper: str, discovery: str, cluster: str, labels: str = ""
    ) -> tuple[ServiceProcess, str]:
        flags = ["--ray", ray, "--keeper", keeper, "--discovery", discovery, "--cluster", cluster]
        flags += ["--etcd", self.etcd.address, "--token-file", str(self.token_file)]
        if labels:
            flags += ["--labels", labels]
        child = self.service("services.agent", *flags, name=f"agent-{cluster}")
        return child, child.address

    def admin_token(self) -> str:
        return self.token_file.read_text().strip()

    def stop(self) -> None:
        for child in reversed(self.started):
            child.stop()


@pytest.fixture
def procs(etcd: EtcdProcess) -> Iterator[Procs]:
    found = Procs(etcd)
    yield found
    found.stop()
