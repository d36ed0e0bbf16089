"""Shard actor of a ``kind: sharded`` app: one replica of one shard of the table, as a Ray actor.

It memory-maps only its part of the table (:class:`~servefleet.services.sharding.ShardPart`) and
answers lookups on its own gRPC port (``names.SHARD_LOOKUP``): the global keys it owns as raw
little-endian int64 in, their rows as raw float32 [k, 1 + dim] out (linear weight, then factors).
So the router reaches it in one hop of gRPC with the caller's deadline, with no message to build
or parse on either side. The application master starts, health-checks (``stats``), drains and
replaces it like any replica.

With ``shard_lookup_cpp`` a C++ server (``cpp/shard_server.cc``) owns that port in front of the
Python one: the gather itself is a few microseconds (``bench/sharded.py``'s ``shard_gather_us``),
but Python's gRPC server spent about a millisecond of CPU per lookup around it, the largest
share of a sharded request's CPU. C++ reads the same mapped arrays and relays to Python whatever
it does not answer (bad input, traced lookups, every lookup while a fault delay is injected).
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
from servefleet.services.forwarder import CppFront, custom_sampler, rpc_series
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
        # With the C++ fast path, it owns the public port and the Python server sits behind it.
        self._cpp = CppShard(name, self.capacity, self.part) if settings.shard_lookup_cpp else None
        listen = "127.0.0.1:0" if self._cpp else f"{host}:0"
        self._server = GrpcServer("shard", listen, [self._register], [_SERVICE])
        self._address = ""
        self._started = asyncio.get_running_loop().create_task(self._start(host))
        # Its RPC series, served and registered (kind metrics) like every other part's.
        self._metrics = metrics.expose(
            discovery,
            AppId.parse(spec).ref(),
            "shard",
            {"node": self.node_id, "shard": str(shard), "replica": name},
            credential=credential,
        )

    async def _start(self, host: str) -> None:
        await self._server.start()
        self._address = self._server.address
        if self._cpp is not None:
            self._address = self._cpp.start(f"{host}:0", self._server.address)

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
            "address": self._address,
            "shard": self.shard,
            "layout": self.part.layout.name,
        }

    async def stats(self) -> dict[str, Any]:
        """Load and memory: the master's health check, and what ``app status`` reports per shard
        (both paths' counts when the C++ one is on)."""
        cpp: dict[str, Any] = self._cpp.stats() if self._cpp is not None else {"in_flight": 0, "codes": {}}
        return {
            "in_flight": self.in_flight + cpp["in_flight"],
            "capacity": self.capacity,
            "served": self.served + cpp["codes"].get(grpc.StatusCode.OK.value[0], 0),
            "failed": self.failed,
            "rejected": self.rejected + cpp["codes"].get(grpc.StatusCode.RESOURCE_EXHAUSTED.value[0], 0),
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
            **({"cpp": cpp} if self._cpp is not None else {}),
        }

    async def inject_delay(self, seconds: float) -> None:
        """Fault injection for tests and benchmarks: every lookup waits ``seconds`` first."""
        self.delay_s = max(0.0, seconds)
        if self._cpp is not None:
            self._cpp.set_delayed(bool(self.delay_s))

    async def drain(self, timeout_s: float) -> int:
        """Let lookups in flight finish (routers already moved away), then stop listening;
        returns the lookups in flight when the drain began."""
        self.draining = True
        left = self.in_flight
        if self._cpp is not None:  # first: what it relays needs the Python server
            left += self._cpp.stats()["in_flight"]
            await self._cpp.stop(timeout_s)
        if left:
            self._idle.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._idle.wait(), timeout_s)
        await self._server.stop(grace=1.0)
        return left


_SERVICE, _, _METHOD = SHARD_LOOKUP.strip("/").partition("/")


def _identity(data: bytes) -> bytes:
    return data


class CppShard(CppFront):
    """The C++ fast path of one shard replica (``servefleet.direct._direct.ShardServer``): it owns
    the replica's public port in front of the Python server, reads the part's mapped arrays, and
    its counts go to the replica's ``stats()`` and ``servefleet_rpc_*`` series."""

    def __init__(self, name: str, capacity: int, part: ShardPart) -> None:
        from servefleet.direct._direct import ShardServer as Native

        keys = part.keys if part.keys is not None else np.empty(0, dtype=np.int64)
        native = Native(
            list(metrics.LATENCY_BUCKETS),
            SHARD_LOOKUP,
            name,
            capacity,
            part.linear,
            part.factors,
            keys,
            part.lo,
            settings.trace_sample_ratio,
        )
        # C++ decides by the default sampler's rules only: with another, Python answers every lookup.
        self._usable = not custom_sampler()
        native.set_enabled(self._usable)
        super().__init__(native, lambda: [rpc_series("shard", SHARD_LOOKUP)])

    def set_delayed(self, delayed: bool) -> None:
        """A fault delay is injected: Python answers (and waits) while it is."""
        self.native.set_enabled(self._usable and not delayed)

    def stats(self) -> dict[str, Any]:
        """What C++ answered (by code) and relayed, and its lookups in flight."""
        return dict(self.native.stats())
