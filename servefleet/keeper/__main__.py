"""Entry point: `python -m servefleet.keeper --listen HOST:PORT --etcd HOST:PORT`."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import uuid

from servefleet.api import keeper_pb2
from servefleet.common.entry import Service, run_service, service_parser
from servefleet.common.server import GrpcServer
from servefleet.keeper.auth import Authenticator
from servefleet.keeper.core import Keeper
from servefleet.keeper.election import Election
from servefleet.keeper.reconciler import Agents, Reconciler
from servefleet.keeper.servicer import KeeperServicer, register
from servefleet.keeper.store import KeeperStore


async def build(args: argparse.Namespace) -> Service:
    store = KeeperStore.connect(args.etcd)
    keeper = Keeper(store)
    await keeper.bootstrap_admin(args.admin_token_file)
    server = GrpcServer(
        "keeper",
        args.listen,
        [register(KeeperServicer(keeper), Authenticator(store))],
        [keeper_pb2.DESCRIPTOR.services_by_name["Keeper"].full_name],
    )
    agents = Agents()
    election = Election(store, ident=f"{args.listen}/{uuid.uuid4().hex[:8]}")
    leading = asyncio.create_task(election.run(Reconciler(store, agents).run))

    async def stop() -> None:
        leading.cancel()
        with contextlib.suppress(BaseException):
            await leading
        await election.resign()
        await agents.close()
        await store.close()

    # Without etcd the keeper can neither read nor store desired state.
    return Service(server, on_stop=stop, dependencies={"etcd": store.leader})


def parser() -> argparse.ArgumentParser:
    p = service_parser("keeper", "servefleet keeper service")
    p.add_argument("--etcd", required=True, help="etcd address host:port")
    p.add_argument("--admin-token-file", default="", help="where to keep the admin token")
    return p


def main(argv: list[str] | None = None) -> None:
    run_service("keeper", parser(), build, argv)


if __name__ == "__main__":
    main()
