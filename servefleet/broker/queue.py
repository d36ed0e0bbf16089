"""The broker's request queue: a small interface, and its Redis Streams implementation.

Layout in Redis (``keys.py``; every key and the channel of an app carry the hash tag
``{namespace/name}``, so all of an app lives in one Redis Cluster slot and every multi-key step is
one Lua script, atomic on that slot; the scripts are the files in ``lua/``). ``P`` below is
``sf:broker:{namespace/name}:``:

- ``P app`` (hash): the app is *known* to the broker. Written by its workers when they start
  (``PullWorker.start``) and on every heartbeat, or by the platform; holds the app's
  ``max_stream_length``, ``max_deliveries`` and ``result_ttl_s``.
- ``P q:<band>`` (stream, consumer group ``workers``): queued work, one stream per priority band
  (``high`` for priority > 0, ``normal`` for 0, ``low`` for < 0). Workers drain the bands strictly
  in that order. An entry is deleted (XDEL) when it is acked, so the summed stream length is
  exactly the unfinished work, and Submit refuses work over ``max_stream_length``
  (RESOURCE_EXHAUSTED) instead of trimming.
- ``P t:<ticket>`` (hash): the ticket's state machine (QUEUED, RUNNING, DONE, FAILED, CANCELLED),
  deliveries, last error. ``P r:<ticket>``: the serialized response, which expires after the
  result TTL; the hash outlives it by ``broker_tombstone_s`` so a late reader hears EXPIRED
  rather than NOT_FOUND. A ticket names its app (``keys.new_ticket``).
- ``P dlq`` (stream): dead letters (ticket, payload, reason), kept until an operator removes them;
  QueueStats reports their count.
- Channel ``P events``: "ticket STATE" on every change, so waiters wake at once (the broker
  listens to every app's with one PSUBSCRIBE; waiters also re-read the ticket every
  ``broker.core._REPOLL_S`` (5 s), so a lost message only costs latency).

Works on one Redis, a Redis Cluster and a Sentinel-managed primary (``common.redis_target``).
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

from redis.exceptions import RedisError, ResponseError

from servefleet.api import broker_pb2, common_pb2
from servefleet.broker.keys import BANDS, CONFIG_PATTERN, EVENTS_PATTERN, AppKeys, ticket_app
from servefleet.common.config import settings
from servefleet.common.errors import NotFound, ResourceExhausted, Unavailable
from servefleet.common.redis_target import UNREACHABLE, RedisTarget

log = logging.getLogger(__name__)

State = broker_pb2.TicketStatus.State
GROUP = "workers"
#: Counters are bucketed by this many seconds; rates average the last RATE_WINDOW_S.
RATE_BUCKET_S = 5
RATE_WINDOW_S = 60
#: Errors that mean "Redis is not reachable right now": retry later, answer UNAVAILABLE.
TRANSIENT_ERRORS = UNREACHABLE


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
        self,
        target: str | RedisTarget,
        *,
        max_connections: int = 64,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.target = RedisTarget.parse(target)
        self.address = self.target.text
        self._clock = clock
        self._max_connections = max_connections
        self._failures = 0  # calls in a row that found Redis unreachable
        self._retired: set[asyncio.Task[None]] = set()
        self._connect()
        self._waiters: dict[str, set[asyncio.Queue[int | None]]] = defaultdict(set)
        self._subscribed = asyncio.Event()
        self._listener: asyncio.Task[None] | None = None

    def _connect(self) -> None:
        # Callers beyond max_connections wait for a free connection rather than fail: a burst of
        # GetResult waiters holds connections only for short reads (they sleep on pub/sub).
        self._redis = self.target.client(max_connections=self._max_connections)
        self._submit = self._redis.register_script(lua_script("submit"))
        self._take = self._redis.register_script(lua_script("take"))
        self._start = self._redis.register_script(lua_script("start"))
        self._finish = self._redis.register_script(lua_script("finish"))
        self._fail = self._redis.register_script(lua_script("fail"))
        self._cancel = self._redis.register_script(lua_script("cancel"))

    def _reconnect(self) -> None:
        """A fresh client: a cluster client left on the layout and sockets of a cluster that
        restarted can keep failing on them (the worker replaces its queue the same way). The old
        one is closed a little later, once calls still on it have ended."""
        old = self._redis
        self._connect()

        async def close_later() -> None:
            await asyncio.sleep(5.0)
            with contextlib.suppress(Exception):
                await old.aclose()

        task = asyncio.get_running_loop().create_task(close_later())
        self._retired.add(task)
        task.add_done_callback(self._retired.discard)

    # --- keys (layout: keys.py) ---
    @staticmethod
    def keys(app: str) -> AppKeys:
        return AppKeys(app)

    @classmethod
    def dead_letters(cls, app: str) -> str:
        return cls.keys(app).dead_letters

    def _counter(self, app: str, kind: str, bucket: int | None = None) -> str:
        bucket = int(self._clock() // RATE_BUCKET_S) if bucket is None else bucket
        return self.keys(app).counter(kind, bucket)

    @contextlib.asynccontextmanager
    async def _reachable(self) -> AsyncIterator[None]:
        """Redis down -> UNAVAILABLE (the caller may retry), once for every client-side call; every
        5th failure in a row reconnects."""
        try:
            yield
        except TRANSIENT_ERRORS as exc:
            self._failures += 1
            if self._failures % 5 == 0:
                self._reconnect()
            raise Unavailable(f"broker queue (redis {self.address}) unreachable: {exc!r}") from exc
        self._failures = 0

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
        await self._redis.hset(self.keys(app).config, mapping=fields)

    async def submit(
        self, app: str, band: int, ticket: str, payload: bytes, ttl_s: int, idempotency_key: str
    ) -> tuple[str, bool]:
        k = self.keys(app)
        keys = [
            k.config,
            k.stream(band),
            k.ticket(ticket),
            k.idempotency(idempotency_key),
            self._counter(app, "submit"),
            *k.streams,
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
        k = self.keys(ticket_app(ticket))
        async with self._reachable():  # two reads, not a pipeline: see redis_target._Cluster
            raw = await self._redis.hgetall(k.ticket(ticket))
            response = await self._redis.get(k.result(ticket))
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
        app = ticket_app(ticket)
        async with self._reachable():
            found = await self._redis.hget(self.keys(app).ticket(ticket), "state")
        return app if found else None

    async def cancel(self, ticket: str) -> broker_pb2.TicketStatus | None:
        k = self.keys(ticket_app(ticket))
        async with self._reachable():
            band = await self._redis.hget(k.ticket(ticket), "band")
            if band is None:
                return None
            await self._cancel(
                keys=[k.ticket(ticket), k.stream(int(_s(band)))], args=[settings.broker_tombstone_s, k.events]
            )
        return await self.status(ticket)

    async def apps(self) -> list[str]:
        async with self._reachable():
            keys = {_s(k) async for k in self._redis.scan_iter(match=CONFIG_PATTERN, count=500)}
        return sorted(k[k.index("{") + 1 : k.index("}")] for k in keys)

    async def stats(self, app: str) -> broker_pb2.QueueStatsResponse:
        now = self._clock()
        bucket = int(now // RATE_BUCKET_S)
        buckets = range(bucket - RATE_WINDOW_S // RATE_BUCKET_S, bucket)
        async with self._reachable():
            k = self.keys(app)
            if not await self._redis.exists(k.config):
                raise NotFound(f"app {app!r} is not enabled for async requests")
            await self.ensure_groups(app)
            pipe = self._redis.pipeline(transaction=False)
            for band in range(len(BANDS)):
                pipe.xlen(k.stream(band))
                pipe.xpending(k.stream(band), GROUP)
                pipe.xinfo_groups(k.stream(band))
            pipe.xlen(k.dead_letters)
            pipe.get(k.duplicates)
            pipe.zcount(k.workers, now - 3 * settings.broker_reclaim_idle_s, "+inf")
            for kind in ("submit", "complete"):  # GETs: a cluster pipeline refuses MGET
                for b in buckets:
                    pipe.get(self._counter(app, kind, b))
            replies = await pipe.execute()
            out = broker_pb2.QueueStatsResponse()
            oldest: list[float] = []
            for band in range(len(BANDS)):
                length, pending, groups = replies[3 * band : 3 * band + 3]
                in_flight = int(pending["pending"])
                out.in_flight += in_flight
                out.depth += max(0, int(length) - in_flight)
                last = next((_s(g["last-delivered-id"]) for g in groups if _s(g["name"]) == GROUP), "0-0")
                first = await self._redis.xrange(k.stream(band), f"({last}", "+", count=1)
                if first:
                    oldest.append(int(_s(first[0][0]).split("-")[0]) / 1000)
        dead, dups, workers = replies[3 * len(BANDS) : 3 * len(BANDS) + 3]
        submits = replies[3 * len(BANDS) + 3 :][: len(buckets)]
        completes = replies[3 * len(BANDS) + 3 + len(buckets) :]
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
        """Fan every app's events channel out to local waiters; reconnects on its own. (On a Redis
        Cluster a PUBLISH reaches every node, so one subscription on any node hears every app.)"""
        while True:
            pubsub = self._redis.pubsub(ignore_subscribe_messages=True)
            try:
                await pubsub.psubscribe(EVENTS_PATTERN)
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
                await self._redis.xgroup_create(self.keys(app).stream(band), GROUP, id="0", mkstream=True)
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
        k = self.keys(app)
        keys = [k.dead_letters, k.config, *k.streams]
        args: list[Arg] = [
            GROUP,
            consumer,
            settings.broker_max_deliveries,
            settings.broker_tombstone_s,
            int(self._clock()),
            k.events,
            k.ticket_prefix,
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
        streams: dict[Any, Any] = {stream: ">" for stream in self.keys(app).streams}
        reply = await self._redis.xreadgroup(GROUP, consumer, streams, count=count, block=block_ms)
        return await self._started(app, consumer, self._entries(reply))

    async def reclaim(self, app: str, consumer: str, count: int, min_idle_ms: int) -> list[Entry]:
        out: list[Entry] = []
        for band in range(len(BANDS)):
            if len(out) >= count:
                break
            stream = self.keys(app).stream(band)
            reply = await self._redis.xautoclaim(
                stream, GROUP, consumer, min_idle_ms, "0-0", count=count - len(out)
            )
            out += self._entries([(stream.encode(), reply[1])])
        return await self._started(app, consumer, out)

    async def heartbeat(self, app: str, consumer: str, entries: Sequence[Entry]) -> None:
        await self._redis.zadd(self.keys(app).workers, {consumer: self._clock()})
        for band in range(len(BANDS)):
            ids: list[Any] = [e.entry_id for e in entries if e.band == band]
            if ids:
                await self._redis.xclaim(self.keys(app).stream(band), GROUP, consumer, 0, ids, justid=True)

    async def finish(self, app: str, entry: Entry, response: bytes) -> bool:
        k = self.keys(app)
        keys = [
            k.ticket(entry.ticket),
            k.result(entry.ticket),
            k.stream(entry.band),
            self._counter(app, "complete"),
            k.duplicates,
        ]
        args: list[Arg] = [
            GROUP,
            entry.entry_id,
            response,
            settings.broker_tombstone_s,
            k.events,
            RATE_WINDOW_S + 2 * RATE_BUCKET_S,
        ]
        return bool(await self._finish(keys=keys, args=args))

    async def fail(self, app: str, entry: Entry, reason: str) -> str:
        k = self.keys(app)
        keys = [k.ticket(entry.ticket), k.stream(entry.band), k.dead_letters, k.config]
        args: list[Arg] = [
            GROUP,
            entry.entry_id,
            reason,
            settings.broker_max_deliveries,
            settings.broker_tombstone_s,
            k.events,
        ]
        return _s(await self._fail(keys=keys, args=args))

    async def leave(self, app: str, consumer: str) -> None:
        await self._redis.zrem(self.keys(app).workers, consumer)

    async def close(self) -> None:
        if self._listener is not None:
            self._listener.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._listener
        await self._redis.aclose()
