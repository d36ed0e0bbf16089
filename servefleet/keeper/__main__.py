"""Entry point: `python -m servefleet.keeper --listen HOST:PORT --etcd HOST:PORT[,HOST:PORT...]`."""

from __future__ import annotations

import argparse

from servefleet.common import metrics
from servefleet.common.entry import Service, run_service, service_parser
from servefleet.common.etcd import add_etcd_flag
from servefleet.keeper.reconciler import ReplicaCountCollector
from servefleet.keeper.service import build_keeper
from servefleet.keeper.store import KeeperStore


async def build(args: argparse.Namespace) -> Service:
    store = KeeperStore.connect(args.etcd)
    keeper = await build_keeper(store, args.listen, admin_token_file=args.admin_token_file)
    metrics.REGISTRY.register(ReplicaCountCollector(keeper.reconciler, keeper.election.leading))

    async def stop() -> None:
        await keeper.close()
        await store.close()

    # Without etcd the keeper can neither read nor store desired state.
    return Service(keeper.server, on_stop=stop, dependencies={"etcd": store.leader})


def parser() -> argparse.ArgumentParser:
    p = service_parser("keeper", "servefleet keeper service")
    add_etcd_flag(p, "desired state, tokens, leader election")
    p.add_argument("--admin-token-file", default="", help="where to keep the admin token")
    return p


def main(argv: list[str] | None = None) -> None:
    run_service("keeper", parser(), build, argv)


if __name__ == "__main__":
    main()
