"""Entry point: `python -m servefleet.services.agent --listen HOST:PORT --ray HOST:PORT ...`."""

from __future__ import annotations

import argparse

from servefleet.api import agent_pb2, agent_pb2_grpc
from servefleet.common.entry import Service, run_service, service_parser
from servefleet.common.server import GrpcServer


async def build(args: argparse.Namespace) -> Service:
    servicer = agent_pb2_grpc.ClusterAgentServicer()
    server = GrpcServer(
        "agent",
        args.listen,
        [lambda s: agent_pb2_grpc.add_ClusterAgentServicer_to_server(servicer, s)],
        [agent_pb2.DESCRIPTOR.services_by_name["ClusterAgent"].full_name],
    )
    return Service(server)


def parser() -> argparse.ArgumentParser:
    p = service_parser("services.agent", "servefleet cluster agent")
    p.add_argument("--ray", required=True, help="Ray GCS address host:port")
    p.add_argument("--keeper", required=True, help="keeper address host:port")
    p.add_argument("--discovery", required=True, help="discovery address host:port")
    p.add_argument("--redis", default="", help="Redis address for async apps")
    p.add_argument("--cluster", default="local", help="this cluster's name")
    p.add_argument("--admin-token-file", default="", help="token the agent registers with")
    return p


def main(argv: list[str] | None = None) -> None:
    run_service("agent", parser(), build, argv)


if __name__ == "__main__":
    main()
