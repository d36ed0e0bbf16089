"""The SDK carries the caller's trace context to the endpoint (W3C traceparent in metadata)."""

from __future__ import annotations

import grpc
import numpy as np
from tritonclient.grpc import service_pb2, service_pb2_grpc

from servefleet import AsyncClient
from servefleet.api import discovery_pb2
from servefleet.common import tensors
from servefleet.common.appid import AppId
from servefleet.common.net import async_wait_for
from servefleet.common.telemetry import setup_tracing, tracer
from servefleet.discovery.registration import registration
from servefleet.testing import DiscoveryProcess


class Recorder(service_pb2_grpc.GRPCInferenceServiceServicer):
    def __init__(self) -> None:
        self.metadata: list[dict[str, str]] = []

    async def ModelInfer(
        self, request: service_pb2.ModelInferRequest, context: grpc.aio.ServicerContext
    ) -> service_pb2.ModelInferResponse:
        self.metadata.append({k: str(v) for k, v in context.invocation_metadata() or ()})
        return tensors.encode_response(request.model_name, tensors.decode_request(request))


async def test_trace_context_reaches_the_endpoint(discovery: DiscoveryProcess) -> None:
    setup_tracing("servefleet-tests")
    recorder = Recorder()
    server = grpc.aio.server()
    service_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(recorder, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    endpoint = discovery_pb2.Endpoint(
        app=AppId.parse("traced").ref(), kind="proxy", address=f"127.0.0.1:{port}"
    )
    try:
        async with (
            registration(discovery.address, endpoint, token=discovery.token),
            AsyncClient(discovery.address, token=discovery.token) as client,
        ):

            async def listed() -> bool:
                return len(await client.endpoints("traced")) == 1

            await async_wait_for(listed, timeout=20, what="traced endpoint")
            with tracer.start_as_current_span("caller") as span:
                out = await client.infer("traced", {"x": np.ones(2, np.int64)}, metadata=[("tenant", "t1")])
            trace_id = format(span.get_span_context().trace_id, "032x")
    finally:
        await server.stop(0)
    np.testing.assert_array_equal(out["x"], np.ones(2, np.int64))
    (seen,) = recorder.metadata
    assert seen["tenant"] == "t1"
    assert seen["traceparent"].split("-")[1] == trace_id
