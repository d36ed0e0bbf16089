"""Broker benchmark: pull (the broker) vs round-robin push vs least-loaded push, in the seed's setting.

The seed claims pull has "much less head-of-line delay" and "two times better throughput" than
round-robin push when requests "have very different execution time". This bench builds that
setting and measures all three in one run, on the same four Ray actors:

- Heavy-tailed service times: lognormal (median 50 ms, sigma 1), plus 2 % long requests of 2 s.
- A heterogeneous fleet: four one-slot replicas, one of them 2x slower (it sleeps twice as long).
  Capacity = (3 + 1/2) / mean service time.
- Callers with a deadline (5 s: a long request still fits on the slow replica): a caller that has
  no answer by then gives up and cancels (push: ``ray.cancel`` of the actor task; pull: the
  broker's Cancel, so no worker starts it later). An answer after it never reaches the caller.
- The same bound on outstanding work in every mode: push routers hold at most 5 requests per
  replica (Ray Serve's default ``max_ongoing_requests``) and refuse past it; the broker's app
  bound (``max_stream_length``) is 5 x 4 = 20 unfinished requests, past which Submit answers
  RESOURCE_EXHAUSTED. A refused request counts as rejected.
- Open-loop Poisson arrivals from one seed, the same schedule in every mode, at 0.8 to 1.5 of
  capacity (``--load``).

Modes: (a) pull: Submit to the broker service (its own process, gRPC, Redis Streams), each
replica's PullWorker takes a request when its slot is free, the caller waits on GetResult;
(b) push-rr: a router calls the replicas round-robin (Ray actor calls), each queuing at its
replica; (c) push-ll: the router sends each request to the replica with the fewest outstanding.

Per mode and load: throughput (requests the replicas finished per second, answered in time or
not), goodput (answers the caller got within its deadline per second), p50/p99 completion time of
the answered requests (from the scheduled arrival), rejected and expired counts. Rates count the
window the arrivals span; each figure is the median of ``--reps`` (3) repetitions, modes
interleaved within each repetition. The pull path's own cost (Submit + GetResult + the worker's
take and store) is measured apart, with a zero-length request one at a time, beside a push call.

    .venv/bin/python bench/broker.py            # full: 600 requests per mode, load and rep
    .venv/bin/python bench/broker.py --quick    # 120 requests, loads 1.0 and 1.5 (under 2 minutes)

Writes bench/results/broker.json.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import logging
import os
import statistics
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import numpy as np

# isort: off
from _report import write_report
import servefleet  # noqa: F401 - before Ray: keeps Ray on loopback (servefleet/__init__.py)
import ray

# isort: on
from tritonclient.grpc import service_pb2

from servefleet.api import common_pb2
from servefleet.broker.worker import PullWorker
from servefleet.common.errors import DeadlineExceeded, ResourceExhausted
from servefleet.common.tensors import decode_request, encode_request, encode_response
from servefleet.sdk.broker_client import AsyncBrokerClient
from servefleet.testing import EtcdProcess, RayCluster, RedisProcess, ServiceProcess, admin_token

APP = "bench/heavy-tail"
SLOWDOWN = (1.0, 1.0, 1.0, 2.0)  # one replica of four is 2x slower
MEDIAN_MS, SIGMA, LONG_SHARE, LONG_MS = 50.0, 1.0, 0.02, 2000.0
DEADLINE_S = 5.0
QUEUE_BOUND = 5  # per replica, running + queued (Ray Serve's default max_ongoing_requests)
MODES = ("pull", "push_rr", "push_ll")
FIGURES = ("throughput_rps", "goodput_rps", "p50_ms", "p99_ms", "rejected", "expired")


@ray.remote(num_cpus=0.1)
class Replica:
    """One model replica with one slot and a speed, reachable both ways: pulled by its
    PullWorker, or pushed. Counts the requests it finished (cancelled runs excluded)."""

    def __init__(self, redis_address: str, name: str, slowdown: float) -> None:
        self.slot = asyncio.Semaphore(1)
        self.slowdown = slowdown
        self.finished: list[float] = []
        config = common_pb2.AsyncConfig(max_stream_length=QUEUE_BOUND * len(SLOWDOWN))
        self.worker = PullWorker(redis_address, APP, name, 1, self.infer, config=config)

    async def start(self) -> None:
        await self.worker.start()

    async def infer(self, request: service_pb2.ModelInferRequest) -> service_pb2.ModelInferResponse:
        inputs = decode_request(request)
        async with self.slot:
            await asyncio.sleep(float(inputs["sleep_ms"][0]) * self.slowdown / 1000)
            self.finished.append(time.time())
        return encode_response(request.model_name, {"y": inputs["x"]})

    async def push(self, payload: bytes) -> bytes:
        response = await self.infer(service_pb2.ModelInferRequest.FromString(payload))
        return response.SerializeToString()

    async def take_finished(self) -> list[float]:
        """When each request finished since the last call (wall clock, as the driver's)."""
        finished, self.finished = self.finished, []
        return finished

    async def idle(self) -> bool:
        return not self.slot.locked() and self.worker.busy == 0

    async def stop(self) -> None:
        await self.worker.stop(drain=True)


def workload(n: int, seed: int, load: float) -> tuple[np.ndarray, np.ndarray, float]:
    """(arrival offsets s, service times ms at speed 1, capacity rps) for one offered load."""
    rng = np.random.default_rng(seed)
    service = rng.lognormal(np.log(MEDIAN_MS), SIGMA, n)
    service[rng.random(n) < LONG_SHARE] = LONG_MS
    capacity = sum(1 / s for s in SLOWDOWN) / (service.mean() / 1000)
    arrivals = np.cumsum(rng.exponential(1 / (load * capacity), n))
    return arrivals - arrivals[0], service, capacity


@dataclass
class Outcomes:
    """What the callers of one run saw."""

    answered_ms: list[float] = field(default_factory=list)
    answered_at: list[float] = field(default_factory=list)  # wall clock
    rejected: int = 0
    expired: int = 0


class Rejected(Exception):
    """The router or the broker refused the request (every bound full)."""


class PushRouter:
    """A push router with a per-replica bound on outstanding requests: round-robin (the next
    replica in turn, refused when it is full, as a plain round-robin balancer does) or least-loaded
    (the replica with the fewest outstanding, refused when all are full). A caller past its
    deadline cancels the actor task; the slot frees when the replica has let go of it."""

    def __init__(self, replicas: list[ray.actor.ActorHandle], *, least_loaded: bool) -> None:
        self.replicas = replicas
        self.outstanding = [0] * len(replicas)
        self.least_loaded = least_loaded
        self._turn = itertools.cycle(range(len(replicas)))

    def _choose(self) -> int:
        index = next(self._turn)
        if self.least_loaded:  # ties go to the next in turn
            n = len(self.replicas)
            index = min(((index + k) % n for k in range(n)), key=lambda i: self.outstanding[i])
        if self.outstanding[index] >= QUEUE_BOUND:
            raise Rejected
        return index

    async def call(self, payload: bytes, timeout_s: float) -> None:
        index = self._choose()
        self.outstanding[index] += 1
        ref = self.replicas[index].push.remote(payload)
        try:
            await asyncio.wait_for(asyncio.shield(_settled(ref)), timeout_s)
        except TimeoutError:
            ray.cancel(ref)
            asyncio.get_running_loop().create_task(self._release(index, ref))
            raise
        self.outstanding[index] -= 1

    async def _release(self, index: int, ref: ray.ObjectRef) -> None:
        await _settled(ref)
        self.outstanding[index] -= 1


async def _settled(ref: ray.ObjectRef) -> None:
    """Wait for an actor task to end, cancelled or not."""
    try:
        await ref
    except (ray.exceptions.TaskCancelledError, ray.exceptions.RayTaskError):
        pass


async def drive(
    arrivals: np.ndarray, service: np.ndarray, one: Callable[[dict[str, np.ndarray], float], Awaitable[None]]
) -> tuple[Outcomes, float]:
    """Offer the workload open-loop through ``one(inputs, timeout_s)``; outcomes and the wall-clock
    window the arrivals span (rates are counted in it, so a run's drain does not dilute them)."""
    start = time.monotonic() + 0.2
    wall_start = time.time() + 0.2
    out = Outcomes()

    async def request(i: int) -> None:
        await asyncio.sleep(max(0.0, start + arrivals[i] - time.monotonic()))
        inputs = {"x": np.array([i], dtype=np.int64), "sleep_ms": np.array([service[i]])}
        timeout_s = start + arrivals[i] + DEADLINE_S - time.monotonic()
        try:
            await one(inputs, timeout_s)
        except Rejected:
            out.rejected += 1
            return
        except TimeoutError:
            out.expired += 1
            return
        out.answered_ms.append((time.monotonic() - start - arrivals[i]) * 1000)
        out.answered_at.append(time.time())

    await asyncio.gather(*(request(i) for i in range(len(arrivals))))
    return out, (wall_start, wall_start + float(arrivals[-1]))


def figures(out: Outcomes, finished: list[float], window: tuple[float, float]) -> dict[str, float]:
    """Rates over the arrival window; completion percentiles over every answered request."""
    lo, hi = window

    def rate(times: np.ndarray) -> float:
        return round(float(((times >= lo) & (times <= hi)).sum()) / (hi - lo), 2)

    answered = np.array(out.answered_ms or [float("nan")])
    in_time = np.array(out.answered_at)[answered <= DEADLINE_S * 1000] if out.answered_at else np.array([])
    return {
        "throughput_rps": rate(np.array(finished)),
        "goodput_rps": rate(in_time),
        "p50_ms": round(float(np.percentile(answered, 50)), 1),
        "p99_ms": round(float(np.percentile(answered, 99)), 1),
        "rejected": out.rejected,
        "expired": out.expired,
    }


class Bench:
    """The four replicas, the broker client and the two push routers of one run."""

    def __init__(self, redis_address: str, broker_address: str, token: str) -> None:
        self.client = AsyncBrokerClient(broker_address, token=token)
        self.replicas = [
            Replica.remote(redis_address, f"replica-{i}", slowdown)  # type: ignore[attr-defined]
            for i, slowdown in enumerate(SLOWDOWN)
        ]

    async def start(self) -> None:
        await asyncio.gather(*(r.start.remote() for r in self.replicas))

    async def pull(self, inputs: dict[str, np.ndarray], timeout_s: float) -> None:
        try:
            ticket = await self.client.submit(APP, inputs)
        except ResourceExhausted:
            raise Rejected from None
        try:
            await self.client.result(ticket, timeout=timeout_s)
        except DeadlineExceeded:
            await self.client.cancel(ticket)
            raise TimeoutError from None

    def mode(self, name: str) -> Callable[[dict[str, np.ndarray], float], Awaitable[None]]:
        if name == "pull":
            return self.pull
        router = PushRouter(self.replicas, least_loaded=name == "push_ll")

        async def push(inputs: dict[str, np.ndarray], timeout_s: float) -> None:
            await router.call(encode_request(APP, inputs).SerializeToString(), timeout_s)

        return push

    async def quiesce(self) -> list[float]:
        """Wait until every replica is idle and the queue empty; when requests finished meanwhile."""
        while True:
            idle = await asyncio.gather(*(r.idle.remote() for r in self.replicas))
            stats = await self.client.stats(APP)
            if all(idle) and stats.depth == 0 and stats.in_flight == 0:
                break
            await asyncio.sleep(0.1)
        finished = await asyncio.gather(*(r.take_finished.remote() for r in self.replicas))
        return [t for times in finished for t in times]

    async def one_run(self, mode: str, arrivals: np.ndarray, service: np.ndarray) -> dict[str, float]:
        await self.quiesce()
        out, window = await drive(arrivals, service, self.mode(mode))
        return figures(out, await self.quiesce(), window)

    async def overhead(self, n: int) -> dict[str, float]:
        """Per-request cost of each path with a zero-length request, one at a time (median ms)."""
        zero = np.zeros(n)
        costs: dict[str, float] = {}
        for mode in ("pull", "push_rr"):
            call = self.mode(mode)
            times = []
            for i in range(n):
                t0 = time.perf_counter()
                await call({"x": np.array([i], dtype=np.int64), "sleep_ms": zero[i : i + 1]}, DEADLINE_S)
                times.append((time.perf_counter() - t0) * 1000)
            costs[f"{mode}_p50_ms"] = round(statistics.median(times), 2)
        return costs

    async def stop(self) -> None:
        await asyncio.gather(*(r.stop.remote() for r in self.replicas))
        await self.client.close()


async def run(
    n: int, seed: int, loads: list[float], reps: int, redis_address: str, broker_address: str, token: str
) -> dict[str, object]:
    """Every mode at every load, ``reps`` times interleaved; medians, ratios, the pull overhead."""
    bench = Bench(redis_address, broker_address, token)
    await bench.start()
    overhead = await bench.overhead(100)
    runs: dict[tuple[float, str], list[dict[str, float]]] = {}
    for rep in range(reps):
        for load in loads:
            arrivals, service, _ = workload(n, seed + rep, load)
            order = MODES[rep % len(MODES) :] + MODES[: rep % len(MODES)]  # who goes first rotates
            for mode in order:
                runs.setdefault((load, mode), []).append(await bench.one_run(mode, arrivals, service))
                print(f"rep {rep} load {load} {mode}: {runs[(load, mode)][-1]}", flush=True)
    stats = await bench.client.stats(APP)
    await bench.stop()
    rows = []
    for load in loads:
        _, service, capacity = workload(n, seed, load)
        row: dict[str, object] = {"load": load, "capacity_rps": round(capacity, 2)}
        medians = {
            mode: {f: statistics.median(r[f] for r in runs[(load, mode)]) for f in FIGURES} for mode in MODES
        }
        row.update(medians)
        for peer, suffix in (("push_rr", "push"), ("push_ll", "least_loaded")):
            for f in ("goodput_rps", "throughput_rps", "p99_ms"):
                name = f.split("_")[0]
                theirs = medians[peer][f]
                row[f"ratio_{name}_vs_{suffix}"] = round(medians["pull"][f] / theirs, 3) if theirs else None
        row["reps"] = {mode: runs[(load, mode)] for mode in MODES}
        rows.append(row)
    at_or_over = [r for r in rows if float(r["load"]) >= 1.0]  # type: ignore[arg-type]
    return {
        "figures": rows,
        "pull_overhead": overhead,
        "duplicate_executions": stats.duplicate_executions,
        **{
            f"ratio_{name}_vs_{peer}_min_at_load_1_or_more": min(
                (r[f"ratio_{name}_vs_{peer}"] for r in at_or_over), default=None
            )
            for name in ("goodput", "throughput")
            for peer in ("push", "least_loaded")
        },
    }


def measure(n: int, seed: int, loads: list[float], reps: int) -> dict[str, object]:
    """Start Redis, a small Ray cluster and the broker service (its own process); run; clean up."""
    redis, etcd = RedisProcess().start(), EtcdProcess().start()  # etcd: the tokens the broker checks
    cluster = RayCluster(num_cpus=2).start()
    broker = ServiceProcess("broker", "--redis", redis.address, "--etcd", etcd.address).start()
    try:
        ray.init(address=cluster.address, logging_level=logging.WARNING)
        token = admin_token(etcd.address)
        return asyncio.run(run(n, seed, loads, reps, redis.address, broker.address, token))
    finally:
        broker.cleanup()
        ray.shutdown()
        cluster.cleanup()
        etcd.cleanup()
        redis.cleanup()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="120 requests, loads 1.0 and 1.5 (under 2 minutes)")
    p.add_argument("--requests", type=int, default=0, help="per mode, load and rep (default 600, quick 120)")
    p.add_argument("--reps", type=int, default=3, help="interleaved repetitions (median reported)")
    p.add_argument("--seed", type=int, default=7)
    p.add_argument("--load", type=float, nargs="+", help="offered loads as shares of capacity")
    args = p.parse_args()
    n = args.requests or (120 if args.quick else 600)
    loads = args.load or ([1.0, 1.5] if args.quick else [0.8, 1.0, 1.2, 1.5])
    load_before = round(os.getloadavg()[0], 2)
    result = measure(n, args.seed, loads, args.reps)
    print(f"{'load':>5} {'mode':<8} " + " ".join(f"{f:>15}" for f in FIGURES))
    for row in result["figures"]:  # type: ignore[attr-defined]
        for mode in MODES:
            print(f"{row['load']:>5} {mode:<8} " + " ".join(f"{row[mode][f]:>15}" for f in FIGURES))
        print(
            f"{'':>5} goodput pull/rr {row['ratio_goodput_vs_push']}, pull/ll "
            f"{row['ratio_goodput_vs_least_loaded']}; throughput pull/rr {row['ratio_throughput_vs_push']}, "
            f"pull/ll {row['ratio_throughput_vs_least_loaded']}"
        )
    print("pull overhead (zero-length request, one at a time):", result["pull_overhead"])
    report = {
        "settings": {
            "requests_per_mode_load_and_rep": n,
            "reps": args.reps,
            "replicas": len(SLOWDOWN),
            "slots_per_replica": 1,
            "replica_slowdown": list(SLOWDOWN),
            "service_ms": f"lognormal(median {MEDIAN_MS}, sigma {SIGMA}), {LONG_SHARE:.0%} at {LONG_MS}",
            "caller_deadline_s": DEADLINE_S,
            "bound": f"push: {QUEUE_BOUND} outstanding per replica; "
            f"pull: {QUEUE_BOUND * len(SLOWDOWN)} unfinished",
            "arrivals": f"Poisson at {loads} of capacity, same schedule in every mode (seed + rep)",
            "seed": args.seed,
            "quick": args.quick,
        },
        **result,
    }
    write_report("broker", report, load_average_1m_at_start=load_before)


if __name__ == "__main__":
    main()
