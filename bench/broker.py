"""Broker benchmark: pull (the broker) vs round-robin push, same actors, same workload, one run.

Four Ray actors each model a replica with ONE slot (an asyncio semaphore around the model call).
Service times are heavy-tailed: lognormal (median 50 ms, sigma 1) plus a few long requests
(2 % at 2 s). Requests arrive open-loop (Poisson) at the same offered load in both modes, from
the same seed, at 0.95 of the four replicas' capacity and at 1.5 (overload) (``--load``):

(a) pull: the client submits to the broker service (its own process, gRPC, Redis Streams); each actor's
    PullWorker reads one request when its slot is free; the client waits on GetResult.
(b) push: the client calls the actors round-robin (Ray actor calls), each queuing at its replica.

Throughput = requests / (last completion - first arrival); completion time = result received -
scheduled arrival.

    .venv/bin/python bench/broker.py            # full: 1 200 requests per mode and load
    .venv/bin/python bench/broker.py --quick    # 250 requests per mode and load (under 2 minutes)

Writes bench/results/broker.json.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import time
from collections.abc import Awaitable, Callable

import numpy as np

# isort: off
from _report import write_report
import servefleet  # noqa: F401 - before Ray: keeps Ray on loopback (servefleet/__init__.py)
import ray

# isort: on
from tritonclient.grpc import service_pb2

from servefleet.broker.worker import PullWorker
from servefleet.common.tensors import decode_request, encode_request, encode_response
from servefleet.sdk.broker_client import AsyncBrokerClient
from servefleet.testing import EtcdProcess, RayCluster, RedisProcess, ServiceProcess, admin_token

APP = "bench/heavy-tail"
WORKERS = 4
MEDIAN_MS, SIGMA, LONG_SHARE, LONG_MS = 50.0, 1.0, 0.02, 2000.0


@ray.remote(num_cpus=0.1)
class Replica:
    """One model replica with one slot, reachable both ways: pulled by its PullWorker, or pushed."""

    def __init__(self, redis_address: str, name: str) -> None:
        self.slot = asyncio.Semaphore(1)
        self.worker = PullWorker(redis_address, APP, name, 1, self.infer)

    async def start(self) -> None:
        await self.worker.start()

    async def infer(self, request: service_pb2.ModelInferRequest) -> service_pb2.ModelInferResponse:
        inputs = decode_request(request)
        async with self.slot:
            await asyncio.sleep(float(inputs["sleep_ms"][0]) / 1000)
        return encode_response(request.model_name, {"y": inputs["x"]})

    async def push(self, payload: bytes) -> bytes:
        response = await self.infer(service_pb2.ModelInferRequest.FromString(payload))
        return response.SerializeToString()

    async def stop(self) -> None:
        await self.worker.stop(drain=True)


def workload(n: int, seed: int, load: float) -> tuple[np.ndarray, np.ndarray]:
    """(arrival offsets s, service times ms): lognormal with a long-request tail, Poisson arrivals."""
    rng = np.random.default_rng(seed)
    service = rng.lognormal(np.log(MEDIAN_MS), SIGMA, n)
    service[rng.random(n) < LONG_SHARE] = LONG_MS
    rate = load * WORKERS / (service.mean() / 1000)
    arrivals = np.cumsum(rng.exponential(1 / rate, n))
    return arrivals - arrivals[0], service


async def drive(
    arrivals: np.ndarray, service: np.ndarray, one: Callable[[int, dict[str, np.ndarray]], Awaitable[None]]
) -> dict[str, float]:
    """Offer the workload open-loop through ``one``; throughput and completion-time percentiles."""
    start = time.monotonic() + 0.2
    finished = np.zeros(len(arrivals))

    async def request(i: int) -> None:
        await asyncio.sleep(max(0.0, start + arrivals[i] - time.monotonic()))
        await one(i, {"x": np.array([i], dtype=np.int64), "sleep_ms": np.array([service[i]])})
        finished[i] = time.monotonic() - start

    await asyncio.gather(*(request(i) for i in range(len(arrivals))))
    completion = (finished - arrivals) * 1000
    return {
        "requests": len(arrivals),
        "throughput_rps": round(len(arrivals) / float(finished.max()), 2),
        "p50_ms": round(float(np.percentile(completion, 50)), 1),
        "p99_ms": round(float(np.percentile(completion, 99)), 1),
    }


async def run(
    n: int, seed: int, loads: list[float], redis_address: str, broker_address: str, token: str
) -> dict[str, object]:
    """Both modes against the same four replicas at each offered load; figures and ratios."""
    client = AsyncBrokerClient(broker_address, token=token)
    replicas = [Replica.remote(redis_address, f"replica-{i}") for i in range(WORKERS)]  # type: ignore[attr-defined]
    await asyncio.gather(*(r.start.remote() for r in replicas))

    async def pull(i: int, inputs: dict[str, np.ndarray]) -> None:
        ticket = await client.submit(APP, inputs)
        await client.result(ticket, timeout=600)

    async def push(i: int, inputs: dict[str, np.ndarray]) -> None:
        payload = encode_request(APP, inputs).SerializeToString()
        await replicas[i % WORKERS].push.remote(payload)

    rows = []
    for load in loads:
        arrivals, service = workload(n, seed, load)
        pulled, pushed = await drive(arrivals, service, pull), await drive(arrivals, service, push)
        rows.append(
            {
                "load": load,
                "offered_rps": round(n / arrivals[-1], 2),
                "capacity_rps": round(WORKERS / (service.mean() / 1000), 2),
                "pull": pulled,
                "push": pushed,
                **{
                    f"ratio_{figure}_vs_push": round(pulled[figure] / pushed[figure], 3)
                    for figure in ("throughput_rps", "p50_ms", "p99_ms")
                },
            }
        )
    stats = await client.stats(APP)
    await asyncio.gather(*(r.stop.remote() for r in replicas))
    await client.close()
    return {
        "figures": rows,
        "duplicate_executions": stats.duplicate_executions,
        "ratio_throughput_vs_push": rows[0]["ratio_throughput_rps_vs_push"],
    }


def measure(n: int, seed: int, loads: list[float]) -> dict[str, object]:
    """Start Redis, a small Ray cluster and the broker service (its own process); run; clean up."""
    redis, etcd = RedisProcess().start(), EtcdProcess().start()  # etcd: the tokens the broker checks
    cluster = RayCluster(num_cpus=2).start()
    broker = ServiceProcess("broker", "--redis", redis.address, "--etcd", etcd.address).start()
    try:
        ray.init(address=cluster.address, logging_level=logging.WARNING)
        return asyncio.run(run(n, seed, loads, redis.address, broker.address, admin_token(etcd.address)))
    finally:
        broker.cleanup()
        ray.shutdown()
        cluster.cleanup()
        etcd.cleanup()
        redis.cleanup()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="250 requests per mode and load (under 2 minutes)")
    p.add_argument("--requests", type=int, default=0, help="per mode and load (default 1 200, quick 250)")
    p.add_argument("--seed", type=int, default=7)
    p.add_argument(
        "--load",
        type=float,
        nargs="+",
        default=[0.95, 1.5],
        help="offered loads as shares of capacity (default 0.95 and 1.5: near capacity, overload)",
    )
    args = p.parse_args()
    n = args.requests or (250 if args.quick else 1200)
    result = measure(n, args.seed, args.load)
    titles = ("requests", "offered rps", "throughput rps", "p50 ms", "p99 ms")
    print(f"{'load':>5} {'mode':<5} " + " ".join(f"{title:>14}" for title in titles))
    for row in result["figures"]:  # type: ignore[attr-defined]
        for mode in ("pull", "push"):
            f = row[mode]
            print(
                f"{row['load']:>5} {mode:<5} "
                + " ".join(
                    f"{value:>14}"
                    for value in (
                        f["requests"],
                        row["offered_rps"],
                        f["throughput_rps"],
                        f["p50_ms"],
                        f["p99_ms"],
                    )
                )
            )
        print(
            f"{'':>5} ratio_throughput_vs_push {row['ratio_throughput_rps_vs_push']}, "
            f"p50 {row['ratio_p50_ms_vs_push']}, p99 {row['ratio_p99_ms_vs_push']}"
        )
    report = {
        "settings": {
            "requests_per_mode_and_load": n,
            "workers": WORKERS,
            "slots_per_worker": 1,
            "service_ms": f"lognormal(median {MEDIAN_MS}, sigma {SIGMA}), {LONG_SHARE:.0%} at {LONG_MS}",
            "arrivals": f"Poisson at {args.load} of capacity, same schedule in both modes",
            "seed": args.seed,
            "quick": args.quick,
        },
        **result,
    }
    write_report("broker", report)


if __name__ == "__main__":
    main()
