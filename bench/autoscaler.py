"""Autoscaler benchmark: one load trace against the same app, scaled three ways, in one run.

(a) servefleet, ``autoscaling.mode: proactive``; (b) servefleet, ``mode: reactive``; (c) Ray Serve
2.60's own autoscaler (``autoscaling_config``; the ``bench`` extra). The model holds a slot for a
fixed 50 ms (async sleep), two slots per replica, so replicas are cheap on 2 cores.

The trace is a compressed diurnal curve (night -> day peak -> night, a sin^2 ramp) with two
bursts (2x for 5% of the trace each), replayed open-loop (each request fired at its scheduled
time, whatever the server does) from one grpc.aio channel in this process.

Delays: Ray Serve's defaults (upscale 30 s, downscale 600 s, look-back 30 s, metrics every 10 s)
scaled by k = trace length / 1800 s (the trace stands for half an hour), and the same upscale /
downscale delays for servefleet, so the three differ only in policy.

Per policy: mean utilisation (busy slot-seconds / provisioned slot-seconds; busy = answered
requests x 50 ms, provisioned = ready replicas x slots, sampled every 0.5 s), replica-seconds,
p99 latency, share of requests over the objective (``--slo-ms``, errors count as over), scale
events (changes of the ready count). Also goodput utilisation (the same, counting
only answers within the objective). Ratios: ``ratio_utilisation_vs_reactive``,
``ratio_utilisation_vs_ray_serve``, ``ratio_goodput_utilisation_vs_ray_serve``,
``ratio_slo_violations_vs_reactive``.

    .venv/bin/python bench/autoscaler.py            # 90 s trace, 3 interleaved reps, medians
    .venv/bin/python bench/autoscaler.py --quick    # 20 s trace, 1 rep (under 2 minutes here)

Writes bench/results/autoscaler.json. Ray Serve runs on its own Ray cluster (explicit address and
temp dir, never a plain ``ray.init()``).
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import math
import os
import random
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import grpc
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import itertools

from _report import write_report

from servefleet import stack
from servefleet.api import discovery_pb2, discovery_pb2_grpc, keeper_pb2, keeper_pb2_grpc
from servefleet.common.channels import aio_channel
from servefleet.common.config import grpc_options
from servefleet.common.net import async_wait_for, free_port
from servefleet.common.tensors import decode_request, encode_request, encode_response
from servefleet.spec import load_spec

ROOT = Path(__file__).resolve().parents[1]
METHOD = "/inference.GRPCInferenceService/ModelInfer"
SERVICE_S = 0.05
SLOTS = 2
TARGET = 1.0  # ongoing requests per replica (half its slots: room for noise)
MAX_REPLICAS = 5
LOW_RPS, HIGH_RPS = 3.0, 30.0
QUICK_TRACE_S = 20.0  # 3 replays + both systems' start-up stay under 2 minutes
RAY_DEFAULTS = {
    "upscale_delay_s": 30.0,
    "downscale_delay_s": 600.0,
    "look_back_period_s": 30.0,
    "metrics_interval_s": 10.0,
}


def rate(t: float, length: float) -> float:
    """Requests per second at ``t``: night -> day -> night, and two 2x bursts."""
    day = LOW_RPS + (HIGH_RPS - LOW_RPS) * math.sin(math.pi * t / length) ** 2
    burst = any(start <= t / length < start + 0.05 for start in (0.3, 0.75))
    return day * (2.0 if burst else 1.0)


def schedule(length: float, seed: int) -> list[float]:
    """Send times of a Poisson process with the trace's rate (thinning)."""
    rng, times, t = random.Random(seed), [], 0.0
    peak = 2 * HIGH_RPS
    while True:
        t += rng.expovariate(peak)
        if t >= length:
            return times
        if rng.random() < rate(t, length) / peak:
            times.append(t)


async def replay(
    address: str,
    model: str,
    times: list[float],
    replicas: Callable[[], Awaitable[int]],
    md: tuple[tuple[str, str], ...] = (),
) -> dict[str, Any]:
    """Fire every request at its time; sample the ready replica count every 0.5 s meanwhile."""
    request = encode_request(model, {"x": np.ones(1, np.float32)}).SerializeToString()
    latencies: list[float] = []
    errors: collections.Counter[str] = collections.Counter()
    samples: list[tuple[float, int]] = []
    async with grpc.aio.insecure_channel(address, options=grpc_options()) as channel:
        call = channel.unary_unary(METHOD)

        async def one() -> None:
            began = time.perf_counter()
            try:
                await call(request, timeout=10, metadata=md)
                latencies.append(time.perf_counter() - began)
            except grpc.aio.AioRpcError as error:
                errors[error.code().name] += 1

        async def sampler() -> None:
            while True:
                samples.append((time.monotonic(), await replicas()))
                await asyncio.sleep(0.5)

        watching = asyncio.create_task(sampler())
        start = time.monotonic()
        tasks = []
        for at in times:
            delay = start + at - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(one()))
        await asyncio.gather(*tasks)
        watching.cancel()
    return {
        **figures(latencies, sum(errors.values()), samples, slo_s=ARGS.slo_ms / 1000),
        "error_codes": dict(errors),
    }


def figures(
    latencies: list[float], errors: int, samples: list[tuple[float, int]], *, slo_s: float
) -> dict[str, Any]:
    replica_s = sum(n * (t2 - t1) for (t1, n), (t2, _) in itertools.pairwise(samples))
    busy = len(latencies) * SERVICE_S
    counts = [n for _, n in samples]
    total = len(latencies) + errors
    over = sum(lat > slo_s for lat in latencies) + errors
    ms = np.array(latencies or [math.nan]) * 1000
    return {
        "utilisation": round(busy / (replica_s * SLOTS), 3) if replica_s else 0.0,
        # Busy slot-seconds of answers within the objective only: utilisation bought by
        # under-provisioning (late answers) does not count here.
        "goodput_utilisation": round((len(latencies) + errors - over) * SERVICE_S / (replica_s * SLOTS), 3)
        if replica_s
        else 0.0,
        "replica_seconds": round(replica_s, 1),
        "p99_ms": round(float(np.percentile(ms, 99)), 1),
        "slo_violations": round(over / total, 4) if total else 0.0,
        "scale_events": sum(a != b for a, b in itertools.pairwise(counts)),
        "requests": total,
        "errors": errors,
        "max_replicas": max(counts, default=0),
    }


# ---- servefleet --------------------------------------------------------------------------------


class Servefleet:
    """A whole local stack (`servefleet up`) and one app per policy."""

    def __init__(self, k: float, length: float) -> None:
        self.state = Path(tempfile.mkdtemp(prefix="sf-bench-autoscaler-")) / "state"
        self.k, self.length = k, length
        self.env = {
            **os.environ,
            "SERVEFLEET_AUTOSCALER_INTERVAL_S": "0.5",
            "SERVEFLEET_KEEPER_STEADY_CHECK_S": "1",
            "PYTHONPATH": os.pathsep.join(sys.path),
        }

    def cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "servefleet.cli", *args, "--state-dir", str(self.state)],
            capture_output=True,
            text=True,
            timeout=300,
            env=self.env,
            cwd=ROOT,
        )

    def up(self) -> None:
        from tests.integration.test_stack import free_base_port

        done = self.cli("up", "--detach", "--base-port", str(free_base_port()))
        if done.returncode:
            raise RuntimeError(done.stderr)
        self.addresses = stack.addresses(self.state)
        self.token = (self.state / "admin.token").read_text().strip()

    def connect(self) -> None:
        """The keeper's channel, made on the event loop's thread (``up`` runs in a worker)."""
        self.keeper = keeper_pb2_grpc.KeeperStub(grpc.aio.insecure_channel(self.addresses["keeper"]))

    def down(self) -> None:
        self.cli("down")

    async def deploy(self, name: str, mode: str) -> str:
        spec = load_spec(
            {
                "name": name,
                "import_path": "examples.latency:VariableLatency",
                "init_args": {"min_ms": SERVICE_S * 1000, "max_ms": SERVICE_S * 1000},
                "max_concurrency": SLOTS,
                "max_queued": 8,
                "proxies": 1,
                "autoscaling": {
                    "target_ongoing_requests": TARGET,
                    "min_replicas": 1,
                    "max_replicas": MAX_REPLICAS,
                    "upscale_delay_s": RAY_DEFAULTS["upscale_delay_s"] * self.k,
                    "downscale_delay_s": RAY_DEFAULTS["downscale_delay_s"] * self.k,
                    "mode": mode,
                    "history_window_s": self.length,
                    "forecast_horizon_s": max(1.0, self.length / 30),
                    "startup_s": 2,
                },
            }
        )
        md = [("authorization", f"Bearer {self.token}")]
        await self.keeper.SubmitApplication(
            keeper_pb2.SubmitApplicationRequest(spec=spec), metadata=md, timeout=10
        )
        discovery = discovery_pb2_grpc.DiscoveryStub(
            aio_channel(self.addresses["discovery"], token=self.token)
        )

        async def proxy() -> str:
            found = await discovery.Resolve(
                discovery_pb2.ResolveRequest(app=spec_ref(name), kind="proxy"), timeout=5
            )
            return found.endpoints[0].address if found.endpoints else ""

        return await async_wait_for(proxy, timeout=120, interval=0.5, what=f"{name}'s proxy")  # type: ignore[return-value]

    def ready(self, name: str) -> Callable[[], Awaitable[int]]:
        md = [("authorization", f"Bearer {self.token}")]

        async def count() -> int:
            got = await self.keeper.GetApplication(
                keeper_pb2.GetApplicationRequest(app=spec_ref(name)), metadata=md, timeout=5
            )
            return sum(p.ready_replicas for p in got.placements)

        return count


def spec_ref(name: str) -> Any:
    from servefleet.api import common_pb2

    return common_pb2.AppRef(namespace="default", name=name)


# ---- Ray Serve ---------------------------------------------------------------------------------


class RayServe:
    def __init__(self, k: float) -> None:
        self.k = k

    def up(self) -> str:
        import ray
        from ray import serve
        from ray.serve.config import gRPCOptions

        from servefleet.testing import RayCluster

        self.cluster = RayCluster(num_cpus=2).start()
        ray.init(address=self.cluster.address, namespace="bench-autoscaler", log_to_driver=False)
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
        config = {
            "target_ongoing_requests": TARGET,
            "min_replicas": 1,
            "max_replicas": MAX_REPLICAS,
            **{key: value * self.k for key, value in RAY_DEFAULTS.items()},
        }

        @serve.deployment(
            max_ongoing_requests=SLOTS, autoscaling_config=config, ray_actor_options={"num_cpus": 0.1}
        )
        class Hold:
            async def ModelInfer(self, request: Any) -> Any:
                await asyncio.sleep(SERVICE_S)
                return encode_response(request.model_name, decode_request(request))

        serve.run(Hold.bind(), name="serve-hold")
        self.config = config
        return f"127.0.0.1:{port}"

    async def ready(self) -> int:
        from ray import serve

        def running() -> int:
            app = serve.status().applications.get("serve-hold")
            if app is None:
                return 0
            return sum(d.replica_states.get("RUNNING", 0) for d in app.deployments.values())

        return await asyncio.to_thread(running)

    def down(self) -> None:
        import ray
        from ray import serve

        serve.shutdown()
        ray.shutdown()
        self.cluster.cleanup()


# ---- the run -----------------------------------------------------------------------------------


async def run(length: float, reps: int) -> dict[str, Any]:
    k = length / 1800
    fleet, serve = Servefleet(k, length), RayServe(k)
    results: dict[str, list[dict[str, Any]]] = {"proactive": [], "reactive": [], "ray_serve": []}
    # Both systems start side by side and the first rep's apps deploy while Ray Serve still
    # starts (start-up is most of a quick run); each is torn down whether or not the other came up.
    serving = asyncio.ensure_future(asyncio.to_thread(serve.up))
    try:
        await asyncio.to_thread(fleet.up)
        fleet.connect()
        for rep in range(reps):
            times = schedule(length, seed=rep)
            # Both servefleet apps are deployed together, before the rep's first replay.
            names = {policy: f"{policy}-{rep}" for policy in ("proactive", "reactive")}
            deployed = await asyncio.gather(*(fleet.deploy(n, p) for p, n in names.items()))
            proxies = dict(zip(names, deployed, strict=True))
            serve_address = await serving
            for policy in ("proactive", "reactive", "ray_serve"):
                if policy == "ray_serve":
                    got = await replay(
                        str(serve_address), "serve-hold", times, serve.ready, (("application", "serve-hold"),)
                    )
                else:
                    got = await replay(proxies[policy], names[policy], times, fleet.ready(names[policy]))
                print(f"  rep {rep} {policy}: {got}", flush=True)
                results[policy].append(got)
                if policy != "ray_serve" or rep < reps - 1:
                    await asyncio.sleep(max(2.0, length / 10))  # back to night before the next
            if rep < reps - 1:
                await asyncio.gather(
                    *(asyncio.to_thread(fleet.cli, "app", "delete", n) for n in names.values())
                )
    finally:
        await asyncio.wait([serving])
        serve_up = not serving.cancelled() and serving.exception() is None
        await asyncio.gather(
            asyncio.to_thread(fleet.down), *([asyncio.to_thread(serve.down)] if serve_up else [])
        )
    medians = {
        p: {key: float(np.median([r[key] for r in runs])) for key in runs[0] if key != "error_codes"}
        for p, runs in results.items()
    }
    p, r, s = medians["proactive"], medians["reactive"], medians["ray_serve"]
    ratios = {
        "ratio_utilisation_vs_reactive": round(p["utilisation"] / r["utilisation"], 3)
        if r["utilisation"]
        else None,
        "ratio_utilisation_vs_ray_serve": round(p["utilisation"] / s["utilisation"], 3)
        if s["utilisation"]
        else None,
        "ratio_goodput_utilisation_vs_ray_serve": round(
            p["goodput_utilisation"] / s["goodput_utilisation"], 3
        )
        if s["goodput_utilisation"]
        else None,
        "ratio_slo_violations_vs_reactive": round(p["slo_violations"] / r["slo_violations"], 3)
        if r["slo_violations"]
        else None,
    }
    return {"medians": medians, "runs": results, **ratios, "ray_serve_autoscaling_config": serve.config}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help=f"{QUICK_TRACE_S:g} s trace, 1 rep")
    parser.add_argument("--slo-ms", type=float, default=250.0, help="latency objective (ms)")
    global ARGS
    ARGS = parser.parse_args()
    length, reps = (QUICK_TRACE_S, 1) if ARGS.quick else (90.0, 3)
    started = time.monotonic()
    body = asyncio.run(run(length, reps))
    report = {
        "settings": {
            "trace_s": length,
            "reps": reps,
            "service_ms": SERVICE_S * 1000,
            "slots_per_replica": SLOTS,
            "target_ongoing_requests": TARGET,
            "max_replicas": MAX_REPLICAS,
            "rps": [LOW_RPS, HIGH_RPS],
            "bursts": "2x for 5% of the trace at 30% and 75%",
            "slo_ms": ARGS.slo_ms,
            "delay_scale_k": length / 1800,
            "quick": ARGS.quick,
            "elapsed_s": round(time.monotonic() - started, 1),
        },
        **body,
    }
    path = write_report("autoscaler", report)
    print(f"wrote {path}")


ARGS: argparse.Namespace
if __name__ == "__main__":
    main()
