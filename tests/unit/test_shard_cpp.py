"""A shard replica's C++ lookup fast path (cpp/shard_server.cc) in front of its real Python server
(``services.shard.Shard`` with ``shard_lookup_cpp``, on loopback, no Ray). Lookups carry an
unsampled traceparent so C++ answers them (this test session records every new trace, and a
lookup that needs a span is Python's); whatever C++ does not answer must come back exactly as the
Python server answers it."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import AsyncIterator, Sequence
from pathlib import Path

import grpc
import numpy as np
import pytest

from servefleet.common import metrics
from servefleet.common.config import settings
from servefleet.services import shard as shard_module
from servefleet.services.replica_wire import SHARD_LOOKUP
from servefleet.services.shard import Shard
from servefleet.services.sharding import Layout, ShardPart
from tests.unit.test_shard_router_cpp import SAMPLED, UNSAMPLED
from tests.unit.test_sharding import ROWS, sharded_spec, table

__all__ = ["table"]

pytest.importorskip("servefleet.direct._direct")


@pytest.fixture
async def shard(
    table: Path, monkeypatch: pytest.MonkeyPatch, request: pytest.FixtureRequest
) -> AsyncIterator[Shard]:
    """Shard 1 of 3 (``request.param``: its partitioning, range by default) with C++ in front."""
    monkeypatch.setattr(shard_module, "settings", dataclasses.replace(settings, shard_lookup_cpp=1))
    partitioning = getattr(request, "param", "range")
    spec = sharded_spec(table, partitioning, 3, 1, max_concurrency=8)
    replica = Shard(spec.SerializeToString(), "s1r0", 1, host="127.0.0.1")
    await replica.ready()
    yield replica
    await replica.drain(1.0)


async def lookup(address: str, raw: bytes, metadata: Sequence[tuple[str, str]] = UNSAMPLED) -> bytes:
    async with grpc.aio.insecure_channel(address) as channel:
        answer: bytes = await channel.unary_unary(SHARD_LOOKUP)(raw, timeout=10, metadata=metadata)
        return answer


async def failure(address: str, raw: bytes) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as error:
        await lookup(address, raw)
    return error.value


def held_keys(part: ShardPart, n: int) -> np.ndarray:
    """``n`` keys shard ``part`` holds, in no order, some repeated."""
    owned = np.flatnonzero(part.layout.owners(np.arange(ROWS, dtype=np.int64)) == part.shard)
    return np.random.default_rng(7).choice(owned, size=n).astype("<i8")


@pytest.mark.parametrize("shard", ["range", "hash"], indirect=True)
async def test_cpp_rows_are_the_parts_rows_byte_for_byte(shard: Shard) -> None:
    keys = held_keys(shard.part, 300)
    ready = await shard.ready()
    rows = await lookup(ready["address"], keys.tobytes())
    assert rows == shard.part.lookup(keys).tobytes()
    assert rows == await lookup(shard._server.address, keys.tobytes())  # Python's own answer
    cpp = shard._cpp.stats() if shard._cpp else {}
    assert cpp["codes"] == {0: 1} and cpp["relayed"] == 0
    stats = await shard.stats()
    assert stats["served"] == 2 and stats["failed"] == 0 and stats["in_flight"] == 0


async def test_what_cpp_does_not_answer_gets_pythons_answer_word_for_word(shard: Shard) -> None:
    address = (await shard.ready())["address"]
    not_held = np.array([0, ROWS - 1], dtype="<i8").tobytes()  # shard 1 of 3 holds neither
    for raw in (b"\x00" * 12, not_held):
        fast, python = await failure(address, raw), await failure(shard._server.address, raw)
        assert fast.code() == python.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert fast.details() == python.details()
    assert "not a multiple of 8" in ((await failure(address, b"\x00" * 12)).details() or "")
    keys = held_keys(shard.part, 5).tobytes()
    assert await lookup(address, keys, SAMPLED) == await lookup(address, keys)  # traced: Python's
    assert shard._cpp is not None
    cpp = shard._cpp.stats()
    assert cpp["relayed"] == 4 and cpp["codes"] == {0: 1}
    assert (await shard.stats())["failed"] == 5


async def test_an_injected_delay_is_pythons_and_is_waited(shard: Shard) -> None:
    assert shard._cpp is not None
    address, keys = (await shard.ready())["address"], held_keys(shard.part, 10).tobytes()
    await shard.inject_delay(0.3)
    began = time.monotonic()
    await lookup(address, keys)
    assert time.monotonic() - began >= 0.3 and shard._cpp.stats()["relayed"] == 1
    await shard.inject_delay(0.0)
    await lookup(address, keys)
    assert shard._cpp.stats()["relayed"] == 1 and shard._cpp.stats()["codes"] == {0: 1}


async def test_over_capacity_cpp_answers_resource_exhausted(table: Path) -> None:
    from servefleet.direct._direct import ShardServer

    part = ShardPart(str(table), Layout("range", 3, ROWS), 1)
    native = ShardServer(
        list(metrics.LATENCY_BUCKETS),
        SHARD_LOOKUP,
        "s1r0",
        0,
        part.linear,
        part.factors,
        np.empty(0, np.int64),
        part.lo,
        0.0,
    )
    port = native.start("127.0.0.1:0", "127.0.0.1:1")
    try:
        error = await failure(f"127.0.0.1:{port}", held_keys(part, 3).tobytes())
        assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert error.details() == "shard s1r0: 0 lookups in flight (capacity)"
        assert native.stats()["codes"] == {8: 1} and native.stats()["in_flight"] == 0
    finally:
        native.stop(0.0)


def test_a_part_is_taken_as_is_or_refused(table: Path) -> None:
    from servefleet.direct._direct import ShardServer

    part = ShardPart(str(table), Layout("range", 3, ROWS), 1)
    with pytest.raises(TypeError):  # float64: would be a converted copy, not the mapped part
        ShardServer(
            [0.1],
            SHARD_LOOKUP,
            "s",
            1,
            part.linear.astype(np.float64),
            part.factors,
            np.empty(0, np.int64),
            part.lo,
            0.0,
        )
    with pytest.raises(ValueError, match="linear \\[rows\\], factors \\[rows, dim\\]"):
        ShardServer(
            [0.1], SHARD_LOOKUP, "s", 1, part.linear[:-1], part.factors, np.empty(0, np.int64), part.lo, 0.0
        )


async def test_counts_reach_metrics_and_drain_closes_both_ports(shard: Shard) -> None:
    assert shard._cpp is not None
    address = (await shard.ready())["address"]
    labels = {"service": "shard", "method": SHARD_LOOKUP, "code": "OK"}
    before = metrics.REGISTRY.get_sample_value("servefleet_rpc_requests_total", labels) or 0.0
    for _ in range(3):
        await lookup(address, held_keys(shard.part, 4).tobytes())
    shard._cpp._counts.sync()
    assert metrics.REGISTRY.get_sample_value("servefleet_rpc_requests_total", labels) == before + 3
    assert await shard.drain(1.0) == 0
    for port in (address, shard._server.address):
        error = await failure(port, held_keys(shard.part, 1).tobytes())
        assert error.code() == grpc.StatusCode.UNAVAILABLE
