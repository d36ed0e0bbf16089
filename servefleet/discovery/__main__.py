"""Entry point: `python -m servefleet.discovery --listen HOST:PORT --etcd HOST:PORT[,HOST:PORT...]`."""

from __future__ import annotations

import argparse

from servefleet.api import discovery_pb2, discovery_pb2_grpc
from servefleet.common.auth import Authenticator, EtcdTokens
from servefleet.common.entry import Service, run_service, service_parser
from servefleet.common.etcd import add_etcd_flag, connect_etcd
from servefleet.common.server import GrpcServer
from servefleet.discovery.core import DiscoveryCore
from servefleet.discovery.servicer import DiscoveryServicer

SERVICE = discovery_pb2.DESCRIPTOR.services_by_name["Discovery"].full_name


async def build(args: argparse.Namespace) -> Service:
    etcd = connect_etcd(args.etcd)
    core = DiscoveryCore(etcd)
    servicer = DiscoveryServicer(core)
    server = GrpcServer(
        "discovery",
        args.listen,
        [lambda s: discovery_pb2_grpc.add_DiscoveryServicer_to_server(servicer, s)],
        [SERVICE],
        auth=Authenticator(EtcdTokens(etcd)),
        tls=True,
    )
    # Without etcd discovery can answer nothing.
    return Service(server, on_stop=etcd.close, dependencies={"etcd": core.revision})


def parser() -> argparse.ArgumentParser:
    p = service_parser("discovery", "servefleet discovery service")
    add_etcd_flag(p, "where endpoints are kept")
    return p


def main(argv: list[str] | None = None) -> None:
    run_service("discovery", parser(), build, argv)


if __name__ == "__main__":
    main()
