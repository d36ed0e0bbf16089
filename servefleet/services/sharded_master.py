"""Application master of a ``kind: sharded`` app: shard actors per layout, routers in front.

The :class:`ApplicationMaster` machinery (desired state in Ray's KV, adoption of live named actors
after a restart, health checks, drains, start back-off, router actors as its "proxies") with a
sharded reconcile: the app's ``replicas`` count is replicas *per shard*, and each shard replica is
named ``replica:{app}:{generation}:s{shard}:{id}`` so a restarted master knows its layout and shard.
Shard replicas are spread over the cluster's nodes (Ray's SPREAD scheduling).

Resharding (N -> M, or any change of table or partitioning) is a rolling update: the new layout's
shard replicas start beside the old ones, the routers keep serving the old layout until *every*
new shard has all its replicas ready, then every router acknowledges a table with the new layout
before the old shards drain their in-flight lookups and are killed. No request sees a half-built
layout, and none is cut off.
"""

from __future__ import annotations

import json
import time
from typing import Any

import ray
from ray.experimental import internal_kv

from servefleet.api import common_pb2
from servefleet.common.appid import AppId
from servefleet.services.actors import RAY_NAMESPACE, replica_prefix
from servefleet.services.master import ApplicationMaster, ReplicaState, actor_options, generation
from servefleet.services.shard import Shard, layout_of
from servefleet.services.shard_router import ShardRouter, ShardRouting

ShardActor = ray.remote(Shard)
RouterActor = ray.remote(ShardRouter)


def shard_key(gen: str, shard: int) -> str:
    """What a shard replica's ReplicaState.generation holds: its layout generation and shard."""
    return f"{gen}:s{shard}"


def split_key(key: str) -> tuple[str, int]:
    gen, _, shard = key.rpartition(":s")
    return gen, int(shard)


class ShardedMaster(ApplicationMaster):
    """Reconciles one sharded app (runs as a detached Ray actor, like every master)."""

    proxy_actor = RouterActor

    def __init__(
        self,
        app: bytes,
        *,
        cluster: str,
        discovery: str,
        redis: str = "",
        broker: str = "",
        credential: str = "",
    ) -> None:
        self._layouts_key = f"layouts:{AppId.parse(common_pb2.AppRef.FromString(app)).key}".encode()
        stored = internal_kv._internal_kv_get(self._layouts_key, namespace=RAY_NAMESPACE)
        book = json.loads(stored) if stored else {}
        #: generation -> serialized spec, for every layout that may still be serving.
        self._layout_specs: dict[str, bytes] = {g: bytes.fromhex(s) for g, s in book.get("specs", {}).items()}
        self._serving: str | None = book.get("serving")
        super().__init__(
            app, cluster=cluster, discovery=discovery, redis=redis, broker=broker, credential=credential
        )

    def _save_layouts(self) -> None:
        book = {"serving": self._serving, "specs": {g: s.hex() for g, s in self._layout_specs.items()}}
        internal_kv._internal_kv_put(
            self._layouts_key, json.dumps(book).encode(), overwrite=True, namespace=RAY_NAMESPACE
        )

    async def status(self) -> bytes:
        spec = self.spec or common_pb2.ApplicationSpec()
        current = generation(spec) if self.spec else ""
        serving = self._routed_replicas()
        per_shard = [
            sum(split_key(r.generation) == (current, i) for r in serving) for i in range(spec.sharding.shards)
        ]
        ready = min(per_shard) if per_shard else 0
        stale = any(split_key(r.generation)[0] != current for r in self._replicas.values())
        status = self._status(serving, ready, stale)
        status.shards.extend(
            self._shard_status(r) for r in sorted(self._replicas.values(), key=lambda r: r.generation)
        )
        return status.SerializeToString()

    def _shard_status(self, replica: ReplicaState) -> common_pb2.ShardStatus:
        stats = replica.stats
        return common_pb2.ShardStatus(
            shard=split_key(replica.generation)[1],
            replica=replica.name,
            node_id=replica.info.node_id if replica.info else "",
            layout=str(stats.get("layout", "")),
            rows=int(stats.get("rows", 0)),
            table_bytes=int(stats.get("table_bytes", 0)),
            resident_bytes=int(stats.get("resident_bytes", 0)),
            ready=replica.ready,
        )

    async def router_stats(self) -> dict[str, dict[str, Any]]:
        """Each router's counts: requests, failures, per-shard lookups and hedges (extra load)."""
        out: dict[str, dict[str, Any]] = {}
        for proxy in self._proxies.values():
            try:
                out[proxy.name] = await proxy.handle.stats.remote()
            except Exception as exc:  # a restarting router reports why, not nothing
                out[proxy.name] = {"error": f"{type(exc).__name__}: {exc}"}
        return out

    async def _reconcile(self) -> None:
        if self.spec is None:
            return
        await self._health_check()
        current = generation(self.spec)
        if current not in self._layout_specs:
            self._layout_specs[current] = self.spec.SerializeToString()
            self._save_layouts()
        wanted, shards = self.replica_count, self.spec.sharding.shards
        for shard in range(shards):
            key = shard_key(current, shard)
            mine = [r for r in self._replicas.values() if r.generation == key]
            if len(mine) < wanted and time.monotonic() >= self._next_start:
                for _ in range(wanted - len(mine)):
                    self._start_replica(self.spec, key)
            elif len(mine) > wanted:
                await self._retire(sorted(mine, key=lambda r: r.ready)[: len(mine) - wanted])
        ready = [r for r in self._replicas.values() if r.ready and split_key(r.generation)[0] == current]
        complete = all(sum(split_key(r.generation)[1] == i for r in ready) >= wanted for i in range(shards))
        if complete or self._serving == current:
            if self._serving != current:
                self._serving = current
                self._save_layouts()
            await self._publish(ready)  # every router on the new layout first ...
            await self._retire([r for r in self._replicas.values() if split_key(r.generation)[0] != current])
            self._forget_layouts(current)  # ... then the old one drains
        elif self._serving is not None:  # new layout still building: the old one serves
            await self._publish([r for r in self._replicas.values() if r.ready])
        await self._ensure_proxies(self.spec.proxies)

    def _forget_layouts(self, keep: str) -> None:
        if set(self._layout_specs) != {keep}:
            self._layout_specs = {keep: self._layout_specs[keep]}
            self._save_layouts()

    def _start_replica(self, spec: common_pb2.ApplicationSpec, gen: str) -> None:
        """Start one replica of shard ``split_key(gen)[1]``, spread away from its siblings."""
        name = f"{replica_prefix(self.app)}{gen}:{time.time_ns():x}"
        handle = ShardActor.options(name=name, **actor_options(spec)).remote(  # SPREAD, like replicas
            spec.SerializeToString(),
            name,
            split_key(gen)[1],
            discovery=self.discovery,
            credential=self.credential,
        )
        self._track_replica(ReplicaState(name, handle, gen))

    async def _publish(self, replicas: list[ReplicaState]) -> None:
        """Push the serving layout's table (its ready replicas, by shard) to every router."""
        gen = self._serving
        if gen is None or gen not in self._layout_specs:
            return
        spec = self._layout_specs[gen]
        mine = [r for r in replicas if r.ready and r.info is not None and split_key(r.generation)[0] == gen]
        names = frozenset(r.name for r in mine)
        if self._routed == (spec, names) and self._routing is not None:
            return
        layout = layout_of(common_pb2.ApplicationSpec.FromString(spec))
        by_shard = tuple(
            tuple(r.info for r in mine if r.info is not None and split_key(r.generation)[1] == i)
            for i in range(layout.shards)
        )
        self._routing = ShardRouting(epoch=time.time_ns(), spec=spec, layout=layout, shards=by_shard)
        await self._push(list(self._proxies.values()))
        self._routed = (spec, names)
