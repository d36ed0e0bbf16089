"""Entry point: `python -m servefleet.autoscaler --listen HOST:PORT --etcd HOST:PORT --keeper
HOST:PORT --discovery HOST:PORT [--broker HOST:PORT] [--file-sd PATH]`.

Every instance serves ``GetState``; only the one holding the leader key (etcd lease) acts."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import uuid
from pathlib import Path

from servefleet.autoscaler.core import Autoscaler
from servefleet.autoscaler.servicer import SERVICE, AutoscalerServicer, register
from servefleet.autoscaler.sources import EtcdHistory, KeeperApps, MetricsLoad, write_file_sd
from servefleet.common.config import settings
from servefleet.common.entry import Service, run_service, service_parser
from servefleet.common.errors import ServefleetError
from servefleet.common.etcd import add_etcd_flag, connect_etcd
from servefleet.common.server import GrpcServer
from servefleet.keeper.election import Election
from servefleet.services.agent.core import read_token

log = logging.getLogger(__name__)


async def build(args: argparse.Namespace) -> Service:
    client = connect_etcd(args.etcd, timeout=None)
    history = EtcdHistory(client)
    # Its credential (role autoscaler, which `servefleet up` issues): a flag, SERVEFLEET_TOKEN, or a file.
    token = lambda: args.token or os.environ.get("SERVEFLEET_TOKEN", "") or read_token(args.token_file)  # noqa: E731
    apps = KeeperApps(args.keeper, token)
    loads = MetricsLoad(args.discovery, args.broker, token=token())
    core = Autoscaler(apps, loads, history, interval_s=settings.autoscaler_interval_s)
    # TLS like every control-plane part when Settings.tls_* say so (`up --tls`); no token (README).
    server = GrpcServer("autoscaler", args.listen, [register(AutoscalerServicer(core))], [SERVICE], tls=True)
    election = Election(client, history.leader_key, ident=f"{args.listen}/{uuid.uuid4().hex[:8]}")

    async def lead(fence: bytes) -> None:
        tasks = [asyncio.create_task(core.run(fence))]
        if args.file_sd:
            tasks.append(asyncio.create_task(keep_file_sd(Path(args.file_sd), apps, loads)))
        try:
            await asyncio.gather(*tasks)
        finally:
            for task in tasks:
                task.cancel()

    leading = asyncio.create_task(election.run(lead))

    async def stop() -> None:
        leading.cancel()
        with contextlib.suppress(BaseException):
            await leading
        await election.resign()
        await apps.close()
        await loads.close()
        await client.close()

    async def etcd_up() -> None:
        await client.get(history.leader_key)

    # Without etcd it can neither elect a leader nor keep its history.
    return Service(server, on_stop=stop, dependencies={"etcd": etcd_up})


async def keep_file_sd(path: Path, apps: KeeperApps, loads: MetricsLoad) -> None:
    """The actors' Prometheus targets, rewritten when discovery's set changes (checked every 5 s)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    while True:
        try:
            await write_file_sd(path, apps, loads)
        except (ServefleetError, OSError) as exc:
            log.warning("file-SD targets not written: %s", exc)
        await asyncio.sleep(5.0)


def parser() -> argparse.ArgumentParser:
    p = service_parser("autoscaler", "servefleet autoscaler service")
    add_etcd_flag(p, "history, leader election")
    p.add_argument("--keeper", required=True, help="keeper address host:port")
    p.add_argument("--discovery", required=True, help="discovery address host:port")
    p.add_argument("--broker", default="", help="broker address host:port (async apps' backlog)")
    p.add_argument("--token-file", default="", help="file holding the token to call the keeper with")
    p.add_argument(
        "--token", default="", help="token to call the keeper with (else SERVEFLEET_TOKEN, else the file)"
    )
    p.add_argument("--file-sd", default="", help="where to keep the actors' Prometheus file-SD targets")
    return p


def main(argv: list[str] | None = None) -> None:
    run_service("autoscaler", parser(), build, argv)


if __name__ == "__main__":
    main()
