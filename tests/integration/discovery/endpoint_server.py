"""A tiny KServe v2 endpoint process for discovery/SDK tests: answers ModelInfer with ``y = 2 * x``
plus its own id (optionally after a delay) and keeps itself registered via ``registration(...)``."""

from __future__ import annotations

import argparse
import asyncio
import signal

import grpc
import numpy as np
from tritonclient.grpc import service_pb2, service_pb2_grpc

from servefleet.api import discovery_pb2
from servefleet.common import tensors
from servefleet.common.appid import AppId
from servefleet.common.errors import InvalidArgument, NotFound
from servefleet.common.server import GrpcServer
from servefleet.discovery.registration import registration


class Echo(service_pb2_grpc.GRPCInferenceServiceServicer):
    def __init__(self, app: str, endpoint_id: str, delay_s: float) -> None:
        self.model = AppId.parse(AppId.parse(app).ref()).model_name
        self.endpoint_id = endpoint_id
        self.delay_s = delay_s

    async def ServerLive(self, request: object, context: grpc.aio.ServicerContext) -> object:
        return service_pb2.ServerLiveResponse(live=True)

    async def ServerReady(self, request: object, context: grpc.aio.ServicerContext) -> object:
        return service_pb2.ServerReadyResponse(ready=True)

    async def ModelReady(
        self, request: service_pb2.ModelReadyRequest, context: grpc.aio.ServicerContext
    ) -> object:
        return service_pb2.ModelReadyResponse(ready=request.name == self.model)

    async def ModelInfer(
        self, request: service_pb2.ModelInferRequest, context: grpc.aio.ServicerContext
    ) -> service_pb2.ModelInferResponse:
        if request.model_name != self.model:
            raise NotFound(f"model {request.model_name!r} is not served here ({self.model!r} is)")
        inputs = tensors.decode_request(request)
        if "x" not in inputs:
            raise InvalidArgument(f"{self.model} needs input 'x'; got {sorted(inputs)}")
        if self.delay_s:
            await asyncio.sleep(self.delay_s)
        outputs = {"y": inputs["x"] * 2, "server": np.array([self.endpoint_id.encode()], dtype=object)}
        return tensors.encode_response(self.model, outputs, request_id=request.id)


async def main(args: argparse.Namespace) -> None:
    servicer = Echo(args.app, args.id, args.delay_ms / 1000)
    server = GrpcServer(
        "endpoint",
        args.listen,
        [lambda s: service_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(servicer, s)],
        ["inference.GRPCInferenceService"],
    )
    await server.start()
    endpoint = discovery_pb2.Endpoint(
        id=args.id,
        app=AppId.parse(args.app).ref(),
        kind="proxy",  # a plain KServe endpoint: it serves the app under its own model name
        address=server.address,
        labels={"zone": args.zone} if args.zone else {},
        weight=args.weight,
    )
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        asyncio.get_running_loop().add_signal_handler(sig, stop.set)
    async with registration(args.discovery, endpoint, ttl_s=args.ttl):
        await stop.wait()
    await server.stop(0)


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("--discovery", required=True)
    p.add_argument("--app", required=True)
    p.add_argument("--id", required=True)
    p.add_argument("--listen", required=True)
    p.add_argument("--ttl", type=int, default=2)
    p.add_argument("--delay-ms", type=float, default=0.0)
    p.add_argument("--zone", default="")
    p.add_argument("--weight", type=float, default=0.0)
    asyncio.run(main(p.parse_args()))
