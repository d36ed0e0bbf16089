"""The autoscaler's real backends: the keeper (apps and Scale), the parts' ``/metrics`` found in
discovery (load), the broker (backlog), etcd (history), and the Prometheus file-SD targets."""

from __future__ import annotations

import asyncio
import json
import math
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aetcd
import grpc
from prometheus_client.parser import text_string_to_metric_families

from servefleet.api import (
    broker_pb2,
    broker_pb2_grpc,
    common_pb2,
    discovery_pb2,
    discovery_pb2_grpc,
    keeper_pb2,
    keeper_pb2_grpc,
)
from servefleet.autoscaler.policy import Sample
from servefleet.common.appid import AppId
from servefleet.common.channels import aio_channel
from servefleet.common.config import settings
from servefleet.common.errors import from_rpc_error
from servefleet.common.metrics import METRICS_KIND, PART_LABEL
from servefleet.pipeline_spec import autoscaled, served_apps

#: Seconds one scrape or RPC of a tick may take.
TIMEOUT_S = 2.0


class KeeperApps:
    """Autoscaled apps and Scale, over the keeper's API with the autoscaler's token."""

    def __init__(self, keeper: str, token: Callable[[], str]) -> None:
        self.channel = aio_channel(keeper)  # TLS when configured; the token goes per call
        self.stub = keeper_pb2_grpc.KeeperStub(self.channel)
        self.token = token

    def _md(self) -> list[tuple[str, str]]:
        return [("authorization", f"Bearer {self.token()}")]

    async def all(self) -> list[keeper_pb2.ApplicationStatus]:
        found: list[keeper_pb2.ApplicationStatus] = []
        request = keeper_pb2.ListApplicationsRequest(page_size=1000)
        try:
            while True:
                page = await self.stub.ListApplications(request, metadata=self._md(), timeout=TIMEOUT_S)
                found += page.applications
                if not page.next_page_token:
                    return found
                request.page_token = page.next_page_token
        except grpc.aio.AioRpcError as exc:
            raise from_rpc_error(exc) from None

    async def autoscaled(self) -> list[keeper_pb2.ApplicationStatus]:
        running = (keeper_pb2.AppState.DELETING, keeper_pb2.AppState.DELETED)
        return [s for s in await self.all() if autoscaled(s.spec) and s.state not in running]

    async def scale(
        self, app: common_pb2.AppRef, replicas: int, reason: str, stage: str = ""
    ) -> keeper_pb2.ApplicationStatus:
        request = keeper_pb2.ScaleApplicationRequest(
            app=app, replicas=replicas, reason=reason, by_autoscaler=True, stage=stage
        )
        try:
            return await self.stub.ScaleApplication(request, metadata=self._md(), timeout=TIMEOUT_S * 5)
        except grpc.aio.AioRpcError as exc:
            raise from_rpc_error(exc) from None

    async def close(self) -> None:
        await self.channel.close()


def scrape(address: str, timeout: float = TIMEOUT_S) -> dict[str, float]:
    """``/metrics`` of one part as sample name -> value summed over label sets (blocking)."""
    with urllib.request.urlopen(f"http://{address}/metrics", timeout=timeout) as response:
        text = response.read().decode()
    values: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name.startswith("servefleet_") and "le" not in sample.labels:
                values[sample.name] = values.get(sample.name, 0.0) + sample.value
    return values


@dataclass
class _Seen:
    """The last scrape of one endpoint, for turning counters into rates."""

    t: float
    values: dict[str, float] = field(default_factory=dict)

    def rate(self, now: float, values: dict[str, float], name: str) -> float:
        dt = now - self.t
        if dt <= 0 or name not in values or name not in self.values:
            return 0.0
        return max(0.0, values[name] - self.values[name]) / dt

    def delta(self, values: dict[str, float], name: str) -> float:
        return max(0.0, values.get(name, 0.0) - self.values.get(name, 0.0))


class MetricsLoad:
    """Load samples from the parts' own metrics: replicas (running, queued, busy time), proxies
    (arrivals, refusals) and, for async apps, the broker's queue (backlog, drain rate)."""

    def __init__(self, discovery: str, broker: str = "", *, token: str = "") -> None:
        # Discovery and the broker check callers: ``token`` (role autoscaler or admin) sees every app.
        self._discovery = aio_channel(discovery, token=token)
        self.discovery = discovery_pb2_grpc.DiscoveryStub(self._discovery)
        self._broker = aio_channel(broker, token=token) if broker else None
        self.broker = broker_pb2_grpc.BrokerStub(self._broker) if self._broker is not None else None
        self._seen: dict[str, _Seen] = {}

    async def endpoints(self, app: common_pb2.AppRef) -> list[discovery_pb2.Endpoint]:
        try:
            found = await self.discovery.Resolve(
                discovery_pb2.ResolveRequest(app=app, kind=METRICS_KIND), timeout=TIMEOUT_S
            )
        except grpc.aio.AioRpcError as exc:
            raise from_rpc_error(exc) from None
        return list(found.endpoints)

    async def read(self, status: keeper_pb2.ApplicationStatus, now: float) -> Sample | None:
        endpoints = [e for e in await self.endpoints(status.app) if e.labels.get(PART_LABEL) != "master"]
        scraped = await asyncio.gather(
            *(asyncio.to_thread(scrape, e.address) for e in endpoints), return_exceptions=True
        )
        replicas = proxies = 0
        ongoing = replica_rate = proxy_rate = refused_rate = busy = served = 0.0
        proxied = False
        for endpoint, values in zip(endpoints, scraped, strict=True):
            if isinstance(values, BaseException):
                continue  # gone between the resolve and the scrape, or stuck: next tick
            seen = self._seen.get(endpoint.address)
            self._seen[endpoint.address] = _Seen(now, values)
            part = endpoint.labels.get(PART_LABEL, "")
            if part == "proxy":
                proxies += 1
                proxied = True
                if seen is not None:
                    proxy_rate += seen.rate(now, values, "servefleet_proxy_requests_total")
                    refused_rate += seen.rate(now, values, "servefleet_proxy_rejected_total")
                continue
            replicas += 1
            now_in = sum(values.get(n, 0.0) for n in _ONGOING)
            if seen is None:
                ongoing += now_in
                continue
            # Time-averaged over the interval (Little's law: in-replica seconds per second), or what
            # is in there now when more (requests still running count before they finish).
            averaged = sum(seen.rate(now, values, n) for n in _IN_REPLICA_SECONDS)
            ongoing += max(averaged, now_in)
            replica_rate += sum(seen.rate(now, values, n) for n in _ARRIVALS)
            busy += seen.delta(values, "servefleet_replica_busy_seconds_total") + seen.delta(
                values, "servefleet_direct_latency_seconds_sum"
            )
            served += sum(seen.delta(values, n) for n in _SERVED)
        self._forget({e.address for e in endpoints}, now)
        if not replicas and not proxies:
            return None
        service_s = busy / served if served else 0.0
        arrival = proxy_rate if proxied else replica_rate
        ongoing += refused_rate * service_s  # demand the replicas had no room for
        backlog = drain = 0.0
        if status.spec.async_mode.enabled and self.broker is not None:
            stats = await self._queue(status.app)
            backlog, drain = float(stats.depth), stats.complete_rate
            arrival += stats.submit_rate
            ongoing += backlog
        clusters = max(1, len(status.placements))  # the keeper's count is per cluster
        return Sample(
            t=now,
            ongoing=ongoing / clusters,
            arrival_rate=arrival / clusters,
            service_s=service_s,
            replicas=math.ceil(replicas / clusters),
            backlog=backlog / clusters,
            drain_rate=drain / clusters,
        )

    async def _queue(self, app: common_pb2.AppRef) -> broker_pb2.QueueStatsResponse:
        assert self.broker is not None
        try:
            return await self.broker.QueueStats(broker_pb2.QueueStatsRequest(app=app), timeout=TIMEOUT_S)
        except grpc.aio.AioRpcError:
            return broker_pb2.QueueStatsResponse()  # not registered yet (no worker started)

    def _forget(self, live: set[str], now: float) -> None:
        """Drop what is known of endpoints that stopped reporting long ago."""
        for address in [a for a, s in self._seen.items() if a not in live and now - s.t > 60]:
            del self._seen[address]

    async def close(self) -> None:
        await self._discovery.close()
        if self._broker is not None:
            await self._broker.close()


_ONGOING = ("servefleet_replica_in_flight", "servefleet_replica_queued", "servefleet_direct_in_flight")
_ARRIVALS = (
    "servefleet_replica_requests_total",
    "servefleet_replica_rejected_total",
    "servefleet_direct_requests_total",
)
_IN_REPLICA_SECONDS = ("servefleet_replica_latency_seconds_sum", "servefleet_direct_latency_seconds_sum")
_SERVED = ("servefleet_replica_latency_seconds_count", "servefleet_direct_latency_seconds_count")


class EtcdHistory:
    """Per-app autoscaler state under ``<prefix>/autoscaler/history/``; writes are fenced on the
    autoscaler's leader key, so a deposed leader cannot overwrite its successor's history."""

    def __init__(self, client: aetcd.Client, prefix: str | None = None) -> None:
        self.client = client
        self.root = f"{prefix or settings.etcd_prefix}/autoscaler/"
        self.leader_key = (self.root + "leader").encode()

    def _key(self, app: str) -> bytes:
        return f"{self.root}history/{app}".encode()

    async def load(self) -> dict[str, dict[str, Any]]:
        prefix = self._key("")
        found = await self.client.get_prefix(prefix)
        return {bytes(kv.key)[len(prefix) :].decode(): json.loads(kv.value) for kv in found}

    async def save(self, key: str, state: dict[str, Any], fence: bytes) -> None:
        tx = self.client.transactions
        compare = [tx.value(self.leader_key) == fence] if fence else []
        await self.client.transaction(
            compare=compare, success=[tx.put(self._key(key), json.dumps(state).encode())], failure=[]
        )

    async def forget(self, key: str) -> None:
        await self.client.delete(self._key(key))


async def write_file_sd(path: Path, apps: KeeperApps, loads: MetricsLoad) -> None:
    """Every actor's metrics endpoint (all apps) as a Prometheus file-SD target list; the file is
    replaced atomically and only when it changed (Prometheus re-reads it on change)."""
    groups: list[dict[str, Any]] = []
    for status in await apps.all():
        for ref in served_apps(status.spec, status.app):  # a pipeline's stages run as apps too
            for endpoint in await loads.endpoints(ref):
                labels = {k: v for k, v in endpoint.labels.items() if k.isidentifier()}
                groups.append(
                    {"targets": [endpoint.address], "labels": {**labels, "app": AppId.parse(ref).model_name}}
                )
    await asyncio.to_thread(
        _replace_if_changed, path, json.dumps(sorted(groups, key=lambda g: g["targets"]), indent=2)
    )


def _replace_if_changed(path: Path, text: str) -> None:
    if path.exists() and path.read_text() == text:
        return
    tmp = path.with_suffix(".tmp")
    tmp.write_text(text)
    tmp.replace(path)
