"""Entry point: `python -m servefleet.discovery --listen HOST:PORT --etcd HOST:PORT`."""

from __future__ import annotations

import argparse
import asyncio
import contextlib

from grpc_health.v1 import health_pb2

from servefleet.api import discovery_pb2, discovery_pb2_grpc
from servefleet.common.entry import Service, run_service, service_parser
from servefleet.common.errors import ServefleetError
from servefleet.common.server import GrpcServer
from servefleet.discovery.core import DiscoveryCore, connect_etcd
from servefleet.discovery.servicer import DiscoveryServicer

SERVICE = discovery_pb2.DESCRIPTOR.services_by_name["Discovery"].full_name


async def follow_etcd(core: DiscoveryCore, server: GrpcServer, period_s: float = 2.0) -> None:
    """Health says NOT_SERVING while etcd is unreachable: without etcd discovery can answer nothing."""
    serving = True
    while True:
        await asyncio.sleep(period_s)
        try:
            await asyncio.wait_for(core.revision(), period_s)
            ok = True
        except (ServefleetError, TimeoutError):
            ok = False
        if ok != serving:
            status = (
                health_pb2.HealthCheckResponse.SERVING if ok else health_pb2.HealthCheckResponse.NOT_SERVING
            )
            for name in ("", SERVICE):
                await server.health.set(name, status)
            serving = ok


async def build(args: argparse.Namespace) -> Service:
    etcd = connect_etcd(args.etcd)
    core = DiscoveryCore(etcd)
    servicer = DiscoveryServicer(core)
    server = GrpcServer(
        "discovery",
        args.listen,
        [lambda s: discovery_pb2_grpc.add_DiscoveryServicer_to_server(servicer, s)],
        [SERVICE],
    )
    probe = asyncio.create_task(follow_etcd(core, server))

    async def stop() -> None:
        probe.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await probe
        await etcd.close()

    return Service(server, on_stop=stop)


def parser() -> argparse.ArgumentParser:
    p = service_parser("discovery", "servefleet discovery service")
    p.add_argument("--etcd", required=True, help="etcd address host:port")
    return p


def main(argv: list[str] | None = None) -> None:
    run_service("discovery", parser(), build, argv)


if __name__ == "__main__":
    main()
