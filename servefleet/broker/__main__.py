"""Entry point: `python -m servefleet.broker --listen HOST:PORT --redis HOST:PORT[,...]
[--redis-password-file PATH]`."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from pathlib import Path

from servefleet.broker.acl import ADMIN_USER, AppUsers, WorkerCredentials
from servefleet.broker.core import BrokerCore
from servefleet.broker.queue import RedisStreamQueue
from servefleet.broker.servicer import broker_server
from servefleet.common.appid import AppId
from servefleet.common.auth import Authenticator, EtcdTokens, keeper_key
from servefleet.common.config import settings
from servefleet.common.entry import Service, run_service, service_parser
from servefleet.common.etcd import EtcdClient, add_etcd_flag, connect_etcd
from servefleet.common.redis_target import RedisTarget
from servefleet.pipeline_spec import pipeline_of

log = logging.getLogger(__name__)


def app_exists(etcd: EtcdClient) -> Callable[[str], Awaitable[bool]]:
    """Whether the keeper still has ``namespace/name`` (a pipeline stage: its pipeline)."""

    async def exists(app: str) -> bool:
        parsed = AppId.parse(app)
        return bool(
            await etcd.get(keeper_key("", "apps", parsed.namespace, pipeline_of(parsed.name), "desired"))
        )

    return exists


async def sweep_forever(credentials: WorkerCredentials, exists: Callable[[str], Awaitable[bool]]) -> None:
    """Deleting an app removes its Redis user within ``broker_acl_sweep_s``."""
    while True:
        await asyncio.sleep(settings.broker_acl_sweep_s)
        try:
            await credentials.sweep(exists)
        except Exception as exc:  # Redis or etcd down: the next pass tries again
            log.warning("redis users not swept: %s", exc)


async def build(args: argparse.Namespace) -> Service:
    public = RedisTarget.parse(args.redis)
    target = public
    if args.redis_password_file:  # the stack's Redis admits the admin user only
        password = await asyncio.to_thread(Path(args.redis_password_file).read_text)
        target = public.with_credential(ADMIN_USER, password.strip())
    queue = RedisStreamQueue(target)
    users = AppUsers(target.client(max_connections=4), target.password) if target.password else None
    credentials = WorkerCredentials(public, users)
    core = BrokerCore(queue, credentials)
    etcd = connect_etcd(args.etcd)  # where the keeper keeps the tokens callers present and the apps
    tasks = [
        asyncio.create_task(core.publish_stats_forever(settings.broker_stats_interval_s)),
        asyncio.create_task(sweep_forever(credentials, app_exists(etcd))),
    ]

    async def stop() -> None:
        # A stop must end: a cancel that lands as a Redis call returns can be swallowed (CPython 3.11's
        # wait_for race) and its loop go on, and a connection that does not close within the grace
        # is dropped with the process.
        for task in tasks:
            task.cancel()
        await asyncio.wait(tasks, timeout=settings.shutdown_grace_s)
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
    p.add_argument(
        "--redis",
        required=True,
        help="redis host:port[,host:port...] (SERVEFLEET_REDIS_MODE says which kind)",
    )
    p.add_argument(
        "--redis-password-file",
        default="",
        help=f"the password of Redis user {ADMIN_USER!r}: Redis requires auth, workers get per-app users",
    )
    add_etcd_flag(p, "where the keeper keeps tokens")
    return p


def main(argv: list[str] | None = None) -> None:
    run_service("broker", parser(), build, argv)


if __name__ == "__main__":
    main()
