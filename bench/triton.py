"""Triton bootstrapper benchmark: the example python-backend model (``examples/triton``, add_sub on
16 floats) served three ways, driven by the same C++ load generator (``servefleet.direct.run_load``:
one thread and one channel per caller, raw ModelInfer bytes):

  (a) bare_triton  a tritonserver the bench launches itself (``TritonServer``: the process alone,
                   no Ray, no actor, no discovery)
  (b) direct       a servefleet ``kind: triton`` replica on a Ray cluster, called at the address it
                   registers (what the SDK and tritonclient do): the bootstrapper's cost, if any
  (c) proxy        the same app through a servefleet proxy (``proxies: 1``), for clients that only
                   know the proxy

Each figure is the median of 3 reps at concurrency 1 and 8. Within a rep the paths take turns in
short slices (a, b, c, b, c, a, ...), so a busy spell on a shared box lands on every path alike:
a rep's rps is its requests over its seconds, its p50/p99 the median of its slices'.
``ratio_rps_vs_bare_triton`` is (b)/(a) at concurrency 8; the bootstrapper adds nothing on the
request path (the same binary, flags and loopback hop), so it should sit at 1 within noise.

    .venv/bin/python bench/triton.py            # full: 10 s per measurement
    .venv/bin/python bench/triton.py --quick    # 2 s per measurement (under 2 minutes)

Writes bench/results/triton.json.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

# isort: off
from _report import write_report
import servefleet  # noqa: F401 - before Ray: keeps Ray on loopback (servefleet/__init__.py)
import ray

# isort: on
from servefleet.common.appid import AppId
from servefleet.common.tensors import encode_request
from servefleet.direct import run_load
from servefleet.services.actors import RAY_NAMESPACE, replica_prefix
from servefleet.services.agent import masters
from servefleet.services.triton.install import find
from servefleet.services.triton.server import TritonServer
from servefleet.spec import load_spec
from servefleet.testing import RayCluster

REPOSITORY = Path(__file__).resolve().parents[1] / "examples" / "triton" / "models"
MODEL = "add_sub"
PATHS = ("bare_triton", "direct", "proxy")
CONCURRENCY = (1, 8)
REPS = 3
SLICE_S = 0.5


def request_bytes() -> bytes:
    a = np.linspace(0, 1, 16, dtype=np.float32)
    return encode_request(MODEL, {"INPUT0": a, "INPUT1": a[::-1].copy()}).SerializeToString()


#: The example as a kind-triton app with one replica and one proxy.
SPEC = load_spec(
    {
        "name": "bench-triton",
        "kind": "triton",
        "model_repository": str(REPOSITORY),
        "resources": {"num_cpus": 0.1},
        "replicas": 1,
        "proxies": 1,
    }
)


async def deploy(spec: Any) -> tuple[str, str]:
    """Deploy ``spec``; returns the (replica, proxy) addresses."""
    await masters.apply(spec, 1, 1, cluster="bench", discovery="")
    for _ in range(1800):
        status = await masters.status(AppId.parse(spec).ref())
        if status is not None and status.ready_replicas == 1 and status.proxy_addresses:
            break
        await asyncio.sleep(0.1)
    else:
        raise TimeoutError(f"kind triton app not ready: {status}")
    [name] = [
        a["name"]
        for a in ray.util.list_named_actors(all_namespaces=True)
        if a["namespace"] == RAY_NAMESPACE and a["name"].startswith(replica_prefix(AppId.parse(spec).ref()))
    ]
    info = await ray.get_actor(name, namespace=RAY_NAMESPACE).ready.remote()
    return str(info["address"]), str(status.proxy_addresses[0])


def measure_rep(addresses: dict[str, str], concurrency: int, seconds: float) -> dict[str, dict[str, Any]]:
    """One rep: every path for ``seconds`` in all, in slices taking turns (order rotated)."""
    request = request_bytes()
    slices = max(2, round(seconds / SLICE_S))
    runs: dict[str, list[Any]] = {path: [] for path in addresses}
    for address in addresses.values():
        run_load(address, request, concurrency, 0.3)  # warm-up: channels, caches
    for i in range(slices):
        for path in PATHS[i % len(PATHS) :] + PATHS[: i % len(PATHS)]:
            result = run_load(addresses[path], request, concurrency, seconds / slices)
            if result["errors"]:
                raise RuntimeError(f"{path}: {result['errors']} errors: {result['first_error']}")
            runs[path].append(result)
    return {
        path: {
            "rps": sum(r["requests"] for r in rs) / sum(r["seconds"] for r in rs),
            "p50_ms": statistics.median(r["p50_ms"] for r in rs),
            "p99_ms": statistics.median(r["p99_ms"] for r in rs),
        }
        for path, rs in runs.items()
    }


def median_of(reps: list[dict[str, Any]]) -> dict[str, Any]:
    keys = ("rps", "p50_ms", "p99_ms")
    return {k: round(statistics.median(r[k] for r in reps), 4) for k in keys} | {"reps": len(reps)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="2 s per measurement instead of 10 s")
    args = p.parse_args()
    seconds = 2.0 if args.quick else 10.0
    load_before = os.getloadavg()[0]

    bare = TritonServer(find(), REPOSITORY, {}, log_dir=Path(tempfile.mkdtemp(prefix="bench-triton-")))
    asyncio.run(bare.start(120))
    cluster = RayCluster(num_cpus=2).start()
    try:
        ray.init(address=cluster.address, namespace="bench-triton", log_to_driver=False)
        direct, proxy = asyncio.run(deploy(SPEC))
        addresses = {"bare_triton": bare.address, "direct": direct, "proxy": proxy}
        reps: dict[str, list[dict[str, Any]]] = {f"{p}_c{c}": [] for p in PATHS for c in CONCURRENCY}
        for _ in range(REPS):
            for concurrency in CONCURRENCY:
                for path, result in measure_rep(addresses, concurrency, seconds).items():
                    reps[f"{path}_c{concurrency}"].append(result)
        asyncio.run(masters.remove(AppId.parse(SPEC).ref()))
    finally:
        ray.shutdown()
        cluster.cleanup()
        asyncio.run(bare.stop(10))

    figures = {key: median_of(runs) for key, runs in reps.items()}
    ratios: dict[str, float] = {}
    for concurrency in CONCURRENCY:
        bare_rps = figures[f"bare_triton_c{concurrency}"]["rps"]
        direct_c, proxy_c = figures[f"direct_c{concurrency}"], figures[f"proxy_c{concurrency}"]
        ratios[f"ratio_rps_c{concurrency}_vs_bare_triton"] = round(direct_c["rps"] / bare_rps, 3)
        ratios[f"ratio_rps_proxy_c{concurrency}_vs_bare_triton"] = round(proxy_c["rps"] / bare_rps, 3)
    ratios["ratio_rps_vs_bare_triton"] = ratios[f"ratio_rps_c{CONCURRENCY[-1]}_vs_bare_triton"]

    print(f"{'path':>12} | {'C':>2} | {'rps':>8} | {'p50 ms':>7} | {'p99 ms':>7}")
    for concurrency in CONCURRENCY:
        for path in PATHS:
            rps, p50, p99 = (figures[f"{path}_c{concurrency}"][k] for k in ("rps", "p50_ms", "p99_ms"))
            print(f"{path:>12} | {concurrency:>2} | {rps:>8.0f} | {p50:>7.3f} | {p99:>7.3f}")
    for name, value in ratios.items():
        print(f"{name}: {value}")
    report = {
        "settings": {
            "seconds": seconds,
            "reps": REPS,
            "slice_s": SLICE_S,
            "concurrency": list(CONCURRENCY),
            "quick": args.quick,
            "model": "examples/triton add_sub (python backend, 1 CPU instance), 2 x 16 FP32 in, 2 out",
            "load_generator": "C++ (servefleet.direct.run_load), one thread + channel per caller, same box",
        },
        "figures": figures,
        **ratios,
    }
    write_report(
        "triton", report, load_average_1m_before_after=[round(load_before, 2), round(os.getloadavg()[0], 2)]
    )
    print("wrote bench/results/triton.json")


if __name__ == "__main__":
    main()
