"""One way to start any service process: parse flags, set up logs and tracing, serve until signalled."""

from __future__ import annotations

import argparse
import asyncio
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

from servefleet.common.logs import setup_logging
from servefleet.common.server import GrpcServer, serve_until_signal
from servefleet.common.telemetry import setup_tracing


@dataclass
class Service:
    server: GrpcServer
    #: Runs after the server has drained (close clients, revoke leases, ...).
    on_stop: Callable[[], Awaitable[None]] | None = None


def service_parser(name: str, description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=f"python -m servefleet.{name}", description=description)
    parser.add_argument("--listen", default="127.0.0.1:0", help="host:port to serve gRPC on")
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

    async def main() -> None:
        service = await build(args)
        await serve_until_signal(service.server, on_stop=service.on_stop)

    asyncio.run(main())
