"""Sharded-deployment benchmark: one CTR table (factorization machine, 1M rows x 17 floats, 16
fields), the same request batches, driven by the same C++ load generator (``run_load``: one thread
and channel per caller), served

  (a) unsharded   the whole table in one actor: kind python (``servefleet.direct.ctr:CtrScorer``,
                  the numpy reference) behind the platform's proxy, its usual ingress
  (b) sharded     kind sharded, range over 4 shards x 2 replicas, through the shard-aware router
                  (split by owner, parallel lookups, pooling + scoring on the router), two ways
                  through the same router actor and shards: its C++ fast path (the default,
                  cpp/shard_router.cc, on the router's public port) and its Python path (the
                  Python server behind the C++ port); the shards answer on their C++ fast path
                  (the default, cpp/shard_server.cc) either way
  (c) slow        the same app with one replica of shard 0 made 10x slower (its lookups wait
                  9x their p50 through the C++ router first), with hedging (budget 0.25) and
                  without (budget 0), through each router

Reps are interleaved ((a), (b) C++, (b) Python, (a), ... and hedged, unhedged, ...) and the
median of 3 (5 for the slow replica, in the full run) is reported. Also: ``shard_gather_us`` (one
numpy gather of 1024 keys on a shard's mmap'd part: the lookup's own work, small beside a gRPC
hop), each shard actor's table memory as ``app status`` shows it, and the share of the C++
router's calls, and of the shards' lookups, relayed to Python (new traces left to Python to start:
``trace_sample_ratio``).

    .venv/bin/python bench/sharded.py            # full: batches 1, 64, 512; 8 s per measurement
    .venv/bin/python bench/sharded.py --quick    # batch 64; 3 s per measurement (under 2 minutes)

Writes bench/results/sharded.json.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

# isort: off
from _report import write_report
import servefleet  # noqa: F401 - before Ray: keeps Ray on loopback (servefleet/__init__.py)
import ray

# isort: on
from servefleet.api import common_pb2
from servefleet.common.appid import AppId
from servefleet.common.tensors import encode_request
from servefleet.direct import INPUT_NAME, OUTPUT_NAME, ctr, run_load
from servefleet.services.actors import RAY_NAMESPACE, proxy_prefix
from servefleet.services.agent import masters
from servefleet.services.sharding import Layout, ShardPart
from servefleet.spec import load_spec
from servefleet.testing import RayCluster

ROWS, FIELDS, DIM = 1 << 20, 16, 16
UNSHARDED = common_pb2.AppRef(namespace="recs", name="ctr-whole")
SHARDED = common_pb2.AppRef(namespace="recs", name="ctr-sharded")
CONCURRENCY = 4
REPS = 3
#: The slow-replica comparison is the noisiest figure (a tail, on a shared box): more reps
#: (--quick: REPS, to stay under two minutes).
SLOW_REPS = 5
HEDGE_BUDGET = 0.25
#: The two paths of one router: its Python server, and C++ in front of it.
ROUTERS = ("cpp", "python")


def specs(table: Path) -> tuple[common_pb2.ApplicationSpec, common_pb2.ApplicationSpec]:
    tensors = {
        "inputs": [{"name": INPUT_NAME, "datatype": "INT64", "shape": [-1, FIELDS]}],
        "outputs": [{"name": OUTPUT_NAME, "datatype": "FP32", "shape": [-1]}],
        "max_concurrency": 16,
        "proxies": 1,
    }
    whole = load_spec(
        {
            "namespace": UNSHARDED.namespace,
            "name": UNSHARDED.name,
            "import_path": "servefleet.direct.ctr:CtrScorer",
            "init_args": {"model_path": str(table)},
            "resources": {"num_cpus": 0.5},
            "replicas": 1,
            **tensors,
        }
    )
    sharded = load_spec(
        {
            "namespace": SHARDED.namespace,
            "name": SHARDED.name,
            "kind": "sharded",
            "sharding": {"shards": 4, "replicas_per_shard": 2, "partitioning": "range", "table": str(table)},
            "resources": {"num_cpus": 0.1, "memory": "24Mi"},
            **tensors,
        }
    )
    return whole, sharded


async def deploy(spec: common_pb2.ApplicationSpec, ready: int) -> str:
    """Apply and wait until ``ready`` replicas (per shard, for sharded) serve; the ingress address."""
    app = common_pb2.AppRef(namespace=spec.namespace, name=spec.name)
    await masters.apply(spec, spec.replicas.initial, 1, cluster="bench", discovery="")
    for _ in range(3000):
        status = await masters.status(app)
        if status is not None and status.ready_replicas >= ready and status.proxy_addresses:
            return str(status.proxy_addresses[0])
        await asyncio.sleep(0.1)
    raise TimeoutError(f"{spec.name} not ready: {status}")


def request_bytes(app: common_pb2.AppRef, batch: int) -> bytes:
    ids = np.random.default_rng(batch).integers(0, ROWS, size=(batch, FIELDS), dtype=np.int64)
    return encode_request(AppId.parse(app).model_name, {INPUT_NAME: ids}).SerializeToString()


def run(address: str, request: bytes, seconds: float) -> dict[str, Any]:
    result = run_load(address, request, CONCURRENCY, seconds)
    if result["errors"]:
        raise RuntimeError(f"{address}: {result['errors']} errors: {result['first_error']}")
    return {k: round(v, 4) if isinstance(v, float) else v for k, v in result.items()}


def median_of(reps: list[dict[str, Any]]) -> dict[str, Any]:
    return {k: round(statistics.median(r[k] for r in reps), 4) for k in ("rps", "p50_ms", "p99_ms")}


def gather_us(table: Path) -> float:
    """Median microseconds of one shard lookup of 1024 keys (the work a shard does per request)."""
    part = ShardPart(str(table), Layout("range", 4, ROWS), 0)
    keys = np.sort(np.random.default_rng(0).integers(0, ROWS // 4, size=1024, dtype=np.int64))
    times = []
    for _ in range(300):
        began = time.perf_counter()
        part.lookup(keys)
        times.append(time.perf_counter() - began)
    return round(statistics.median(times) * 1e6, 1)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="batch 64 only, 3 s per measurement")
    args = p.parse_args()
    seconds = 3.0 if args.quick else 8.0
    slow_reps = REPS if args.quick else SLOW_REPS
    batches = (64,) if args.quick else (1, 64, 512)
    work = Path(tempfile.mkdtemp(prefix="bench-sharded-"))
    table = ctr.export_model(
        ctr.random_model(num_rows=ROWS, num_fields=FIELDS, dim=DIM, scale=0.3, seed=1), work / "ctr.bin"
    )
    load_before = os.getloadavg()[0]
    figures: dict[str, Any] = {"shard_gather_us_1024_keys": gather_us(table)}
    cluster = RayCluster(num_cpus=2).start()
    try:
        ray.init(address=cluster.address, namespace="bench-sharded", log_to_driver=False)
        whole_spec, sharded_spec = specs(table)
        whole = asyncio.run(deploy(whole_spec, 1))
        cpp = asyncio.run(deploy(sharded_spec, 2))
        router = ray.get_actor(f"{proxy_prefix(SHARDED)}0", namespace=RAY_NAMESPACE)
        python = ray.get(router.python_address.remote())
        routers = {"python": python, "cpp": cpp}
        modes = {
            "unsharded": (whole, UNSHARDED),
            "sharded": (cpp, SHARDED),
            "sharded_python_router": (python, SHARDED),
        }
        for batch in batches:
            reps: dict[str, list[dict[str, Any]]] = {name: [] for name in modes}
            for address, app in modes.values():
                run(address, request_bytes(app, batch), 1.0)  # warm-up: channels, latency windows
            for _ in range(REPS):
                for name, (address, app) in modes.items():
                    reps[name].append(run(address, request_bytes(app, batch), seconds))
            figures[f"b{batch}"] = {name: median_of(r) for name, r in reps.items()}
        cpp_counts = ray.get(router.stats.remote())["cpp"]
        figures["cpp_router_relayed_fraction"] = round(
            cpp_counts["relayed"] / max(1, cpp_counts["relayed"] + sum(cpp_counts["codes"].values())), 4
        )

        status = asyncio.run(masters.status(SHARDED))
        assert status is not None
        figures["shard_memory_mib"] = [
            {
                "shard": s.shard,
                "table": round(s.table_bytes / 2**20, 1),
                "resident": round(s.resident_bytes / 2**20, 1),
            }
            for s in status.shards
        ]
        shard_cpp = [
            ray.get(ray.get_actor(s.replica, namespace=RAY_NAMESPACE).stats.remote())["cpp"]
            for s in status.shards
        ]
        relayed = sum(c["relayed"] for c in shard_cpp)
        figures["shard_cpp_relayed_fraction"] = round(
            relayed / max(1, relayed + sum(sum(c["codes"].values()) for c in shard_cpp)), 4
        )
        slow_name = next(s.replica for s in status.shards if s.shard == 0)
        # 10x slower as the default (C++) router measures the replica: its p50 there, then 9x that.
        p50_ms = ray.get(router.stats.remote())["cpp"]["shards"][0]["p50_ms"][slow_name]
        ray.get(ray.get_actor(slow_name, namespace=RAY_NAMESPACE).inject_delay.remote(9 * p50_ms / 1000))
        request = request_bytes(SHARDED, 64)
        slow = {path: {"hedged": [], "unhedged": []} for path in ROUTERS}
        extra: dict[str, list[float]] = {path: [] for path in ROUTERS}
        for _ in range(slow_reps):
            for path in ROUTERS:
                for mode, budget in (("hedged", HEDGE_BUDGET), ("unhedged", 0.0)):
                    ray.get(router.set_hedge_budget.remote(budget))
                    before = ray.get(router.stats.remote())["shards"][0]
                    slow[path][mode].append(run(routers[path], request, seconds))
                    after = ray.get(router.stats.remote())["shards"][0]
                    if budget:
                        added = after["hedges"] - before["hedges"]
                        extra[path].append(added / max(1, after["lookups"] - before["lookups"]))
        figures["slow_replica_b64"] = {
            "delay_ms": round(9 * p50_ms, 3),
            **{mode: median_of(r) for mode, r in slow["cpp"].items()},
            "hedged_extra_lookups_fraction_shard0": round(statistics.median(extra["cpp"]), 4),
            "python_router": {
                **{mode: median_of(r) for mode, r in slow["python"].items()},
                "hedged_extra_lookups_fraction_shard0": round(statistics.median(extra["python"]), 4),
            },
        }
        ray.get(router.set_hedge_budget.remote(HEDGE_BUDGET))
        asyncio.run(masters.remove(SHARDED))
        asyncio.run(masters.remove(UNSHARDED))
    finally:
        ray.shutdown()
        cluster.cleanup()

    b64, slow_b64 = figures["b64"], figures["slow_replica_b64"]
    python_slow = slow_b64["python_router"]
    ratios = {
        "ratio_p99_vs_unsharded": round(b64["sharded"]["p99_ms"] / b64["unsharded"]["p99_ms"], 3),
        "ratio_rps_vs_unsharded": round(b64["sharded"]["rps"] / b64["unsharded"]["rps"], 3),
        "ratio_p99_vs_unsharded_python_router": round(
            b64["sharded_python_router"]["p99_ms"] / b64["unsharded"]["p99_ms"], 3
        ),
        "ratio_rps_vs_unsharded_python_router": round(
            b64["sharded_python_router"]["rps"] / b64["unsharded"]["rps"], 3
        ),
        "ratio_p99_hedged_vs_unhedged": round(
            slow_b64["hedged"]["p99_ms"] / slow_b64["unhedged"]["p99_ms"], 3
        ),
        "ratio_p99_hedged_vs_unhedged_python_router": round(
            python_slow["hedged"]["p99_ms"] / python_slow["unhedged"]["p99_ms"], 3
        ),
        # The "hedging keeps the p99 within 2x of the healthy p99": (c) hedged vs (b).
        "ratio_p99_hedged_vs_healthy": round(slow_b64["hedged"]["p99_ms"] / b64["sharded"]["p99_ms"], 3),
        "ratio_p99_hedged_vs_healthy_python_router": round(
            python_slow["hedged"]["p99_ms"] / b64["sharded_python_router"]["p99_ms"], 3
        ),
    }
    print(f"{'config':>30} | {'rps':>8} | {'p50 ms':>8} | {'p99 ms':>8}")
    rows = [(f"b{b} {n}", figures[f"b{b}"][n]) for b in batches for n in modes]
    rows += [(f"slow b64 {m}", slow_b64[m]) for m in ("hedged", "unhedged")]
    rows += [(f"slow b64 {m} python_router", python_slow[m]) for m in ("hedged", "unhedged")]
    for name, row in rows:
        print(f"{name:>30} | {row['rps']:>8.0f} | {row['p50_ms']:>8.3f} | {row['p99_ms']:>8.3f}")
    print(f"shard gather of 1024 keys: {figures['shard_gather_us_1024_keys']} us")
    for name, value in ratios.items():
        print(f"{name}: {value}")
    report = {
        "settings": {
            "quick": args.quick,
            "seconds": seconds,
            "concurrency": CONCURRENCY,
            "batches": list(batches),
            "reps": f"median of {REPS} ({slow_reps} for the slow replica), interleaved",
            "table": f"factorization machine, {ROWS:,} rows x (1 + {DIM}) floats, {FIELDS} fields",
            "sharded": "range, 4 shards x 2 replicas, one router; one Ray node of 2 CPUs",
            "routers": "sharded: the router's C++ fast path (default); sharded_python_router: Python's",
            "shards": "C++ lookup fast path (default)",
            "hedge_budget": HEDGE_BUDGET,
            "load_generator": "C++ (servefleet.direct.run_load), one thread + channel per caller, same box",
        },
        "figures": figures,
        **ratios,
    }
    write_report(
        "sharded", report, load_average_1m_before_after=[round(load_before, 2), round(os.getloadavg()[0], 2)]
    )
    print("wrote bench/results/sharded.json")


if __name__ == "__main__":
    main()
