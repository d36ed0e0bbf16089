"""Thin gRPC layer over ``Autoscaler``: what it knows and decides, per app (errors mapped by the
server interceptor)."""

from __future__ import annotations

from collections.abc import Callable

import grpc

from servefleet.api import autoscaler_pb2, autoscaler_pb2_grpc
from servefleet.autoscaler.core import Autoscaler

SERVICE = autoscaler_pb2.DESCRIPTOR.services_by_name["Autoscaler"].full_name


class AutoscalerServicer(autoscaler_pb2_grpc.AutoscalerServicer):
    def __init__(self, core: Autoscaler) -> None:
        self.core = core

    async def GetState(
        self, request: autoscaler_pb2.GetAutoscalerStateRequest, context: grpc.aio.ServicerContext
    ) -> autoscaler_pb2.AutoscalerState:
        return self.core.state(request.app if request.HasField("app") else None)


def register(servicer: AutoscalerServicer) -> Callable[[grpc.aio.Server], None]:
    return lambda server: autoscaler_pb2_grpc.add_AutoscalerServicer_to_server(servicer, server)
