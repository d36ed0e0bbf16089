"""Sharded tables without Ray: layouts, shard parts on a real file, and the router core over shard
parts behind a fake transport (exact merge, precise errors, hedging, failover)."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from tritonclient.grpc import service_pb2

from servefleet.common.errors import InvalidArgument, ResourceExhausted
from servefleet.common.tensors import decode_response, encode_request
from servefleet.direct import INPUT_NAME, OUTPUT_NAME, ctr
from servefleet.services.router import Slot
from servefleet.services.routing import ReplicaInfo
from servefleet.services.shard_router import MIN_SAMPLES, ShardPool, ShardRouterCore, ShardRouting
from servefleet.services.sharding import Layout, ShardPart, mapped_rss
from servefleet.services.transports import ReplicaGone
from servefleet.spec import load_spec

ROWS, FIELDS, DIM = 5000, 4, 8


@pytest.fixture(scope="module")
def table(tmp_path_factory: pytest.TempPathFactory) -> Path:
    model = ctr.random_model(num_rows=ROWS, num_fields=FIELDS, dim=DIM, scale=0.3, seed=3)
    return ctr.export_model(model, tmp_path_factory.mktemp("table") / "ctr.bin")


@pytest.fixture(scope="module")
def reference(table: Path) -> ctr.FactorizationMachine:
    return ctr.load_model(table)


@pytest.mark.parametrize("partitioning", ["range", "hash"])
def test_every_key_has_exactly_one_owner_and_shards_are_balanced(partitioning: str) -> None:
    layout = Layout(partitioning, 4, ROWS)
    keys = np.arange(ROWS, dtype=np.int64)
    owners = layout.owners(keys)
    counts = np.bincount(owners, minlength=4)
    assert counts.sum() == ROWS and counts.min() > 0.9 * ROWS / 4
    groups = layout.split(keys)
    assert sorted(np.concatenate([where for _, where in groups]).tolist()) == keys.tolist()
    assert all((owners[where] == shard).all() for shard, where in groups)


@pytest.mark.parametrize("partitioning", ["range", "hash"])
def test_a_part_holds_only_its_rows_and_they_equal_the_table(
    partitioning: str, table: Path, tmp_path: Path, reference: ctr.FactorizationMachine
) -> None:
    layout = Layout(partitioning, 4, ROWS)
    parts = [ShardPart(str(table), layout, i, cache_dir=str(tmp_path)) for i in range(4)]
    assert sum(p.rows for p in parts) == ROWS
    for part in parts:
        assert part.table_bytes < (ROWS * 4 * (1 + DIM)) / 2  # about a quarter (hash adds its keys)
        assert 0 < part.resident_bytes() <= part.table_bytes + 3 * 2 * 4096  # pages at both ends
    keys = np.arange(ROWS, dtype=np.int64)
    for shard, where in layout.split(keys):
        rows = parts[shard].lookup(keys[where])
        assert np.array_equal(rows[:, 0], reference.linear[keys[where]])
        assert np.array_equal(rows[:, 1:], reference.factors[keys[where]])
    with pytest.raises(InvalidArgument, match=r"key \d+ is not held by shard 0"):
        foreign = next(where for shard, where in layout.split(keys) if shard == 1)
        parts[0].lookup(keys[foreign[:1]])


def test_a_part_above_the_memory_limit_is_refused_with_the_fix(table: Path) -> None:
    with pytest.raises(
        ResourceExhausted, match=r"shard 0 of layout range-1 needs .* raise spec.sharding.shards"
    ):
        ShardPart(str(table), Layout("range", 1, ROWS), 0, memory_limit=ROWS * 4 * (1 + DIM) // 2)
    assert ShardPart(str(table), Layout("range", 4, ROWS), 0, memory_limit=ROWS * 4 * (1 + DIM) // 2).rows


def test_mapped_rss_of_no_mapping_is_zero() -> None:
    assert mapped_rss([(1, 2)]) == 0


class PartTransport:
    """Shard replicas as in-process parts; ``delays`` slows chosen replicas, ``dead`` kills them."""

    def __init__(self, parts: dict[str, ShardPart]) -> None:
        self.parts = parts
        self.delays: dict[str, float] = {}
        self.dead: set[str] = set()
        self.calls: dict[str, int] = {}

    async def lookup(self, replica: ReplicaInfo, keys: np.ndarray, timeout_s: float) -> np.ndarray:
        self.calls[replica.name] = self.calls.get(replica.name, 0) + 1
        if replica.name in self.dead:
            raise ReplicaGone("connection refused")
        await asyncio.sleep(self.delays.get(replica.name, 0.0))
        return self.parts[replica.name].lookup(keys)


def sharded_spec(table: Path, partitioning: str, shards: int, replicas: int, **more: object) -> Any:
    """The spec of app recs/ctr sharded over ``table`` (``more``: other spec fields)."""
    return load_spec(
        {
            "name": "ctr",
            "namespace": "recs",
            "kind": "sharded",
            "sharding": {"shards": shards, "partitioning": partitioning, "table": str(table)},
            "replicas": replicas,
            "inputs": [{"name": INPUT_NAME, "datatype": "INT64", "shape": [-1, FIELDS]}],
            "outputs": [{"name": OUTPUT_NAME, "datatype": "FP32", "shape": [-1]}],
            **more,
        }
    )


def _routing(
    table: Path, partitioning: str, shards: int, replicas: int
) -> tuple[ShardRouting, dict[str, ShardPart]]:
    spec = sharded_spec(table, partitioning, shards, replicas)
    layout = Layout(partitioning, shards, ROWS)
    parts: dict[str, ShardPart] = {}
    infos = []
    for shard in range(shards):
        part = ShardPart(str(table), layout, shard, cache_dir=str(table.parent))
        names = [f"s{shard}r{r}" for r in range(replicas)]
        parts.update({name: part for name in names})
        infos.append(tuple(ReplicaInfo(n, None, "", "1", 100) for n in names))
    return ShardRouting(time.time_ns(), spec.SerializeToString(), layout, tuple(infos)), parts


def _request(ids: np.ndarray) -> bytes:
    return encode_request("recs/ctr", {INPUT_NAME: ids}).SerializeToString()


def _scores(raw: bytes) -> np.ndarray:
    return decode_response(service_pb2.ModelInferResponse.FromString(raw))[OUTPUT_NAME]


@pytest.mark.parametrize("partitioning", ["range", "hash"])
async def test_router_scores_equal_the_unsharded_reference_exactly(
    partitioning: str, table: Path, reference: ctr.FactorizationMachine
) -> None:
    routing, parts = _routing(table, partitioning, 3, 1)
    core = ShardRouterCore(PartTransport(parts))
    assert core.set_routing(routing) and core.ready
    rng = np.random.default_rng(1)
    for batch in (1, 2, 17, 64, 1000):
        ids = rng.integers(0, ROWS, size=(batch, FIELDS), dtype=np.int64)
        assert np.array_equal(_scores(await core.infer(_request(ids), 5.0)), reference.score(ids))


async def test_a_key_out_of_range_is_invalid_argument_naming_it(table: Path) -> None:
    routing, parts = _routing(table, "range", 2, 1)
    core = ShardRouterCore(PartTransport(parts))
    core.set_routing(routing)
    ids = np.zeros((3, FIELDS), dtype=np.int64)
    ids[2, 1] = ROWS
    with pytest.raises(
        InvalidArgument, match=rf"feature id {ROWS} at example 2, field 1 is outside \[0, {ROWS}\)"
    ):
        await core.infer(_request(ids), 5.0)


async def test_a_dead_replica_costs_a_retry_on_its_sibling(
    table: Path, reference: ctr.FactorizationMachine
) -> None:
    routing, parts = _routing(table, "range", 2, 2)
    transport = PartTransport(parts)
    transport.dead = {"s0r0", "s1r1"}
    core = ShardRouterCore(transport, hedge_budget=0.0)
    core.set_routing(routing)
    ids = np.random.default_rng(2).integers(0, ROWS, size=(64, FIELDS), dtype=np.int64)
    for _ in range(10):
        assert np.array_equal(_scores(await core.infer(_request(ids), 5.0)), reference.score(ids))
    assert core.failures == 0 and all(len(p.router) == 1 for p in core.pools)


async def test_a_slow_replica_is_hedged_to_its_sibling_within_the_budget(table: Path) -> None:
    routing, parts = _routing(table, "range", 1, 2)
    transport = PartTransport(parts)
    transport.delays = {"s0r0": 0.02, "s0r1": 0.0}
    core = ShardRouterCore(transport, hedge_budget=0.5)
    core.set_routing(routing)
    ids = np.random.default_rng(4).integers(0, ROWS, size=(8, FIELDS), dtype=np.int64)
    for _ in range(200):
        await core.infer(_request(ids), 5.0)
    pool = core.pools[0]
    assert pool.hedges > 0 and pool.hedge_wins > 0
    assert pool.hedges <= 0.5 * pool.lookups + 10  # the budget bounds the extra load
    p95 = {name: sorted(w)[int(0.95 * (len(w) - 1))] for name, w in pool.latencies.items()}
    # Judged by the fast replica's p95 (recomputed every few samples), not the slow one's.
    assert min(pool.latencies["s0r1"]) <= pool.hedge_delay() < p95["s0r0"]


def test_hedge_delay_is_the_fastest_replicas_p95() -> None:
    pool = ShardPool(0)
    pool.update([ReplicaInfo(n, None, "", "1", 10) for n in ("a", "b")])
    assert pool.hedge_delay() > 0  # the default until enough samples
    for i in range(MIN_SAMPLES * 2):
        pool.observe("a", 0.001 * (1 + i % 2))
        pool.observe("b", 0.050)
    assert pool.hedge_delay() == pytest.approx(0.002)
    slot = pool.router.choose()
    assert isinstance(slot, Slot)


def _sharded(**sharding: object) -> dict[str, object]:
    return {"name": "ctr", "kind": "sharded", "sharding": {"shards": 2, "table": "/srv/ctr.bin", **sharding}}


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (_sharded(shards=0), r"spec.sharding.shards: must be >= 1, got 0"),
        (_sharded(table="ctr.bin"), r"spec.sharding.table: 'ctr.bin' must be the absolute path"),
        (_sharded(partitioning="modulo"), r"spec.sharding.partitioning: 'modulo' is not one of range, hash"),
        (_sharded(merge="sum"), r"spec.sharding.merge: 'sum' is not one of ctr"),
        (
            {**_sharded(replicas_per_shard=2), "replicas": 3},
            r"replicas_per_shard 2 disagrees with spec.replicas",
        ),
        (
            {**_sharded(key_input="ids"), "inputs": [{"name": "ids", "datatype": "FP32", "shape": [-1]}]},
            r"spec.sharding.key_input: input 'ids' is FP32; keys must be INT64",
        ),
        (
            {"name": "m", "import_path": "a:B", "sharding": {"shards": 2}},
            r"spec.sharding: only for kind 'sharded' \(this app is 'python'\)",
        ),
    ],
)
def test_sharding_spec_errors_name_the_field(data: dict[str, object], message: str) -> None:
    with pytest.raises(InvalidArgument, match=message):
        load_spec(data)


def test_sharding_defaults_and_replicas_per_shard() -> None:
    spec = load_spec(_sharded(replicas_per_shard=2))
    assert spec.replicas.initial == 2 and spec.sharding.replicas_per_shard == 2
    assert (spec.sharding.partitioning, spec.sharding.merge, spec.sharding.key_input) == (
        "range",
        "ctr",
        "feature_ids",
    )


def test_the_keeper_passes_each_shards_memory_on_to_app_status() -> None:
    from servefleet.api import agent_pb2, keeper_pb2
    from servefleet.api.common_pb2 import ShardStatus
    from servefleet.keeper.reconciler import summarize
    from servefleet.keeper.store import AppRecord

    spec = load_spec(_sharded())
    record = AppRecord(keeper_pb2.DesiredState(spec=spec, replicas=1), 7, keeper_pb2.ApplicationStatus())
    mib = 2**20
    shard = ShardStatus(
        shard=1, layout="range-2", rows=10, table_bytes=17 * mib, resident_bytes=16 * mib, ready=True
    )
    seen = agent_pb2.MasterStatus(replicas=1, ready_replicas=1, version="1", revision=7, shards=[shard])
    _, _, placements = summarize(record, {"c": seen})
    assert list(placements[0].shards) == [shard]
    from servefleet.cli.app_cmds import shard_rows

    rows = shard_rows(keeper_pb2.ApplicationStatus(placements=placements))
    assert rows == [
        {"cluster": "c", "shard": 1, "layout": "range-2", "ready": True, "rows": 10}
        | {"table_mib": 17.0, "resident_mib": 16.0, "node": ""}
    ]


async def test_a_request_caught_by_a_reshard_runs_again_on_the_new_layout(
    table: Path, reference: ctr.FactorizationMachine
) -> None:
    old, old_parts = _routing(table, "range", 2, 1)
    new, new_parts = _routing(table, "range", 3, 1)
    transport = PartTransport({**old_parts, **new_parts})
    core = ShardRouterCore(transport, hedge_budget=0.0)
    core.set_routing(old)

    class Resharding(PartTransport):
        async def lookup(self, replica: ReplicaInfo, keys: np.ndarray, timeout_s: float) -> np.ndarray:
            if core.routing is old:  # the old layout drains while this request is under way
                core.set_routing(new)
                raise ReplicaGone("drained")
            return await transport.lookup(replica, keys, timeout_s)

    core.transport = Resharding(transport.parts)
    ids = np.random.default_rng(9).integers(0, ROWS, size=(32, FIELDS), dtype=np.int64)
    assert np.array_equal(_scores(await core.infer(_request(ids), 5.0)), reference.score(ids))
    assert core.failures == 0 and core.routing is new


def test_quotas_and_placement_count_every_shard_actor() -> None:
    from servefleet.keeper.placement import demand
    from servefleet.keeper.policy import usage_of

    spec = load_spec({**_sharded(shards=4), "resources": {"num_cpus": 0.5, "memory": "10Mi"}})
    assert demand(spec, 2) == {"CPU": 4.0, "memory": float(8 * 10 * 2**20)}
    usage = usage_of(spec, 2)
    assert (usage.replicas, usage.cpus) == (8, 4.0)
