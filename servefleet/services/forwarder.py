"""The proxy's C++ ModelInfer forwarder (``servefleet.direct._direct.Forwarder``), set up from Python.

With ``SERVEFLEET_PROXY_CPP_FORWARD=1`` the C++ server owns the proxy's port and the Python
server listens on a private loopback port behind it. A ModelInfer for the served model that passes
the spec's checks and needs no span goes from C++ straight to a same-node replica's gRPC endpoint
(no GIL, no event loop per request); everything else is relayed to the Python server unchanged,
so Python still answers every error, stream, other method and traced request. The table is
pushed on every routing change; the C++ counts of the requests it answered are added to the
proxy's Prometheus series (``servefleet_proxy_*`` and ``servefleet_rpc_*``) every
``SYNC_S`` seconds and before each stats call (:class:`CppCounts`, which the sharded router's C++
fast path uses too).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import grpc
from prometheus_client import Counter, Gauge, Histogram

from servefleet.common import metrics
from servefleet.common.config import settings
from servefleet.common.tensors import DTYPES
from servefleet.services.routing import Routing

SYNC_S = 0.5
INFER = "/inference.GRPCInferenceService/ModelInfer"
_CODES = {s.value[0]: s for s in grpc.StatusCode}

#: Where C++ counts go: (requests counter by code name, latency histogram, in-flight gauge).
Series = tuple[Callable[[str], Counter], Histogram, Gauge]


def _add_to_histogram(series: Histogram, buckets: list[int], seconds: float) -> None:
    """Adds observations counted elsewhere (non-cumulative bucket counts) to a Histogram child.
    prometheus_client has no public call for it: its child keeps per-bucket values and a sum."""
    for value, count in zip(series._buckets, buckets, strict=True):
        if count:
            value.inc(count)
    series._sum.inc(seconds)


def custom_sampler() -> bool:
    """``OTEL_TRACES_SAMPLER`` replaces the sampler: C++ decides by the default one's rules only,
    so with another sampler every request stays on the Python path."""
    return "OTEL_TRACES_SAMPLER" in os.environ


def input_rows(spec: Any) -> list[tuple[str, str, list[int], int]]:
    """The spec's inputs as the C++ checks take them: (name, datatype, shape, itemsize; 0: BYTES)."""
    return [
        (t.name, t.datatype, list(t.shape), 0 if t.datatype == "BYTES" else DTYPES[t.datatype].itemsize)
        for t in spec.inputs
    ]


def rpc_series(service: str, method: str = INFER) -> Series:
    """A service's own ``servefleet_rpc_*`` series of one method (what its Python server counts)."""
    return (
        lambda code: metrics.RPC_REQUESTS.labels(service, method, code),
        metrics.RPC_LATENCY.labels(service, method),
        metrics.RPC_IN_FLIGHT.labels(service, method),
    )


class CppCounts:
    """A C++ server's counts of the calls it answered (``stats()``: codes, latency buckets, in
    flight) added to Prometheus series as they grow: every ``SYNC_S`` seconds once started, and on
    each ``sync()``."""

    def __init__(self, read: Callable[[], Mapping[str, Any]], series: Callable[[], Sequence[Series]]) -> None:
        """``series``: where the counts go now (empty: nowhere yet, they wait)."""
        self._read, self._series = read, series
        self._seen = read()  # what the series have been given so far
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._forever())

    def sync(self) -> None:
        targets = self._series()
        if not targets:
            return
        now, seen = self._read(), self._seen
        buckets = [n - s for n, s in zip(now["buckets"], seen["buckets"], strict=True)]
        seconds = now["latency_s"] - seen["latency_s"]
        for requests, latency, in_flight in targets:
            in_flight.inc(now["in_flight"] - seen["in_flight"])
            for value, count in now["codes"].items():
                delta = count - seen["codes"].get(value, 0)
                if delta:
                    requests(_CODES.get(value, grpc.StatusCode.UNKNOWN).name).inc(delta)
            if any(buckets):
                _add_to_histogram(latency, buckets, seconds)
        self._seen = now

    async def _forever(self) -> None:
        while True:
            await asyncio.sleep(SYNC_S)
            self.sync()

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        self.sync()


class CppFront:
    """A C++ fast path (a ``_direct.RelayServer``) in front of a Python server: it listens on the
    public port, and its counts go to Prometheus series as they grow (``CppCounts``)."""

    def __init__(self, native: Any, series: Callable[[], Sequence[Series]]) -> None:
        self.native = native
        self._counts = CppCounts(native.stats, series)

    def start(self, listen: str, fallback: str) -> str:
        """Listens on ``listen`` (port 0: any) in front of the Python server at ``fallback``."""
        port = self.native.start(listen, fallback)
        self._counts.start()
        return f"{listen.rsplit(':', 1)[0]}:{port}"

    async def stop(self, grace_s: float) -> None:
        """Stops taking calls and lets those in flight (relayed ones included) finish."""
        await asyncio.to_thread(self.native.stop, grace_s)
        await self._counts.stop()


class CppForwarder(CppFront):
    """The C++ forwarder of one proxy: its table from the proxy's routing, its counts in metrics."""

    def __init__(self, node_id: str, requests: Counter, latency: Histogram, in_flight: Gauge) -> None:
        """``requests`` / ``latency`` / ``in_flight``: the proxy's own series (by app)."""
        from servefleet.direct._direct import Forwarder

        self.node_id = node_id
        self._app = ""

        def series() -> list[Series]:
            if not self._app:
                return []
            app = self._app
            mine: Series = (
                lambda code: requests.labels(app, code),
                latency.labels(app),
                in_flight.labels(app),
            )
            return [mine, rpc_series("proxy")]

        super().__init__(Forwarder(list(metrics.LATENCY_BUCKETS), settings.proxy_attempts), series)

    def set_table(self, routing: Routing, spec: Any) -> None:
        """Same-node Python replicas with a gRPC endpoint (the ones the router prefers); Triton
        apps and replicas reached by Ray stay on the Python path, and so does every request under
        a custom sampler."""
        self._app = routing.model_name
        python_only = any(r.models for r in routing.replicas) or custom_sampler()
        rows = [
            (r.name, r.address, r.infer_method, r.capacity)
            for r in routing.replicas
            if r.address and r.node_id == self.node_id and not python_only
        ]
        self.native.set_table(
            routing.model_name, spec.version, rows, input_rows(spec), settings.trace_sample_ratio
        )

    @property
    def in_flight(self) -> int:
        return int(self.native.stats()["in_flight"])

    def sync_metrics(self) -> None:
        """Adds what C++ answered since the last sync to the proxy's series."""
        self._counts.sync()
