"""Keeper fixtures: an in-process keeper (real etcd, real gRPC) on its own etcd prefix per test,
and helpers to start keepers and agents as child processes where a test must kill them."""

from __future__ import annotations

import asyncio
import contextlib
import os
import subprocess
import sys
import tempfile
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import pytest

from servefleet.api import keeper_pb2, keeper_pb2_grpc
from servefleet.common import health
from servefleet.common.config import grpc_options
from servefleet.common.net import free_port, wait_for
from servefleet.common.server import GrpcServer
from servefleet.keeper.auth import Authenticator
from servefleet.keeper.core import Keeper
from servefleet.keeper.election import Election
from servefleet.keeper.reconciler import Agents, Reconciler
from servefleet.keeper.servicer import KeeperServicer, register
from servefleet.keeper.store import KeeperStore
from servefleet.testing import EtcdProcess


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
    core = Keeper(store)
    token = await core.bootstrap_admin()
    server = GrpcServer(
        "keeper",
        "127.0.0.1:0",
        [register(KeeperServicer(core), Authenticator(store))],
        [keeper_pb2.DESCRIPTOR.services_by_name["Keeper"].full_name],
    )
    await server.start()
    agents = Agents(timeout_s=30)
    election = Election(store, ttl_s=2)
    leading = asyncio.create_task(election.run(Reconciler(store, agents, interval_s=0.2).run))
    running = InProcessKeeper(server.address, store, core, token, prefix)
    yield running
    leading.cancel()
    with contextlib.suppress(BaseException):
        await leading
    for channel in running.channels:
        await channel.close()
    await server.stop(0)
    await agents.close()
    await store.client.delete_prefix(f"{prefix}/".encode())
    await store.close()


@dataclass
class ChildProcess:
    """A service started with ``python -m ...`` in its own process group (SIGKILL-able)."""

    argv: list[str]
    env: dict[str, str]
    log: Path
    proc: subprocess.Popen[bytes] | None = None

    def start(self) -> ChildProcess:
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen(
                self.argv, stdout=out, stderr=subprocess.STDOUT, env=self.env, start_new_session=True
            )
        return self

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, 9)
            self.proc.wait(timeout=10)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, 15)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.kill()

    def tail(self) -> str:
        return self.log.read_text(errors="replace")[-3000:] if self.log.exists() else ""


@dataclass
class Procs:
    """Keepers and agents a test starts as processes; all stopped at teardown."""

    etcd: EtcdProcess
    prefix: str = field(default_factory=lambda: f"/test-{uuid.uuid4().hex[:8]}")
    workdir: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="sf-keeper-")))
    started: list[ChildProcess] = field(default_factory=list)

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

    def keeper(self, port: int | None = None, name: str = "keeper") -> tuple[ChildProcess, str]:
        address = f"127.0.0.1:{port or free_port()}"
        argv = [sys.executable, "-m", "servefleet.keeper", "--listen", address, "--etcd", self.etcd.address]
        argv += ["--admin-token-file", str(self.token_file)]
        child = ChildProcess(argv, self.env(), self.workdir / f"{name}.log").start()
        self.started.append(child)
        wait_for(lambda: health.grpc_health(address)[0], timeout=60, what=f"{name} on {address}")
        return child, address

    def agent(
        self, *, ray: str, keeper: str, discovery: str, cluster: str, labels: str = ""
    ) -> tuple[ChildProcess, str]:
        address = f"127.0.0.1:{free_port()}"
        argv = [sys.executable, "-m", "servefleet.services.agent", "--listen", address, "--ray", ray]
        argv += ["--keeper", keeper, "--discovery", discovery, "--cluster", cluster]
        argv += ["--admin-token-file", str(self.token_file)]
        if labels:
            argv += ["--labels", labels]
        child = ChildProcess(argv, self.env(), self.workdir / f"agent-{cluster}.log").start()
        self.started.append(child)
        wait_for(lambda: health.grpc_health(address)[0], timeout=120, what=f"agent {cluster} on {address}")
        return child, address

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
