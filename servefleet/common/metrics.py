"""Prometheus metrics of this process: one registry, one loopback ``/metrics`` endpoint.

Every part of servefleet calls :func:`serve` once (services from ``run_service``, actors in their
constructor) and registers its series on :data:`REGISTRY`. Names follow Prometheus' advice:
``servefleet_`` prefix, base units (``_seconds``), counters end in ``_total``, and labels have
bounded values (app, method, code, reason; never a request id).

Where a part's metrics live must be findable without configuration:

- services: ``stack.json`` lists each service's ``metrics`` address (``servefleet status``);
- actors (proxies, replicas, masters, and later kinds): :func:`discovery_endpoint` builds the
  discovery registration of kind :data:`METRICS_KIND` for the app, whose labels say which part
  it is (``part``) and which cluster/node it runs on. The autoscaler and the Prometheus file-SD
  targets that ``servefleet up`` keeps current read exactly these registrations.

A new app kind exposes its actor's metrics with one call (in the actor, on its event loop)::

    self._metrics = metrics.expose(discovery, app, "triton", labels, credential=endpoint_token)
    ...
    self._metrics.cancel()  # when the actor drains: Prometheus and the autoscaler forget it
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Mapping

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    PlatformCollector,
    ProcessCollector,
    start_http_server,
)

from servefleet.api import common_pb2, discovery_pb2

log = logging.getLogger(__name__)

#: The one registry of this process (not prometheus_client's global one, which Ray's own
#: libraries may also write to).
REGISTRY = CollectorRegistry(auto_describe=True)
ProcessCollector(registry=REGISTRY)
PlatformCollector(registry=REGISTRY)

#: Discovery kind of an actor's metrics endpoint; clients of inference endpoints never pick it.
METRICS_KIND = "metrics"
#: Label of a metrics registration naming the part it belongs to (proxy, replica, master, ...).
PART_LABEL = "part"

#: Latency buckets in seconds: 0.5 ms to 30 s (inference calls and control-plane RPCs alike).
LATENCY_BUCKETS = (
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
)

_lock = threading.Lock()
_address = ""


def serve(host: str = "127.0.0.1", port: int = 0) -> str:
    """Serve :data:`REGISTRY` on ``http://host:port/metrics`` (port 0: any free one) from a daemon
    thread; returns ``host:port``. Idempotent: a second call returns the first address."""
    global _address
    with _lock:
        if not _address:
            server, _ = start_http_server(port, addr=host, registry=REGISTRY)
            _address = f"{host}:{server.server_port}"
        return _address


def address() -> str:
    """Where this process serves its metrics ("" until :func:`serve` ran)."""
    return _address


def discovery_endpoint(
    app: common_pb2.AppRef, part: str, metrics_address: str, labels: Mapping[str, str] | None = None
) -> discovery_pb2.Endpoint:
    """The discovery registration that makes an actor's metrics findable (kind ``metrics``)."""
    return discovery_pb2.Endpoint(
        app=app,
        kind=METRICS_KIND,
        address=metrics_address,
        labels={**(labels or {}), PART_LABEL: part},
    )


def expose(
    discovery: str,
    app: common_pb2.AppRef,
    part: str,
    labels: Mapping[str, str] | None = None,
    *,
    credential: str = "",
) -> asyncio.Task[None]:
    """Serve this process's metrics and keep them registered in discovery (kind ``metrics``) for
    as long as the returned task runs, with the app's endpoint token ``credential``; with no
    discovery address it only serves."""
    endpoint = discovery_endpoint(app, part, serve(), labels)

    async def registered() -> None:
        if not discovery:
            return
        from servefleet.common.config import settings
        from servefleet.discovery.registration import registration

        try:
            async with registration(discovery, endpoint, ttl_s=settings.discovery_ttl_s, token=credential):
                await asyncio.Event().wait()
        except Exception:  # metrics must never take the actor down with them
            log.warning("cannot register metrics of %s in discovery", part, exc_info=True)

    return asyncio.get_running_loop().create_task(registered())


# -- series every gRPC server has (recorded by the ServiceInterceptor) ---------------------------

RPC_REQUESTS = Counter(
    "servefleet_rpc_requests_total",
    "gRPC calls answered, by service, method and status code.",
    ["service", "method", "code"],
    registry=REGISTRY,
)
RPC_LATENCY = Histogram(
    "servefleet_rpc_latency_seconds",
    "Time from a gRPC call's arrival to its answer (streams: to their end).",
    ["service", "method"],
    buckets=LATENCY_BUCKETS,
    registry=REGISTRY,
)
RPC_IN_FLIGHT = Gauge(
    "servefleet_rpc_in_flight",
    "gRPC calls being handled now.",
    ["service", "method"],
    registry=REGISTRY,
)
