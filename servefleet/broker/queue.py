"""The broker's request queue: a small interface, and its Redis Streams implementation.

Layout in Redis (one logical database; every multi-key step is one Lua script, so each is atomic;
the scripts are the files in ``lua/``):

- ``sf:broker:app:{app}`` (hash): the app is *known* to the broker. Written by its workers when
  they start (``PullWorker.start``) and on every heartbeat, or by the platform; holds the app's
  ``max_stream_length``, ``max_deliveries`` and ``result_ttl_s``.
- ``sf:broker:q:{app}:{band}`` (stream, consumer group ``workers``): queued work, one stream per
  priority band (``high`` for priority > 0, ``normal`` for 0, ``low`` for < 0). Workers drain the
  bands strictly in that order. An entry is deleted (XDEL) when it is acked, so the summed stream
  length is exactly the unfinished work, and Submit refuses work over ``max_stream_length``
  (RESOURCE_EXHAUSTED) instead of trimming.
- ``sf:broker:t:{ticket}`` (hash): the ticket's state machine (QUEUED, RUNNING, DONE, FAILED,
  CANCELLED), deliveries, last error. ``sf:broker:r:{ticket}``: the serialized response, which
  expires after the result TTL; the hash outlives it by ``broker_tombstone_s`` so a late reader
  hears EXPIRED rather than NOT_FOUND.
- ``sf:broker:dlq:{app}`` (stream): dead letters (ticket, payload, reason), kept until an
  operator removes them; QueueStats reports their count.
- Channel ``sf:broker:events``: "ticket STATE" on every change, so waiters wake at once (they
  also re-read the ticket every ``broker.core._REPOLL_S`` (5 s), so a lost message only costs
  latency).

Keys are not hash-tagged: this targets a single Redis (or a primary with replicas/Sentinel),
not Redis Cluster.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from abc import ABC, abstractmethod
from collections import defaultdict
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from importlib import resources
from typing import Any, cast

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from servefleet.api import broker_pb2, common_pb2
from servefleet.common.config import settings
from servefleet.common.errors import NotFound, ResourceExhausted, Unavailable
from servefleet.common.net import split_address

log = logging.getLogger(__name__)

State = broker_pb2.TicketStatus.State
#: Priority bands, drained in this order.
BANDS: tuple[str, ...] = ("high", "normal", "low")
GROUP = "workers"
EVENTS = "sf:broker:events"
#: Counters are bucketed by this many seconds; rates average the last RATE_WINDOW_S.
RATE_BUCKET_S = 5
RATE_WINDOW_S = 60
#: Errors that mean "Redis is not reachable right now": retry later, answer UNAVAILABLE.
TRANSIENT_ERRORS: tuple[type[BaseException], ...] = (RedisConnectionError, RedisTimeoutError, OSError)


def band_of(priority: int) -> int:
    """Index into BANDS for a Submit priority."""
    return 0 if priority > 0 else 1 if priority == 0 else 2


#: ``await next_change(timeout)``: a ticket's next state, or None (re-read it).
NextChange = Callable[[float], Awaitable["int | None"]]


@dataclass(frozen=True)
class AppConfig:
    """Per-app queue limits; 0 means "the broker default" (``settings.broker_*``)."""

    max_stream_length: int = 0
    max_deliveries: int = 0
    result_ttl_s: int = 0

    @classmethod
    def from_proto(cls, config: common_pb2.AsyncConfig | None) -> AppConfig:
        if config is None:
            return cls()
        return cls(config.max_stream_length, config.max_deliveries, config.result_ttl_s)


@dataclass(frozen=True)
class Entry:
    """One delivered stream entry: which band it came from, its id, and what it carries."""

    band: int
    entry_id: str
    ticket: str
    payload: bytes


class RequestQueue(ABC):
    """What the broker core and the pull workers need from a queue backend."""

    # --- producer / reader side (broker core) ---
    @abstractmethod
    async def register_app(self, app: str, config: AppConfig) -> None: ...

    @abstractmethod
    async def submit(
        self, app: str, band: int, ticket: str, payload: bytes, ttl_s: int, idempotency_key: str
    ) -> tuple[str, bool]:
        """Queue the payload; (ticket, duplicate). NotFound for an unknown app,
        ResourceExhausted when the app's queue is full."""

    @abstractmethod
    async def status(self, ticket: str) -> broker_pb2.TicketStatus | None:
        """The ticket's status (with the response when DONE), None when unknown."""

    @abstractmethod
    async def cancel(self, ticket: str) -> broker_pb2.TicketStatus | None: ...

    @abstractmethod
    async def ticket_app(self, ticket: str) -> str | None:
        """The ``namespace/name`` a ticket was submitted to; None when unknown."""

    @abstractmethod
    async def stats(self, app: str) -> broker_pb2.QueueStatsResponse: ...

    @abstractmethod
    async def apps(self) -> list[str]:
        """Every registered app (``namespace/name``)."""

    @abstractmethod
    def changes(self, ticket: str) -> contextlib.AbstractAsyncContextManager[NextChange]:
        """Subscribe to the ticket's changes (enter it *before* reading its status, so no change
        slips between). Yields ``next_change(timeout)``: the new state, or None after ``timeout``
        or when changes may have been missed; on None the caller re-reads."""

    # --- consumer side (pull workers) ---
    @abstractmethod
    async def ensure_groups(self, app: str) -> None: ...

    @abstractmethod
    async def take(self, app: str, consumer: str, count: int, block_ms: int) -> list[Entry]:
        """Up to ``count`` new entries, highest band first, each already marked RUNNING (entries
        whose ticket is final are acked and skipped; over-delivered ones dead-lettered). Blocks
        up to ``block_ms`` when there are none."""

    @abstractmethod
    async def reclaim(self, app: str, consumer: str, count: int, min_idle_ms: int) -> list[Entry]:
        """Take over (and start) up to ``count`` entries other consumers left pending longer than
        ``min_idle_ms``."""

    @abstractmethod
    async def heartbeat(self, app: str, consumer: str, entries: Sequence[Entry]) -> None:
        """Reset the idle time of entries still running here, so nobody reclaims them."""

    @abstractmethod
    async def finish(self, app: str, entry: Entry, response: bytes) -> bool:
        """Store the result and ack; False when the ticket was already final (a duplicate run)."""

    @abstractmethod
    async def fail(self, app: str, entry: Entry, reason: str) -> str:
        """Record a failed run: 'retry' (re-queued), 'dead' (dead-lettered) or 'skip'."""

    @abstractmethod
    async def leave(self, app: str, consumer: str) -> None: ...

    @abstractmethod
    async def close(self) -> None: ...


#: Which Lua files make up each script, in order (shared helpers first): ``broker/lua/*.lua``.
_SCRIPTS: dict[str, tuple[str, ...]] = {
    "submit": ("submit",),
    "take": ("lib", "starter", "take"),
    "start": ("lib", "starter", "start"),
    "finish": ("lib", "finish"),
    "fail": ("lib", "fail"),
    "cancel": ("lib", "cancel"),
}


def lua_script(name: str) -> str:
    """The source of one Redis script, from the package's ``lua/`` files."""
    folder = resources.files(__package__) / "lua"
    return "".join((folder / f"{part}.lua").read_text() for part in _SCRIPTS[name])


#: What redis-py accepts as a command or script argument.
Arg = bytes | str | int | float


def _s(value: bytes | str | None) -> str:
    return value.decode() if isinstance(value, bytes) else (value or "")


class RedisStreamQueue(RequestQueue):
    """RequestQueue over Redis Streams and consumer groups (see the module docstring)."""

    def __init__(
        self, address: str, *, max_connections: int = 64, clock: Callable[[], float] = time.time
    ) -> None:
        host, port = split_address(address)
        self.address = address
        self._clock = clock
        # Callers beyond max_connections wait for a free connection rather than fail: a burst of
        # GetResult waiters holds connections only for short reads (they sleep on pub/sub).
        # After a Redis restart, pooled connections are closed by the old server: a command that finds
        # its socket closed is sent once more on a fresh connection (a stale socket never delivered it).
        pool = aioredis.BlockingConnectionPool(
            host=host,
            port=port,
            max_connections=max_connections,
            health_check_interval=1,
            retry=Retry(NoBackoff(), 1),
            retry_on_error=[RedisConnectionError],
        )
        self._redis = aioredis.Redis(connection_pool=pool)
        self._submit = self._redis.register_script(lua_script("submit"))
        self._take = self._redis.register_script(lua_script("take"))
        self._start = self._redis.register_script(lua_script("start"))
        self._finish = self._redis.register_script(lua_script("finish"))
        self._fail = self._redis.register_script(lua_script("fail"))
        self._cancel = self._redis.register_script(lua_script("cancel"))
        self._waiters: dict[str, set[asyncio.Queue[int | None]]] = defaultdict(set)
        self._subscribed = asyncio.Event()
        self._listener: asyncio.Task[None] | None = None

    # --- keys ---
    @staticmethod
    def app_key(app: str) -> str:
        return f"sf:broker:app:{app}"

    @staticmethod
    def stream(app: str, band: int) -> str:
        return f"sf:broker:q:{app}:{BANDS[band]}"

    @staticmethod
    def dead_letters(app: str) -> str:
        return f"sf:broker:dlq:{app}"

    @staticmethod
    def ticket_key(ticket: str) -> str:
        return f"sf:broker:t:{ticket}"

    @staticmethod
    def result_key(ticket: str) -> str:
        return f"sf:broker:r:{ticket}"

    def _counter(self, app: str, kind: str, bucket: int | None = None) -> str:
        bucket = int(self._clock() // RATE_BUCKET_S) if bucket is None else bucket
        return f"sf:broker:n:{app}:{kind}:{bucket}"

    @staticmethod
    def _workers_key(app: str) -> str:
        return f"sf:broker:w:{app}"

    @staticmethod
    def _dup_key(app: str) -> str:
        return f"sf:broker:dup:{app}"

    @contextlib.asynccontextmanager
    async def _reachable(self) -> AsyncIterator[None]:
        """Redis down -> UNAVAILABLE (the caller may retry), once for every client-side call."""
        try:
            yield
        except TRANSIENT_ERRORS as exc:
            raise Unavailable(f"broker queue (redis {self.address}) unreachable: {exc}") from exc

    async def ping(self) -> None:
        """Raise Unavailable unless Redis answers now (the broker's health follows this)."""
        async with self._reachable():
            await self._redis.ping()

    # --- producer / reader side ---
    async def register_app(self, app: str, config: AppConfig) -> None:
        fields: dict[Any, Arg] = {"registered": int(self._clock())}
        for name in ("max_stream_length", "max_deliveries", "result_ttl_s"):
            if getattr(config, name) > 0:
                fields[name] = getattr(config, name)
        await self._redis.hset(self.app_key(app), mapping=fields)

    async def submit(
        self, app: str, band: int, ticket: str, payload: bytes, ttl_s: int, idempotency_key: str
    ) -> tuple[str, bool]:
        keys = [
            self.app_key(app),
            self.stream(app, band),
            self.ticket_key(ticket),
            f"sf:broker:idem:{app}:{idempotency_key}",
            self._counter(app, "submit"),
            *(self.stream(app, b) for b in range(len(BANDS))),
        ]
        args: list[Arg] = [
            ticket,
            payload,
            ttl_s,
            settings.broker_ticket_max_age_s,
            settings.broker_max_stream_length,
            settings.broker_result_ttl_s,
            app,
            band,
            "1" if idempotency_key else "0",
            int(self._clock()),
            RATE_WINDOW_S + 2 * RATE_BUCKET_S,
        ]
        async with self._reachable():
            reply = [_s(x) for x in await self._submit(keys=keys, args=args)]
        if reply[0] == "unknown":
            raise NotFound(
                f"app {app!r} is not enabled for async requests: no worker has registered it with "
                "the broker (deploy it with async_mode.enabled)"
            )
        if reply[0] == "full":
            raise ResourceExhausted(
                f"app {app!r} has {reply[1]} unfinished async requests (limit {reply[2]}); "
                "retry later or raise async_mode.max_stream_length"
            )
        return reply[1], reply[0] == "dup"

    async def status(self, ticket: str) -> broker_pb2.TicketStatus | None:
        async with self._reachable():
            pipe = self._redis.pipeline(transaction=False)
            pipe.hgetall(self.ticket_key(ticket))
            pipe.get(self.result_key(ticket))
            raw, response = await pipe.execute()
        if not raw:
            return None
        fields = {_s(k): _s(v) for k, v in raw.items()}
        out = broker_pb2.TicketStatus(
            ticket=ticket,
            state=cast(State, State.Value(fields["state"])),
            error=fields.get("error", ""),
            deliveries=int(fields.get("deliveries", 0)),
        )
        if out.state == State.DONE:
            if response is None:
                out.state = State.EXPIRED
                out.error = f"result expired after its time to live of {fields['ttl_s']} s"
            else:
                out.infer_response = response
        return out

    async def ticket_app(self, ticket: str) -> str | None:
        async with self._reachable():
            found = await self._redis.hget(self.ticket_key(ticket), "app")
        return None if found is None else _s(found)

    async def cancel(self, ticket: str) -> broker_pb2.TicketStatus | None:
        async with self._reachable():
            fields = await self._redis.hmget(self.ticket_key(ticket), ["app", "band"])
            if fields[0] is None:
                return None
            stream = self.stream(_s(fields[0]), int(_s(fields[1])))
            await self._cancel(
                keys=[self.ticket_key(ticket), stream], args=[settings.broker_tombstone_s, EVENTS]
            )
        return await self.status(ticket)

    async def apps(self) -> list[str]:
        prefix = self.app_key("")
        async with self._reachable():
            keys = [_s(k) async for k in self._redis.scan_iter(match=f"{prefix}*", count=500)]
        return sorted(k.removeprefix(prefix) for k in keys)

    async def stats(self, app: str) -> broker_pb2.QueueStatsResponse:
        now = self._clock()
        bucket = int(now // RATE_BUCKET_S)
        buckets = range(bucket - RATE_WINDOW_S // RATE_BUCKET_S, bucket)
        async with self._reachable():
            if not await self._redis.exists(self.app_key(app)):
                raise NotFound(f"app {app!r} is not enabled for async requests")
            await self.ensure_groups(app)
            pipe = self._redis.pipeline(transaction=False)
            for band in range(len(BANDS)):
                pipe.xlen(self.stream(app, band))
                pipe.xpending(self.stream(app, band), GROUP)
                pipe.xinfo_groups(self.stream(app, band))
            pipe.xlen(self.dead_letters(app))
            pipe.get(self._dup_key(app))
            pipe.zcount(self._workers_key(app), now - 3 * settings.broker_reclaim_idle_s, "+inf")
            pipe.mget([self._counter(app, "submit", b) for b in buckets])
            pipe.mget([self._counter(app, "complete", b) for b in buckets])
            replies = await pipe.execute()
            out = broker_pb2.QueueStatsResponse()
            oldest: list[float] = []
            for band in range(len(BANDS)):
                length, pending, groups = replies[3 * band : 3 * band + 3]
                in_flight = int(pending["pending"])
                out.in_flight += in_flight
                out.depth += max(0, int(length) - in_flight)
                last = next((_s(g["last-delivered-id"]) for g in groups if _s(g["name"]) == GROUP), "0-0")
                first = await self._redis.xrange(self.stream(app, band), f"({last}", "+", count=1)
                if first:
                    oldest.append(int(_s(first[0][0]).split("-")[0]) / 1000)
        dead, dups, workers, submits, completes = replies[3 * len(BANDS) :]
        out.oldest_age_s = max(0.0, now - min(oldest)) if oldest else 0.0
        out.dead_letters = int(dead)
        out.duplicate_executions = int(dups or 0)
        out.workers = int(workers)
        out.submit_rate = sum(int(x or 0) for x in submits) / RATE_WINDOW_S
        out.complete_rate = sum(int(x or 0) for x in completes) / RATE_WINDOW_S
        return out

    @contextlib.asynccontextmanager
    async def changes(self, ticket: str) -> AsyncIterator[NextChange]:
        feed: asyncio.Queue[int | None] = asyncio.Queue()
        self._waiters[ticket].add(feed)
        try:
            if self._listener is None or self._listener.done():
                self._listener = asyncio.create_task(self._listen())
            with contextlib.suppress(TimeoutError):  # not subscribed yet: the re-reads cover it
                await asyncio.wait_for(self._subscribed.wait(), 1.0)

            async def next_change(timeout: float) -> int | None:
                try:
                    return await asyncio.wait_for(feed.get(), timeout)
                except TimeoutError:
                    return None

            yield next_change
        finally:
            self._waiters[ticket].discard(feed)
            if not self._waiters[ticket]:
                del self._waiters[ticket]

    async def _listen(self) -> None:
        """Fan the events channel out to local waiters; reconnects on its own."""
        while True:
            pubsub = self._redis.pubsub(ignore_subscribe_messages=True)
            try:
                await pubsub.subscribe(EVENTS)
                self._subscribed.set()
                for feeds in self._waiters.values():  # events may have been missed: re-read
                    for feed in feeds:
                        feed.put_nowait(None)
                async for message in pubsub.listen():
                    ticket, state = _s(message["data"]).split(" ", 1)
                    for feed in self._waiters.get(ticket, ()):
                        feed.put_nowait(State.Value(state))
            except TRANSIENT_ERRORS:
                self._subscribed.clear()
                await asyncio.sleep(0.5)
            finally:
                with contextlib.suppress(*TRANSIENT_ERRORS, RedisError):
                    await pubsub.aclose()

    # --- consumer side ---
    async def ensure_groups(self, app: str) -> None:
        for band in range(len(BANDS)):
            try:
                await self._redis.xgroup_create(self.stream(app, band), GROUP, id="0", mkstream=True)
            except ResponseError as exc:
                if "BUSYGROUP" not in str(exc):
                    raise

    @staticmethod
    def _entries(reply: Any) -> list[Entry]:
        out: list[Entry] = []
        for stream, items in reply or []:
            band = BANDS.index(_s(stream).rsplit(":", 1)[1])
            for entry_id, fields in items:
                if fields:  # None for entries deleted while pending (cancelled)
                    out.append(Entry(band, _s(entry_id), _s(fields[b"ticket"]), fields[b"payload"]))
        return out

    def _starter_args(self, app: str, consumer: str) -> tuple[list[str], list[Arg]]:
        keys = [self.dead_letters(app), self.app_key(app), *(self.stream(app, b) for b in range(len(BANDS)))]
        args: list[Arg] = [
            GROUP,
            consumer,
            settings.broker_max_deliveries,
            settings.broker_tombstone_s,
            int(self._clock()),
            EVENTS,
            self.ticket_key(""),
        ]
        return keys, args

    async def _started(self, app: str, consumer: str, entries: list[Entry]) -> list[Entry]:
        """Start delivered entries; those that may run."""
        if not entries:
            return []
        keys, args = self._starter_args(app, consumer)
        for entry in entries:
            args += [entry.band, entry.entry_id, entry.ticket]
        verdicts = await self._start(keys=keys, args=args)
        return [entry for entry, verdict in zip(entries, verdicts, strict=True) if _s(verdict) == "run"]

    async def take(self, app: str, consumer: str, count: int, block_ms: int) -> list[Entry]:
        keys, args = self._starter_args(app, consumer)
        flat = await self._take(keys=keys, args=[*args, count])
        out = [
            Entry(int(flat[i]), _s(flat[i + 1]), _s(flat[i + 2]), flat[i + 3]) for i in range(0, len(flat), 4)
        ]
        if out or block_ms <= 0:
            return out
        # Nothing anywhere: one blocking read on every band. Redis 7.0 answers a blocked reader
        # with the entries of the one stream that woke it, so this returns at most `count`.
        streams: dict[Any, Any] = {self.stream(app, band): ">" for band in range(len(BANDS))}
        reply = await self._redis.xreadgroup(GROUP, consumer, streams, count=count, block=block_ms)
        return await self._started(app, consumer, self._entries(reply))

    async def reclaim(self, app: str, consumer: str, count: int, min_idle_ms: int) -> list[Entry]:
        out: list[Entry] = []
        for band in range(len(BANDS)):
            if len(out) >= count:
                break
            reply = await self._redis.xautoclaim(
                self.stream(app, band), GROUP, consumer, min_idle_ms, "0-0", count=count - len(out)
            )
            out += self._entries([(self.stream(app, band).encode(), reply[1])])
        return await self._started(app, consumer, out)

    async def heartbeat(self, app: str, consumer: str, entries: Sequence[Entry]) -> None:
        await self._redis.zadd(self._workers_key(app), {consumer: self._clock()})
        for band in range(len(BANDS)):
            ids: list[Any] = [e.entry_id for e in entries if e.band == band]
            if ids:
                await self._redis.xclaim(self.stream(app, band), GROUP, consumer, 0, ids, justid=True)

    async def finish(self, app: str, entry: Entry, response: bytes) -> bool:
        keys = [
            self.ticket_key(entry.ticket),
            self.result_key(entry.ticket),
            self.stream(app, entry.band),
            self._counter(app, "complete"),
            self._dup_key(app),
        ]
        args: list[Arg] = [
            GROUP,
            entry.entry_id,
            response,
            settings.broker_tombstone_s,
            EVENTS,
            RATE_WINDOW_S + 2 * RATE_BUCKET_S,
        ]
        return bool(await self._finish(keys=keys, args=args))

    async def fail(self, app: str, entry: Entry, reason: str) -> str:
        keys = [
            self.ticket_key(entry.ticket),
            self.stream(app, entry.band),
            self.dead_letters(app),
            self.app_key(app),
        ]
        args: list[Arg] = [
            GROUP,
            entry.entry_id,
            reason,
            settings.broker_max_deliveries,
            settings.broker_tombstone_s,
            EVENTS,
        ]
        return _s(await self._fail(keys=keys, args=args))

    async def leave(self, app: str, consumer: str) -> None:
        await self._redis.zrem(self._workers_key(app), consumer)

    async def close(self) -> None:
        if self._listener is not None:
            self._listener.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._listener
        await self._redis.aclose()
