"""Cache entries in Redis, shared by every cache replica of an app and kept across restarts.

Keys of one app share the hash tag ``{namespace/name}`` (one Redis Cluster slot):

- ``sfc:{app}:e:<id>``: hash ``prompt, tenant, version, embedding, answer, pieces, created, hits``,
  expiring ``ttl_s`` after it was stored (a hit does not extend it: answers age out);
- ``sfc:{app}:lru``: sorted set of ids by last use (stored or hit), the eviction order;
- ``sfc:{app}:log``: stream of ``add``/``del`` events, which replicas tail to keep their index in
  step (the index is rebuilt from ``lru`` and the hashes at start);
- ``sfc:{app}:seq``: the id counter (ids are the index labels).

Eviction: at most ``max_entries`` per app; storing one more drops the least recently used, in the
same Lua step as the insert, so replicas never race past the cap. Entries whose TTL ran out are
dropped from ``lru`` when a lookup or rebuild meets them, or when they come up for eviction.
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np

from servefleet.api import common_pb2
from servefleet.common.redis_target import RedisTarget, TargetSource, refused
from servefleet.semantic_cache.index import Partition

_INSERT = """
local id = redis.call('INCR', KEYS[1])
local key = ARGV[1] .. id
redis.call('HSET', key, 'prompt', ARGV[5], 'tenant', ARGV[6], 'version', ARGV[7], 'embedding', ARGV[8],
           'answer', ARGV[9], 'pieces', ARGV[10], 'created', ARGV[4], 'hits', 0)
redis.call('EXPIRE', key, ARGV[2])
redis.call('ZADD', KEYS[2], ARGV[4], id)
redis.call('XADD', KEYS[3], 'MAXLEN', '~', ARGV[11], '*', 'op', 'add', 'id', id, 'tenant', ARGV[6],
           'version', ARGV[7], 'embedding', ARGV[8])
local over = redis.call('ZCARD', KEYS[2]) - tonumber(ARGV[3])
if over > 0 then
  local victims = redis.call('ZPOPMIN', KEYS[2], over)
  for i = 1, #victims, 2 do
    redis.call('DEL', ARGV[1] .. victims[i])
    redis.call('XADD', KEYS[3], 'MAXLEN', '~', ARGV[11], '*', 'op', 'del', 'id', victims[i])
  end
end
return id
"""
_FIELDS = ("prompt", "tenant", "version", "answer", "pieces", "hits")


@dataclass(frozen=True)
class Entry:
    id: int
    prompt: str
    tenant: str
    version: str
    answer: str
    pieces: list[str]  # the answer as the model streamed it, replayed to a streaming hit
    hits: int


@dataclass(frozen=True)
class Change:
    """One event of the change feed: an entry added (with what the index needs) or deleted."""

    op: str
    id: int
    partition: Partition = ("", "")
    embedding: np.ndarray | None = None


class CacheStore:
    def __init__(
        self,
        address: str | RedisTarget | TargetSource,
        app: common_pb2.AppRef,
        *,
        ttl_s: int,
        max_entries: int,
    ) -> None:
        """``address``: the platform's Redis (one, a cluster or Sentinels: ``RedisTarget``), or where
        to get the app's own Redis user (``TargetSource``: connected at first use, and asked again
        when Redis refuses it)."""
        self._source = address if callable(address) else None
        # Any: redis-py's stubs type replies as str | bytes | list | ..., these keys hold bytes.
        self._redis: Any = None
        if not callable(address):
            self._connect(RedisTarget.parse(address))
        tag = f"{{{app.namespace}/{app.name}}}"
        self._prefix = f"sfc:{tag}:e:"
        self._lru, self._log, self._seq = f"sfc:{tag}:lru", f"sfc:{tag}:log", f"sfc:{tag}:seq"
        self.ttl_s = ttl_s
        self.max_entries = max_entries

    def _connect(self, target: RedisTarget) -> Any:
        self._redis = target.client(socket_timeout=2.0, socket_connect_timeout=2.0)
        self._insert = self._redis.register_script(_INSERT)
        return self._redis

    async def _r(self) -> Any:
        if self._redis is None:
            assert self._source is not None
            self._connect(await self._source())
        return self._redis

    def forget(self, exc: BaseException) -> None:
        """After an error: when Redis refused the credential, ask for a fresh one next time."""
        if self._source is not None and refused(exc):
            self._redis = None

    async def close(self) -> None:
        if self._redis is not None:
            await self._redis.aclose()

    async def put(
        self, prompt: str, partition: Partition, embedding: np.ndarray, answer: str, pieces: list[str]
    ) -> int:
        """Store an answer; returns its id (evicting the least recently used beyond the cap)."""
        now_ms = int(time.time() * 1000)
        args: list[Any] = [self._prefix, self.ttl_s, self.max_entries, now_ms, prompt, *partition]
        args += [
            embedding.astype(np.float32).tobytes(),
            answer,
            json.dumps(pieces),
            4 * self.max_entries + 1000,
        ]
        await self._r()
        return int(await self._insert(keys=[self._seq, self._lru, self._log], args=args))

    async def get(self, ids: Iterable[int]) -> dict[int, Entry]:
        """The live entries among ``ids`` (expired or evicted ones are left out and unlisted)."""
        ids = list(ids)
        if not ids:
            return {}
        async with (await self._r()).pipeline(transaction=False) as pipe:
            for i in ids:
                pipe.hmget(f"{self._prefix}{i}", _FIELDS)
            rows = await pipe.execute()
        found, gone = {}, []
        for i, row in zip(ids, rows, strict=True):
            if row[0] is None:
                gone.append(i)
                continue
            prompt, tenant, version, answer, pieces, hits = (v.decode() for v in row)
            found[i] = Entry(i, prompt, tenant, version, answer, json.loads(pieces), int(hits))
        if gone:
            await (await self._r()).zrem(self._lru, *gone)
        return found

    async def touch(self, entry_id: int) -> None:
        """Count a hit and move the entry to the young end of the eviction order."""
        async with (await self._r()).pipeline(transaction=False) as pipe:
            pipe.hincrby(f"{self._prefix}{entry_id}", "hits", 1)
            pipe.zadd(self._lru, {str(entry_id): int(time.time() * 1000)}, xx=True)
            await pipe.execute()

    async def feed_position(self) -> str:
        """The change feed's last event id: tail from here after a rebuild, and nothing is missed."""
        redis = await self._r()
        last = await redis.xinfo_stream(self._log) if await redis.exists(self._log) else None
        return last["last-generated-id"].decode() if last else "0-0"

    async def snapshot(self, batch: int = 500) -> AsyncIterator[Change]:
        """Every live entry as an ``add`` (what a rebuild indexes)."""
        ids = [int(i) for i in await (await self._r()).zrange(self._lru, 0, -1)]
        for start in range(0, len(ids), batch):
            chunk = ids[start : start + batch]
            async with (await self._r()).pipeline(transaction=False) as pipe:
                for i in chunk:
                    pipe.hmget(f"{self._prefix}{i}", ("tenant", "version", "embedding"))
                rows = await pipe.execute()
            for i, (tenant, version, embedding) in zip(chunk, rows, strict=True):
                if tenant is not None:
                    vector = np.frombuffer(embedding, np.float32)
                    yield Change("add", i, (tenant.decode(), version.decode()), vector)

    async def changes(self, after: str, block_ms: int) -> tuple[str, list[Change]]:
        """Events after ``after`` (waiting up to ``block_ms``); returns the new position too."""
        answer = await (await self._r()).xread({self._log: after}, count=500, block=block_ms)
        out: list[Change] = []
        position = after
        for _, events in answer or ():
            for event_id, fields in events:
                position = event_id.decode()
                op, entry_id = fields[b"op"].decode(), int(fields[b"id"])
                if op == "add":
                    partition = (fields[b"tenant"].decode(), fields[b"version"].decode())
                    out.append(
                        Change(op, entry_id, partition, np.frombuffer(fields[b"embedding"], np.float32))
                    )
                else:
                    out.append(Change(op, entry_id))
        return position, out

    async def count(self) -> int:
        return int(await (await self._r()).zcard(self._lru))
