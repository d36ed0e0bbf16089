"""The broker's request queue: a small interface, and its Redis Streams implementation.

Layout in Redis (one logical database; every multi-key step is one Lua script, so each is atomic):

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
  also re-read every second, so a lost message only costs latency).

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
from typing import Any, cast

import redis.asyncio as aioredis
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
    async def stats(self, app: str) -> broker_pb2.QueueStatsResponse: ...

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


# Shared Lua helpers, prepended to the scripts that end or dead-letter a ticket.
_LIB = """
local function ack(stream, group, id)
  redis.call('XACK', stream, group, id)
  redis.call('XDEL', stream, id)
end
local function settle(th, state, err, tomb, channel)
  redis.call('HSET', th, 'state', state, 'error', err)
  local keep = tonumber(redis.call('HGET', th, 'ttl_s') or '0') + tonumber(tomb)
  redis.call('EXPIRE', th, keep)
  local idem = redis.call('HGET', th, 'idem')
  if idem and idem ~= '' then redis.call('EXPIRE', idem, keep) end
  redis.call('PUBLISH', channel, redis.call('HGET', th, 'ticket') .. ' ' .. state)
end
local function payload_of(stream, id)
  local e = redis.call('XRANGE', stream, id, id)
  if not e[1] then return '' end
  local f = e[1][2]
  for i = 1, #f, 2 do if f[i] == 'payload' then return f[i + 1] end end
  return ''
end
local function dead_letter(th, stream, dlq, group, id, reason, tomb, channel)
  redis.call('XADD', dlq, '*', 'ticket', redis.call('HGET', th, 'ticket'),
    'payload', payload_of(stream, id), 'reason', reason)
  ack(stream, group, id)
  settle(th, 'FAILED', reason, tomb, channel)
end
local function live(state) return state == 'QUEUED' or state == 'RUNNING' end
"""

# KEYS: app, target stream, ticket hash, idempotency key, submit counter, band streams...
# ARGV: ticket, payload, ttl_s, max_age_s, default max length, default ttl, app, band,
#       use idempotency ('1'/'0'), created (unix s), counter ttl
_SUBMIT = """
if redis.call('EXISTS', KEYS[1]) == 0 then return {'unknown'} end
if ARGV[9] == '1' then
  local seen = redis.call('GET', KEYS[4])
  if seen then return {'dup', seen} end
end
local max = tonumber(redis.call('HGET', KEYS[1], 'max_stream_length') or ARGV[5])
local total = 0
for i = 6, #KEYS do total = total + redis.call('XLEN', KEYS[i]) end
if total >= max then return {'full', tostring(total), tostring(max)} end
local ttl = tonumber(ARGV[3])
if ttl <= 0 then ttl = tonumber(redis.call('HGET', KEYS[1], 'result_ttl_s') or ARGV[6]) end
local id = redis.call('XADD', KEYS[2], '*', 'ticket', ARGV[1], 'payload', ARGV[2])
local idem = ''
if ARGV[9] == '1' then
  idem = KEYS[4]
  redis.call('SET', KEYS[4], ARGV[1], 'EX', ARGV[4])
end
redis.call('HSET', KEYS[3], 'ticket', ARGV[1], 'app', ARGV[7], 'band', ARGV[8], 'entry_id', id,
  'state', 'QUEUED', 'ttl_s', ttl, 'created', ARGV[10], 'deliveries', 0, 'idem', idem)
redis.call('EXPIRE', KEYS[3], ARGV[4])
redis.call('INCR', KEYS[5])
redis.call('EXPIRE', KEYS[5], ARGV[11])
return {'ok', ARGV[1]}
"""

# Starting an entry: skip it if its ticket is final or it is a stale copy, dead-letter it when
# delivered more than max_deliveries times, else mark it RUNNING. Shared by _TAKE and _START.
# KEYS: dlq, app, band streams...  ARGV: group, consumer, default max deliveries, tombstone s,
#       now, channel, ticket key prefix, then (_TAKE) count or (_START) band/id/ticket triples
_STARTER = (
    _LIB
    + """
local function start_entry(band, id, ticket)
  local th, stream = ARGV[7] .. ticket, KEYS[2 + band]
  local state = redis.call('HGET', th, 'state')
  if not live(state) or redis.call('HGET', th, 'entry_id') ~= id then
    ack(stream, ARGV[1], id)
    return 'skip'
  end
  local d = redis.call('HINCRBY', th, 'deliveries', 1)
  local max = tonumber(redis.call('HGET', KEYS[2], 'max_deliveries') or ARGV[3])
  if d > max then
    local last = redis.call('HGET', th, 'last_error') or 'the worker running it stopped or died'
    dead_letter(th, stream, KEYS[1], ARGV[1], id,
      'gave up after ' .. max .. ' deliveries; last: ' .. last, ARGV[4], ARGV[6])
    return 'dead'
  end
  redis.call('HSET', th, 'state', 'RUNNING', 'worker', ARGV[2], 'started', ARGV[5],
    'last_error', 'worker ' .. ARGV[2] .. ' stopped or died while running it')
  redis.call('PUBLISH', ARGV[6], ticket .. ' RUNNING')
  return 'run'
end
"""
)

# Read up to `count` new entries, highest band first, and start them: one round trip per pull.
_TAKE = (
    _STARTER
    + """
local out, want = {}, tonumber(ARGV[8])
for band = 1, #KEYS - 2 do
  while want > 0 do
    local reply = redis.call('XREADGROUP', 'GROUP', ARGV[1], ARGV[2], 'COUNT', want,
      'STREAMS', KEYS[2 + band], '>')
    if not reply then break end
    for _, e in ipairs(reply[1][2]) do
      local f, ticket, payload = e[2], '', ''
      for i = 1, #f, 2 do
        if f[i] == 'ticket' then ticket = f[i + 1] elseif f[i] == 'payload' then payload = f[i + 1] end
      end
      if start_entry(band, e[1], ticket) == 'run' then
        table.insert(out, band - 1); table.insert(out, e[1])
        table.insert(out, ticket); table.insert(out, payload)
        want = want - 1
      end
    end
  end
end
return out
"""
)

# Start entries already delivered (reclaimed, or woken by a blocking read); their verdicts.
_START = (
    _STARTER
    + """
local out = {}
for i = 8, #ARGV, 3 do
  table.insert(out, start_entry(tonumber(ARGV[i]) + 1, ARGV[i + 1], ARGV[i + 2]))
end
return out
"""
)

# KEYS: ticket hash, result, stream, completion counter, duplicate counter
# ARGV: group, entry id, response, tombstone s, channel, counter ttl
_FINISH = (
    _LIB
    + """
local state = redis.call('HGET', KEYS[1], 'state')
ack(KEYS[3], ARGV[1], ARGV[2])
if not live(state) then
  if state and state ~= 'CANCELLED' then redis.call('INCR', KEYS[5]) end
  return 0
end
local ttl = tonumber(redis.call('HGET', KEYS[1], 'ttl_s'))
redis.call('SET', KEYS[2], ARGV[3], 'EX', ttl)
settle(KEYS[1], 'DONE', '', ARGV[4], ARGV[5])
redis.call('INCR', KEYS[4])
redis.call('EXPIRE', KEYS[4], ARGV[6])
return 1
"""
)

# KEYS: ticket hash, stream, dlq, app.  ARGV: group, entry id, reason, default max deliveries,
# tombstone s, channel
_FAIL = (
    _LIB
    + """
local state = redis.call('HGET', KEYS[1], 'state')
if not live(state) or redis.call('HGET', KEYS[1], 'entry_id') ~= ARGV[2] then
  ack(KEYS[2], ARGV[1], ARGV[2])
  return 'skip'
end
redis.call('HSET', KEYS[1], 'last_error', ARGV[3])
local d = tonumber(redis.call('HGET', KEYS[1], 'deliveries'))
local max = tonumber(redis.call('HGET', KEYS[4], 'max_deliveries') or ARGV[4])
if d >= max then
  dead_letter(KEYS[1], KEYS[2], KEYS[3], ARGV[1], ARGV[2],
    'failed ' .. d .. ' times; last: ' .. ARGV[3], ARGV[5], ARGV[6])
  return 'dead'
end
local ticket = redis.call('HGET', KEYS[1], 'ticket')
local nid = redis.call('XADD', KEYS[2], '*', 'ticket', ticket, 'payload', payload_of(KEYS[2], ARGV[2]))
ack(KEYS[2], ARGV[1], ARGV[2])
redis.call('HSET', KEYS[1], 'entry_id', nid, 'state', 'QUEUED')
redis.call('PUBLISH', ARGV[6], ticket .. ' QUEUED')
return 'retry'
"""
)

# KEYS: ticket hash, stream.  ARGV: tombstone s, channel
_CANCEL = (
    _LIB
    + """
local state = redis.call('HGET', KEYS[1], 'state')
if not state then return false end
if not live(state) then return state end
if state == 'QUEUED' then redis.call('XDEL', KEYS[2], redis.call('HGET', KEYS[1], 'entry_id')) end
settle(KEYS[1], 'CANCELLED', 'cancelled by the client', ARGV[1], ARGV[2])
return 'CANCELLED'
"""
)


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
        pool = aioredis.BlockingConnectionPool(host=host, port=port, max_connections=max_connections)
        self._redis = aioredis.Redis(connection_pool=pool)
        self._submit = self._redis.register_script(_SUBMIT)
        self._take = self._redis.register_script(_TAKE)
        self._start = self._redis.register_script(_START)
        self._finish = self._redis.register_script(_FINISH)
        self._fail = self._redis.register_script(_FAIL)
        self._cancel = self._redis.register_script(_CANCEL)
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
