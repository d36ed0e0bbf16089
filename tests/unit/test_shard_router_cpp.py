"""The sharded router's C++ fast path (cpp/shard_router.cc) in front of the real Python router
server, over real shard replicas (``services.shard.Shard``, each on its own loopback gRPC port,
no Ray). Requests carry an unsampled traceparent so C++ answers them (this test session records
every new trace, and a request that needs a span is Python's); whatever C++ cannot answer must come
back exactly as the Python path answers it."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from tritonclient.grpc import service_pb2

from servefleet.common import metrics
from servefleet.common.net import free_port
from servefleet.common.server import GrpcServer
from servefleet.common.tensors import decode_response, encode_request
from servefleet.direct import INPUT_NAME, OUTPUT_NAME, ctr
from servefleet.services.proxy import SERVICE, InferenceServicer, registrar
from servefleet.services.routing import ReplicaInfo
from servefleet.services.shard import Shard
from servefleet.services.shard_router import (
    CppShardRouter,
    GrpcShardTransport,
    ShardRouterCore,
    ShardRouting,
    merge_matches,
)
from servefleet.services.sharding import Layout

# The table (5000 rows x 4 fields x dim 8) and its unsharded reference, shared with the Python
# router's tests.
from tests.unit.test_sharding import FIELDS, ROWS, reference, sharded_spec, table

__all__ = ["reference", "table"]

pytest.importorskip("servefleet.direct._direct")

INFER = "/inference.GRPCInferenceService/ModelInfer"
UNSAMPLED = (("traceparent", "00-" + "ab" * 16 + "-" + "cd" * 8 + "-00"),)
SAMPLED = (("traceparent", "00-" + "ab" * 16 + "-" + "cd" * 8 + "-01"),)
MODEL = "recs/ctr"


class Stack:
    """Shard replicas (``dead``: replicas of shard 0 listed at a port nobody listens on), the
    Python router server, and C++ in front of it, wired as ``ShardRouter`` wires them."""

    def __init__(
        self, table: Path, partitioning: str = "range", shards: int = 3, replicas: int = 1, dead: int = 0
    ) -> None:
        self.spec = sharded_spec(table, partitioning, shards, replicas, max_concurrency=64)
        self.layout = Layout(partitioning, shards, ROWS)
        self.shape, self.dead = (shards, replicas), dead
        self.shards: list[list[Shard]] = []
        self.core = ShardRouterCore(GrpcShardTransport())
        self.server = GrpcServer(
            "shard-router", "127.0.0.1:0", [registrar(InferenceServicer(self.core))], [SERVICE]
        )
        self.cpp = CppShardRouter(self.core.hedge_budget)

    async def __aenter__(self) -> Stack:
        shards, replicas = self.shape
        raw = self.spec.SerializeToString()
        self.shards = [
            [Shard(raw, f"s{i}r{r}", i, host="127.0.0.1") for r in range(replicas)] for i in range(shards)
        ]
        infos = []
        for i, group in enumerate(self.shards):
            ready = [await s.ready() for s in group]
            listed = [
                ReplicaInfo(r["name"], None, "", "1", r["capacity"], address=r["address"]) for r in ready
            ]
            if i == 0:
                listed = [
                    ReplicaInfo(f"dead{d}", None, "", "1", 64, address=f"127.0.0.1:{free_port()}")
                    for d in range(self.dead)
                ] + listed
            infos.append(tuple(listed))
        await self.server.start()
        self.address = self.cpp.start("127.0.0.1:0", self.server.address)
        self.adopt(ShardRouting(time.time_ns(), raw, self.layout, tuple(infos)))
        self.channel = grpc.aio.insecure_channel(self.address)
        self.python = grpc.aio.insecure_channel(self.server.address)
        return self

    def adopt(self, routing: ShardRouting) -> None:
        assert self.core.set_routing(routing)
        self.cpp.set_table(self.core)

    async def __aexit__(self, *exc: object) -> None:
        await self.channel.close()
        await self.python.close()
        await self.cpp.stop(1.0)
        await self.server.stop(0)
        for group in self.shards:
            for shard in group:
                await shard.drain(1.0)

    def stats(self) -> dict[str, Any]:
        return self.cpp.stats()

    async def infer(
        self,
        ids: np.ndarray,
        *,
        python: bool = False,
        metadata: Sequence[tuple[str, str]] = UNSAMPLED,
        **kw: Any,
    ) -> bytes:
        raw = encode_request(MODEL, {INPUT_NAME: ids}, request_id="req-7").SerializeToString()
        channel = self.python if python else self.channel
        answer: bytes = await channel.unary_unary(INFER)(
            raw, timeout=kw.pop("timeout", 10), metadata=metadata
        )
        return answer


def scores(raw: bytes) -> np.ndarray:
    return decode_response(service_pb2.ModelInferResponse.FromString(raw))[OUTPUT_NAME]


async def failure(call: Any) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as error:
        await call
    return error.value


@pytest.mark.parametrize("partitioning", ["range", "hash"])
async def test_cpp_scores_equal_the_unsharded_reference_exactly_and_answer_as_python_does(
    partitioning: str, table: Path, reference: ctr.FactorizationMachine
) -> None:
    async with Stack(table, partitioning, shards=4) as stack:
        rng = np.random.default_rng(1)
        hits = np.zeros(4, dtype=np.int64)
        for batch in (1, 2, 3, 17, 64, 333, 1000):
            ids = rng.integers(0, ROWS, size=(batch, FIELDS), dtype=np.int64)
            answer = await stack.infer(ids)
            assert np.array_equal(scores(answer), reference.score(ids)), f"batch {batch}"
            # The same message Python builds: model, version, id, output name, datatype and shape.
            assert answer == await stack.infer(ids, python=True), f"batch {batch}"
            hits[np.unique(stack.layout.owners(np.unique(ids)))] += 1
        stats = stack.stats()
        assert stats["relayed"] == 0 and stats["codes"] == {0: 7}  # every one answered in C++
        # One lookup per shard a batch hits, as Python's layout splits it.
        assert [s["lookups"] for s in stats["shards"]] == hits.tolist() and hits.min() > 0


@pytest.mark.parametrize("partitioning", ["range", "hash"])
async def test_cpp_owners_are_pythons_layout(partitioning: str, table: Path) -> None:
    async with Stack(table, partitioning, shards=5) as stack:
        keys = np.arange(ROWS, dtype=np.int64)
        assert stack.cpp.owners(keys.tolist()) == stack.layout.owners(keys).tolist()


@pytest.mark.parametrize(("fields", "dim"), [(1, 1), (3, 7), (16, 16), (39, 130), (200, 3)])
def test_the_cpp_merge_is_merge_ctr_bit_for_bit(fields: int, dim: int) -> None:
    """Every branch of numpy's pairwise sum (under 8, up to 128, split above) and both ends of
    sigmoid (merge_matches draws rows at scales up to 4: logits far past +-20)."""
    for bias in (-1.0, 0.0, 0.37):
        assert merge_matches(ctr.TableHeader(fields, dim, 1000, bias))


async def test_what_cpp_cannot_answer_gets_pythons_answer_word_for_word(table: Path) -> None:
    async with Stack(table) as stack:
        out_of_range = np.zeros((3, FIELDS), dtype=np.int64)
        out_of_range[2, 1] = ROWS
        errors = []
        for python in (False, True):
            errors.append(await failure(stack.infer(out_of_range, python=python)))
        assert [e.code() for e in errors] == [grpc.StatusCode.INVALID_ARGUMENT] * 2
        assert errors[0].details() == errors[1].details()
        assert f"feature id {ROWS} at example 2, field 1 is outside [0, {ROWS})" in (
            errors[0].details() or ""
        )
        wrong = encode_request(
            "recs/other", {INPUT_NAME: np.zeros((1, FIELDS), np.int64)}
        ).SerializeToString()
        unknown = await failure(stack.channel.unary_unary(INFER)(wrong, timeout=5, metadata=UNSAMPLED))
        assert unknown.code() == grpc.StatusCode.NOT_FOUND and "'recs/other'" in (unknown.details() or "")
        narrow = await failure(stack.infer(np.zeros((2, FIELDS - 1), np.int64)))
        assert narrow.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert stack.stats()["relayed"] == 3 and not stack.stats()["codes"]
        ids = np.ones((5, FIELDS), np.int64)
        traced = await stack.infer(ids, metadata=SAMPLED)  # needs a span: Python's
        assert traced == await stack.infer(ids) and stack.stats()["relayed"] == 4


async def test_a_gone_replica_costs_a_retry_on_its_sibling(
    table: Path, reference: ctr.FactorizationMachine
) -> None:
    async with Stack(table, shards=2, replicas=1, dead=1) as stack:
        ids = np.random.default_rng(2).integers(0, ROWS, size=(64, FIELDS), dtype=np.int64)
        for _ in range(30):  # the dead one is picked first by one of them (but for 2**-30)
            assert np.array_equal(scores(await stack.infer(ids)), reference.score(ids))
        stats = stack.stats()
        assert stats["relayed"] == 0 and stats["codes"] == {0: 30}
        # The dead one cost one retry, then it was dropped (until the master's next table).
        assert stats["shards"][0]["retries"] == 1 and stats["shards"][1]["retries"] == 0


async def test_a_shard_with_no_replica_left_is_pythons_to_answer(table: Path) -> None:
    async with Stack(table, shards=2, replicas=1, dead=2) as stack:
        await stack.shards[0][0].drain(0)  # every replica of shard 0 is gone now
        ids = np.arange(2 * FIELDS, dtype=np.int64).reshape(2, FIELDS)  # keys of shard 0
        error = await failure(stack.infer(ids))
        assert error.code() == grpc.StatusCode.UNAVAILABLE
        assert "shard 0: no replica could answer" in (error.details() or "")
        assert stack.stats()["relayed"] == 1


async def test_a_slow_replica_is_hedged_and_counted_within_the_budget(table: Path) -> None:
    async with Stack(table, shards=1, replicas=2) as stack:
        stack.cpp.set_hedge_budget(0.5)
        await stack.shards[0][0].inject_delay(0.03)
        ids = np.random.default_rng(4).integers(0, ROWS, size=(8, FIELDS), dtype=np.int64)
        for _ in range(150):
            await stack.infer(ids)
        pool = stack.stats()["shards"][0]
        assert pool["lookups"] == 150 and pool["hedges"] > 0 and pool["hedge_wins"] > 0
        assert pool["hedges"] <= 0.5 * pool["lookups"] + 10  # the budget bounds the extra load
        # Judged by the fast replica's p95, not the slow one's: the bar sits below the delay.
        assert pool["p50_ms"]["s0r1"] < pool["hedge_delay_ms"] + 1 and pool["hedge_delay_ms"] < 30
        stack.cpp.set_hedge_budget(0.0)
        before = stack.stats()["shards"][0]["hedges"]
        for _ in range(20):
            await stack.infer(ids)
        assert stack.stats()["shards"][0]["hedges"] == before  # budget 0: no hedge


async def test_the_callers_deadline_bounds_the_fan_out(table: Path) -> None:
    async with Stack(table, shards=2) as stack:
        for group in stack.shards:
            await group[0].inject_delay(2.0)
        began = time.monotonic()
        error = await failure(stack.infer(np.ones((1, FIELDS), np.int64), timeout=0.3))
        assert error.code() == grpc.StatusCode.DEADLINE_EXCEEDED and time.monotonic() - began < 1.5
        await asyncio.sleep(0.3)
        assert stack.stats()["in_flight"] == 0 and stack.stats()["relayed"] == 0


async def test_counts_reach_stats_and_metrics(table: Path) -> None:
    async with Stack(table, shards=2) as stack:
        labels = {"service": "shard-router", "method": INFER, "code": "OK"}
        before = metrics.REGISTRY.get_sample_value("servefleet_rpc_requests_total", labels) or 0.0
        for _ in range(3):
            await stack.infer(np.ones((2, FIELDS), np.int64))
        stack.cpp._counts.sync()
        assert metrics.REGISTRY.get_sample_value("servefleet_rpc_requests_total", labels) == before + 3
        merged = stack.cpp.add_to(stack.core.stats())
        assert merged["requests"] == 3 and merged["failures"] == 0 and merged["cpp"]["relayed"] == 0
        assert merged["lookups"] == sum(s["lookups"] for s in merged["shards"]) >= 3
        # The lookups carry the caller's unsampled trace: the shards' C++ answered every one.
        shard_stats = [await shard.stats() for group in stack.shards for shard in group]
        assert sum(s["cpp"]["codes"].get(0, 0) for s in shard_stats) == merged["lookups"]
        assert all(s["cpp"]["relayed"] == 0 for s in shard_stats)


async def test_a_new_layout_serves_new_calls_exactly(
    table: Path, reference: ctr.FactorizationMachine
) -> None:
    async with Stack(table, shards=2) as stack, Stack(table, "hash", shards=3) as other:
        ids = np.random.default_rng(6).integers(0, ROWS, size=(50, FIELDS), dtype=np.int64)
        assert np.array_equal(scores(await stack.infer(ids)), reference.score(ids))
        # The other stack's shards, as a reshard's new layout: one router table swap.
        infos = []
        for group in other.shards:
            ready = [await s.ready() for s in group]
            infos.append(
                tuple(ReplicaInfo(r["name"], None, "", "1", 64, address=r["address"]) for r in ready)
            )
        stack.adopt(ShardRouting(time.time_ns(), other.spec.SerializeToString(), other.layout, tuple(infos)))
        assert np.array_equal(scores(await stack.infer(ids)), reference.score(ids))
        assert stack.stats()["relayed"] == 0 and len(stack.stats()["shards"]) == 3
