"""The SDK against real discovery, etcd and endpoint processes: failover, restarts, pick quality."""

from __future__ import annotations

import asyncio
import collections
import time
from collections.abc import AsyncIterator

import numpy as np
import pytest

from servefleet import AsyncClient, Client
from servefleet.common.errors import DeadlineExceeded, InvalidArgument, Unavailable
from servefleet.common.net import async_wait_for, wait_for
from servefleet.testing import DiscoveryProcess, EtcdProcess

from .conftest import TTL_S, EndpointProcess

X = {"x": np.arange(4, dtype=np.float32)}


def start(
    endpoints: list[EndpointProcess],
    discovery: DiscoveryProcess,
    app: str,
    endpoint_id: str,
    **kwargs: object,
) -> EndpointProcess:
    proc = EndpointProcess(discovery, app, endpoint_id, **kwargs)  # type: ignore[arg-type]
    endpoints.append(proc)
    return proc.start()  # type: ignore[return-value]


async def ids(client: AsyncClient, app: str) -> set[str]:
    return {e.id for e in await client.endpoints(app)}


async def wait_ids(client: AsyncClient, app: str, expected: set[str], timeout: float = 20.0) -> None:
    async def check() -> bool:
        return await ids(client, app) == expected

    await async_wait_for(check, timeout=timeout, what=f"{app} endpoints == {sorted(expected)}")


@pytest.fixture
async def client(discovery: DiscoveryProcess) -> AsyncIterator[AsyncClient]:
    async with AsyncClient(discovery.address, timeout=10.0, token=discovery.token) as c:
        yield c


async def served_by(client: AsyncClient, app: str, **kwargs: object) -> str:
    out = await client.infer(app, X, **kwargs)  # type: ignore[arg-type]
    np.testing.assert_array_equal(out["y"], X["x"] * 2)
    return bytes(out["server"][0]).decode()


async def test_infer_roundtrip_errors_and_namespaced_names(
    client: AsyncClient, discovery: DiscoveryProcess, endpoints: list[EndpointProcess]
) -> None:
    start(endpoints, discovery, "s1", "s1-a")
    start(endpoints, discovery, "team/s1", "team-a")
    await wait_ids(client, "s1", {"s1-a"})
    assert await ids(client, "default/s1") == {"s1-a"}
    await wait_ids(client, "team/s1", {"team-a"})
    assert await served_by(client, "s1") == "s1-a"
    assert await served_by(client, "team/s1") == "team-a"  # model_name "team/s1" on the wire
    # An application nobody serves: an empty set, and a request fails within its deadline.
    assert await client.endpoints("nobody") == []
    with pytest.raises(Unavailable, match="no live endpoints"):
        await client.infer("nobody", X, timeout=0.5)
    # An error the endpoint answers is the caller's own error, with its message.
    with pytest.raises(InvalidArgument, match="needs input 'x'"):
        await client.infer("s1", {"z": X["x"]})


async def test_sigkill_leaves_the_set_within_ttl_and_sigstop_re_registers(
    client: AsyncClient, discovery: DiscoveryProcess, endpoints: list[EndpointProcess]
) -> None:
    a = start(endpoints, discovery, "s2", "s2-a")
    b = start(endpoints, discovery, "s2", "s2-b")
    await wait_ids(client, "s2", {"s2-a", "s2-b"})

    await load(client, "s2", 10, 2)  # both endpoints have pooled channels now
    killed_at = time.monotonic()
    a.kill()
    await wait_ids(client, "s2", {"s2-b"}, timeout=TTL_S + 1)
    print(f"\nSIGKILL -> gone from the SDK's set after {time.monotonic() - killed_at:.2f}s (TTL {TTL_S}s)")
    assert a.address not in client._pool  # a removed endpoint's channel is closed

    b.pause()
    await wait_ids(client, "s2", set(), timeout=TTL_S + 1)
    b.resume()
    await wait_ids(client, "s2", {"s2-b"}, timeout=10)
    assert await served_by(client, "s2") == "s2-b"


async def test_sync_client_and_tritonclient(
    discovery: DiscoveryProcess, endpoints: list[EndpointProcess]
) -> None:
    start(endpoints, discovery, "s3", "s3-a")
    with Client(discovery.address, token=discovery.token) as client:
        await asyncio.to_thread(
            wait_for, lambda: [e.id for e in client.endpoints("s3")] == ["s3-a"], timeout=20, what="s3-a"
        )
        out = await asyncio.to_thread(client.infer, "s3", X)
        assert bytes(out["server"][0]) == b"s3-a"
        triton = await asyncio.to_thread(client.triton_client, "s3")
        assert await asyncio.to_thread(triton.is_model_ready, "s3")
        triton.close()


async def load(client: AsyncClient, app: str, requests: int, concurrency: int) -> collections.Counter[str]:
    """Send ``requests`` requests over ``concurrency`` tasks; every one must succeed."""
    counts: collections.Counter[str] = collections.Counter()
    remaining = iter(range(requests))

    async def worker() -> None:
        for _ in remaining:
            counts[await served_by(client, app)] += 1

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return counts


async def test_restart_etcd_and_discovery_while_sdk_holds_a_set(endpoints: list[EndpointProcess]) -> None:
    etcd = EtcdProcess().start()
    watched = DiscoveryProcess(etcd.address).start()  # the SDK's discovery
    other = DiscoveryProcess(etcd.address).start()  # where endpoints register
    try:
        start(endpoints, other, "s4", "s4-a")
        b = start(endpoints, other, "s4", "s4-b")
        async with AsyncClient(watched.address, timeout=10.0, token=watched.token) as client:
            await wait_ids(client, "s4", {"s4-a", "s4-b"})

            etcd.kill()
            assert len(await load(client, "s4", 20, 2)) >= 1  # routing on the last known set
            etcd.start()  # same data dir: leases and records survive
            watched.kill()
            # Changes while the SDK's discovery is down: one endpoint leaves, one joins.
            await asyncio.to_thread(b.stop)
            await asyncio.to_thread(start, endpoints, other, "s4", "s4-c")
            assert set(await load(client, "s4", 20, 2)) <= {"s4-a", "s4-c"}  # s4-b retried away
            watched.start()
            await wait_ids(client, "s4", {"s4-a", "s4-c"})
            # Resumed from its revision through both restarts: deltas, never a second snapshot.
            assert client.watch("s4").state.snapshots == 1
            assert set(await load(client, "s4", 40, 2)) == {"s4-a", "s4-c"}
    finally:
        watched.cleanup()
        other.cleanup()
        etcd.cleanup()


async def test_sigkill_under_steady_load_loses_no_request_and_evens_out(
    client: AsyncClient, discovery: DiscoveryProcess, endpoints: list[EndpointProcess]
) -> None:
    procs = [start(endpoints, discovery, "s5", f"s5-{i}", delay_ms=5) for i in range(3)]
    await wait_ids(client, "s5", {"s5-0", "s5-1", "s5-2"})
    before = await load(client, "s5", 150, 6)
    killer = asyncio.get_running_loop().call_later(0.3, procs[0].kill)
    during = await load(client, "s5", 300, 6)  # the kill lands mid-run: every request still succeeds
    killer.cancel()
    await wait_ids(client, "s5", {"s5-1", "s5-2"})
    after = await load(client, "s5", 300, 6)
    print(f"\nbefore kill {dict(before)}; around kill {dict(during)}; after {dict(after)}")
    assert set(before) == {"s5-0", "s5-1", "s5-2"}
    assert set(after) == {"s5-1", "s5-2"}
    # Both survivors take a real share (a picker stuck on stale stats of the kill would starve one).
    # Not "within 2x of each other": with two hogs on 2 cores one endpoint's latency spikes for tens
    # of ms at a time and the latency-aware picker rightly leans on the other (once 239 vs 61).
    assert min(after.values()) >= 300 / 2 / 5


async def test_a_ten_times_slower_endpoint_gets_clearly_less_traffic(
    client: AsyncClient, discovery: DiscoveryProcess, endpoints: list[EndpointProcess]
) -> None:
    # 30 ms vs 300 ms, not 10 vs 100: on a loaded 2-core box a runnable process (the endpoints and the
    # SDK's own event loop) waits tens of ms, spikes past 100, for a core, and a peak-EWMA picker sees
    # every such spike; beside two hogs 10 vs 100 once split 39/28/33 %: "10x slower" is not what
    # the SDK saw. 300 ms stays well above those spikes.
    for i, delay in enumerate((30, 30, 300)):
        start(endpoints, discovery, "s6", f"s6-{i}", delay_ms=delay)
    await wait_ids(client, "s6", {"s6-0", "s6-1", "s6-2"})
    counts = await load(client, "s6", 600, 4)
    share = {k: round(v / 600, 3) for k, v in sorted(counts.items())}
    print(f"\nsplit with s6-2 10x slower: {share}")
    assert counts["s6-2"] < 600 / 3 / 2  # under half its fair share


async def test_deadline_and_cancellation_release_the_endpoint(
    client: AsyncClient, discovery: DiscoveryProcess, endpoints: list[EndpointProcess]
) -> None:
    slow = start(endpoints, discovery, "s7", "s7-a", delay_ms=400)
    await wait_ids(client, "s7", {"s7-a"})
    with pytest.raises(DeadlineExceeded):
        await client.infer("s7", X, timeout=0.1)
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(client.infer("s7", X), 0.1)
    assert client.picker.stats[slow.address].in_flight == 0
    assert client.picker.stats[slow.address].backoff_until == 0.0  # slow is not dead


async def test_only_endpoint_killed_and_back_within_the_deadline_fails_nothing(
    client: AsyncClient, discovery: DiscoveryProcess, endpoints: list[EndpointProcess]
) -> None:
    """Every endpoint down (then none live once its lease ends): requests wait, retrying with
    backoff and woken by the watch, and succeed when it is back before their deadline."""
    only = start(endpoints, discovery, "s8", "s8-a")
    await wait_ids(client, "s8", {"s8-a"})
    await load(client, "s8", 10, 2)
    only.kill()
    # Requests in flight while it is down: dead address first, then an empty set (TTL_S later).
    calls = [asyncio.create_task(served_by(client, "s8", timeout=30.0)) for _ in range(8)]
    await asyncio.sleep(TTL_S + 1.0)
    assert not any(call.done() for call in calls)  # still retrying, not failed
    await asyncio.to_thread(only.start)  # back, same id and address
    assert await asyncio.gather(*calls) == ["s8-a"] * 8
    only.kill()
    with pytest.raises(Unavailable):  # retry=False: one try, no waiting for it to come back
        await client.infer("s8", X, retry=False, timeout=30.0)
