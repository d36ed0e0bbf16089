"""Thin gRPC layer over BrokerCore: unpack, call, pack. The server interceptor authenticates every
call (and maps errors); each method checks the app or ticket belongs to ``caller()``."""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc

from servefleet.api import broker_pb2, broker_pb2_grpc
from servefleet.broker.core import BrokerCore
from servefleet.common.auth import Authenticator, caller
from servefleet.common.server import GrpcServer


class BrokerServicer(broker_pb2_grpc.BrokerServicer):
    def __init__(self, core: BrokerCore) -> None:
        self.core = core

    async def Submit(
        self, request: broker_pb2.SubmitRequest, context: grpc.aio.ServicerContext
    ) -> broker_pb2.SubmitResponse:
        return await self.core.submit(caller(), request)

    async def GetResult(
        self, request: broker_pb2.GetResultRequest, context: grpc.aio.ServicerContext
    ) -> broker_pb2.TicketStatus:
        wait = request.wait_timeout_s
        remaining = context.time_remaining()
        if remaining is not None:  # answer before the caller's deadline, with the current status
            wait = min(wait, max(0.0, remaining - 0.05))
        return await self.core.get_result(caller(), request.ticket, wait)

    async def WatchResult(
        self, request: broker_pb2.WatchResultRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[broker_pb2.TicketStatus]:
        async for status in self.core.watch(caller(), request.ticket):
            yield status

    async def Cancel(
        self, request: broker_pb2.CancelRequest, context: grpc.aio.ServicerContext
    ) -> broker_pb2.TicketStatus:
        return await self.core.cancel(caller(), request.ticket)

    async def QueueStats(
        self, request: broker_pb2.QueueStatsRequest, context: grpc.aio.ServicerContext
    ) -> broker_pb2.QueueStatsResponse:
        return await self.core.stats(caller(), request.app)

    async def GetWorkerCredential(
        self, request: broker_pb2.WorkerCredentialRequest, context: grpc.aio.ServicerContext
    ) -> broker_pb2.WorkerCredential:
        return await self.core.worker_credential(caller(), request.app, rotate=request.rotate)


def broker_server(core: BrokerCore, listen: str, auth: Authenticator) -> GrpcServer:
    """A GrpcServer (health, reflection, callers checked by ``auth``) serving the broker over ``core``."""
    servicer = BrokerServicer(core)
    return GrpcServer(
        "broker",
        listen,
        [lambda server: broker_pb2_grpc.add_BrokerServicer_to_server(servicer, server)],
        [broker_pb2.DESCRIPTOR.services_by_name["Broker"].full_name],
        auth=auth,
        tls=True,
    )
