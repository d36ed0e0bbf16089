"""Entry point: `python -m servefleet.broker --listen HOST:PORT --redis HOST:PORT`."""

from __future__ import annotations

import argparse
import asyncio
import contextlib

from servefleet.broker.core import BrokerCore
from servefleet.broker.queue import RedisStreamQueue
from servefleet.broker.servicer import broker_server
from servefleet.common.config import settings
from servefleet.common.entry import Service, run_service, service_parser


async def build(args: argparse.Namespace) -> Service:
    queue = RedisStreamQueue(args.redis)
    core = BrokerCore(queue)
    publishing = asyncio.create_task(core.publish_stats_forever(settings.broker_stats_interval_s))

    async def stop() -> None:
        publishing.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await publishing
        await core.close()

    # Without Redis the broker can neither queue a request nor hand out a result.
    return Service(broker_server(core, args.listen), on_stop=stop, dependencies={"redis": queue.ping})


def parser() -> argparse.ArgumentParser:
    p = service_parser("broker", "servefleet broker service")
    p.add_argument("--redis", required=True, help="redis address host:port")
    return p


def main(argv: list[str] | None = None) -> None:
    run_service("broker", parser(), build, argv)


if __name__ == "__main__":
    main()
