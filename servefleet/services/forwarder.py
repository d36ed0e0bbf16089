"""The proxy's C++ ModelInfer forwarder (``servefleet.direct._direct.Forwarder``), set up from Python.

With ``SERVEFLEET_PROXY_CPP_FORWARD=1`` the C++ server owns the proxy's port and the Python
server listens on a private loopback port behind it. A ModelInfer for the served model that passes
the spec's checks and needs no span goes from C++ straight to a same-node replica's gRPC endpoint
(no GIL, no event loop per request); everything else is relayed to the Python server unchanged,
so Python still answers every error, stream, other method and traced request. The table is
pushed on every routing change; the C++ counts of the requests it answered are added to the
proxy's Prometheus series (``servefleet_proxy_*`` and ``servefleet_rpc_*``) every
``SYNC_S`` seconds and before each stats call.
"""

from __future__ import annotations

import asyncio
import os
from typing import Any

import grpc
from prometheus_client import Counter, Gauge, Histogram

from servefleet.common import metrics
from servefleet.common.config import settings
from servefleet.common.tensors import DTYPES
from servefleet.services.routing import Routing

SYNC_S = 0.5
_INFER = "/inference.GRPCInferenceService/ModelInfer"
_CODES = {s.value[0]: s for s in grpc.StatusCode}


def _add_to_histogram(series: Histogram, buckets: list[int], seconds: float) -> None:
    """Adds observations counted elsewhere (non-cumulative bucket counts) to a Histogram child.
    prometheus_client has no public call for it: its child keeps per-bucket values and a sum."""
    for value, count in zip(series._buckets, buckets, strict=True):
        if count:
            value.inc(count)
    series._sum.inc(seconds)


class CppForwarder:
    """The C++ forwarder of one proxy: its table from the proxy's routing, its counts in metrics."""

    def __init__(self, node_id: str, requests: Counter, latency: Histogram, in_flight: Gauge) -> None:
        """``requests`` / ``latency`` / ``in_flight``: the proxy's own series (by app)."""
        from servefleet.direct._direct import Forwarder

        self.node_id = node_id
        self._series = requests, latency, in_flight
        self._forwarder = Forwarder(list(metrics.LATENCY_BUCKETS), settings.proxy_attempts)
        self._seen = self._forwarder.stats()  # what the series have been given so far
        self._app = ""
        self._sync: asyncio.Task[None] | None = None

    def start(self, listen: str, fallback: str) -> str:
        """Listens on ``listen`` (port 0: any) in front of the Python server at ``fallback``."""
        port = self._forwarder.start(listen, fallback)
        self._sync = asyncio.get_running_loop().create_task(self._sync_forever())
        return f"{listen.rsplit(':', 1)[0]}:{port}"

    def set_table(self, routing: Routing, spec: Any) -> None:
        """Same-node Python replicas with a gRPC endpoint (the ones the router prefers); Triton
        apps and replicas reached by Ray stay on the Python path, and so does every request when
        ``OTEL_TRACES_SAMPLER`` replaces the sampler (C++ decides by the default one's rules)."""
        self._app = routing.model_name
        python_only = any(r.models for r in routing.replicas) or "OTEL_TRACES_SAMPLER" in os.environ
        rows = [
            (r.name, r.address, r.infer_method, r.capacity)
            for r in routing.replicas
            if r.address and r.node_id == self.node_id and not python_only
        ]
        inputs = [
            (t.name, t.datatype, list(t.shape), 0 if t.datatype == "BYTES" else DTYPES[t.datatype].itemsize)
            for t in spec.inputs
        ]
        self._forwarder.set_table(routing.model_name, spec.version, rows, inputs, settings.trace_sample_ratio)

    @property
    def in_flight(self) -> int:
        return int(self._forwarder.stats()["in_flight"])

    def sync_metrics(self) -> None:
        """Adds what C++ answered since the last sync to the proxy's series."""
        if not self._app:
            return
        now, seen = self._forwarder.stats(), self._seen
        requests, latency, in_flight = self._series
        for gauge in (in_flight.labels(self._app), metrics.RPC_IN_FLIGHT.labels("proxy", _INFER)):
            gauge.inc(now["in_flight"] - seen["in_flight"])
        for value, count in now["codes"].items():
            delta = count - seen["codes"].get(value, 0)
            if delta:
                name = _CODES.get(value, grpc.StatusCode.UNKNOWN).name
                requests.labels(self._app, name).inc(delta)
                metrics.RPC_REQUESTS.labels("proxy", _INFER, name).inc(delta)
        buckets = [n - s for n, s in zip(now["buckets"], seen["buckets"], strict=True)]
        if any(buckets):
            seconds = now["latency_s"] - seen["latency_s"]
            _add_to_histogram(latency.labels(self._app), buckets, seconds)
            _add_to_histogram(metrics.RPC_LATENCY.labels("proxy", _INFER), buckets, seconds)
        self._seen = now

    async def _sync_forever(self) -> None:
        while True:
            await asyncio.sleep(SYNC_S)
            self.sync_metrics()

    async def stop(self, grace_s: float) -> None:
        """Stops taking calls and lets those in flight (relayed ones included) finish."""
        if self._sync is not None:
            self._sync.cancel()
        await asyncio.to_thread(self._forwarder.stop, grace_s)
        self.sync_metrics()
