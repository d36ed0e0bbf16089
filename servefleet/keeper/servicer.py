"""Thin gRPC layer over ``Keeper``. Authentication happens once, in ``authenticated()``, for every
method of the service: a method cannot be added without it."""

from __future__ import annotations

import inspect
from collections.abc import AsyncIterator, Callable
from types import SimpleNamespace
from typing import Any

import grpc

from servefleet.api import keeper_pb2, keeper_pb2_grpc
from servefleet.keeper.auth import Authenticator, Principal
from servefleet.keeper.core import Keeper

SERVICE = keeper_pb2.DESCRIPTOR.services_by_name["Keeper"]


class KeeperServicer:
    """One method per RPC, each given the caller the authenticator resolved."""

    def __init__(self, keeper: Keeper) -> None:
        self.keeper = keeper

    async def SubmitApplication(
        self, request: keeper_pb2.SubmitApplicationRequest, context: Any, who: Principal
    ) -> keeper_pb2.ApplicationStatus:
        return await self.keeper.submit(who, request.spec)

    async def GetApplication(
        self, request: keeper_pb2.GetApplicationRequest, context: Any, who: Principal
    ) -> keeper_pb2.ApplicationStatus:
        return await self.keeper.get(who, request.app)

    async def ListApplications(
        self, request: keeper_pb2.ListApplicationsRequest, context: Any, who: Principal
    ) -> keeper_pb2.ListApplicationsResponse:
        return await self.keeper.list_apps(who, request)

    async def UpdateApplication(
        self, request: keeper_pb2.UpdateApplicationRequest, context: Any, who: Principal
    ) -> keeper_pb2.ApplicationStatus:
        return await self.keeper.update(who, request.spec, request.expected_revision)

    async def ScaleApplication(
        self, request: keeper_pb2.ScaleApplicationRequest, context: Any, who: Principal
    ) -> keeper_pb2.ApplicationStatus:
        return await self.keeper.scale(
            who,
            request.app,
            request.replicas,
            request.expected_revision,
            reason=request.reason,
            by_autoscaler=request.by_autoscaler,
            resume_autoscaling=request.resume_autoscaling,
        )

    async def DeleteApplication(
        self, request: keeper_pb2.DeleteApplicationRequest, context: Any, who: Principal
    ) -> keeper_pb2.ApplicationStatus:
        return await self.keeper.delete(who, request.app)

    async def WatchApplication(
        self, request: keeper_pb2.WatchApplicationRequest, context: Any, who: Principal
    ) -> AsyncIterator[keeper_pb2.StatusEvent]:
        async for event in self.keeper.watch(who, request.app):
            yield event

    async def RegisterCluster(
        self, request: keeper_pb2.RegisterClusterRequest, context: Any, who: Principal
    ) -> keeper_pb2.RegisterClusterResponse:
        interval = await self.keeper.register_cluster(who, request.cluster)
        return keeper_pb2.RegisterClusterResponse(heartbeat_interval_s=interval)

    async def ListClusters(
        self, request: keeper_pb2.ListClustersRequest, context: Any, who: Principal
    ) -> keeper_pb2.ListClustersResponse:
        return keeper_pb2.ListClustersResponse(clusters=await self.keeper.clusters(who))

    async def CreateTenant(
        self, request: keeper_pb2.CreateTenantRequest, context: Any, who: Principal
    ) -> keeper_pb2.TenantInfo:
        return await self.keeper.create_tenant(who, request)

    async def IssueToken(
        self, request: keeper_pb2.IssueTokenRequest, context: Any, who: Principal
    ) -> keeper_pb2.IssueTokenResponse:
        return keeper_pb2.IssueTokenResponse(
            token=await self.keeper.issue_token(who, request.tenant, request.role)
        )

    async def SetQuota(
        self, request: keeper_pb2.SetQuotaRequest, context: Any, who: Principal
    ) -> keeper_pb2.TenantInfo:
        return await self.keeper.set_quota(who, request.tenant, request.quota)


def authenticated(servicer: KeeperServicer, auth: Authenticator) -> SimpleNamespace:
    """Every RPC of the Keeper service, each resolving the caller's token before anything else."""

    def wrap(method: Callable[..., Any], streaming: bool) -> Callable[..., Any]:
        if streaming:

            async def stream(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
                who = await auth.authenticate(context.invocation_metadata())
                async for item in method(request, context, who):
                    yield item

            return stream

        async def unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
            return await method(request, context, await auth.authenticate(context.invocation_metadata()))

        return unary

    handlers = {}
    for rpc in SERVICE.methods:
        method = getattr(servicer, rpc.name)
        assert inspect.iscoroutinefunction(method) or inspect.isasyncgenfunction(method), rpc.name
        handlers[rpc.name] = wrap(method, rpc.server_streaming)
    return SimpleNamespace(**handlers)


def register(servicer: KeeperServicer, auth: Authenticator) -> Callable[[grpc.aio.Server], None]:
    return lambda server: keeper_pb2_grpc.add_KeeperServicer_to_server(authenticated(servicer, auth), server)
