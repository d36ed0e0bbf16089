"""``kind: direct`` through the application master: C++ servers inside Ray actors, registered in
discovery, called by the SDK and tritonclient with no proxy; a killed actor drops out of every
client's view within the lease TTL while the SDK fails over to the other replica."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import ray

from servefleet.api import common_pb2, discovery_pb2
from servefleet.common.appid import AppId
from servefleet.common.auth import ENDPOINT
from servefleet.common.config import settings
from servefleet.common.net import async_wait_for
from servefleet.direct import INPUT_NAME, OUTPUT_NAME, ctr
from servefleet.sdk import AsyncClient
from servefleet.services.actors import RAY_NAMESPACE, replica_prefix
from servefleet.services.agent import masters
from servefleet.spec import load_spec
from servefleet.testing import Credentials, DiscoveryProcess

pytestmark = [pytest.mark.ray, pytest.mark.slow]
APP = "recs/ctr-direct"


def direct_spec(model_path: Path, name: str = "ctr-direct") -> common_pb2.ApplicationSpec:
    return load_spec(
        {
            "name": name,
            "namespace": "recs",
            "version": "1",
            "kind": "direct",
            "init_args": {"model_path": str(model_path), "workers": 2},
            "inputs": [{"name": INPUT_NAME, "datatype": "INT64", "shape": [-1, 16]}],
            "outputs": [{"name": OUTPUT_NAME, "datatype": "FP32", "shape": [-1]}],
            "resources": {"num_cpus": 0.1},
            "replicas": {"min": 2, "max": 2, "initial": 2},
        }
    )


@pytest.fixture
async def client(discovery_server: DiscoveryProcess) -> AsyncIterator[AsyncClient]:
    async with AsyncClient(discovery_server.address, timeout=10.0, token=discovery_server.token) as client:
        yield client


@pytest.fixture
async def deployed(
    ray_driver: str, discovery_server: DiscoveryProcess, ctr_model_path: Path, credentials: Credentials
) -> AsyncIterator[common_pb2.ApplicationSpec]:
    spec = direct_spec(ctr_model_path)
    await apply_new(spec, discovery_server, credentials)
    yield spec
    await masters.remove(AppId.parse(spec).ref())


async def apply_new(
    spec: common_pb2.ApplicationSpec, discovery: DiscoveryProcess, credentials: Credentials
) -> None:
    """Create the app's master as the agent does: with the app's own endpoint token."""
    token = await credentials.issue(ENDPOINT, app=f"{spec.namespace}/{spec.name}")
    await masters.apply(
        spec,
        spec.replicas.initial,
        1,
        cluster="direct-cluster",
        discovery=discovery.address,
        credential=token,
    )


async def _replicas(spec: common_pb2.ApplicationSpec) -> dict[str, str]:
    """Replica actor name -> its server's address, once the master has both replicas ready."""
    return {name: info["address"] for name, info in (await ready_replicas(spec)).items()}


async def ready_replicas(
    spec: common_pb2.ApplicationSpec, count: int = 2, *, timeout: float = 120
) -> dict[str, dict[str, Any]]:
    """Replica actor name -> its ``ready`` answer (address, node_id, ...), once the master has
    ``count`` replicas ready and no other replica actor lives."""

    async def ready() -> bool:
        status = await masters.status(AppId.parse(spec).ref())
        return status is not None and status.ready_replicas == count and len(_replica_names(spec)) == count

    await async_wait_for(ready, timeout=timeout, interval=0.1, what=f"{count} direct replicas ready")
    handles = {name: ray.get_actor(name, namespace=RAY_NAMESPACE) for name in _replica_names(spec)}
    return {name: await handle.ready.remote() for name, handle in handles.items()}


def _replica_names(spec: common_pb2.ApplicationSpec) -> list[str]:
    return [
        a["name"]
        for a in ray.util.list_named_actors(all_namespaces=True)
        if a["namespace"] == RAY_NAMESPACE and a["name"].startswith(replica_prefix(AppId.parse(spec).ref()))
    ]


async def _seen(client: AsyncClient, addresses: set[str], app: str = APP) -> list[discovery_pb2.Endpoint]:
    """Wait until the SDK's view of ``app`` is exactly these direct endpoints."""

    async def exact() -> list[discovery_pb2.Endpoint] | None:
        endpoints = await client.endpoints(app)
        same = {e.address for e in endpoints} == addresses and all(e.kind == "direct" for e in endpoints)
        return endpoints if same else None

    found = await async_wait_for(exact, timeout=60, interval=0.1, what=f"SDK view {sorted(addresses)}")
    assert isinstance(found, list)
    return found


async def test_sdk_and_tritonclient_get_reference_scores_without_a_proxy(
    deployed: common_pb2.ApplicationSpec, client: AsyncClient, ctr_reference: ctr.FactorizationMachine
) -> None:
    replicas = await _replicas(deployed)
    assert len(replicas) == 2
    for endpoint in await _seen(client, set(replicas.values())):
        assert endpoint.labels["cluster"] == "direct-cluster" and endpoint.labels["node"]
    status = await masters.status(AppId.parse(deployed).ref())
    assert status is not None and not status.proxy_addresses

    ids = np.random.default_rng(7).integers(0, 1 << 20, size=(64, 16), dtype=np.int64)
    out = await client.infer(APP, {INPUT_NAME: ids})
    np.testing.assert_allclose(out[OUTPUT_NAME], ctr_reference.score(ids), rtol=1e-5, atol=1e-6)

    triton = await client.triton_client(APP)
    try:
        from tritonclient.grpc import InferInput

        tensor = InferInput(INPUT_NAME, list(ids.shape), "INT64")
        tensor.set_data_from_numpy(ids)
        result = await triton.infer(APP, [tensor])
        np.testing.assert_allclose(
            result.as_numpy(OUTPUT_NAME), ctr_reference.score(ids), rtol=1e-5, atol=1e-6
        )
    finally:
        await triton.close()


async def test_killed_actor_leaves_within_the_ttl_and_the_sdk_fails_over(
    deployed: common_pb2.ApplicationSpec, client: AsyncClient, ctr_reference: ctr.FactorizationMachine
) -> None:
    replicas = await _replicas(deployed)
    await _seen(client, set(replicas.values()))
    ids = np.random.default_rng(8).integers(0, 1 << 20, size=(1, 16), dtype=np.int64)
    expected = ctr_reference.score(ids)
    victim_name, victim_address = sorted(replicas.items())[0]
    victim = ray.get_actor(victim_name, namespace=RAY_NAMESPACE)

    ray.kill(victim, no_restart=True)
    killed_at = asyncio.get_running_loop().time()
    served = 0

    async def victim_gone() -> bool:
        nonlocal served
        # Requests keep succeeding meanwhile: the SDK retries a dead endpoint on the other one.
        out = await client.infer(APP, {INPUT_NAME: ids})
        np.testing.assert_allclose(out[OUTPUT_NAME], expected, rtol=1e-5, atol=1e-6)
        served += 1
        return victim_address not in {e.address for e in await client.endpoints(APP)}

    await async_wait_for(
        victim_gone, timeout=settings.discovery_ttl_s + 2, interval=0.05, what="endpoint removal"
    )
    assert served > 0
    assert asyncio.get_running_loop().time() - killed_at <= settings.discovery_ttl_s + 2
    # The master replaces the dead replica; the new one registers itself.
    replaced = await _replicas(deployed)
    assert victim_name not in replaced
    await _seen(client, set(replaced.values()))


async def test_scaling_down_and_removing_deregister_at_once(
    ray_driver: str,
    discovery_server: DiscoveryProcess,
    client: AsyncClient,
    ctr_model_path: Path,
    credentials: Credentials,
) -> None:
    spec = direct_spec(ctr_model_path)
    await apply_new(spec, discovery_server, credentials)
    await _seen(client, set((await _replicas(spec)).values()))
    # Drained replicas deregister: each change shows before a lease (TTL) could have lapsed.
    await masters.apply(spec, 1, 2, cluster="direct-cluster", discovery=discovery_server.address)
    await async_wait_for(
        lambda: _count(client, 1), timeout=settings.discovery_ttl_s - 1, interval=0.05, what="scale to 1"
    )
    await masters.remove(AppId.parse(spec).ref())
    await async_wait_for(
        lambda: _count(client, 0), timeout=settings.discovery_ttl_s - 1, interval=0.05, what="deregistration"
    )


async def _count(client: AsyncClient, count: int) -> bool:
    return len(await client.endpoints(APP)) == count
