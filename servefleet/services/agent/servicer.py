"""Thin gRPC layer over ``ClusterAgent`` (errors become statuses in the server's interceptor)."""

from __future__ import annotations

from typing import Any

from servefleet.api import agent_pb2, agent_pb2_grpc
from servefleet.services.agent.core import ClusterAgent


class ClusterAgentServicer(agent_pb2_grpc.ClusterAgentServicer):
    def __init__(self, agent: ClusterAgent) -> None:
        self.agent = agent

    async def ApplyApplication(
        self, request: agent_pb2.ApplyApplicationRequest, context: Any
    ) -> agent_pb2.MasterStatus:
        return await self.agent.apply(
            request.spec, request.replicas, request.revision, dict(request.stage_replicas)
        )

    async def RemoveApplication(
        self, request: agent_pb2.RemoveApplicationRequest, context: Any
    ) -> agent_pb2.RemoveApplicationResponse:
        return agent_pb2.RemoveApplicationResponse(removed=await self.agent.remove(request.app))

    async def GetApplicationState(
        self, request: agent_pb2.GetApplicationStateRequest, context: Any
    ) -> agent_pb2.MasterStatus:
        return await self.agent.state(request.app)

    async def ListMasters(
        self, request: agent_pb2.ListMastersRequest, context: Any
    ) -> agent_pb2.ListMastersResponse:
        return agent_pb2.ListMastersResponse(masters=await self.agent.list_masters())

    async def Capacity(self, request: agent_pb2.CapacityRequest, context: Any) -> agent_pb2.CapacityResponse:
        capacity, free = await self.agent.capacity()
        return agent_pb2.CapacityResponse(capacity=capacity, free=free)
