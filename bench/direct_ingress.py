"""Direct-ingress benchmark: the same CTR model (factorization machine, 1M embedding rows) served
three ways, each driven by the same C++ load generator (``servefleet.direct.run_load``: one thread
and one channel per concurrent caller, so the client's own overhead is small and equal for all):

  (a) direct       the C++ KServe v2 server of ``servefleet.direct`` (no Python on the request path)
  (b) proxy        the data plane: KServe v2 proxy actor -> Python replica actor running the numpy
                   reference (``servefleet.direct.ctr:CtrScorer``, kind python) on a Ray cluster
  (c) python_grpc  a plain grpc.aio server (own process) running the numpy reference

at batch 1 and batch 64, concurrency 8, and the direct server at batch 1, concurrency 1 as well. All
three run at once; each repetition (``--reps``, 3) measures every path in turn, the first one
rotating, and each figure is the median over the repetitions. For the direct server the handler's
own latency (its C++ histogram, read before and after each measurement, so every figure belongs to
one batch size and one concurrency) is reported beside the end-to-end latency, with the time the
process's threads (server and load generator) spent runnable but waiting for a CPU, per request.

    .venv/bin/python bench/direct_ingress.py            # full: 5 s per measurement and rep
    .venv/bin/python bench/direct_ingress.py --quick    # 1 s per measurement and rep (under 2 minutes)

Writes bench/results/direct_ingress.json.
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import os
import tempfile
from pathlib import Path
from typing import Any

import grpc
import numpy as np

# isort: off
from _report import write_report
import servefleet  # noqa: F401 - before Ray: keeps Ray on loopback (servefleet/__init__.py)
import ray

# isort: on
from tritonclient.grpc import service_pb2, service_pb2_grpc

from servefleet.api import common_pb2
from servefleet.common.appid import AppId
from servefleet.common.config import grpc_options
from servefleet.common.errors import ServefleetError
from servefleet.common.net import free_port, wait_for
from servefleet.common.tensors import decode_request, encode_request, encode_response
from servefleet.direct import INPUT_NAME, DirectServer, ctr, run_load
from servefleet.services.agent import masters
from servefleet.spec import load_spec
from servefleet.testing import RayCluster

APP = common_pb2.AppRef(namespace="recs", name="ctr")
MODEL = AppId.parse(APP).model_name
BATCHES = (1, 64)


class ReferenceServicer(service_pb2_grpc.GRPCInferenceServiceServicer):
    """Peer (c): KServe v2 ModelInfer over the numpy reference, in plain grpc.aio."""

    def __init__(self, model_path: str) -> None:
        self.scorer = ctr.CtrScorer(model_path)

    async def ServerLive(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        return service_pb2.ServerLiveResponse(live=True)

    async def ModelInfer(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        try:
            outputs = self.scorer(decode_request(request))
        except ServefleetError as exc:
            await context.abort(exc.code, str(exc))
        return encode_response(request.model_name, outputs, model_version="1", request_id=request.id)


def serve_python(model_path: str, port: int) -> None:
    async def main() -> None:
        server = grpc.aio.server(options=grpc_options())
        service_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(ReferenceServicer(model_path), server)
        server.add_insecure_port(f"127.0.0.1:{port}")
        await server.start()
        await server.wait_for_termination()

    asyncio.run(main())


def live(address: str) -> bool:
    with grpc.insecure_channel(address) as channel:
        try:
            stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
            return bool(stub.ServerLive(service_pb2.ServerLiveRequest(), timeout=1).live)
        except grpc.RpcError:
            return False


def request_bytes(batch: int) -> bytes:
    ids = np.random.default_rng(batch).integers(0, 1 << 20, size=(batch, 16), dtype=np.int64)
    return encode_request(MODEL, {INPUT_NAME: ids}).SerializeToString()


BOUNDS_US = list(range(1, 20_001))  # the handler histogram read at 1 us resolution up to 20 ms


def handler_histogram(server: DirectServer | None) -> np.ndarray:
    """Cumulative count of handled RPCs under each bound (empty without a server to read)."""
    return np.array(server.latency_buckets(BOUNDS_US)[0][:-1]) if server is not None else np.array([])


def handler_percentiles(before: np.ndarray, after: np.ndarray) -> dict[str, float]:
    """p50/p99 (upper bucket edge, us) of the RPCs handled between two histogram reads."""
    cumulative = after - before
    total = cumulative[-1] if len(cumulative) else 0
    if not total:
        return {}
    return {
        f"handler_p{q}_us": float(BOUNDS_US[int(np.searchsorted(cumulative, q / 100 * total))])
        for q in (50, 99)
    }


def run_queue_wait_s() -> float:
    """Seconds this process's threads (server and load generator alike) spent runnable but waiting
    for a CPU (Linux schedstat): the scheduling share of the end-to-end latency."""
    total = 0
    for stat in Path("/proc/self/task").glob("*/schedstat"):
        try:
            total += int(stat.read_text().split()[1])
        except (OSError, IndexError, ValueError):  # a thread that ended meanwhile
            continue
    return total / 1e9


def one_point(
    address: str, seconds: float, concurrency: int, batch: int, server: DirectServer | None = None
) -> dict[str, Any]:
    request = request_bytes(batch)
    run_load(address, request, concurrency, min(1.0, seconds / 3))  # warm-up: channels, caches
    before, waited = handler_histogram(server), run_queue_wait_s()
    result = run_load(address, request, concurrency, seconds)
    if result["errors"]:
        raise RuntimeError(f"{address} batch {batch}: {result['errors']} errors: {result['first_error']}")
    out = {k: round(v, 4) if isinstance(v, float) else v for k, v in result.items() if k != "first_error"}
    if server is not None:
        wait_us = (run_queue_wait_s() - waited) * 1e6 / max(result["requests"], 1)
        out["run_queue_wait_us_per_request"] = round(wait_us, 1)
    return {**out, **handler_percentiles(before, handler_histogram(server))}


def measure(
    address: str, seconds: float, concurrency: int, server: DirectServer | None = None
) -> dict[str, dict[str, Any]]:
    out = {f"b{batch}": one_point(address, seconds, concurrency, batch, server) for batch in BATCHES}
    if server is not None:  # one caller: the latency floor here, without 8 callers sharing the cores
        out["b1_c1"] = one_point(address, seconds, 1, 1, server)
    return out


def median_of(reps: list[dict[str, dict[str, Any]]]) -> dict[str, dict[str, float]]:
    return {
        point: {key: float(np.median([r[point][key] for r in reps])) for key in reps[0][point]}
        for point in reps[0]
    }


async def deploy_proxy_path(model_path: Path) -> str:
    """The CTR reference as a kind-python app behind one proxy; returns the proxy's address."""
    spec = load_spec(
        {
            "namespace": APP.namespace,
            "name": APP.name,
            "version": "1",
            "import_path": "servefleet.direct.ctr:CtrScorer",
            "init_args": {"model_path": str(model_path)},
            "resources": {"num_cpus": 1},
            "replicas": {"min": 1, "max": 1, "initial": 1},
            "max_concurrency": 8,
            "proxies": 1,
        }
    )
    await masters.apply(spec, 1, 1, cluster="bench", discovery="")
    for _ in range(1200):
        status = await masters.status(APP)
        if status is not None and status.ready_replicas == 1 and status.proxy_addresses:
            return str(status.proxy_addresses[0])
        await asyncio.sleep(0.1)
    raise TimeoutError(f"proxy path not ready: {status}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="1 s per measurement and rep instead of 5 s")
    p.add_argument("--reps", type=int, default=3, help="interleaved repetitions (median reported)")
    args = p.parse_args()
    seconds, concurrency = (1.0 if args.quick else 5.0), 8
    settings = {"seconds": seconds, "concurrency": concurrency, "batches": list(BATCHES)}
    work = Path(tempfile.mkdtemp(prefix="bench-direct-"))
    model = ctr.build_model(num_rows=1 << 20, num_fields=16, dim=16)
    model_path = ctr.export_model(model, work / "ctr.bin")
    load_before = os.getloadavg()[0]

    direct = DirectServer()
    direct.load_model(str(model_path), MODEL, "1")
    direct_address = f"127.0.0.1:{direct.start('127.0.0.1:0', workers=2)}"
    port = free_port()
    python_server = multiprocessing.get_context("spawn").Process(
        target=serve_python, args=(str(model_path), port)
    )
    python_server.start()
    cluster = RayCluster(num_cpus=2).start()
    reps: dict[str, list[dict[str, dict[str, Any]]]] = {"direct": [], "python_grpc": [], "proxy": []}
    try:
        wait_for(lambda: live(f"127.0.0.1:{port}"), timeout=60, what="python grpc.aio server")
        ray.init(address=cluster.address, namespace="bench-direct", log_to_driver=False)
        proxy_address = asyncio.run(deploy_proxy_path(model_path))
        paths = [
            ("direct", lambda: measure(direct_address, seconds, concurrency, direct)),
            ("python_grpc", lambda: measure(f"127.0.0.1:{port}", seconds, concurrency)),
            ("proxy", lambda: measure(proxy_address, seconds, concurrency)),
        ]
        for rep in range(args.reps):
            for path, run in paths[rep % 3 :] + paths[: rep % 3]:
                reps[path].append(run())
                print(f"rep {rep} {path}: {reps[path][-1]}", flush=True)
        asyncio.run(masters.remove(APP))
    finally:
        ray.shutdown()
        cluster.cleanup()
        python_server.terminate()
        python_server.join(10)
        direct.stop(1.0)
    figures: dict[str, Any] = {path: median_of(runs) for path, runs in reps.items()}

    ratios = {}
    for batch in BATCHES:
        for peer in ("proxy", "python_grpc"):
            d, q = figures["direct"][f"b{batch}"], figures[peer][f"b{batch}"]
            ratios[f"ratio_rps_b{batch}_vs_{peer}"] = round(d["rps"] / q["rps"], 2)
            ratios[f"ratio_p99_b{batch}_vs_{peer}"] = round(d["p99_ms"] / q["p99_ms"], 3)

    print(f"{'path':>12} | {'batch':>5} | {'rps':>9} | {'p50 ms':>7} | {'p99 ms':>7}")
    for path in ("direct", "proxy", "python_grpc"):
        for batch in BATCHES:
            row = figures[path][f"b{batch}"]
            rps, p50, p99 = row["rps"], row["p50_ms"], row["p99_ms"]
            print(f"{path:>12} | {batch:>5} | {rps:>9.0f} | {p50:>7.3f} | {p99:>7.3f}")
    for point, c in (("b1_c1", 1), ("b1", concurrency)):
        f = figures["direct"][point]
        print(
            f"direct, batch 1, concurrency {c}: {f['rps']:.0f} rps, end to end p50 {f['p50_ms']:.3f} ms "
            f"p99 {f['p99_ms']:.3f} ms; handler p50 {f['handler_p50_us']:.0f} us "
            f"p99 {f['handler_p99_us']:.0f} us; waiting for a CPU {f['run_queue_wait_us_per_request']:.0f} us"
            " per request"
        )
    for name, value in ratios.items():
        print(f"{name}: {value}")
    report = {
        "settings": {
            **settings,
            "quick": args.quick,
            "model": "factorization machine, 1,048,576 rows x (1 + 16) floats, 16 fields",
            "load_generator": "C++ (servefleet.direct.run_load), one thread + channel per caller, same box",
            "direct_workers": 2,
            "reps": args.reps,
            "figure": "median over the reps, paths interleaved within each rep",
        },
        "figures": figures,
        "reps": reps,
        **ratios,
    }
    write_report(
        "direct_ingress",
        report,
        load_average_1m_before_after=[round(load_before, 2), round(os.getloadavg()[0], 2)],
    )
    print("wrote bench/results/direct_ingress.json")


if __name__ == "__main__":
    main()
