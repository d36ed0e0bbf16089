"""Semantic cache benchmark: the LLM pipeline of examples/llm.yaml with and without its cache, in one run.

1. The labelled pairs (tests/data/semantic_cache_pairs.jsonl), offline with the stage's own
   embedder and guard: precision, recall and false-hit rate per cosine threshold, with and without
   the lexical guard; the threshold rule (the highest threshold whose false-hit rate is <= 1% and
   whose recall is >= 95% of the best such recall) and ``false_hit_rate`` at DEFAULT_THRESHOLD.
2. The deployed pipeline (one Ray node with ``{accelerator: 1}``, Redis, 2 cache replicas, one
   model replica: the random-weight GPT decoder, answers of a fixed ``max_tokens``). A workload
   where 40% of prompts repeat an earlier one as a paraphrase, sent by a closed loop of C callers
   to the proxy; the same workload with ``cache: false`` is the peer. Reps interleave (cache,
   no cache, cache, ...), each under a fresh tenant (a cold cache); medians of 3 reps.
   Figures: hit and miss latency p50/p99, hit rate, requests/s with and without the cache;
   ``ratio_latency_miss_vs_hit`` (p50), ``ratio_rps_vs_no_cache``.

    .venv/bin/python bench/semantic_cache.py           # 120 requests per rep
    .venv/bin/python bench/semantic_cache.py --quick   # 40 per rep, shorter answers (< 2 minutes)

Writes bench/results/semantic_cache.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import random
import signal
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import grpc
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

# isort: off
from _report import write_report
import servefleet  # noqa: F401 - before Ray: keeps Ray on loopback (servefleet/__init__.py)
import ray

# isort: on
from tritonclient.grpc import service_pb2

from servefleet.common.appid import AppId
from servefleet.common.config import grpc_options
from servefleet.common.tensors import decode_response, encode_request
from servefleet.semantic_cache.embedder import MiniLMEmbedder
from servefleet.semantic_cache.guard import compatible
from servefleet.semantic_cache.stage import DEFAULT_THRESHOLD
from servefleet.services.agent import masters
from servefleet.spec import load_spec
from servefleet.testing import RayCluster, RedisProcess

ROOT = Path(__file__).resolve().parents[1]
PAIRS = ROOT / "tests" / "data" / "semantic_cache_pairs.jsonl"
METHOD = "/inference.GRPCInferenceService/ModelInfer"
REPEAT_RATE = 0.4
CONCURRENCY = 4
REPS = 3


def labelled_set() -> dict[str, Any]:
    """Precision / recall / false-hit rate per threshold on the labelled pairs."""
    rows = [json.loads(line) for line in PAIRS.read_text().splitlines() if line.strip()]
    embedder = MiniLMEmbedder()
    a, b = embedder.embed([r["a"] for r in rows]), embedder.embed([r["b"] for r in rows])
    cosine = (a * b).sum(1)
    guard = np.array([compatible(r["a"], r["b"]) for r in rows])
    should = np.array([r["hit"] for r in rows])

    def rates(threshold: float, with_guard: bool) -> dict[str, float]:
        served = (cosine >= threshold) & (guard if with_guard else True)
        hits = int((served & should).sum())
        return {
            "precision": round(hits / max(int(served.sum()), 1), 4),
            "recall": round(hits / int(should.sum()), 4),
            "false_hit_rate": round(int((served & ~should).sum()) / int((~should).sum()), 4),
        }

    grid = [round(t, 2) for t in np.arange(0.70, 0.995, 0.01)]
    table = {f"{t:.2f}": {"guard": rates(t, True), "cosine_only": rates(t, False)} for t in grid}
    allowed = [t for t in grid if table[f"{t:.2f}"]["guard"]["false_hit_rate"] <= 0.01]
    best = max(table[f"{t:.2f}"]["guard"]["recall"] for t in allowed)
    chosen = max(t for t in allowed if table[f"{t:.2f}"]["guard"]["recall"] >= 0.95 * best)
    kinds: dict[str, dict[str, float]] = {}
    for kind in sorted({r["kind"] for r in rows}):
        mask = np.array([r["kind"] == kind for r in rows])
        kinds[kind] = {
            "pairs": int(mask.sum()),
            "cosine_min": round(float(cosine[mask].min()), 3),
            "cosine_median": round(float(np.median(cosine[mask])), 3),
            "cosine_max": round(float(cosine[mask].max()), 3),
            "guard_passes": round(float(guard[mask].mean()), 3),
        }
    at_default = rates(DEFAULT_THRESHOLD, True)
    return {
        "pairs": len(rows),
        "kinds": kinds,
        "per_threshold": table,
        "threshold_rule_chooses": chosen,
        "default_threshold": DEFAULT_THRESHOLD,
        "at_default": at_default,
        "at_default_cosine_only": rates(DEFAULT_THRESHOLD, False),
    }


def workload(count: int, rng: random.Random) -> list[str]:
    """``count`` prompts; REPEAT_RATE of them paraphrase (or repeat) one asked before."""
    rows = [json.loads(line) for line in PAIRS.read_text().splitlines() if line.strip()]
    paraphrases = [(r["a"], r["b"]) for r in rows if r["hit"]]
    rng.shuffle(paraphrases)
    fresh = iter(paraphrases)
    asked: list[tuple[str, str]] = []
    prompts = []
    for _ in range(count):
        if asked and rng.random() < REPEAT_RATE:
            original, paraphrase = rng.choice(asked)
            prompts.append(rng.choice((original, paraphrase)))
        else:
            pair = next(fresh)
            asked.append(pair)
            prompts.append(pair[0])
    return prompts


async def run(address: str, prompts: list[str], parameters: dict[str, Any]) -> dict[str, Any]:
    """Closed loop of CONCURRENCY callers over ``prompts`` in order; per-request latency and hit."""
    queue = list(enumerate(prompts))
    results: list[tuple[float, bool]] = []
    async with grpc.aio.insecure_channel(address, options=grpc_options()) as channel:
        call = channel.unary_unary(METHOD)

        async def caller() -> None:
            while queue:
                _, text = queue.pop(0)
                request = encode_request(
                    "llm", {"prompt": np.array([text.encode()], np.object_)}, parameters=parameters
                ).SerializeToString()
                began = time.perf_counter()
                reply = await call(request, timeout=120)
                elapsed = time.perf_counter() - began
                out = decode_response(service_pb2.ModelInferResponse.FromString(reply))
                results.append((elapsed, bool(out["cache_hit"][0])))

        began = time.perf_counter()
        await asyncio.gather(*(caller() for _ in range(CONCURRENCY)))
        wall = time.perf_counter() - began
    hits = [t for t, hit in results if hit]
    misses = [t for t, hit in results if not hit]
    return {
        "requests": len(results),
        "rps": len(results) / wall,
        "hit_rate": len(hits) / len(results),
        "hit_p50_ms": _pct(hits, 50),
        "hit_p99_ms": _pct(hits, 99),
        "miss_p50_ms": _pct(misses, 50),
        "miss_p99_ms": _pct(misses, 99),
    }


def _pct(values: list[float], q: float) -> float:
    return round(float(np.percentile(values, q)) * 1000, 2) if values else float("nan")


async def deploy(redis: str, max_tokens: int) -> str:
    spec = load_spec(ROOT / "examples" / "llm.yaml")
    for stage in spec.stages:
        if stage.name == "model":
            stage.init_args.update({"max_tokens": max_tokens, "eos": False})
    spec = load_spec(spec)
    await masters.apply(spec, 1, 1, cluster="bench", discovery="", redis=redis)
    for _ in range(3000):
        status = await masters.status(AppId.parse(spec).ref())
        if (
            status
            and not status.updating
            and status.ready_replicas == status.replicas
            and status.proxy_addresses
        ):
            return str(status.proxy_addresses[0])
        await asyncio.sleep(0.1)
    raise TimeoutError(f"pipeline not ready: {status}")


async def served(address: str, prompts: list[str], reps: int) -> dict[str, Any]:
    await run(address, prompts[:4], {"tenant": "warm-up"})  # first calls: connections, model pages
    with_cache: list[dict[str, Any]] = []
    without: list[dict[str, Any]] = []
    for rep in range(reps):  # interleaved: the box's load drifts alike for both
        with_cache.append(await run(address, prompts, {"tenant": f"rep-{rep}"}))
        without.append(await run(address, prompts, {"tenant": f"rep-{rep}", "cache": False}))

    def median(rows: list[dict[str, Any]], key: str) -> float:
        return round(statistics.median(r[key] for r in rows), 3)

    figures = {key: median(with_cache, key) for key in with_cache[0]}
    figures["no_cache_rps"] = median(without, "rps")
    figures["no_cache_p50_ms"] = median(without, "miss_p50_ms")
    return {"with_cache": with_cache, "without_cache": without, "median": figures}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="40 requests per rep, 24-token answers")
    args = parser.parse_args()
    count, max_tokens = (40, 24) if args.quick else (120, 64)
    load_before = os.getloadavg()[0]
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # a timeout still stops Ray and Redis
    offline = labelled_set()
    prompts = workload(count, random.Random(14))
    redis = RedisProcess().start()
    cluster = RayCluster(num_cpus=2, resources={"accelerator": 1}).start()
    try:
        ray.init(
            address=cluster.address,
            namespace="bench-semantic-cache",
            log_to_driver=False,
            logging_level=logging.WARNING,
        )
        address = asyncio.run(deploy(redis.address, max_tokens))
        online = asyncio.run(served(address, prompts, REPS))
    finally:
        ray.shutdown()
        cluster.cleanup()
        redis.cleanup()
    m = online["median"]
    ratios = {
        "ratio_latency_miss_vs_hit": round(m["miss_p50_ms"] / m["hit_p50_ms"], 2),
        "ratio_rps_vs_no_cache": round(m["rps"] / m["no_cache_rps"], 2),
    }
    report = {
        "settings": {
            "quick": args.quick,
            "requests_per_rep": count,
            "repeat_rate": REPEAT_RATE,
            "concurrency": CONCURRENCY,
            "reps": REPS,
            "answer_tokens": max_tokens,
            "model": "random-weight GPT decoder (dim 384, 6 layers, KV cache), numpy on CPU",
            "pipeline": "examples/llm.yaml: 2 cache replicas, 1 model replica, one Ray node (2 CPUs)",
            "load_average_1m_before": round(load_before, 2),
        },
        "labelled_set": offline,
        "false_hit_rate": offline["at_default"]["false_hit_rate"],
        "figures": m,
        "reps": {"with_cache": online["with_cache"], "without_cache": online["without_cache"]},
        **ratios,
    }
    path = write_report("semantic_cache", report)
    print(
        json.dumps(
            {
                "figures": m,
                "false_hit_rate": report["false_hit_rate"],
                **ratios,
                "threshold_rule_chooses": offline["threshold_rule_chooses"],
            },
            indent=2,
        )
    )
    print(f"-> {path}")


if __name__ == "__main__":
    main()
