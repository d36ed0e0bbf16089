"""Deployment actor of a ``kind: direct`` application: the C++ direct ingress inside a Ray actor.

The actor loads the app's CTR model into a C++ KServe v2 server (``servefleet.direct``) that
listens on its own port and answers on its own C++ threads, and registers that server in
discovery as kind ``direct`` with its cluster/node(/zone) labels, so the SDK calls it with no
proxy in between. The application master starts, health-checks, drains and replaces it like any
replica (same ``ready``/``stats``/``drain`` calls). A killed actor stops renewing its lease, so
clients drop it within the discovery TTL.

Metrics: the C++ server's own counters and latency histogram, read at scrape time from the
actor's ``/metrics`` (registered in discovery as kind ``metrics``, part ``direct``).

``init_args``: ``model_path`` (required: a file written by ``servefleet.direct.ctr.export_model``)
and ``workers`` (request threads; default ``settings.direct_workers``).
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector

from servefleet.api import common_pb2
from servefleet.common import metrics
from servefleet.common.appid import AppId
from servefleet.common.config import settings
from servefleet.common.errors import InvalidArgument
from servefleet.services.endpoint import Identity, Registered
from servefleet.spec import struct_to_python


class DirectServerCollector(Collector):
    """The C++ ingress's counters and histogram as Prometheus series, read when scraped (the
    request path stays free of Python)."""

    BOUNDS_US = [round(b * 1e6) for b in metrics.LATENCY_BUCKETS]

    def __init__(self, server: Any, app: str) -> None:
        self.server = server
        self.app = app

    def collect(self) -> Iterator[Any]:
        stats = self.server.stats()
        counts, sum_us = self.server.latency_buckets(self.BOUNDS_US)
        labels = [self.app]
        requests = CounterMetricFamily(
            "servefleet_direct_requests", "RPCs the C++ ingress answered, any status.", labels=["app"]
        )
        requests.add_metric(labels, stats["requests"])
        errors = CounterMetricFamily(
            "servefleet_direct_errors", "RPCs the C++ ingress answered with a non-OK status.", labels=["app"]
        )
        errors.add_metric(labels, stats["errors"])
        rows = CounterMetricFamily("servefleet_direct_rows", "Examples scored.", labels=["app"])
        rows.add_metric(labels, stats["rows"])
        in_flight = GaugeMetricFamily(
            "servefleet_direct_in_flight", "RPCs the C++ ingress is handling now.", labels=["app"]
        )
        in_flight.add_metric(labels, stats["in_flight"])
        latency = HistogramMetricFamily(
            "servefleet_direct_latency_seconds", "RPC latency inside the C++ ingress.", labels=["app"]
        )
        buckets = [(f"{b:g}", c) for b, c in zip(metrics.LATENCY_BUCKETS, counts, strict=False)]
        latency.add_metric(labels, [*buckets, ("+Inf", counts[-1])], sum_us / 1e6)
        yield from (requests, errors, rows, in_flight, latency)


class DirectReplica:
    """One C++ direct-ingress replica (a Ray actor in production; a plain object in tests)."""

    def __init__(
        self,
        spec_bytes: bytes,
        name: str,
        *,
        cluster: str = "",
        discovery: str = "",
        credential: str = "",
        host: str = "127.0.0.1",
    ) -> None:
        from servefleet.direct import DirectServer  # the compiled module: only where it serves

        spec = common_pb2.ApplicationSpec.FromString(spec_bytes)
        args = struct_to_python(spec.init_args)
        if "model_path" not in args:
            raise InvalidArgument(
                "kind 'direct' needs init_args.model_path (a servefleet.direct.ctr model file)"
            )
        self.id = Identity.of(spec, name, cluster)
        self.server = DirectServer()
        self.server.load_model(str(args["model_path"]), AppId.parse(self.id.app).model_name, self.id.version)
        port = self.server.start(f"{host}:0", workers=int(args.get("workers", settings.direct_workers)))
        self.address = f"{host}:{port}"
        self.draining = False
        self._collector = DirectServerCollector(self.server, AppId.parse(self.id.app).model_name)
        metrics.REGISTRY.register(self._collector)
        self._metrics = metrics.expose(
            discovery, self.id.app, "direct", {**self.id.labels, "replica": name}, credential=credential
        )
        self._registration = Registered(discovery, self.id.endpoint("direct", self.address), credential)
        self._registration.start()

    async def ready(self) -> dict[str, Any]:
        """Identity and placement, once the server is registered (raises if registering failed)."""
        await self._registration.wait()
        return self.id.ready(self.address)

    async def stats(self) -> dict[str, Any]:
        """Load as the master's health check and the autoscaler see it (counted in C++)."""
        stats = self.server.stats()
        return {
            "in_flight": stats["in_flight"],
            "capacity": self.id.capacity,
            "latency_ms": stats["mean_latency_us"] / 1000.0,
            "served": stats["requests"] - stats["errors"],
            "failed": stats["errors"],
            "rejected": 0,
            "draining": self.draining,
            "version": self.id.version,
            "address": self.address,
            "metrics": metrics.address(),
        }

    async def drain(self, timeout_s: float) -> int:
        """Deregister first (clients move away), then let in-flight calls finish for up to
        ``timeout_s`` before the server stops; returns the requests in flight when the drain began."""
        self.draining = True
        self._metrics.cancel()
        await self._registration.stop()
        left = self.server.stats()["in_flight"]
        await asyncio.to_thread(self.server.stop, timeout_s)
        return left
