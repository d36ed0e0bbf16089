"""Every part of a real stack serves /metrics that prometheus_client's parser reads, with the
expected series present and moving: the services (addresses in stack.json), and the actors of a
python app (proxy, replica, master) and of a direct app (the C++ ingress's own counters), found
through the Prometheus file-SD targets the stack keeps."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc.aio as aioclient
from tritonclient.grpc import InferInput

from servefleet import stack
from servefleet.common.net import async_wait_for
from servefleet.direct import INPUT_NAME, ctr
from servefleet.sdk.broker_client import AsyncBrokerClient
from servefleet.spec import DEFAULT_PROXIES
from tests.integration.autoscaler.conftest import Stack, actors, scrape, total, unique

pytestmark = [pytest.mark.slow, pytest.mark.ray]

SERVICES = ("discovery", "keeper", "broker", "agent", "autoscaler")


async def _actor_targets(local_stack: Stack, app: str, parts: dict[str, int]) -> dict[str, list[str]]:
    """part -> metrics addresses of the app's actors, once the file-SD targets list as many of
    each part as the app runs (a request sent to a proxy not yet listed would go uncounted)."""

    async def listed() -> dict[str, list[str]] | None:
        found: dict[str, list[str]] = {}
        for group in actors(local_stack):
            if group["labels"]["app"] == app:
                found.setdefault(group["labels"]["part"], []).extend(group["targets"])
        return found if all(len(found.get(part, [])) >= n for part, n in parts.items()) else None

    return await async_wait_for(listed, timeout=60, interval=0.5, what=f"{parts} of {app} in file-SD")  # type: ignore[return-value]


def scrape_all(addresses: list[str]) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """The samples of several parts (the app's proxies, say), summed per series and label set."""
    summed: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
    for address in addresses:
        for key, value in scrape(address).items():
            summed[key] = summed.get(key, 0.0) + value
    return summed


async def _infer(address: str, model: str, n: int) -> None:
    client = aioclient.InferenceServerClient(address)
    x = InferInput("x", [1], "FP32")
    x.set_data_from_numpy(np.ones(1, np.float32))
    try:
        for _ in range(n):
            await client.infer(model, [x])
    finally:
        await client.close()


async def test_every_part_serves_metrics_that_parse_and_move(local_stack: Stack, tmp_path: Path) -> None:
    name = unique("metered")
    await local_stack.submit({"name": name, "async_mode": {"enabled": True}})
    proxy = await local_stack.proxy(name)
    targets = await _actor_targets(local_stack, name, {"proxy": DEFAULT_PROXIES, "replica": 1, "master": 1})
    before = {part: scrape_all(addresses) for part, addresses in targets.items()}
    await _infer(proxy, name, 20)
    broker = AsyncBrokerClient(local_stack.addresses["broker"], token=local_stack.admin)
    tickets = [await broker.submit(f"default/{name}", {"x": np.ones(1, np.float32)}) for _ in range(3)]
    for ticket in tickets:
        await broker.result(ticket, timeout=60)
    await broker.close()

    after = {part: scrape_all(addresses) for part, addresses in targets.items()}

    def moved(part: str, series: str, **labels: str) -> float:
        return total(after[part], series, **labels) - total(before[part], series, **labels)

    assert moved("proxy", "servefleet_proxy_requests_total", app=name, code="OK") >= 20
    assert moved("proxy", "servefleet_proxy_latency_seconds_count", app=name) >= 20
    assert ("servefleet_proxy_in_flight", (("app", name),)) in after["proxy"]
    assert moved("replica", "servefleet_replica_requests_total", app=name, code="OK") >= 20
    assert moved("replica", "servefleet_replica_latency_seconds_count", app=name) >= 20
    assert moved("replica", "servefleet_replica_busy_seconds_total", app=name) > 0
    for gauge in ("servefleet_replica_in_flight", "servefleet_replica_queued", "servefleet_replica_slots"):
        assert (gauge, (("app", name),)) in after["replica"], gauge
    assert total(after["master"], "servefleet_master_replicas_desired", app=name) == 1
    assert total(after["master"], "servefleet_master_replicas_ready", app=name) == 1

    # Every service: its address in stack.json, the common RPC series, and its own.
    parts = {p.name: p for p in stack.load(local_stack.state)}
    services = json.loads((local_stack.state / "prometheus" / "services.json").read_text())
    assert {g["labels"]["part"] for g in services} >= set(SERVICES)
    for service in SERVICES:
        samples = scrape(parts[service].metrics)
        assert (
            total(samples, "servefleet_rpc_requests_total", service=service) > 0 or service == "autoscaler"
        ), service
        assert any(n == "process_cpu_seconds_total" for n, _ in samples), service
    keeper = scrape(parts["keeper"].metrics)
    assert total(keeper, "servefleet_app_replicas_desired", app=name) == 1
    assert total(keeper, "servefleet_app_replicas_ready", app=name) == 1

    async def broker_moved() -> bool:
        samples = scrape(parts["broker"].metrics)
        return (
            total(samples, "servefleet_broker_submitted_total", app=name) >= 3
            and (
                "servefleet_broker_queue_depth",
                (("app", name),),
            )
            in samples
        )

    await async_wait_for(broker_moved, timeout=10, what="the broker's queue series")
    autoscaler = scrape(parts["autoscaler"].metrics)
    assert total(autoscaler, "servefleet_autoscaler_leading") == 1
    status = local_stack.cli("status")
    assert parts["keeper"].metrics in status.stdout, status.stdout
    await local_stack.delete(name)


async def test_the_direct_ingress_exports_its_cpp_counters(local_stack: Stack, tmp_path: Path) -> None:
    model = ctr.export_model(ctr.build_model(num_rows=1 << 12, examples=2_000), tmp_path / "ctr.bin")
    name = unique("direct")
    await local_stack.submit(
        {
            "name": name,
            "kind": "direct",
            "import_path": "",
            "inputs": [],
            "outputs": [],
            "init_args": {"model_path": str(model)},
        }
    )
    targets = await _actor_targets(local_stack, name, {"direct": 1})
    before = scrape_all(targets["direct"])
    endpoint = (await local_stack.endpoints(name, "direct"))[0].address
    client = aioclient.InferenceServerClient(endpoint)
    ids = np.random.default_rng(1).integers(0, 1 << 12, size=(4, 16), dtype=np.int64)
    tensor = InferInput(INPUT_NAME, list(ids.shape), "INT64")
    tensor.set_data_from_numpy(ids)
    for _ in range(10):
        await client.infer(name, [tensor])
    await client.close()
    after = scrape_all(targets["direct"])
    assert (
        total(after, "servefleet_direct_requests_total", app=name)
        - total(before, "servefleet_direct_requests_total", app=name)
        >= 10
    )
    assert total(after, "servefleet_direct_rows_total", app=name) >= 40
    buckets = {
        dict(ls)["le"]: v for (n, ls), v in after.items() if n == "servefleet_direct_latency_seconds_bucket"
    }
    assert buckets["+Inf"] >= 10 and buckets["+Inf"] == total(
        after, "servefleet_direct_latency_seconds_count", app=name
    )
    assert list(buckets.values()) == sorted(buckets.values())  # cumulative
    await local_stack.delete(name)
