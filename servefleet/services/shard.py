"""Shard actor of a ``kind: sharded`` app: one replica of one shard of the table, as a Ray actor.

It memory-maps only its part of the table (:class:`~servefleet.services.sharding.ShardPart`) and
answers lookups on its own gRPC port (``names.SHARD_LOOKUP``): the global keys it owns as raw
little-endian int64 in, their rows as raw float32 [k, 1 + dim] out (linear weight, then factors).
So the router reaches it in one hop of gRPC with the caller's deadline, with no message to build
or parse on either side. The application master starts, health-checks (``stats``), drains and
replaces it like any replica.

Why numpy and not the C++ of ``cpp/``: a lookup is one fancy-indexing gather on the mmap (measured
by ``bench/sharded.py`` as ``shard_gather_us``: a few microseconds per key batch), against a
gRPC hop that costs far more on either side; the C++ server scores whole examples from a table
it owns in full, so reusing it would need a second C++ service for row lookups and would not move
the figure that dominates (the router's fan-out in Python).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from typing import Any

import grpc
import numpy as np

from servefleet.api import common_pb2
from servefleet.common import metrics
from servefleet.common.appid import AppId
from servefleet.common.config import settings
from servefleet.common.errors import InvalidArgument, ResourceExhausted
from servefleet.common.server import GrpcServer
from servefleet.direct import ctr
from servefleet.services.replica_wire import SHARD_LOOKUP
from servefleet.services.sharding import Layout, ShardPart


def layout_of(spec: common_pb2.ApplicationSpec) -> Layout:
    """The layout a (validated) sharded spec asks for, over its table's rows."""
    header = ctr.read_header(spec.sharding.table)
    return Layout(spec.sharding.partitioning, spec.sharding.shards, header.num_rows)


def _rss_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class Shard:
    """One shard replica (a Ray actor in production; a plain object in unit tests)."""

    def __init__(
        self,
        spec_bytes: bytes,
        name: str,
        shard: int,
        *,
        host: str = "",
        discovery: str = "",
        credential: str = "",
    ) -> None:
        spec = common_pb2.ApplicationSpec.FromString(spec_bytes)
        if not host:
            import ray

            host = ray.util.get_node_ip_address()
            self.node_id = ray.get_runtime_context().get_node_id()
        else:
            self.node_id = ""
        self.name, self.shard, self.version = name, shard, spec.version
        self.capacity = spec.max_concurrency + spec.max_queued
        self.part = ShardPart(
            spec.sharding.table,
            layout_of(spec),
            shard,
            memory_limit=spec.resources.memory,
            cache_dir=settings.shard_cache_dir,
        )
        self.in_flight = self.served = self.failed = self.rejected = 0
        self.delay_s = 0.0
        self.draining = False
        self._idle = asyncio.Event()  # set whenever no lookup is in flight (drain waits on it)
        self._server = GrpcServer("shard", f"{host}:0", [self._register], [_SERVICE])
        self._started = asyncio.get_running_loop().create_task(self._server.start())
        # Its RPC series, served and registered (kind metrics) like every other part's.
        self._metrics = metrics.expose(
            discovery,
            AppId.parse(spec).ref(),
            "shard",
            {"node": self.node_id, "shard": str(shard), "replica": name},
            credential=credential,
        )

    def _register(self, server: grpc.aio.Server) -> None:
        handler = grpc.unary_unary_rpc_method_handler(
            self.Lookup, request_deserializer=_identity, response_serializer=_identity
        )
        generic = grpc.method_handlers_generic_handler(_SERVICE, {_METHOD: handler})
        server.add_generic_rpc_handlers((generic,))

    async def Lookup(self, raw: bytes, context: Any) -> bytes:
        """Rows of the keys in one lookup request (errors become statuses in the interceptor)."""
        if self.in_flight >= self.capacity:
            self.rejected += 1
            raise ResourceExhausted(f"shard {self.name}: {self.in_flight} lookups in flight (capacity)")
        self.in_flight += 1
        try:
            if len(raw) % 8:
                raise InvalidArgument(
                    f"a lookup takes raw int64 keys: {len(raw)} bytes is not a multiple of 8"
                )
            keys = np.frombuffer(raw, dtype="<i8")
            if self.delay_s:
                await asyncio.sleep(self.delay_s)
            rows = self.part.lookup(keys)
            self.served += 1
        except Exception:
            self.failed += 1
            raise
        finally:
            self.in_flight -= 1
            if not self.in_flight:
                self._idle.set()
        return rows.tobytes()

    async def ready(self) -> dict[str, Any]:
        """Identity and placement once the server listens (the table part is already resident)."""
        await self._started
        return {
            "name": self.name,
            "version": self.version,
            "node_id": self.node_id,
            "capacity": self.capacity,
            "address": self._server.address,
            "shard": self.shard,
            "layout": self.part.layout.name,
        }

    async def stats(self) -> dict[str, Any]:
        """Load and memory: the master's health check, and what ``app status`` reports per shard."""
        return {
            "in_flight": self.in_flight,
            "capacity": self.capacity,
            "served": self.served,
            "failed": self.failed,
            "rejected": self.rejected,
            "draining": self.draining,
            "version": self.version,
            "shard": self.shard,
            "layout": self.part.layout.name,
            "rows": self.part.rows,
            "table_bytes": self.part.table_bytes,
            "resident_bytes": self.part.resident_bytes(),
            "rss_bytes": _rss_bytes(),
            "node_id": self.node_id,
            "pid": os.getpid(),
        }

    async def inject_delay(self, seconds: float) -> None:
        """Fault injection for tests and benchmarks: every lookup waits ``seconds`` first."""
        self.delay_s = max(0.0, seconds)

    async def drain(self, timeout_s: float) -> int:
        """Let lookups in flight finish (routers already moved away), then stop listening;
        returns the lookups in flight when the drain began."""
        self.draining = True
        left = self.in_flight
        if left:
            self._idle.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._idle.wait(), timeout_s)
        await self._server.stop(grace=1.0)
        return left


_SERVICE, _, _METHOD = SHARD_LOOKUP.strip("/").partition("/")


def _identity(data: bytes) -> bytes:
    return data
