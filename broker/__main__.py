"""Entry point: `python -m servefleet.broker --listen HOST:PORT --redis HOST:PORT`."""

from __future__ import annotations

import argparse

from servefleet.api import broker_pb2, broker_pb2_grpc
from servefleet.common.entry import Service, run_service, service_parser
from servefleet.common.server import GrpcServer


async def build(args: argparse.Namespace) -> Service:
    servicer = broker_pb2_grpc.BrokerServicer()
    server = GrpcServer(
        "broker",
        args.listen,
        [lambda s: broker_pb2_grpc.add_BrokerServicer_to_server(servicer, s)],
        [broker_pb2.DESCRIPTOR.services_by_name["Broker"].full_name],
    )
    return Service(server)


def parser() -> argparse.ArgumentParser:
    p = service_parser("broker", "servefleet broker service")
    p.add_argument("--redis", required=True, help="redis address host:port")
    return p


def main(argv: list[str] | None = None) -> None:
    run_service("broker", parser(), build, argv)


if __name__ == "__main__":
    main()
