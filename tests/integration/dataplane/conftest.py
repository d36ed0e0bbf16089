"""Data-plane fixtures: a Ray driver on the session's Ray cluster, a real discovery process, and
helpers that deploy an example app through ``services.agent.masters`` and drive load at its proxy."""

from __future__ import annotations

import asyncio
import time
from collections import Counter, defaultdict
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import ray
import tritonclient.grpc.aio as aioclient
from tritonclient.grpc import InferInput
from tritonclient.utils import InferenceServerException

from servefleet.api import agent_pb2, common_pb2
from servefleet.common.appid import AppId
from servefleet.common.auth import ENDPOINT
from servefleet.common.net import async_wait_for
from servefleet.services.agent import masters
from servefleet.spec import load_spec
from servefleet.testing import Credentials, DiscoveryProcess, EtcdProcess, RayCluster

EXAMPLES = Path(__file__).parents[3] / "examples"
CLUSTER = "test-cluster"


@pytest.fixture(scope="session")
def discovery_server(etcd: EtcdProcess) -> Iterator[DiscoveryProcess]:
    proc = DiscoveryProcess(etcd.address).start()
    yield proc
    proc.cleanup()


@pytest.fixture(scope="session")
def ray_driver(ray_cluster: RayCluster) -> Iterator[str]:
    """This process as a Ray driver (what the cluster agent is in production)."""
    if not ray.is_initialized():
        ray.init(address=ray_cluster.address, namespace="dataplane-tests", log_to_driver=False)
    yield ray_cluster.address


def example_spec(example: str, **overrides: Any) -> common_pb2.ApplicationSpec:
    spec = load_spec(EXAMPLES / f"{example}.yaml")
    for key, value in overrides.items():
        if key == "init_args":
            spec.init_args.update(value)
        else:
            setattr(spec, key, value)
    return spec


async def deploy(
    spec: common_pb2.ApplicationSpec,
    replicas: int,
    discovery: str,
    *,
    revision: int = 1,
    redis: str = "",
    broker: str = "",
    credential: str = "",
) -> agent_pb2.MasterStatus:
    """Apply (as the cluster agent does, with the app's endpoint token as ``credential``) and wait
    until ``replicas`` replicas of the spec's version serve behind a proxy."""
    await masters.apply(
        spec,
        replicas,
        revision,
        cluster=CLUSTER,
        discovery=discovery,
        redis=redis,
        broker=broker,
        credential=credential,
    )

    async def settled() -> agent_pb2.MasterStatus | None:
        status = await masters.status(AppId.parse(spec).ref())
        done = (
            status is not None
            and status.ready_replicas == replicas
            and not status.updating
            and status.version == spec.version
            and len(status.proxy_addresses) == spec.proxies
        )
        return status if done else None

    status = await async_wait_for(settled, timeout=180, interval=0.2, what=f"{spec.name} deployed")
    assert isinstance(status, agent_pb2.MasterStatus)
    return status


@pytest.fixture
async def deployed(
    ray_driver: str, discovery_server: DiscoveryProcess, credentials: Credentials
) -> AsyncIterator[Callable[..., Any]]:
    """``await deployed(spec, replicas)`` -> status; every app deployed is removed afterwards. Its
    proxies and replicas register in discovery with the app's own endpoint token."""
    apps: list[common_pb2.AppRef] = []

    async def _deploy(
        spec: common_pb2.ApplicationSpec, replicas: int = 1, *, redis: str = "", broker: str = ""
    ) -> agent_pb2.MasterStatus:
        app = AppId.parse(spec)
        apps.append(app.ref())
        token = await credentials.issue(ENDPOINT, app=app.key)
        return await deploy(
            spec, replicas, discovery_server.address, redis=redis, broker=broker, credential=token
        )

    yield _deploy
    for app in apps:
        await masters.remove(app)


def iris_input(batch: np.ndarray | None = None) -> InferInput:
    data = batch if batch is not None else np.array([[5.0, 3.4, 1.5, 0.2]], dtype=np.float32)
    tensor = InferInput("features", list(data.shape), "FP32")
    tensor.set_data_from_numpy(data)
    return tensor


def x_input(value: float = 1.0) -> InferInput:
    tensor = InferInput("x", [1], "FP32")
    tensor.set_data_from_numpy(np.array([value], dtype=np.float32))
    return tensor


@dataclass
class Load:
    """Steady closed-loop load from ``concurrency`` aio tritonclient callers until stopped."""

    address: str
    model: str
    make_inputs: Callable[[], list[InferInput]]
    concurrency: int = 8
    timeout_s: float = 30.0
    ok: int = 0
    failures: Counter[str] = field(default_factory=Counter)
    versions: Counter[str] = field(default_factory=Counter)
    #: Answers' versions by the phase that was current when the request was *sent* (set ``phase``
    #: to mark an event: a request sent before it may still be answered after it).
    phase: str = ""
    by_phase: dict[str, Counter[str]] = field(default_factory=lambda: defaultdict(Counter))
    slowest_s: float = 0.0
    _stop: asyncio.Event = field(default_factory=asyncio.Event)
    _tasks: list[asyncio.Task[None]] = field(default_factory=list)

    async def __aenter__(self) -> Load:
        self.client = aioclient.InferenceServerClient(self.address)
        self._tasks = [asyncio.create_task(self._caller()) for _ in range(self.concurrency)]
        return self

    async def __aexit__(self, *exc: object) -> None:
        self._stop.set()
        await asyncio.wait_for(asyncio.gather(*self._tasks), self.timeout_s + 10)
        await self.client.close()

    async def wait_for_requests(self, count: int) -> None:
        start = self.ok + sum(self.failures.values())

        async def enough() -> bool:
            return self.ok + sum(self.failures.values()) - start >= count

        await async_wait_for(enough, timeout=120, what=f"{count} requests")

    async def _caller(self) -> None:
        while not self._stop.is_set():
            began, phase = time.monotonic(), self.phase
            try:
                result = await self.client.infer(
                    self.model, self.make_inputs(), client_timeout=self.timeout_s
                )
                self.ok += 1
                self.versions[result.get_response().model_version] += 1
                self.by_phase[phase][result.get_response().model_version] += 1
            except InferenceServerException as exc:
                self.failures[str(exc.status())] += 1
            self.slowest_s = max(self.slowest_s, time.monotonic() - began)


def status_of(exc: InferenceServerException) -> str:
    """tritonclient's status string for a gRPC code (``StatusCode.NOT_FOUND``)."""
    return str(exc.status())
