"""Entry point: `python -m servefleet.keeper --listen HOST:PORT --etcd HOST:PORT`."""

from __future__ import annotations

import argparse

from servefleet.api import keeper_pb2, keeper_pb2_grpc
from servefleet.common.entry import Service, run_service, service_parser
from servefleet.common.server import GrpcServer


async def build(args: argparse.Namespace) -> Service:
    servicer = keeper_pb2_grpc.KeeperServicer()
    server = GrpcServer(
        "keeper",
        args.listen,
        [lambda s: keeper_pb2_grpc.add_KeeperServicer_to_server(servicer, s)],
        [keeper_pb2.DESCRIPTOR.services_by_name["Keeper"].full_name],
    )
    return Service(server)


def parser() -> argparse.ArgumentParser:
    p = service_parser("keeper", "servefleet keeper service")
    p.add_argument("--etcd", required=True, help="etcd address host:port")
    p.add_argument("--admin-token-file", default="", help="where to keep the admin token")
    return p


def main(argv: list[str] | None = None) -> None:
    run_service("keeper", parser(), build, argv)


if __name__ == "__main__":
    main()
