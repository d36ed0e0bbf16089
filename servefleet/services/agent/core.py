"""The cluster agent's logic, without gRPC: apply the keeper's word to one Ray cluster's masters,
and tell the keeper what the cluster has.

The agent keeps no state of its own: application masters are detached, named Ray actors that
``services.agent.masters`` finds again by name, so an agent that restarts sees the masters already
running and the keeper's next reconcile step finds them at the revision it last applied.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path
from typing import Protocol

import grpc

from servefleet.api import agent_pb2, common_pb2, keeper_pb2, keeper_pb2_grpc
from servefleet.common.auth import ENDPOINT, bearer_metadata
from servefleet.common.channels import aio_channel
from servefleet.common.config import settings
from servefleet.common.errors import InvalidArgument, NotFound, from_rpc_error

log = logging.getLogger(__name__)


class Masters(Protocol):
    """What the agent needs from ``servefleet.services.agent.masters`` (the module satisfies it)."""

    async def apply(
        self,
        spec: common_pb2.ApplicationSpec,
        replicas: int,
        revision: int,
        *,
        cluster: str,
        discovery: str,
        redis: str = "",
        broker: str = "",
        credential: str = "",
        stages: Mapping[str, int] | None = None,
    ) -> agent_pb2.MasterStatus: ...

    async def remove(self, app: common_pb2.AppRef) -> bool: ...

    async def status(self, app: common_pb2.AppRef) -> agent_pb2.MasterStatus | None: ...

    async def list_all(self) -> list[agent_pb2.MasterStatus]: ...


Resources = Callable[[], Awaitable[tuple[dict[str, float], dict[str, float]]]]
#: An app's endpoint token, obtained from the keeper when the agent creates the app's master.
Credentials = Callable[[common_pb2.AppRef], Awaitable[str]]


def parse_labels(text: str) -> dict[str, str]:
    """``k=v,k2=v2`` -> mapping; InvalidArgument naming the bad item."""
    labels: dict[str, str] = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise InvalidArgument(f"--labels: {item!r} is not key=value")
        labels[key.strip()] = value.strip()
    return labels


class ClusterAgent:
    """Creates, updates and removes application masters on one Ray cluster."""

    def __init__(
        self,
        masters: Masters,
        resources: Resources,
        *,
        cluster: str,
        discovery: str,
        redis: str = "",
        broker: str = "",
        credentials: Credentials | None = None,
    ) -> None:
        self.masters = masters
        self.resources = resources
        self.credentials = credentials
        self.cluster = cluster
        self.discovery = discovery
        self.redis = redis
        self.broker = broker

    async def apply(
        self,
        spec: common_pb2.ApplicationSpec,
        replicas: int,
        revision: int,
        stages: Mapping[str, int] | None = None,
    ) -> agent_pb2.MasterStatus:
        """Bring the app's master to ``revision`` (a pipeline's stages to the counts in
        ``stages``); a revision older than the master's is ignored (a slow keeper step must not
        roll back a newer one)."""
        if not spec.name:
            raise InvalidArgument("spec.name: required")
        if replicas < 0:
            raise InvalidArgument(f"replicas: must be >= 0, got {replicas}")
        ref = common_pb2.AppRef(namespace=spec.namespace, name=spec.name)
        current = await self.masters.status(ref)
        if current is not None and current.revision > revision:
            return current
        # A new master gets the app's own endpoint token: its proxies and replicas can register
        # that app in discovery and nothing else.
        credential = await self.credentials(ref) if current is None and self.credentials else ""
        return await self.masters.apply(
            spec,
            replicas,
            revision,
            cluster=self.cluster,
            discovery=self.discovery,
            redis=self.redis,
            broker=self.broker,
            credential=credential,
            stages=stages,
        )

    async def remove(self, ref: common_pb2.AppRef) -> bool:
        return await self.masters.remove(ref)

    async def state(self, ref: common_pb2.AppRef) -> agent_pb2.MasterStatus:
        found = await self.masters.status(ref)
        if found is None:
            raise NotFound(f"no master for {ref.namespace}/{ref.name} on cluster {self.cluster}")
        return found

    async def list_masters(self) -> list[agent_pb2.MasterStatus]:
        return await self.masters.list_all()

    async def capacity(self) -> tuple[dict[str, float], dict[str, float]]:
        return await self.resources()


def read_token(path: str) -> str:
    """The token in ``path`` (the keeper writes it on first start); "" while it is not there."""
    try:
        return Path(path).read_text().strip() if path else ""
    except FileNotFoundError:
        return ""


class Heartbeat:
    """Registers the cluster with the keeper and repeats it at the interval the keeper asks for."""

    def __init__(
        self,
        agent: ClusterAgent,
        *,
        keeper: str,
        agent_address: Callable[[], str],
        ray_address: str,
        labels: dict[str, str],
        token: Callable[[], str],
    ) -> None:
        self.agent = agent
        self.keeper = keeper
        self.agent_address = agent_address
        self.ray_address = ray_address
        self.labels = labels
        self.token = token
        self.interval_s: float = settings.keeper_heartbeat_interval_s

    async def beat(self, stub: keeper_pb2_grpc.KeeperStub) -> None:
        # No answer from Ray, no heartbeat: the keeper moves the cluster's apps after its grace.
        capacity, free = await asyncio.wait_for(self.agent.capacity(), 10)
        info = keeper_pb2.ClusterInfo(
            name=self.agent.cluster,
            agent_address=self.agent_address(),
            ray_address=self.ray_address,
            labels=self.labels,
            capacity=capacity,
            free=free,
        )
        reply = await stub.RegisterCluster(
            keeper_pb2.RegisterClusterRequest(cluster=info),
            metadata=bearer_metadata(self.token()),
            timeout=10,
        )
        self.interval_s = reply.heartbeat_interval_s or self.interval_s

    async def endpoint_token(self, app: common_pb2.AppRef) -> str:
        """A new endpoint token for ``app`` from the keeper (this agent's token has role agent)."""
        async with aio_channel(self.keeper, token=self.token()) as channel:
            request = keeper_pb2.IssueTokenRequest(
                role=ENDPOINT,
                app=app,
                description=f"endpoints of {app.namespace}/{app.name} on {self.agent.cluster}",
            )
            try:
                reply = await keeper_pb2_grpc.KeeperStub(channel).IssueToken(request, timeout=10)
            except grpc.aio.AioRpcError as exc:
                raise from_rpc_error(exc) from None
        return reply.token

    async def run(self) -> None:
        async with aio_channel(self.keeper) as channel:
            stub = keeper_pb2_grpc.KeeperStub(channel)
            while True:
                try:
                    await self.beat(stub)
                except grpc.aio.AioRpcError as exc:
                    log.warning(
                        "heartbeat to keeper failed",
                        extra={"keeper": self.keeper, "code": exc.code().name, "details": exc.details()},
                    )
                except Exception as exc:  # Ray unreachable: skip this beat, try again next interval
                    log.warning("no heartbeat: cluster capacity unknown", extra={"error": repr(exc)})
                await asyncio.sleep(self.interval_s)
