"""An app with ``async_mode.enabled``: its deployment actors pull requests from the broker's stream
and still answer synchronous calls through the proxy; both paths give the same answers."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import tritonclient.grpc.aio as aioclient

from servefleet.broker.core import BrokerCore
from servefleet.broker.queue import RedisStreamQueue
from servefleet.broker.servicer import broker_server
from servefleet.common.appid import AppId
from servefleet.common.errors import NotFound
from servefleet.common.net import async_wait_for
from servefleet.sdk.broker_client import AsyncBrokerClient
from servefleet.testing import Credentials, RedisProcess

from .conftest import example_spec, iris_input


async def test_async_app_serves_broker_and_proxy(
    deployed: Callable[..., Any], redis_server: RedisProcess, credentials: Credentials
) -> None:
    spec = example_spec("iris", name="iris-async")
    spec.async_mode.enabled = True
    status = await deployed(spec, 2, redis=redis_server.address)

    core = BrokerCore(RedisStreamQueue(redis_server.address))
    server = broker_server(core, "127.0.0.1:0", credentials.authenticator())
    await server.start()
    client = AsyncBrokerClient(server.address, token=await credentials.admin())
    try:
        app = AppId.parse(spec).ref()

        async def workers_registered() -> bool:
            try:
                return (await client.stats(app)).workers >= 2
            except NotFound:
                return False

        await async_wait_for(workers_registered, timeout=60, what="both replicas pulling from the broker")
        rng = np.random.default_rng(7)
        batches = [rng.uniform(0.5, 7.0, size=(3, 4)).astype(np.float32) for _ in range(30)]
        tickets = [await client.submit(app, {"features": batch}) for batch in batches]
        results = [await client.result(ticket, timeout=60) for ticket in tickets]

        triton = aioclient.InferenceServerClient(status.proxy_addresses[0])
        try:
            for batch, result in zip(batches[:5], results, strict=False):
                sync = await triton.infer(spec.name, [iris_input(batch)])
                np.testing.assert_array_equal(result["label"], sync.as_numpy("label"))
                np.testing.assert_allclose(result["scores"], sync.as_numpy("scores"), rtol=1e-6)
        finally:
            await triton.close()
        assert all(r["scores"].shape == (3, 3) for r in results)
        stats = await client.stats(app)
        assert stats.depth == 0 and stats.in_flight == 0
    finally:
        await client.close()
        await server.stop(0)
        await core.close()
