"""Thin gRPC layer over ``Keeper``. The server interceptor authenticates every call and checks the
caller's role (``servefleet.common.auth.ALLOWED``); ``with_caller()`` hands each method that caller."""

from __future__ import annotations

import inspect
from collections.abc import AsyncIterator, Callable
from types import SimpleNamespace
from typing import Any

import grpc

from servefleet.api import keeper_pb2, keeper_pb2_grpc
from servefleet.common.auth import Principal, caller
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
            stage=request.stage,
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
        token, token_id = await self.keeper.issue_token(who, request)
        return keeper_pb2.IssueTokenResponse(token=token, token_id=token_id)

    async def SetQuota(
        self, request: keeper_pb2.SetQuotaRequest, context: Any, who: Principal
    ) -> keeper_pb2.TenantInfo:
        return await self.keeper.set_quota(who, request.tenant, request.quota)

    async def ListTokens(
        self, request: keeper_pb2.ListTokensRequest, context: Any, who: Principal
    ) -> keeper_pb2.ListTokensResponse:
        return keeper_pb2.ListTokensResponse(tokens=await self.keeper.list_tokens(who, request.tenant))

    async def RevokeToken(
        self, request: keeper_pb2.RevokeTokenRequest, context: Any, who: Principal
    ) -> keeper_pb2.RevokeTokenResponse:
        return keeper_pb2.RevokeTokenResponse(token=await self.keeper.revoke_token(who, request.token_id))


def with_caller(servicer: KeeperServicer) -> SimpleNamespace:
    """Every RPC of the Keeper service, each given the caller the server interceptor authenticated."""

    def wrap(method: Callable[..., Any], streaming: bool) -> Callable[..., Any]:
        if streaming:

            async def stream(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
                async for item in method(request, context, caller()):
                    yield item

            return stream

        async def unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
            return await method(request, context, caller())

        return unary

    handlers = {}
    for rpc in SERVICE.methods:
        method = getattr(servicer, rpc.name)
        assert inspect.iscoroutinefunction(method) or inspect.isasyncgenfunction(method), rpc.name
        handlers[rpc.name] = wrap(method, rpc.server_streaming)
    return SimpleNamespace(**handlers)


def register(servicer: KeeperServicer) -> Callable[[grpc.aio.Server], None]:
    return lambda server: keeper_pb2_grpc.add_KeeperServicer_to_server(with_caller(servicer), server)
