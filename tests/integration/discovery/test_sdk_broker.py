"""Client(broker=...) hands long requests to the async broker and waits on the ticket."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
from tritonclient.grpc import service_pb2

from servefleet import AsyncClient, Client
from servefleet.broker.core import BrokerCore
from servefleet.broker.queue import RedisStreamQueue
from servefleet.broker.servicer import broker_server
from servefleet.broker.worker import PullWorker
from servefleet.common import tensors
from servefleet.common.errors import FailedPrecondition
from servefleet.testing import Credentials, DiscoveryProcess, RedisProcess


async def triple(request: service_pb2.ModelInferRequest) -> service_pb2.ModelInferResponse:
    inputs = tensors.decode_request(request)
    return tensors.encode_response(request.model_name, {"y": inputs["x"] * 3})


async def test_submit_and_result_through_the_broker(
    discovery: DiscoveryProcess, redis_server: RedisProcess, credentials: Credentials
) -> None:
    core = BrokerCore(RedisStreamQueue(redis_server.address))
    server = broker_server(core, "127.0.0.1:0", credentials.authenticator())
    token = discovery.token
    await server.start()
    worker = PullWorker(redis_server.address, "default/sdk-long", consumer="w1", slots=2, handler=triple)
    await worker.start()
    x = np.arange(3, dtype=np.int32)
    try:
        async with AsyncClient(discovery.address, broker=server.address, token=token) as client:
            ticket = await client.submit("sdk-long", {"x": x}, idempotency_key="k1")
            np.testing.assert_array_equal((await client.result(ticket, timeout=20))["y"], x * 3)
        with Client(discovery.address, broker=server.address, token=token) as sync:
            ticket = await asyncio.to_thread(sync.submit, "sdk-long", {"x": x})
            out = await asyncio.to_thread(sync.result, ticket, timeout=20)
            np.testing.assert_array_equal(out["y"], x * 3)
        async with AsyncClient(discovery.address, token=token) as plain:
            with pytest.raises(FailedPrecondition, match="without broker"):
                await plain.submit("sdk-long", {"x": x})
    finally:
        await worker.stop(drain=False)
        await server.stop(0)
        await core.close()
