"""Thin gRPC layer over DiscoveryCore: unpack, call, pack. The server interceptor authenticates
every call and checks its role; the core checks the application with ``caller()``."""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc

from servefleet.api import discovery_pb2, discovery_pb2_grpc
from servefleet.common.auth import caller
from servefleet.discovery.core import DiscoveryCore


class DiscoveryServicer(discovery_pb2_grpc.DiscoveryServicer):
    def __init__(self, core: DiscoveryCore) -> None:
        self._core = core

    async def Register(
        self, request: discovery_pb2.RegisterRequest, context: grpc.aio.ServicerContext
    ) -> discovery_pb2.RegisterResponse:
        return await self._core.register(
            caller(), request.endpoint, ttl_s=request.ttl_s, lease_id=request.lease_id
        )

    async def KeepAlive(
        self,
        request_iterator: AsyncIterator[discovery_pb2.KeepAliveRequest],
        context: grpc.aio.ServicerContext,
    ) -> AsyncIterator[discovery_pb2.KeepAliveResponse]:
        who, checked = caller(), set()
        async for request in request_iterator:
            if request.lease_id > 0 and request.lease_id not in checked:
                if not await self._core.check_lease(who, request.lease_id):
                    yield discovery_pb2.KeepAliveResponse(lease_id=request.lease_id, ttl_s=0)  # gone
                    continue
                checked.add(request.lease_id)
            yield await self._core.keep_alive(request.lease_id)

    async def Deregister(
        self, request: discovery_pb2.DeregisterRequest, context: grpc.aio.ServicerContext
    ) -> discovery_pb2.DeregisterResponse:
        revision = await self._core.deregister(caller(), request.app, request.endpoint_id, request.lease_id)
        return discovery_pb2.DeregisterResponse(revision=revision)

    async def Resolve(
        self, request: discovery_pb2.ResolveRequest, context: grpc.aio.ServicerContext
    ) -> discovery_pb2.ResolveResponse:
        return await self._core.resolve(
            caller(), request.app, kind=request.kind, label_filter=request.label_filter
        )

    async def Watch(
        self, request: discovery_pb2.WatchRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[discovery_pb2.WatchEvent]:
        async for event in self._core.watch(caller(), request.app, from_revision=request.from_revision):
            yield event
