"""``kind: triton`` through the application master: tritonserver inside Ray actors, registered
in discovery as kind ``triton``, called by the SDK with no proxy. A SIGKILLed server or a rolling
update under load costs no request; the servers leave with their actors."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import urllib.request
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
import ray
import tritonclient.grpc.aio as tritonaio
from tritonclient.utils import InferenceServerException

from servefleet.api import common_pb2, discovery_pb2
from servefleet.common import tensors
from servefleet.common.appid import AppId
from servefleet.common.config import settings
from servefleet.common.errors import ServefleetError
from servefleet.common.net import async_wait_for
from servefleet.sdk import AsyncClient
from servefleet.services.actors import RAY_NAMESPACE, replica_prefix
from servefleet.services.agent import masters
from servefleet.spec import load_spec
from servefleet.testing import DiscoveryProcess, endpoint_token
from tests.integration.triton.conftest import MODEL, add_sub_inputs, pid_alive, versioned_repository

pytestmark = [pytest.mark.ray, pytest.mark.slow]
APP = "ml/add-sub"
CLUSTER = "triton-cluster"


def triton_spec(repository: Path, version: str) -> common_pb2.ApplicationSpec:
    return load_spec(
        {
            "name": "add-sub",
            "namespace": "ml",
            "version": version,
            "kind": "triton",
            "model_repository": str(repository),
            "resources": {"num_cpus": 0.1},
            "replicas": 2,
        }
    )


@pytest.fixture
async def client(discovery_server: DiscoveryProcess) -> AsyncIterator[AsyncClient]:
    async with AsyncClient(discovery_server.address, timeout=15.0, token=discovery_server.token) as client:
        yield client


async def apply(spec: common_pb2.ApplicationSpec, discovery: DiscoveryProcess, revision: int) -> None:
    """As the cluster agent does: a new master gets the app's endpoint token (its servers register)."""
    token = await endpoint_token(discovery.etcd, AppId.parse(spec).key)
    await masters.apply(spec, 2, revision, cluster=CLUSTER, discovery=discovery.address, credential=token)

    async def settled() -> bool:
        status = await masters.status(AppId.parse(spec).ref())
        return (
            status is not None
            and status.ready_replicas == 2
            and not status.updating
            and status.version == spec.version
        )

    await async_wait_for(settled, timeout=180, interval=0.2, what=f"{APP} v{spec.version} ready")


async def replicas(spec: common_pb2.ApplicationSpec) -> dict[str, dict[str, Any]]:
    """Replica actor name -> its stats (address, pids of its tritonserver and stubs)."""
    names = [
        a["name"]
        for a in ray.util.list_named_actors(all_namespaces=True)
        if a["namespace"] == RAY_NAMESPACE and a["name"].startswith(replica_prefix(AppId.parse(spec).ref()))
    ]
    handles = {}
    for name in names:
        with contextlib.suppress(ValueError):  # gone since the listing
            handles[name] = ray.get_actor(name, namespace=RAY_NAMESPACE)
    answers = await asyncio.gather(*(h.stats.remote() for h in handles.values()), return_exceptions=True)
    # An actor killed a moment ago may still be listed: only live replicas count.
    return {name: a for name, a in zip(handles, answers, strict=True) if isinstance(a, dict)}


async def triton_endpoints(client: AsyncClient) -> dict[str, discovery_pb2.Endpoint]:
    return {e.address: e for e in await client.endpoints(APP) if e.kind == "triton"}


class SdkLoad:
    """Closed-loop SDK callers checking every answer against ``OUTPUT0 = scale * (a + b)``."""

    def __init__(self, client: AsyncClient, concurrency: int = 4) -> None:
        self.client = client
        self.concurrency = concurrency
        self.ok = 0
        self.failures: Counter[str] = Counter()
        self.versions: Counter[str] = Counter()
        self._stop = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []

    async def __aenter__(self) -> SdkLoad:
        self._tasks = [asyncio.create_task(self._caller(i)) for i in range(self.concurrency)]
        return self

    async def __aexit__(self, *exc: object) -> None:
        self._stop.set()
        await asyncio.gather(*self._tasks)

    async def _caller(self, seed: int) -> None:
        rng = np.random.default_rng(seed)
        while not self._stop.is_set():
            a, b = rng.random(8, dtype=np.float32), rng.random(8, dtype=np.float32)
            try:
                out = await self.client.infer(APP, {"INPUT0": a, "INPUT1": b})
            except ServefleetError as exc:
                self.failures[f"{type(exc).__name__}: {exc}"] += 1
                continue
            np.testing.assert_allclose(out["OUTPUT1"], a - b, rtol=1e-6)
            scale = float(np.round(np.mean(out["OUTPUT0"] / (a + b))))
            self.versions[f"x{scale:g}"] += 1
            self.ok += 1

    async def served(self, count: int) -> None:
        start = self.ok

        async def enough() -> bool:
            return self.ok - start >= count

        await async_wait_for(enough, timeout=60, what=f"{count} more answers")


async def test_sigkilled_server_costs_no_request_and_a_new_one_registers(
    ray_driver: str, discovery_server: DiscoveryProcess, client: AsyncClient, tmp_path: Path
) -> None:
    spec = triton_spec(versioned_repository(tmp_path, 1), "1")
    await apply(spec, discovery_server, 1)
    try:
        before = await replicas(spec)
        endpoints = await async_wait_for(
            lambda: _exactly(client, {s["address"] for s in before.values()}), timeout=30, what="2 endpoints"
        )
        assert isinstance(endpoints, dict)
        for endpoint in endpoints.values():
            assert endpoint.labels["models"] == MODEL and endpoint.labels["cluster"] == CLUSTER
            assert endpoint.labels["node"] and endpoint.labels["metrics"]
        # Not at the Ray worker's niceness (15): Triton serves like a server started by hand.
        assert {os.getpriority(os.PRIO_PROCESS, s["pids"][0]) for s in before.values()} == {0}
        victim_name, victim = sorted(before.items())[0]
        old_id = endpoints[victim["address"]].id

        async with SdkLoad(client) as load:
            await load.served(50)
            os.kill(victim["pids"][0], signal.SIGKILL)
            killed = asyncio.get_running_loop().time()

            async def left() -> bool:
                return victim["address"] not in await triton_endpoints(client)

            # The replica deregisters it on seeing its server die (0.2 s looks); its lease's TTL is
            # the bound should that fail.
            await async_wait_for(left, timeout=settings.discovery_ttl_s, interval=0.02, what="endpoint gone")
            gone_s = asyncio.get_running_loop().time() - killed
            print(f"\nSIGKILLed server's endpoint gone after {gone_s:.2f}s (TTL {settings.discovery_ttl_s}s)")
            assert gone_s <= settings.discovery_ttl_s

            async def registered_again() -> bool:
                seen = await triton_endpoints(client)
                return victim["address"] in seen and seen[victim["address"]].id != old_id

            await async_wait_for(registered_again, timeout=60, interval=0.05, what="new server registered")
            await load.served(50)
        assert load.failures == Counter(), load.failures
        after = (await replicas(spec))[victim_name]
        assert after["restarts"] == 1 and after["pids"][0] != victim["pids"][0]
        assert not any(pid_alive(pid) for pid in victim["pids"])
    finally:
        pids = [pid for stats in (await replicas(spec)).values() for pid in stats["pids"]]
        await masters.remove(AppId.parse(spec).ref())
    # Removing the app leaves no tritonserver (nor stub) behind: checked by the recorded pids.
    await async_wait_for(_all_gone(pids), timeout=settings.shutdown_grace_s + 10, what=f"pids {pids} gone")


async def test_a_hung_server_is_restarted(
    ray_driver: str, discovery_server: DiscoveryProcess, client: AsyncClient, tmp_path: Path
) -> None:
    """A server that stops answering (SIGSTOP: alive, silent) fails its ServerLive probes and is
    killed with its stubs and started again; the SDK keeps getting answers meanwhile."""
    spec = triton_spec(versioned_repository(tmp_path, 1), "1")
    await apply(spec, discovery_server, 1)
    try:
        name, victim = sorted((await replicas(spec)).items())[0]
        os.kill(victim["pids"][0], signal.SIGSTOP)

        async def restarted() -> bool:
            stats = (await replicas(spec))[name]
            return bool(stats["restarts"] == 1 and stats["pids"] and stats["pids"][0] != victim["pids"][0])

        async with SdkLoad(client, concurrency=2) as load:
            await async_wait_for(restarted, timeout=60, interval=0.2, what="hung server restarted")
            await load.served(20)
        assert load.failures == Counter(), load.failures
        assert not any(pid_alive(pid) for pid in victim["pids"])
    finally:
        await masters.remove(AppId.parse(spec).ref())


async def test_a_killed_actor_takes_its_server_along(
    ray_driver: str, discovery_server: DiscoveryProcess, client: AsyncClient, tmp_path: Path
) -> None:
    """SIGKILL the replica actor itself (no drain, no cleanup code): its tritonserver and stubs die
    with it (parent-death signal), and the master's replacement registers a new server."""
    spec = triton_spec(versioned_repository(tmp_path, 1), "1")
    await apply(spec, discovery_server, 1)
    try:
        before = await replicas(spec)
        name, victim = sorted(before.items())[0]
        actor_pid = await ray.get_actor(name, namespace=RAY_NAMESPACE).__ray_call__.remote(
            lambda _: os.getpid()
        )
        os.kill(actor_pid, signal.SIGKILL)
        await async_wait_for(_all_gone(victim["pids"]), timeout=10, what=f"pids {victim['pids']} gone")

        async def replaced() -> bool:
            now = await replicas(spec)
            addresses = {s["address"] for s in now.values()}
            return name not in now and len(now) == 2 and set(await triton_endpoints(client)) == addresses

        await async_wait_for(replaced, timeout=120, interval=0.2, what="replacement registered")
    finally:
        await masters.remove(AppId.parse(spec).ref())


async def test_rolling_update_to_a_new_repository_version_under_load(
    ray_driver: str, discovery_server: DiscoveryProcess, client: AsyncClient, tmp_path: Path
) -> None:
    v1 = triton_spec(versioned_repository(tmp_path, 1), "1")
    await apply(v1, discovery_server, 1)
    try:
        async with SdkLoad(client) as load:
            await load.served(30)
            v2 = triton_spec(versioned_repository(tmp_path, 2, scale=3.0), "2")
            await apply(v2, discovery_server, 2)

            async def only_v2() -> bool:
                return {e.version for e in await client.endpoints(APP)} == {"2"}

            await async_wait_for(only_v2, timeout=60, what="only v2 endpoints")
            await load.served(30)
        assert load.failures == Counter(), load.failures
        assert load.versions["x1"] > 0 and load.versions["x3"] > 0
    finally:
        await masters.remove(AppId.parse(v1).ref())


async def _exactly(client: AsyncClient, addresses: set[str]) -> dict[str, discovery_pb2.Endpoint] | None:
    seen = await triton_endpoints(client)
    return seen if set(seen) == addresses else None


def _all_gone(pids: list[int]) -> Any:
    async def gone() -> bool:
        return bool(pids) and not any(pid_alive(pid) for pid in pids)

    return gone


async def test_proxies_route_to_triton_and_pass_its_statuses_through(
    ray_driver: str, discovery_server: DiscoveryProcess, client: AsyncClient, tmp_path: Path
) -> None:
    spec = triton_spec(versioned_repository(tmp_path, 1), "1")
    spec.proxies = 1
    await apply(spec, discovery_server, 1)
    try:
        status = await masters.status(AppId.parse(spec).ref())
        assert status is not None and len(status.proxy_addresses) == 1
        # Discovery hands out the Triton servers only; the proxy serves whoever knows its address.
        assert {e.kind for e in await client.endpoints(APP)} == {"triton"}
        a, b = np.arange(3, dtype=np.float32), np.ones(3, dtype=np.float32)
        proxy = tritonaio.InferenceServerClient(status.proxy_addresses[0])
        direct = tritonaio.InferenceServerClient(next(iter(await triton_endpoints(client))))
        try:
            result = await proxy.infer(MODEL, add_sub_inputs(a, b))
            np.testing.assert_allclose(result.as_numpy("OUTPUT0"), a + b)
            assert await proxy.get_model_metadata(MODEL) == await direct.get_model_metadata(MODEL)
            assert await proxy.is_model_ready(MODEL)
            for client_ in (proxy, direct):  # the same status and message either way
                with pytest.raises(InferenceServerException) as info:
                    await client_.infer(MODEL, add_sub_inputs(a, b[:2]))
                assert info.value.status() == "StatusCode.INVALID_ARGUMENT"
                assert "INPUT0 has shape [3] but INPUT1 has [2]" in info.value.message()
            with pytest.raises(InferenceServerException, match="Triton models: \\['add_sub'\\]"):
                await proxy.infer("nope", add_sub_inputs(a, b))
        finally:
            await proxy.close()
            await direct.close()
        # A proxy on another node calls the replica over Ray: the same bytes, the same status.
        handle = ray.get_actor(next(iter(await replicas(spec))), namespace=RAY_NAMESPACE)
        # Triton's own metrics: the actor re-reads them, and discovery links to them.
        assert "nv_inference_request_success{" in await handle.metrics.remote()
        endpoint = next(iter((await triton_endpoints(client)).values()))
        assert b"nv_inference_count{" in await asyncio.to_thread(_scrape, endpoint.labels["metrics"])
        request = tensors.encode_request(MODEL, {"INPUT0": a, "INPUT1": b[:1]}).SerializeToString()
        status_code, message = await handle.infer.remote(request, {}, 10.0)
        assert status_code == grpc.StatusCode.INVALID_ARGUMENT.value[0] and "must match" in message
    finally:
        await masters.remove(AppId.parse(spec).ref())


def _scrape(address: str) -> bytes:
    with urllib.request.urlopen(f"http://{address}/metrics", timeout=5) as page:
        return bytes(page.read())
