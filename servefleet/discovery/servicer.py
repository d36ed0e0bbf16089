"""Thin gRPC layer over DiscoveryCore: unpack, call, pack (errors map in the server interceptor)."""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc

from servefleet.api import discovery_pb2, discovery_pb2_grpc
from servefleet.discovery.core import DiscoveryCore


class DiscoveryServicer(discovery_pb2_grpc.DiscoveryServicer):
    def __init__(self, core: DiscoveryCore) -> None:
        self._core = core

    async def Register(
        self, request: discovery_pb2.RegisterRequest, context: grpc.aio.ServicerContext
    ) -> discovery_pb2.RegisterResponse:
        return await self._core.register(request.endpoint, ttl_s=request.ttl_s, lease_id=request.lease_id)

    async def KeepAlive(
        self,
        request_iterator: AsyncIterator[discovery_pb2.KeepAliveRequest],
        context: grpc.aio.ServicerContext,
    ) -> AsyncIterator[discovery_pb2.KeepAliveResponse]:
        async for request in request_iterator:
            yield await self._core.keep_alive(request.lease_id)

    async def Deregister(
        self, request: discovery_pb2.DeregisterRequest, context: grpc.aio.ServicerContext
    ) -> discovery_pb2.DeregisterResponse:
        revision = await self._core.deregister(request.app, request.endpoint_id, request.lease_id)
        return discovery_pb2.DeregisterResponse(revision=revision)

    async def Resolve(
        self, request: discovery_pb2.ResolveRequest, context: grpc.aio.ServicerContext
    ) -> discovery_pb2.ResolveResponse:
        return await self._core.resolve(request.app, kind=request.kind, label_filter=request.label_filter)

    async def Watch(
        self, request: discovery_pb2.WatchRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[discovery_pb2.WatchEvent]:
        async for event in self._core.watch(request.app, from_revision=request.from_revision):
            yield event
