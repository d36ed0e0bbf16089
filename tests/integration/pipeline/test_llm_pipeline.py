"""The LLM pipeline of examples/llm.yaml on two real Ray nodes, real Redis and discovery, called
through the SDK: placement per stage resources, the semantic cache's hits, misses and isolation,
streaming, deadlines and backpressure across stages, and a cache replica SIGKILLed under load."""

from __future__ import annotations

import asyncio
import json
import os
import signal
from collections import Counter
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import ray
import redis
import tritonclient.grpc.aio as aioclient
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from tritonclient.grpc import InferInput

from servefleet.broker.core import BrokerCore
from servefleet.broker.queue import RedisStreamQueue
from servefleet.broker.servicer import broker_server
from servefleet.common import telemetry
from servefleet.common.appid import AppId
from servefleet.common.errors import DeadlineExceeded, NotFound, ResourceExhausted
from servefleet.common.net import async_wait_for
from servefleet.sdk import AsyncClient
from servefleet.sdk.broker_client import AsyncBrokerClient
from servefleet.services.actors import RAY_NAMESPACE, replica_prefix, stage_replica_prefix
from servefleet.services.agent import masters
from servefleet.testing import Credentials, DiscoveryProcess, RedisProcess
from tests.integration.dataplane.test_tracing import Receiver, otlp_receiver

from .conftest import pipeline_spec

__all__ = ["otlp_receiver"]  # the data plane's OTLP receiver fixture, shared, not copied

pytestmark = pytest.mark.ray

PAIRS = Path(__file__).parents[2] / "data" / "semantic_cache_pairs.jsonl"


def prompt(text: str) -> dict[str, np.ndarray]:
    return {"prompt": np.array([text.encode()], np.object_)}


def text_of(out: dict[str, np.ndarray]) -> str:
    return bytes(out["text"][0]).decode()


def labelled(kind: str) -> list[dict[str, Any]]:
    rows = [json.loads(line) for line in PAIRS.read_text().splitlines() if line.strip()]
    return [r for r in rows if r["kind"] == kind]


async def replicas_of(prefix: str) -> dict[str, dict[str, Any]]:
    """Each live replica whose name starts with ``prefix``: its ready() info and stats()."""
    out = {}
    for entry in ray.util.list_named_actors(all_namespaces=True):
        if entry["namespace"] == RAY_NAMESPACE and entry["name"].startswith(prefix):
            handle = ray.get_actor(entry["name"], namespace=RAY_NAMESPACE)
            out[entry["name"]] = {**await handle.ready.remote(), **await handle.stats.remote()}
    return out


@pytest.fixture(scope="module")
async def llm(
    accelerator_node: str,
    discovery_server: DiscoveryProcess,
    cache_redis: RedisProcess,
    credentials: Credentials,
) -> AsyncIterator[Any]:
    """One deployed pipeline for the module (deploying costs tens of seconds on this box)."""
    from .conftest import deploy_pipeline

    spec = pipeline_spec()
    await deploy_pipeline(spec, discovery_server.address, cache_redis.address, credentials)
    yield spec
    await masters.remove(AppId.parse(spec).ref())


@pytest.fixture
async def client(discovery_server: DiscoveryProcess) -> AsyncIterator[AsyncClient]:
    async with AsyncClient(discovery_server.address, timeout=60.0, token=discovery_server.token) as sdk:
        yield sdk


async def test_each_stage_is_placed_by_its_resources(llm: Any, accelerator_node: str) -> None:
    app = AppId.parse(llm).ref()
    cache = await replicas_of(replica_prefix(app))
    model = await replicas_of(stage_replica_prefix(app))
    assert len(cache) == 2 and len(model) == 1
    assert {r["node_id"] for r in model.values()} == {accelerator_node}  # the only node offering it
    # The cache stage asks for CPU only: Ray may place it on either node (both have CPUs).
    assert {r["node_id"] for r in cache.values()} <= {n["NodeID"] for n in ray.nodes() if n["Alive"]}


async def test_miss_runs_model_and_stores_then_paraphrase_hits(
    llm: Any, client: AsyncClient, cache_redis: RedisProcess
) -> None:
    r = redis.Redis.from_url(f"redis://{cache_redis.address}")
    before = r.zcard("sfc:{default/llm}:lru")
    miss = await client.infer("llm", prompt("What is the capital of France?"))
    assert not miss["cache_hit"][0] and text_of(miss)
    assert r.zcard("sfc:{default/llm}:lru") == before + 1  # the model's answer was stored
    again = await client.infer("llm", prompt("What is the capital of France?"))
    assert again["cache_hit"][0] and again["similarity"][0] > 0.99 and text_of(again) == text_of(miss)
    paraphrase = await client.infer("llm", prompt("Which city is the capital of France?"))
    assert paraphrase["cache_hit"][0], paraphrase["similarity"]
    assert text_of(paraphrase) == text_of(miss)
    skipped = await client.infer("llm", prompt("What is the capital of France?"), parameters={"cache": False})
    assert not skipped["cache_hit"][0]


async def test_near_misses_from_the_labelled_set_miss(llm: Any, client: AsyncClient) -> None:
    for kind in ("negation", "swapped_entities", "different_number"):
        pair = labelled(kind)[0]
        first = await client.infer("llm", prompt(pair["a"]), parameters={"tenant": f"near-{kind}"})
        second = await client.infer("llm", prompt(pair["b"]), parameters={"tenant": f"near-{kind}"})
        assert not first["cache_hit"][0]
        assert not second["cache_hit"][0], (kind, pair, second["similarity"])


async def test_one_tenant_never_gets_another_tenants_answer(llm: Any, client: AsyncClient) -> None:
    question = "How do I rotate the API keys of my account?"
    a = await client.infer("llm", prompt(question), parameters={"tenant": "acme"})
    a_again = await client.infer("llm", prompt(question), parameters={"tenant": "acme"})
    b = await client.infer("llm", prompt(question), parameters={"tenant": "globex"})
    assert not a["cache_hit"][0] and a_again["cache_hit"][0]
    assert not b["cache_hit"][0]


async def test_streaming_miss_then_hit_replays_the_answer(llm: Any, client: AsyncClient) -> None:
    question = "Tell me a story about a lighthouse keeper."
    miss = [chunk async for chunk in client.stream("llm", prompt(question))]
    assert len(miss) > 1 and not any(c["cache_hit"][0] for c in miss)  # token by token
    hit = [chunk async for chunk in client.stream("llm", prompt(question))]
    assert all(c["cache_hit"][0] for c in hit)
    assert [bytes(c["token"][0]) for c in hit] == [bytes(c["token"][0]) for c in miss]
    unary = await client.infer("llm", prompt(question))
    assert unary["cache_hit"][0] and text_of(unary) == b"".join(bytes(c["token"][0]) for c in miss).decode()


async def test_caller_deadline_reaches_the_model_stage(llm: Any, client: AsyncClient) -> None:
    with pytest.raises(DeadlineExceeded):
        await client.infer(
            "llm",
            prompt("Write a very long essay."),
            parameters={"cache": False, "max_tokens": 400},
            timeout=0.05,
        )
    model = stage_replica_prefix(AppId.parse(llm).ref())

    async def model_idle() -> bool:
        return all(r["in_flight"] == 0 for r in (await replicas_of(model)).values())

    await async_wait_for(model_idle, timeout=10, what="the cancelled generation to stop")


@pytest.mark.slow
async def test_cache_replica_sigkill_under_load_fails_nothing_and_keeps_the_cache(
    llm: Any, client: AsyncClient, cache_redis: RedisProcess
) -> None:
    questions = [f"What is the best way to learn topic number {i} quickly?" for i in range(6)]
    answers = {
        q: text_of(await client.infer("llm", prompt(q), parameters={"tenant": "load"})) for q in questions
    }
    outcomes: Counter[str] = Counter()
    answered: Counter[str] = Counter()
    stop = asyncio.Event()

    def running(count: int) -> Callable[[], Any]:
        async def enough() -> bool:
            return sum(outcomes.values()) >= count

        return enough

    async def caller(seed: int) -> None:
        rng = np.random.default_rng(seed)
        while not stop.is_set():
            question = questions[int(rng.integers(len(questions)))]
            try:
                out = await client.infer("llm", prompt(question), parameters={"tenant": "load"})
                outcomes["hit" if out["cache_hit"][0] else "miss"] += 1
                answered["same" if text_of(out) == answers[question] else "different"] += 1
            except Exception as exc:
                outcomes[f"failed {type(exc).__name__}: {exc}"] += 1

    callers = [asyncio.create_task(caller(i)) for i in range(4)]
    await async_wait_for(running(20), timeout=60, what="load running")
    cache = await replicas_of(replica_prefix(AppId.parse(llm).ref()))
    victim = next(iter(cache.values()))
    os.kill(victim["pid"], signal.SIGKILL)
    seen = sum(outcomes.values())
    await async_wait_for(running(seen + 30), timeout=120, what="load after the kill")

    async def replaced() -> bool:
        now = await replicas_of(replica_prefix(AppId.parse(llm).ref()))
        return len(now) == 2 and victim["name"] not in now

    await async_wait_for(replaced, timeout=120, interval=0.5, what="the killed cache replica replaced")
    await async_wait_for(running(sum(outcomes.values()) + 20), timeout=60, what="load on both")
    stop.set()
    await asyncio.gather(*callers)
    failed = {k: v for k, v in outcomes.items() if k.startswith("failed")}
    assert not failed, failed
    assert answered["different"] == 0  # every answer is the one stored before the kill
    # The content survived: the new replica rebuilt its index from Redis and answers from it.
    for question in questions:
        for _ in range(4):  # enough calls to reach both replicas
            out = await client.infer("llm", prompt(question), parameters={"tenant": "load"})
            assert out["cache_hit"][0] and text_of(out) == answers[question]


@pytest.mark.slow
async def test_backpressure_of_a_full_model_stage_reaches_the_client(
    pipelines: Callable[..., Any], client: AsyncClient
) -> None:
    spec = pipeline_spec()
    spec.name = "llm-narrow"
    model = next(s for s in spec.stages if s.name == "model")
    model.max_concurrency, model.max_queued = 1, 1
    model.init_args.update({"max_tokens": 200})
    await pipelines(spec)

    async def call(i: int) -> str:
        try:
            await client.infer(
                "llm-narrow", prompt(f"question {i}"), parameters={"cache": False}, retry=False
            )
            return "ok"
        except ResourceExhausted:
            return "full"

    results = Counter(await asyncio.gather(*(call(i) for i in range(8))))
    assert results["full"] > 0 and results["ok"] >= 2, results


@pytest.mark.slow
async def test_new_model_version_misses(pipelines: Callable[..., Any], client: AsyncClient) -> None:
    spec = pipeline_spec()
    spec.name = "llm-versioned"
    await pipelines(spec)
    question = "What is the boiling point of water at sea level?"
    first = await client.infer("llm-versioned", prompt(question))
    assert (await client.infer("llm-versioned", prompt(question)))["cache_hit"][0] and not first["cache_hit"][
        0
    ]
    spec.version = "2"
    await pipelines(spec, revision=2)
    after = await client.infer("llm-versioned", prompt(question))
    assert not after["cache_hit"][0]  # version 2 never serves version 1's answers


@pytest.mark.slow
async def test_async_mode_goes_through_the_broker_like_any_app(
    pipelines: Callable[..., Any], cache_redis: RedisProcess, credentials: Credentials
) -> None:
    spec = pipeline_spec()
    spec.name = "llm-async"
    spec.async_mode.enabled = True
    await pipelines(spec)
    core = BrokerCore(RedisStreamQueue(cache_redis.address))
    server = broker_server(core, "127.0.0.1:0", credentials.authenticator())
    await server.start()
    broker = AsyncBrokerClient(server.address, token=await credentials.admin())
    try:

        async def pulling() -> bool:
            try:
                return (await broker.stats(AppId.parse(spec).ref())).workers >= 2  # both cache replicas
            except NotFound:
                return False

        await async_wait_for(pulling, timeout=60, what="the entry stage pulling from the broker")
        tickets = [
            await broker.submit(AppId.parse(spec).ref(), prompt(f"Summarise chapter {i}.")) for i in range(3)
        ]
        results = [await broker.result(ticket, timeout=60) for ticket in tickets]
        repeat = await broker.submit(
            AppId.parse(spec).ref(), prompt("Summarise chapter 0.")
        )  # once it is stored
        results.append(await broker.result(repeat, timeout=60))
        assert all(text_of(r) for r in results)
        assert not results[0]["cache_hit"][0] and results[3]["cache_hit"][0]  # the cache serves it too
        assert text_of(results[3]) == text_of(results[0])
    finally:
        await broker.close()
        await server.stop(0)


@pytest.mark.slow
async def test_one_trace_follows_a_miss_from_the_cache_stage_to_the_model_stage(
    pipelines: Callable[..., Any], otlp_receiver: tuple[str, Receiver], monkeypatch: pytest.MonkeyPatch
) -> None:
    telemetry.setup_tracing("pipeline-test", processor=SimpleSpanProcessor(InMemorySpanExporter()))
    address, receiver = otlp_receiver
    monkeypatch.setenv("OTEL_TRACES_EXPORTER", "otlp")
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", f"http://{address}")
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_INSECURE", "true")
    monkeypatch.setenv("OTEL_BSP_SCHEDULE_DELAY", "100")
    spec = pipeline_spec()
    spec.name = "llm-traced"
    status = await pipelines(spec)
    client = aioclient.InferenceServerClient(status.proxy_addresses[0])
    try:
        tensor = InferInput("prompt", [1], "BYTES")
        tensor.set_data_from_numpy(np.array([b"Where do penguins live?"], np.object_))
        with telemetry.tracer.start_as_current_span("caller") as caller:
            headers = {k: str(v) for k, v in telemetry.inject_metadata(None)}
            await client.infer("llm-traced", [tensor], headers=headers)
    finally:
        await client.close()
    trace_id = caller.get_span_context().trace_id

    def in_trace() -> list[Any]:
        return [span for _, span in receiver.spans if int.from_bytes(span.trace_id, "big") == trace_id]

    async def all_exported() -> bool:
        return sum(s.name == "model.call" for s in in_trace()) >= 2 and any(
            s.name == "stage.call" for s in in_trace()
        )

    await async_wait_for(all_exported, timeout=60, interval=0.1, what="both stages' spans in one trace")
    spans = in_trace()
    stage_call = next(s for s in spans if s.name == "stage.call")
    calls = {
        next(a.value.string_value for a in s.attributes if a.key == "servefleet.model"): s
        for s in spans
        if s.name == "model.call"
    }
    assert set(calls) == {"llm-traced", "llm-traced--model"}
    assert stage_call.parent_span_id == calls["llm-traced"].span_id  # called from the cache stage
    assert calls["llm-traced--model"].parent_span_id == stage_call.span_id  # continued by the model
