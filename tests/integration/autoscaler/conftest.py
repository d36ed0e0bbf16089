"""One whole local stack (`servefleet up`: etcd, Redis, Ray and every service, autoscaler
included) for the module, apps submitted through its keeper, and closed-loop load at a proxy."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
import tritonclient.grpc.aio as aioclient
from prometheus_client.parser import text_string_to_metric_families
from tritonclient.grpc import InferInput

from servefleet import stack
from servefleet.api import (
    autoscaler_pb2,
    autoscaler_pb2_grpc,
    discovery_pb2,
    discovery_pb2_grpc,
    keeper_pb2,
    keeper_pb2_grpc,
)
from servefleet.common.channels import aio_channel
from servefleet.common.net import async_wait_for, wait_for
from servefleet.spec import load_spec
from tests.integration.test_stack import free_base_port

ROOT = Path(__file__).resolve().parents[3]
EXAMPLE = ROOT / "examples" / "autoscaled.yaml"
#: Faster loops than the defaults, so the tests' delays are seconds, not minutes.
FAST = {
    "SERVEFLEET_AUTOSCALER_INTERVAL_S": "0.5",
    "SERVEFLEET_KEEPER_RECONCILE_INTERVAL_S": "0.3",
    "SERVEFLEET_KEEPER_STEADY_CHECK_S": "1",
    "SERVEFLEET_LOG_FORMAT": "text",
}


def scrape(address: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of one /metrics page, parsed by prometheus_client's own parser."""
    import urllib.request

    with urllib.request.urlopen(f"http://{address}/metrics", timeout=5) as response:
        text = response.read().decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def total(samples: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str, **labels: str) -> float:
    """Sum of ``name`` over the label sets that match ``labels``."""
    return sum(
        v
        for (n, ls), v in samples.items()
        if n == name and all(dict(ls).get(k) == x for k, x in labels.items())
    )


@dataclass
class Stack:
    state: Path
    env: dict[str, str]
    addresses: dict[str, str] = field(default_factory=dict)

    def cli(self, *args: str, token: str | None = None) -> subprocess.CompletedProcess[str]:
        env = {**self.env, **({"SERVEFLEET_TOKEN": token} if token else {})}
        return subprocess.run(
            [sys.executable, "-m", "servefleet.cli", *args, "--state-dir", str(self.state)],
            capture_output=True,
            text=True,
            timeout=180,
            env=env,
            cwd=ROOT,
        )

    @property
    def admin(self) -> str:
        return (self.state / "admin.token").read_text().strip()

    def keeper(self) -> keeper_pb2_grpc.KeeperStub:
        return keeper_pb2_grpc.KeeperStub(grpc.aio.insecure_channel(self.addresses["keeper"]))

    def md(self, token: str | None = None) -> list[tuple[str, str]]:
        return [("authorization", f"Bearer {token or self.admin}")]

    async def submit(
        self, overrides: dict[str, Any], token: str | None = None
    ) -> keeper_pb2.ApplicationStatus:
        """The autoscaled example with ``overrides`` (None: drop the example's field), submitted,
        once RUNNING."""
        import yaml

        merged = {**yaml.safe_load(EXAMPLE.read_text()), **overrides}
        data = {k: v for k, v in merged.items() if v is not None}
        spec = load_spec(data)
        await self.keeper().SubmitApplication(
            keeper_pb2.SubmitApplicationRequest(spec=spec), metadata=self.md(token), timeout=10
        )

        async def running() -> keeper_pb2.ApplicationStatus | None:
            got = await self.status(spec.name, spec.namespace, token)
            return got if got.state == keeper_pb2.AppState.RUNNING else None

        return await async_wait_for(running, timeout=120, interval=0.3, what=f"{spec.name} RUNNING")  # type: ignore[return-value]

    async def status(
        self, name: str, namespace: str = "default", token: str | None = None
    ) -> keeper_pb2.ApplicationStatus:
        ref = keeper_pb2.GetApplicationRequest(app={"namespace": namespace, "name": name})
        return await self.keeper().GetApplication(ref, metadata=self.md(token), timeout=10)

    async def delete(self, name: str, namespace: str = "default") -> None:
        ref = keeper_pb2.DeleteApplicationRequest(app={"namespace": namespace, "name": name})
        await self.keeper().DeleteApplication(ref, metadata=self.md(), timeout=10)

    async def autoscaler(self, name: str, namespace: str = "default") -> autoscaler_pb2.AppAutoscalerState:
        stub = autoscaler_pb2_grpc.AutoscalerStub(grpc.aio.insecure_channel(self.addresses["autoscaler"]))
        got = await stub.GetState(
            autoscaler_pb2.GetAutoscalerStateRequest(app={"namespace": namespace, "name": name}), timeout=5
        )
        return got.apps[0] if got.apps else autoscaler_pb2.AppAutoscalerState()

    async def endpoints(
        self, name: str, kind: str, namespace: str = "default"
    ) -> list[discovery_pb2.Endpoint]:
        stub = discovery_pb2_grpc.DiscoveryStub(aio_channel(self.addresses["discovery"], token=self.admin))
        found = await stub.Resolve(
            discovery_pb2.ResolveRequest(app={"namespace": namespace, "name": name}, kind=kind), timeout=5
        )
        return list(found.endpoints)

    async def proxy(self, name: str, namespace: str = "default") -> str:
        async def one() -> str:
            found = await self.endpoints(name, "proxy", namespace)
            return found[0].address if found else ""

        return await async_wait_for(one, timeout=60, what=f"a proxy of {name}")  # type: ignore[return-value]

    def scale_log(self) -> str:
        """The autoscaler's scale decisions, for failure messages."""
        log = (self.state / "logs" / "autoscaler.log").read_text(errors="replace")
        return "\n".join(line[-300:] for line in log.splitlines() if " scaled " in line or "refused" in line)

    def kill_autoscaler(self) -> None:
        """SIGKILL the autoscaler's process group and wait until the stack's supervisor has
        started it again and it answers health."""
        from servefleet.common import health

        part = next(p for p in stack.load(self.state) if p.name == "autoscaler")
        os.killpg(part.pid, 9)

        def restarted() -> bool:
            now = next(p for p in stack.load(self.state) if p.name == "autoscaler")
            return now.pid != part.pid and stack.pid_alive(now.pid) and health.grpc_health(now.address)[0]

        wait_for(restarted, timeout=90, interval=0.3, what="the supervisor to restart the autoscaler")


@pytest.fixture(scope="module")
def local_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    state = tmp_path_factory.mktemp("stack") / "state"
    env = {**os.environ, **FAST, "PYTHONPATH": os.pathsep.join(sys.path)}
    found = Stack(state, env)
    up = found.cli("up", "--detach", "--base-port", str(free_base_port()))
    try:
        assert up.returncode == 0, up.stderr
        found.addresses = stack.addresses(state)
        yield found
    finally:
        found.cli("down")


class Load:
    """Closed-loop load: ``concurrency`` callers, each sending its next request when the last is
    answered (refusals back off 20 ms); counts answers and errors."""

    def __init__(self, address: str, model: str, concurrency: int) -> None:
        self.client = aioclient.InferenceServerClient(address)
        self.model = model
        self.concurrency = concurrency
        self.ok = self.errors = 0
        self._tasks: list[asyncio.Task[None]] = []
        x = InferInput("x", [1], "FP32")
        x.set_data_from_numpy(np.ones(1, np.float32))
        self._inputs = [x]

    async def _caller(self) -> None:
        while True:
            try:
                await self.client.infer(self.model, self._inputs, client_timeout=10)
                self.ok += 1
            except Exception:
                self.errors += 1
                await asyncio.sleep(0.02)

    def resize(self, concurrency: int) -> None:
        while len(self._tasks) < concurrency:
            self._tasks.append(asyncio.create_task(self._caller()))
        while len(self._tasks) > concurrency:
            self._tasks.pop().cancel()

    async def __aenter__(self) -> Load:
        self.resize(self.concurrency)
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.resize(0)
        await asyncio.sleep(0)
        await self.client.close()


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:6]}"


async def replicas_reach(
    stack_: Stack, name: str, check: Any, timeout: float, namespace: str = "default"
) -> keeper_pb2.ApplicationStatus:
    async def reached() -> keeper_pb2.ApplicationStatus | None:
        got = await stack_.status(name, namespace)
        return got if check(got.replicas) else None

    return await async_wait_for(reached, timeout=timeout, interval=0.25, what=f"{name} replicas")  # type: ignore[return-value]


def since(start: float) -> float:
    return time.monotonic() - start


def actors(stack_: Stack) -> list[dict[str, Any]]:
    path = stack_.state / "prometheus" / "actors.json"
    return json.loads(path.read_text()) if path.exists() else []
