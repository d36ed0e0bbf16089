"""Discovery benchmark: watch propagation latency (Register -> the SDK's view) and Resolve rps, at
10 / 1 000 / 10 000 registered endpoints against one etcd, each beside its peer measured in the same
run: a direct etcd put -> etcd watch event, and a direct etcd range read of the same prefix.

    .venv/bin/python bench/discovery.py            # full: 10, 1 000, 10 000 endpoints
    .venv/bin/python bench/discovery.py --quick    # 10, 100, 1 000 endpoints, fewer samples

Writes bench/results/discovery.json.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import statistics
import time
from collections.abc import Awaitable, Callable

import aetcd
from _report import write_report

from servefleet import AsyncClient
from servefleet.api import discovery_pb2, discovery_pb2_grpc
from servefleet.common.appid import AppId
from servefleet.common.channels import aio_channel
from servefleet.common.etcd import connect_etcd
from servefleet.discovery import names
from servefleet.testing import DiscoveryProcess, EtcdProcess


def percentile(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


async def register_many(stub: discovery_pb2_grpc.DiscoveryStub, app: str, count: int) -> int:
    """``count`` endpoints on one shared lease (one keep-alive for the lot, as a node agent would)."""
    ref = AppId.parse(app).ref()
    first = await stub.Register(
        discovery_pb2.RegisterRequest(
            endpoint=discovery_pb2.Endpoint(app=ref, kind="proxy", address="127.0.0.1:1"), ttl_s=300
        )
    )
    lease = first.lease_id
    pending = iter(range(1, count))

    async def worker() -> None:
        for i in pending:
            endpoint = discovery_pb2.Endpoint(
                app=ref,
                kind="proxy",
                address=f"127.0.0.{1 + i // 60000}:{1 + i % 60000}",
                labels={"zone": f"z{i % 3}", "node": f"n{i % 97}"},
            )
            await stub.Register(discovery_pb2.RegisterRequest(endpoint=endpoint, lease_id=lease))

    await asyncio.gather(*(worker() for _ in range(32)))
    return lease


async def sdk_propagation(
    stub: discovery_pb2_grpc.DiscoveryStub, client: AsyncClient, app: str, samples: int
) -> list[float]:
    """Seconds from sending Register to the new endpoint being in the SDK's set."""
    ref = AppId.parse(app).ref()
    await client.endpoints(app, timeout=60)
    watch = client.watch(ref)
    out = []
    for i in range(samples):
        endpoint = discovery_pb2.Endpoint(
            id=f"probe-{i}", app=ref, kind="proxy", address=f"127.0.0.2:{10000 + i}"
        )
        start = time.perf_counter()
        reply = await stub.Register(discovery_pb2.RegisterRequest(endpoint=endpoint, ttl_s=60))
        while f"probe-{i}" not in watch.state.endpoints:
            await watch.wait_changed(10)
        out.append(time.perf_counter() - start)
        await stub.Deregister(
            discovery_pb2.DeregisterRequest(app=ref, endpoint_id=f"probe-{i}", lease_id=reply.lease_id)
        )
    return out


async def etcd_propagation(etcd: aetcd.Client, app: str, samples: int) -> list[float]:
    """Peer: seconds from an etcd put to its event on an etcd watch of the same prefix."""
    prefix = names.watch_prefix(AppId.parse(app).ref())
    watch = await etcd.watch_prefix(prefix + b"peer-")
    events = watch.__aiter__()
    out = []
    for i in range(samples):
        start = time.perf_counter()
        await etcd.put(prefix + f"peer-{i}".encode(), b"x")
        while True:
            event = await events.__anext__()
            if event.kind == aetcd.rtypes.EventKind.PUT:
                break
        out.append(time.perf_counter() - start)
        await etcd.delete(prefix + f"peer-{i}".encode())
    await watch.cancel()
    return out


async def rate(call: Callable[[], Awaitable[object]], seconds: float, concurrency: int) -> float:
    """Completed calls per second over ``seconds`` with ``concurrency`` callers."""
    done = 0
    stop = time.perf_counter() + seconds

    async def worker() -> None:
        nonlocal done
        while time.perf_counter() < stop:
            await call()
            done += 1

    start = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return done / (time.perf_counter() - start)


async def run(sizes: list[int], samples: int, seconds: float, concurrency: int) -> dict[str, object]:
    etcd_proc = EtcdProcess().start()
    discovery = DiscoveryProcess(etcd_proc.address).start()
    etcd = connect_etcd(etcd_proc.address)
    figures: list[dict[str, float]] = []
    try:
        async with (
            aio_channel(discovery.address, token=discovery.token) as channel,
            AsyncClient(discovery.address, token=discovery.token) as client,
        ):
            stub = discovery_pb2_grpc.DiscoveryStub(channel)
            for size in sizes:
                app = f"bench/app-{size}"
                started = time.perf_counter()
                lease = await register_many(stub, app, size)
                register_s = time.perf_counter() - started
                sdk = await sdk_propagation(stub, client, app, samples)
                peer = await etcd_propagation(etcd, app, samples)
                request = discovery_pb2.ResolveRequest(app=AppId.parse(app).ref())
                prefix = names.watch_prefix(AppId.parse(app).ref())
                resolve_rps = await rate(functools.partial(stub.Resolve, request), seconds, concurrency)
                etcd_rps = await rate(functools.partial(etcd.get_prefix, prefix), seconds, concurrency)
                figures.append(
                    {
                        "endpoints": size,
                        "register_per_s": round(size / register_s, 1),
                        "watch_p50_ms": round(statistics.median(sdk) * 1000, 2),
                        "watch_p99_ms": round(percentile(sdk, 99) * 1000, 2),
                        "etcd_watch_p50_ms": round(statistics.median(peer) * 1000, 2),
                        "etcd_watch_p99_ms": round(percentile(peer, 99) * 1000, 2),
                        "resolve_rps": round(resolve_rps, 1),
                        "etcd_range_rps": round(etcd_rps, 1),
                        "ratio_resolve_rps_vs_etcd_direct": round(resolve_rps / etcd_rps, 3),
                        "ratio_watch_p50_vs_etcd_direct": round(
                            statistics.median(sdk) / statistics.median(peer), 3
                        ),
                    }
                )
                await stub.Deregister(discovery_pb2.DeregisterRequest(lease_id=lease))
    finally:
        await etcd.close()
        discovery.cleanup()
        etcd_proc.cleanup()
    return {"figures": figures}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="smaller sets and fewer samples (under 2 minutes)")
    args = p.parse_args()
    settings = {
        "sizes": [10, 100, 1000] if args.quick else [10, 1000, 10000],
        "samples": 30 if args.quick else 100,
        "seconds": 1.5 if args.quick else 4.0,
        "concurrency": 8,
    }
    result = asyncio.run(run(**settings))  # type: ignore[arg-type]
    columns = [
        ("endpoints", "endpoints"),
        ("register/s", "register_per_s"),
        ("watch p50 ms", "watch_p50_ms"),
        ("watch p99 ms", "watch_p99_ms"),
        ("etcd watch p50", "etcd_watch_p50_ms"),
        ("etcd watch p99", "etcd_watch_p99_ms"),
        ("Resolve rps", "resolve_rps"),
        ("etcd range rps", "etcd_range_rps"),
        ("resolve/etcd", "ratio_resolve_rps_vs_etcd_direct"),
        ("watch/etcd p50", "ratio_watch_p50_vs_etcd_direct"),
    ]
    print(" | ".join(f"{title:>14}" for title, _ in columns))
    for row in result["figures"]:  # type: ignore[attr-defined]
        print(" | ".join(f"{row[key]:>14}" for _, key in columns))
    report = {
        "settings": {**settings, "quick": args.quick, "transport": "loopback gRPC, one etcd 3.4 member"},
        **result,
    }
    write_report("discovery", report)
    print("wrote bench/results/discovery.json")


if __name__ == "__main__":
    main()
