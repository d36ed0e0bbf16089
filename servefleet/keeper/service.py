"""The keeper as one serving unit: its gRPC server, and the leader election under which it runs
the reconciler. ``python -m servefleet.keeper`` and the in-process test keeper both build it here,
so a test runs the keeper the entry point runs."""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from dataclasses import dataclass

from servefleet.api import keeper_pb2
from servefleet.common.auth import KEEPER, Authenticator, hash_token
from servefleet.common.server import GrpcServer
from servefleet.keeper.core import Keeper
from servefleet.keeper.election import Election
from servefleet.keeper.reconciler import Agents, Reconciler
from servefleet.keeper.servicer import KeeperServicer, register
from servefleet.keeper.store import KeeperStore

SERVICE = keeper_pb2.DESCRIPTOR.services_by_name["Keeper"].full_name


@dataclass
class KeeperService:
    """A keeper whose election (and, while leading, reconciler) already runs; ``server`` is not
    started yet. ``close()`` after the server stopped: leave the lead, close agent channels."""

    keeper: Keeper
    server: GrpcServer
    admin_token: str
    agents: Agents
    election: Election
    reconciler: Reconciler
    leading: asyncio.Task[None]

    async def close(self) -> None:
        self.leading.cancel()
        with contextlib.suppress(BaseException):
            await self.leading
        await self.election.resign()
        await self.agents.close()
        # This keeper's own token (it called agents with it) dies with it.
        await self.keeper.store.delete_token(hash_token(self.agents.token))


async def build_keeper(
    store: KeeperStore,
    listen: str,
    *,
    admin_token_file: str = "",
    leader_ttl_s: int | None = None,
    reconcile_interval_s: float | None = None,
    agent_timeout_s: float = 60.0,
) -> KeeperService:
    """Bootstrap the admin token, build the server and start competing for the lead (unset
    tunables come from ``settings``)."""
    keeper = Keeper(store)
    token = await keeper.bootstrap_admin(admin_token_file)
    server = GrpcServer(
        "keeper", listen, [register(KeeperServicer(keeper))], [SERVICE], auth=Authenticator(store), tls=True
    )
    ident = f"{listen}/{uuid.uuid4().hex[:8]}"
    # Agents answer only keepers and admins: each keeper calls them with a token of its own.
    agents = Agents(timeout_s=agent_timeout_s, token=await keeper.service_token(KEEPER, f"keeper {ident}"))
    election = Election(store.client, store.leader_key, ttl_s=leader_ttl_s, ident=ident)
    reconciler = Reconciler(store, agents, interval_s=reconcile_interval_s)
    leading = asyncio.create_task(election.run(reconciler.run))
    return KeeperService(keeper, server, token, agents, election, reconciler, leading)
