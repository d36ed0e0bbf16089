"""Proxy benchmark: the same trivial KServe v2 model behind three servers, in one run.

(a) servefleet: the app's proxy actor (grpc.aio) -> one replica actor (Ray actor call);
(a') servefleet_cpp: the same app (as ``echo-cpp``) with the proxy's C++ ModelInfer forwarder on
     (``SERVEFLEET_PROXY_CPP_FORWARD=1``: C++ forwards to the replica's gRPC endpoint, Python answers
     what it relays: here the 1 % of requests that start a trace, and every stream);
(b) Ray Serve 2.60's gRPC proxy -> one Serve replica (the peer; the ``bench`` extra);
(c) a raw ``grpc.aio`` server calling the model in its own process (no hop: the limit).

The model is ``examples.echo:Echo`` (returns its FP32 [1, 4] input) on every platform, with one
replica and the same per-replica concurrency (servefleet ``max_concurrency`` = Serve
``max_ongoing_requests``). The load generator is a closed loop of C concurrent callers on one
``grpc.aio`` channel in this process, sending a pre-serialized ModelInferRequest (so its own cost is
the same for all three). For each C in 1, 8, 64: requests/s, p50 and p99 latency. The streaming
row (``ModelStreamInfer``: C bidirectional streams, each sending its next request when the last
answer is back) runs on servefleet and the raw server (Ray Serve's gRPC proxy has no
bidirectional streams).

The machine is shared, so every point is measured ``--reps`` (3) times, the servers interleaved
(whose turn is first rotates), and each figure is the median; the load average is recorded at the
start and the end. CPU time per request (user + system, from /proc) of the servefleet proxy, its
replica and the raw server says where the time goes.

    .venv/bin/python bench/proxy.py            # 5 s per point and rep
    .venv/bin/python bench/proxy.py --quick    # 1 s per point and rep (under 2 minutes)
    .venv/bin/python bench/proxy.py --profile  # also py-spy the servefleet proxy and replica at C=8

Writes bench/results/proxy.json (with ratio_rps_vs_ray_serve / ratio_rps_vs_limit per C).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import re
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import grpc
import numpy as np
from tritonclient.grpc import service_pb2

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # examples/ for the model

from _report import RESULTS_DIR, write_report

from examples.echo import Echo
from servefleet.common.appid import AppId
from servefleet.common.config import grpc_options
from servefleet.common.net import free_port, tcp_open, wait_for
from servefleet.common.tensors import decode_request, encode_request, encode_response

METHOD = "/inference.GRPCInferenceService/ModelInfer"
STREAM_METHOD = "/inference.GRPCInferenceService/ModelStreamInfer"
CONCURRENCY = (1, 8, 64)
MAX_CONCURRENCY = 64  # per replica, both platforms
MODEL = "echo"
CPP_MODEL = "echo-cpp"  # the same app with the proxy's C++ forwarder on


def payload(model: str = MODEL) -> bytes:
    return encode_request(model, {"x": np.arange(4, dtype=np.float32).reshape(1, 4)}).SerializeToString()


def cpu_s(pid: int) -> float:
    """User + system CPU seconds a process has used (its threads included)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def drive_stream(
    address: str, concurrency: int, seconds: float, model: str = MODEL
) -> dict[str, float]:
    """Closed loop over ``concurrency`` ModelStreamInfer streams: each sends its next request
    when the last answer is back; latencies of answers within the window."""
    request = payload(model)
    latencies: list[float] = []
    errors = 0
    async with grpc.aio.insecure_channel(address, options=grpc_options()) as channel:
        open_stream = channel.stream_stream(STREAM_METHOD)
        end = time.perf_counter() + seconds

        async def caller() -> None:
            nonlocal errors
            call = open_stream(timeout=seconds + 30)
            for _ in range(5):  # warm-up
                await call.write(request)
                await call.read()
            while time.perf_counter() < end:
                began = time.perf_counter()
                await call.write(request)
                answer = await call.read()
                if (
                    answer is grpc.aio.EOF
                    or service_pb2.ModelStreamInferResponse.FromString(answer).error_message
                ):
                    errors += 1
                else:
                    latencies.append(time.perf_counter() - began)
            await call.done_writing()

        began = time.perf_counter()
        await asyncio.gather(*(caller() for _ in range(concurrency)))
        elapsed = time.perf_counter() - began
    return summary(latencies, errors, elapsed)


def summary(latencies: list[float], errors: int, elapsed: float) -> dict[str, float]:
    ms = np.array(latencies) * 1000 if latencies else np.array([float("nan")])
    return {
        "rps": round(len(latencies) / elapsed, 1),
        "p50_ms": round(float(np.percentile(ms, 50)), 2),
        "p99_ms": round(float(np.percentile(ms, 99)), 2),
        "requests": len(latencies),
        "errors": errors,
    }


async def drive(
    address: str,
    concurrency: int,
    seconds: float,
    metadata: tuple[tuple[str, str], ...] = (),
    model: str = MODEL,
) -> dict[str, float]:
    """Closed-loop load; latencies of requests completed within the window."""
    request = payload(model)
    async with grpc.aio.insecure_channel(address, options=grpc_options()) as channel:
        call = channel.unary_unary(METHOD)
        ready_by = time.monotonic() + 60
        while True:  # a peer's proxy may learn its routes a moment after it says ready
            try:
                await call(request, timeout=30, metadata=metadata)
                break
            except grpc.aio.AioRpcError:
                if time.monotonic() > ready_by:
                    raise
                await asyncio.sleep(0.5)
        for _ in range(20):  # warm-up: connections, first-call paths
            await call(request, timeout=30, metadata=metadata)
        latencies: list[float] = []
        errors = 0
        end = time.perf_counter() + seconds

        async def caller() -> None:
            nonlocal errors
            while time.perf_counter() < end:
                began = time.perf_counter()
                try:
                    await call(request, timeout=30, metadata=metadata)
                    latencies.append(time.perf_counter() - began)
                except grpc.aio.AioRpcError:
                    errors += 1

        began = time.perf_counter()
        await asyncio.gather(*(caller() for _ in range(concurrency)))
        elapsed = time.perf_counter() - began
    return summary(latencies, errors, elapsed)


# ---- (c) the limit: a raw grpc.aio server in its own process -----------------------------------


def raw_server(port: int) -> None:
    """Entry of the raw server subprocess: the model called in the servicer, nothing else."""
    from tritonclient.grpc import service_pb2_grpc

    model = Echo()

    class Servicer(service_pb2_grpc.GRPCInferenceServiceServicer):
        async def ModelInfer(self, request: Any, context: Any) -> Any:
            return encode_response(request.model_name, model(decode_request(request)))

        async def ModelStreamInfer(self, requests: Any, context: Any) -> Any:
            async for request in requests:
                response = encode_response(request.model_name, model(decode_request(request)))
                yield service_pb2.ModelStreamInferResponse(infer_response=response)

    async def serve() -> None:
        server = grpc.aio.server(options=grpc_options())
        service_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(Servicer(), server)
        server.add_insecure_port(f"127.0.0.1:{port}")
        await server.start()
        await server.wait_for_termination()

    asyncio.run(serve())


@contextmanager
def limit_server() -> Iterator[tuple[str, int]]:
    port = free_port()
    proc = subprocess.Popen([sys.executable, __file__, "--raw-server", str(port)])
    try:
        address = f"127.0.0.1:{port}"
        wait_for(lambda: tcp_open(address), timeout=30, what="raw grpc.aio server")
        yield address, proc.pid
    finally:
        proc.terminate()
        proc.wait(10)


# ---- (a) servefleet ----------------------------------------------------------------------------


async def servefleet_app(name: str = MODEL, cpp_forward: bool = False) -> tuple[str, dict[str, Any]]:
    from servefleet.services.agent import masters
    from servefleet.spec import load_spec

    spec = load_spec(
        {
            "name": name,
            "import_path": "examples.echo:Echo",
            "inputs": [{"name": "x", "datatype": "FP32", "shape": [-1, 4]}],
            "outputs": [{"name": "y", "datatype": "FP32", "shape": [-1, 4]}],
            "max_concurrency": MAX_CONCURRENCY,
            "max_queued": MAX_CONCURRENCY,
            "replicas": 1,
            "resources": {"num_cpus": 0.1},
        }
    )
    if cpp_forward:  # the app's master, proxies and replicas inherit SERVEFLEET_* at apply
        os.environ["SERVEFLEET_PROXY_CPP_FORWARD"] = "1"
    try:
        await masters.apply(spec, 1, 1, cluster="bench", discovery="")
    finally:
        os.environ.pop("SERVEFLEET_PROXY_CPP_FORWARD", None)
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        status = await masters.status(AppId.parse(spec).ref())
        if status is not None and status.ready_replicas == 1 and status.proxy_addresses:
            pids = {
                "replica": [s["pid"] for s in (await masters.replica_stats(AppId.parse(spec).ref())).values()]
            }
            return status.proxy_addresses[0], pids
        await asyncio.sleep(0.2)
    raise TimeoutError("servefleet app did not become ready")


async def proxy_pid(address: str, model: str = MODEL) -> int:
    """The process of the app's proxy that serves ``address`` (an app has more than one)."""
    import ray

    import servefleet.services.actors as names

    for index in range(8):
        with contextlib.suppress(ValueError):
            name = f"{names.PROXY_PREFIX}default/{model}:{index}"
            proxy = ray.get_actor(name, namespace=names.RAY_NAMESPACE)
            if await proxy.address.remote() == address:
                return int((await proxy.stats.remote())["pid"])
    raise LookupError(f"no proxy actor serves {address}")


# ---- (b) Ray Serve -----------------------------------------------------------------------------


def ray_serve_app() -> str:
    from ray import serve
    from ray.serve.config import gRPCOptions

    port = free_port()
    serve.start(
        http_options={"host": "127.0.0.1", "port": free_port()},
        grpc_options=gRPCOptions(
            port=port,
            grpc_servicer_functions=[
                "tritonclient.grpc.service_pb2_grpc.add_GRPCInferenceServiceServicer_to_server"
            ],
        ),
    )

    @serve.deployment(
        num_replicas=1, max_ongoing_requests=MAX_CONCURRENCY, ray_actor_options={"num_cpus": 0.1}
    )
    class ServeEcho:
        def __init__(self) -> None:
            self.model = Echo()

        def ModelInfer(self, request: Any) -> Any:
            return encode_response(request.model_name, self.model(decode_request(request)))

    serve.run(ServeEcho.bind(), name=MODEL)
    return f"127.0.0.1:{port}"


# ---- profile -----------------------------------------------------------------------------------


def profile(pids: dict[str, int], seconds: int, out: Path) -> dict[str, list[str]]:
    """py-spy each process while load runs; the top frames by own time, per process."""
    summary: dict[str, list[str]] = {}
    procs = {
        role: subprocess.Popen(
            [
                str(Path(sys.executable).with_name("py-spy")),
                "record",
                "-p",
                str(pid),
                "-d",
                str(seconds),
                "-f",
                "raw",
                "-o",
                str(out / f"{role}.txt"),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        for role, pid in pids.items()
    }
    for role, proc in procs.items():
        proc.wait(seconds + 30)
        summary[role] = top_frames(out / f"{role}.txt")
    return summary


_PLUMBING = ("Thread._bootstrap", "Thread._bootstrap_inner", "Thread.run", "Worker.main_loop", "_worker (")


def top_frames(path: Path, count: int = 14) -> list[str]:
    """Inclusive share of samples per frame from py-spy's raw (collapsed stacks) output; a stack
    that ends in ``Thread.run`` is a thread inside native code (grpc's C core, Ray's core worker,
    the event loop's poll), shown as ``[native]``."""
    if not path.exists():
        return ["(no samples: py-spy could not attach)"]
    inclusive: dict[str, int] = {}
    total = 0
    for line in path.read_text().splitlines():
        stack, _, samples = line.rpartition(" ")
        frames = [re.sub(r":\d+\)$", ")", f) for f in stack.split(";") if f and not f.startswith(_PLUMBING)]
        frames = frames or ["[native]"]
        total += int(samples)
        for frame in set(frames):
            inclusive[frame] = inclusive.get(frame, 0) + int(samples)
    ranked = sorted(inclusive.items(), key=lambda kv: -kv[1])[:count]
    return [f"{100 * n / total:5.1f}% {frame}" for frame, n in ranked]


# ---- main --------------------------------------------------------------------------------------


def table(figures: dict[str, dict[str, dict[str, float]]]) -> str:
    lines = [f"{'server':<20}{'C':>4}{'rps':>10}{'p50 ms':>10}{'p99 ms':>10}{'errors':>8}"]
    for server, points in figures.items():
        for c, f in points.items():
            lines.append(
                f"{server:<20}{c:>4}{f['rps']:>10}{f['p50_ms']:>10}{f['p99_ms']:>10}{f['errors']:>8}"
            )
    return "\n".join(lines)


def ratios(
    figures: dict[str, dict[str, dict[str, float]]], peer: str, key: str, ours: str = "servefleet"
) -> dict[str, float]:
    mine = figures[ours]
    return {c: round(mine[c][key] / figures[peer][c][key], 2) for c in mine if figures[peer][c][key]}


def median_of(reps: list[dict[str, float]]) -> dict[str, float]:
    """Each figure's median over the repetitions (a point's figures need not come from one rep)."""
    return {key: statistics.median(r[key] for r in reps) for key in reps[0]}


async def run(args: argparse.Namespace, measure: Callable[..., Any]) -> dict[str, Any]:
    """All three servers up at once, then each C measured on each in turn, ``reps`` times with the
    first turn rotating, so that the machine's other load (it is shared) falls on all alike."""
    import ray

    from servefleet.testing import RayCluster

    reps: dict[tuple[str, int], list[dict[str, float]]] = {}
    cpu: dict[tuple[str, int], list[dict[str, float]]] = {}
    profiles: dict[str, list[str]] = {}
    cluster = RayCluster(num_cpus=2).start()
    try:
        ray.init(address=cluster.address, namespace="bench-proxy", log_to_driver=False)
        address, pids = await servefleet_app()
        roles = {"proxy": await proxy_pid(address), "replica": pids["replica"][0]}
        cpp_address, cpp_pids = await servefleet_app(CPP_MODEL, cpp_forward=True)
        cpp_roles = {"proxy": await proxy_pid(cpp_address, CPP_MODEL), "replica": cpp_pids["replica"][0]}
        serve_address = await asyncio.to_thread(ray_serve_app)
        serve_app = (("application", MODEL),)  # Serve's gRPC proxy routes by this metadata
        with limit_server() as (raw, raw_pid):
            points: list[tuple[str, Callable[[int], Any], dict[str, int]]] = [
                ("servefleet", lambda c: measure(address, c), roles),
                ("servefleet_cpp", lambda c: measure(cpp_address, c, model=CPP_MODEL), cpp_roles),
                ("ray_serve", lambda c: measure(serve_address, c, metadata=serve_app), {}),
                ("raw_grpc_aio", lambda c: measure(raw, c), {"server": raw_pid}),
                ("servefleet_stream", lambda c: measure(address, c, stream=True), roles),
                (
                    "servefleet_cpp_stream",
                    lambda c: measure(cpp_address, c, stream=True, model=CPP_MODEL),
                    cpp_roles,
                ),
                ("raw_grpc_aio_stream", lambda c: measure(raw, c, stream=True), {"server": raw_pid}),
            ]
            for rep in range(args.reps):
                for c in CONCURRENCY:
                    turn = rep % len(points)
                    for server, point, procs in points[turn:] + points[:turn]:
                        before = {role: cpu_s(pid) for role, pid in procs.items()}
                        figures = await point(c)
                        reps.setdefault((server, c), []).append(figures)
                        cpu.setdefault((server, c), []).append(
                            {
                                f"{role}_cpu_us_per_request": round(
                                    (cpu_s(pid) - before[role]) * 1e6 / max(figures["requests"], 1), 1
                                )
                                for role, pid in procs.items()
                            }
                        )
        if args.profile:
            out = RESULTS_DIR / "proxy-profile"
            out.mkdir(exist_ok=True)
            load = asyncio.create_task(measure(address, 8, seconds=12))
            profiles = await asyncio.to_thread(profile, roles, 8, out)
            await load
    finally:
        ray.shutdown()  # before the cluster goes: a driver that loses its GCS aborts the process
        cluster.cleanup()
    figures: dict[str, dict[str, dict[str, float]]] = {}
    for (server, c), runs in reps.items():
        figures.setdefault(server, {})[str(c)] = median_of(runs)
        if cpu[(server, c)][0]:
            figures[server][str(c)].update(median_of(cpu[(server, c)]))
    return {"figures": figures, "profile": profiles, "reps": {f"{s} C={c}": r for (s, c), r in reps.items()}}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="3 s per point")
    parser.add_argument("--profile", action="store_true", help="py-spy the servefleet proxy and replica")
    parser.add_argument("--reps", type=int, default=3, help="interleaved repetitions (median reported)")
    parser.add_argument("--raw-server", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.raw_server:
        raw_server(args.raw_server)
        return
    seconds = 1.0 if args.quick else 5.0

    async def measure(
        address: str,
        concurrency: int,
        seconds: float = seconds,
        metadata: tuple[tuple[str, str], ...] = (),
        stream: bool = False,
        model: str = MODEL,
    ) -> dict[str, float]:
        if stream:
            figures = await drive_stream(address, concurrency, seconds, model)
        else:
            figures = await drive(address, concurrency, seconds, metadata, model)
        print(f"  {address} C={concurrency}{' stream' if stream else ''}: {figures}", flush=True)
        return figures

    load_before = round(os.getloadavg()[0], 2)
    result = asyncio.run(run(args, measure))
    figures = result["figures"]
    report = {
        "settings": {
            "seconds_per_point_and_rep": seconds,
            "reps": args.reps,
            "figure": "median over the reps, servers interleaved within each rep",
            "concurrency": list(CONCURRENCY),
            "replicas": 1,
            "per_replica_concurrency": MAX_CONCURRENCY,
            "model": "examples.echo:Echo, FP32 [1, 4]",
            "ray_num_cpus": 2,
            "load_generator": "closed loop, one grpc.aio channel, pre-serialized request, same process",
        },
        "figures": figures,
        "ratio_rps_vs_ray_serve": ratios(figures, "ray_serve", "rps"),
        "ratio_p99_vs_ray_serve": ratios(figures, "ray_serve", "p99_ms"),
        "ratio_rps_vs_limit": ratios(figures, "raw_grpc_aio", "rps"),
        "ratio_stream_rps_vs_limit": ratios(figures, "raw_grpc_aio_stream", "rps", "servefleet_stream"),
        "ratio_cpp_rps_vs_python_proxy": ratios(figures, "servefleet", "rps", "servefleet_cpp"),
        "ratio_cpp_cpu_vs_python_proxy": ratios(
            figures, "servefleet", "proxy_cpu_us_per_request", "servefleet_cpp"
        ),
        "ratio_cpp_rps_vs_ray_serve": ratios(figures, "ray_serve", "rps", "servefleet_cpp"),
        "ratio_cpp_p99_vs_ray_serve": ratios(figures, "ray_serve", "p99_ms", "servefleet_cpp"),
        "ratio_cpp_rps_vs_limit": ratios(figures, "raw_grpc_aio", "rps", "servefleet_cpp"),
        "ratio_cpp_stream_rps_vs_python_proxy": ratios(
            figures, "servefleet_stream", "rps", "servefleet_cpp_stream"
        ),
        "profile": result["profile"],
        "reps": result["reps"],
    }
    write_report("proxy", report, load_average_1m_at_start=load_before)
    print(table(figures))
    for key in (
        "ratio_rps_vs_ray_serve",
        "ratio_p99_vs_ray_serve",
        "ratio_rps_vs_limit",
        "ratio_stream_rps_vs_limit",
        "ratio_cpp_rps_vs_python_proxy",
        "ratio_cpp_cpu_vs_python_proxy",
        "ratio_cpp_rps_vs_ray_serve",
        "ratio_cpp_p99_vs_ray_serve",
        "ratio_cpp_rps_vs_limit",
        "ratio_cpp_stream_rps_vs_python_proxy",
    ):
        print(f"{key}: {report[key]}")
    for role, frames in result["profile"].items():
        print(f"\nprofile {role} (inclusive):\n  " + "\n  ".join(frames))


if __name__ == "__main__":
    main()
