"""Entry point: `python -m servefleet.broker --listen HOST:PORT --redis HOST:PORT`."""

from __future__ import annotations

import argparse
import asyncio
import contextlib

from servefleet.broker.core import BrokerCore
from servefleet.broker.queue import RedisStreamQueue
from servefleet.broker.servicer import broker_server
from servefleet.common.auth import Authenticator, EtcdTokens
from servefleet.common.config import settings
from servefleet.common.entry import Service, run_service, service_parser
from servefleet.common.etcd import add_etcd_flag, connect_etcd


async def build(args: argparse.Namespace) -> Service:
    queue = RedisStreamQueue(args.redis)
    core = BrokerCore(queue)
    publishing = asyncio.create_task(core.publish_stats_forever(settings.broker_stats_interval_s))
    etcd = connect_etcd(args.etcd)  # where the keeper keeps the tokens callers present

    async def stop() -> None:
        publishing.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await publishing
        # A stop must end: a connection that does not close within the grace is dropped with the process.
        for close in (core.close(), etcd.close()):
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(close, settings.shutdown_grace_s)

    # Without Redis the broker can neither queue a request nor hand out a result.
    return Service(
        broker_server(core, args.listen, Authenticator(EtcdTokens(etcd))),
        on_stop=stop,
        dependencies={"redis": queue.ping},
    )


def parser() -> argparse.ArgumentParser:
    p = service_parser("broker", "servefleet broker service")
    p.add_argument("--redis", required=True, help="redis address host:port")
    add_etcd_flag(p, "where the keeper keeps tokens")
    return p


def main(argv: list[str] | None = None) -> None:
    run_service("broker", parser(), build, argv)


if __name__ == "__main__":
    main()
