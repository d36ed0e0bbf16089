"""Fixtures of sharded apps: a second Ray node joined to the session's head (so shards spread over
two nodes), one 1M-row CTR table per session, and helpers to deploy and load a sharded app.

The second node is servefleet.testing's ``RayWorkerNode`` (``ray start --address=<head>``, every
port its own, loopback only) with a custom resource ``sharded_second_node``.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import ray
from opentelemetry import context as otel_context
from opentelemetry import trace

from servefleet.api import agent_pb2, common_pb2
from servefleet.common.appid import AppId
from servefleet.common.errors import ServefleetError
from servefleet.common.net import async_wait_for
from servefleet.direct import INPUT_NAME, OUTPUT_NAME, ctr
from servefleet.sdk import AsyncClient
from servefleet.services.agent import masters
from servefleet.spec import load_spec
from servefleet.testing import DiscoveryProcess, RayCluster, RayWorkerNode, endpoint_token

# The data plane's fixtures (a discovery process, this process as a Ray driver), shared, not copied.
from tests.integration.dataplane.conftest import discovery_server, ray_driver

__all__ = ["discovery_server", "ray_driver"]

CLUSTER = "sharded-cluster"
ROWS, FIELDS, DIM = 1 << 20, 16, 16
SECOND_NODE_RESOURCE = "sharded_second_node"


@pytest.fixture(scope="session")
def two_nodes(ray_driver: str, ray_cluster: RayCluster) -> Iterator[list[str]]:
    """The session's Ray cluster with a second node; yields both node ids once both are alive."""
    node = RayWorkerNode(ray_cluster, resources={SECOND_NODE_RESOURCE: 100}).start()
    deadline = time.monotonic() + 60
    while len([n for n in ray.nodes() if n["Alive"]]) < 2 and time.monotonic() < deadline:
        time.sleep(0.2)
    alive = [n["NodeID"] for n in ray.nodes() if n["Alive"]]
    assert len(alive) >= 2, "the second Ray node did not join"
    yield alive
    node.cleanup()


@pytest.fixture(scope="session")
def table_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 1M-row CTR table (68 MiB): what the app exports; random weights (training is not the point)."""
    model = ctr.random_model(num_rows=ROWS, num_fields=FIELDS, dim=DIM, scale=0.3, seed=11)
    return ctr.export_model(model, tmp_path_factory.mktemp("sharded") / "ctr.bin")


@pytest.fixture(scope="session")
def reference(table_path: Path) -> ctr.FactorizationMachine:
    return ctr.load_model(table_path)


def sharded_spec(
    name: str, table: Path, *, shards: int, replicas: int, memory: str = "24Mi", **sharding: Any
) -> common_pb2.ApplicationSpec:
    return load_spec(
        {
            "name": name,
            "namespace": "recs",
            "kind": "sharded",
            "sharding": {"shards": shards, "replicas_per_shard": replicas, "table": str(table), **sharding},
            "inputs": [{"name": INPUT_NAME, "datatype": "INT64", "shape": [-1, FIELDS]}],
            "outputs": [{"name": OUTPUT_NAME, "datatype": "FP32", "shape": [-1]}],
            "resources": {"num_cpus": 0.1, "memory": memory},
            "max_concurrency": 32,
            "proxies": 1,  # one router: the tests read (and tune) its counters
        }
    )


async def apply(spec: common_pb2.ApplicationSpec, discovery: DiscoveryProcess, *, revision: int = 1) -> None:
    """As the cluster agent does: a new master gets the app's endpoint token (its routers register)."""
    token = await endpoint_token(discovery.etcd, AppId.parse(spec).key)
    await masters.apply(
        spec, spec.replicas.initial, revision, cluster=CLUSTER, discovery=discovery.address, credential=token
    )


async def settled(spec: common_pb2.ApplicationSpec, *, timeout: float = 240) -> agent_pb2.MasterStatus:
    """Wait until every shard of the spec's layout has all replicas routed and nothing else lives."""
    layout = f"{spec.sharding.partitioning}-{spec.sharding.shards}"

    async def done() -> agent_pb2.MasterStatus | None:
        status = await masters.status(AppId.parse(spec).ref())
        ok = (
            status is not None
            and status.ready_replicas == spec.replicas.initial
            and not status.updating
            and len(status.proxy_addresses) == spec.proxies
            and len(status.shards) == spec.sharding.shards * spec.replicas.initial
            and all(s.layout == layout and s.resident_bytes for s in status.shards)
        )
        return status if ok else None

    status = await async_wait_for(done, timeout=timeout, interval=0.3, what=f"{spec.name} at {layout}")
    assert isinstance(status, agent_pb2.MasterStatus)
    return status


#: An unsampled caller trace (W3C flags 00).
_UNSAMPLED = trace.set_span_in_context(
    trace.NonRecordingSpan(
        trace.SpanContext(0xAB << 64 | 0xCD, 0xEF, is_remote=True, trace_flags=trace.TraceFlags(0))
    )
)


class UnsampledClient(AsyncClient):
    """The SDK, each call under an unsampled caller trace. A request its caller samples needs a
    span, which only the router's Python path records, so (this session samples every new trace)
    without it the C++ fast path (SERVEFLEET_SHARD_ROUTER_CPP=1) would relay every request; the
    Python path serves these as any other."""

    async def infer(self, *args: Any, **kwargs: Any) -> dict[str, np.ndarray]:
        token = otel_context.attach(_UNSAMPLED)
        try:
            return await super().infer(*args, **kwargs)
        finally:
            otel_context.detach(token)


@pytest.fixture
async def client(discovery_server: Any) -> AsyncIterator[AsyncClient]:
    async with UnsampledClient(
        discovery_server.address, timeout=30.0, token=discovery_server.token
    ) as client:
        yield client


def router_of(spec: common_pb2.ApplicationSpec) -> Any:
    from servefleet.services.actors import RAY_NAMESPACE, proxy_prefix

    return ray.get_actor(f"{proxy_prefix(AppId.parse(spec).ref())}0", namespace=RAY_NAMESPACE)


@dataclass
class CheckedLoad:
    """Closed-loop load through the SDK from ``concurrency`` callers; every answer is compared with
    the unsharded reference (within ``rtol``: the C++ direct ingress sums in another order), every
    latency kept (seconds)."""

    client: AsyncClient
    app: str
    reference: ctr.FactorizationMachine
    concurrency: int = 4
    batch: int = 64
    rtol: float = 0.0
    ok: int = 0
    wrong: int = 0
    failures: Counter[str] = field(default_factory=Counter)
    latencies: list[float] = field(default_factory=list)
    failed_at: list[float] = field(default_factory=list)  # when each failed call began (monotonic)
    _stop: asyncio.Event = field(default_factory=asyncio.Event)
    _tasks: list[asyncio.Task[None]] = field(default_factory=list)

    async def __aenter__(self) -> CheckedLoad:
        self._tasks = [asyncio.create_task(self._caller(i)) for i in range(self.concurrency)]
        return self

    async def __aexit__(self, *exc: object) -> None:
        self._stop.set()
        await asyncio.wait_for(asyncio.gather(*self._tasks), 60)

    @property
    def done(self) -> int:
        return self.ok + self.wrong + sum(self.failures.values())

    async def wait_for_requests(self, count: int, timeout: float = 180) -> None:
        start = self.done

        async def enough() -> bool:
            return self.done - start >= count

        await async_wait_for(enough, timeout=timeout, interval=0.05, what=f"{count} requests")

    def p99_since(self, start: int) -> float:
        return float(np.percentile(self.latencies[start:], 99))

    async def _caller(self, seed: int) -> None:
        rng = np.random.default_rng(seed)
        shape = (self.batch, self.reference.num_fields)
        batches = [rng.integers(0, self.reference.num_rows, size=shape, dtype=np.int64) for _ in range(8)]
        expected = [self.reference.score(ids) for ids in batches]
        i = 0
        while not self._stop.is_set():
            began = time.monotonic()
            try:
                out = await self.client.infer(self.app, {INPUT_NAME: batches[i % 8]})
                same = np.allclose(out[OUTPUT_NAME], expected[i % 8], rtol=self.rtol, atol=self.rtol / 10)
                self.ok += same
                self.wrong += not same
            except ServefleetError as exc:
                self.failures[f"{type(exc).__name__}: {exc}"] += 1
                self.failed_at.append(began)
            self.latencies.append(time.monotonic() - began)
            i += 1
