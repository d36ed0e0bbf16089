"""One way to start any service process: parse flags, set up logs, tracing and the ``/metrics``
endpoint, serve until signalled, and keep the gRPC health status true to what the service
depends on."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field

from grpc_health.v1 import health_pb2

from servefleet.common import metrics
from servefleet.common.config import settings
from servefleet.common.logs import setup_logging
from servefleet.common.server import GrpcServer, serve_until_signal
from servefleet.common.telemetry import setup_tracing

log = logging.getLogger(__name__)

#: A quick call to a dependency; raising (or outliving the probe period) means it is unreachable.
Probe = Callable[[], Awaitable[object]]


@dataclass
class Service:
    server: GrpcServer
    #: Runs after the server has drained (close clients, revoke leases, ...).
    on_stop: Callable[[], Awaitable[None]] | None = None
    #: What the service cannot answer without (etcd, Redis, Ray): while any probe fails, health
    #: reads NOT_SERVING, so `servefleet status`, supervisors and load balancers see the truth.
    dependencies: Mapping[str, Probe] = field(default_factory=dict)


async def _reachable(probe: Probe, timeout_s: float) -> bool:
    try:
        await asyncio.wait_for(probe(), timeout_s)
    except Exception:
        return False
    return True


async def follow_dependencies(
    server: GrpcServer, dependencies: Mapping[str, Probe], *, period_s: float | None = None
) -> None:
    """Probe every dependency each period; NOT_SERVING while any is down, SERVING once all are back."""
    period = period_s or settings.dependency_probe_interval_s
    serving = True
    while True:
        results = await asyncio.gather(*(_reachable(p, period) for p in dependencies.values()))
        down = [name for name, ok in zip(dependencies, results, strict=True) if not ok]
        # Set again on every failed pass: start() may have marked the server SERVING meanwhile.
        if down or not serving:
            status = (
                health_pb2.HealthCheckResponse.NOT_SERVING if down else health_pb2.HealthCheckResponse.SERVING
            )
            for name in ("", *server.service_names):
                await server.health.set(name, status)
            if bool(down) == serving:
                log.warning(
                    "dependency unreachable: NOT_SERVING" if down else "dependencies back: SERVING",
                    extra={"dependencies": down},
                )
            serving = not down
        await asyncio.sleep(period)


def service_parser(name: str, description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=f"python -m servefleet.{name}", description=description)
    parser.add_argument("--listen", default="127.0.0.1:0", help="host:port to serve gRPC on")
    parser.add_argument(
        "--metrics",
        default="127.0.0.1:0",
        help="host:port to serve Prometheus /metrics on (port 0: any free port)",
    )
    return parser


def run_service(
    name: str,
    parser: argparse.ArgumentParser,
    build: Callable[[argparse.Namespace], Awaitable[Service]],
    argv: Sequence[str] | None = None,
) -> None:
    args = parser.parse_args(argv)
    setup_logging(name)
    setup_tracing(f"servefleet-{name}")
    host, _, port = args.metrics.rpartition(":")  # port 0 allowed: any free one
    if not host or not port.isdigit():
        parser.error(f"--metrics {args.metrics!r} is not host:port")
    metrics.serve(host, int(port))

    async def main() -> None:
        service = await build(args)
        follower = None
        if service.dependencies:
            follower = asyncio.create_task(follow_dependencies(service.server, service.dependencies))
        try:
            await serve_until_signal(service.server, on_stop=service.on_stop)
        finally:
            if follower is not None:
                follower.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await follower

    asyncio.run(main())
