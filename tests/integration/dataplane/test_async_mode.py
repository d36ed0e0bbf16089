"""An app with ``async_mode.enabled``: its deployment actors pull requests from the broker's stream
and still answer synchronous calls through the proxy; both paths give the same answers. Redis
requires auth, as in the stack: the replicas pull as the app's own Redis user, which they get from
the broker with the app's endpoint token."""

from __future__ import annotations

import secrets
from collections.abc import Callable
from typing import Any

import numpy as np
import tritonclient.grpc.aio as aioclient

from servefleet.common.appid import AppId
from servefleet.common.errors import NotFound
from servefleet.common.net import async_wait_for
from servefleet.testing import Credentials, RedisProcess
from tests.integration.broker.conftest import BrokerService

from .conftest import example_spec, iris_input


async def test_async_app_serves_broker_and_proxy(
    deployed: Callable[..., Any], credentials: Credentials
) -> None:
    redis = RedisProcess(admin_password=secrets.token_hex(16)).start()
    service = await BrokerService(redis.target, credentials).start()
    spec = example_spec("iris", name="iris-async")
    spec.async_mode.enabled = True
    status = await deployed(spec, 2, broker=service.server.address)
    client = service.client
    assert client is not None
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
        assert await service.core.credentials.users.apps() == [AppId.parse(spec).key]  # type: ignore[union-attr]
    finally:
        await service.stop()
        redis.cleanup()
