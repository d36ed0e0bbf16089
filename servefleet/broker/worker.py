"""PullWorker: the loop a deployment actor runs to serve an app's async requests from the broker.

Usage inside a (Ray) deployment actor, on the actor's event loop::

    source = from_broker(broker_address, endpoint_token, spec.app)  # the app's own Redis user
    worker = PullWorker(source, spec.app, consumer=f"{replica_id}", slots=4, handler=infer)
    await worker.start()          # registers the app with the broker, starts pulling
    ...
    await worker.stop(drain=True)  # finish what is running, then leave

``handler`` is ``async (ModelInferRequest) -> ModelInferResponse``: the same call the replica
serves synchronously, so one app serves both. The request carries its ticket in
``parameters["servefleet.ticket"]``. Nothing else is needed: the broker service only talks to
Redis, and this worker handles reclaiming, retries, dead letters and Redis restarts itself.

Credential: with ``from_broker`` the worker asks the broker (``GetWorkerCredential``, presenting
the app's endpoint token) for its app's Redis user, which may touch that app's keys only; when
Redis refuses it (rotated, removed, or Redis restarted and forgot it) the worker asks again. A
plain ``HOST:PORT`` or ``RedisTarget`` connects with whatever credential it carries.

Guarantees: the worker holds at most ``slots`` requests (it reads COUNT = free slots); a result
is stored and the entry acked in one atomic step; if this worker dies, its requests are taken
over by the app's other workers once idle for ``reclaim_idle_s``; a handler exception or a run
past ``exec_timeout_s`` counts as a failed delivery and the request is re-queued, until the
app's ``max_deliveries``, after which it is dead-lettered and its ticket FAILED.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

import grpc
from redis.exceptions import ResponseError
from tritonclient.grpc import service_pb2

from servefleet.api import broker_pb2, broker_pb2_grpc, common_pb2
from servefleet.broker.acl import target_of
from servefleet.broker.queue import TRANSIENT_ERRORS, AppConfig, Entry, RedisStreamQueue, RequestQueue
from servefleet.common.appid import AppId
from servefleet.common.channels import aio_channel
from servefleet.common.config import settings
from servefleet.common.errors import Unavailable, from_rpc_error
from servefleet.common.redis_target import RedisTarget, TargetSource, refused
from servefleet.common.retry import Backoff, RetryPolicy

log = logging.getLogger(__name__)

Handler = Callable[[service_pb2.ModelInferRequest], Awaitable[service_pb2.ModelInferResponse]]
TICKET_PARAMETER = "servefleet.ticket"
T = TypeVar("T")
#: Redis (or, for a credential, the broker) unreachable, or the credential refused: try again after
#: a capped, doubling, fully jittered pause (so a fleet of workers does not reconnect to a restarted
#: Redis in step), for as long as it takes.
REDIS_RETRY = RetryPolicy(
    Backoff(initial_s=0.1, max_s=2.0),
    retry_on=lambda exc: isinstance(exc, (*TRANSIENT_ERRORS, Unavailable)) or refused(exc),
)


def from_broker(broker: str, token: str, app: common_pb2.AppRef | str) -> TargetSource:
    """A source of ``app``'s Redis credential: the broker at ``broker``, asked with ``token`` (the
    app's endpoint token)."""
    ref = AppId.parse(app).ref()

    async def fetch() -> RedisTarget:
        async with aio_channel(broker, token=token) as channel:
            stub = broker_pb2_grpc.BrokerStub(channel)
            try:
                reply = await stub.GetWorkerCredential(
                    broker_pb2.WorkerCredentialRequest(app=ref), timeout=10
                )
            except grpc.RpcError as exc:
                raise from_rpc_error(exc) from None
        return target_of(reply)

    return fetch


class PullWorker:
    """Pulls an app's queued requests when it has a free slot and runs them with ``handler``.

    Args:
        redis_address: the broker's Redis: ``host:port[,...]`` (``settings.redis_mode``), a
            ``RedisTarget``, or where to get the app's credential (``from_broker``).
        app: the application (``AppRef`` or ``"namespace/name"``).
        consumer: this worker's name in the app's consumer group; unique per replica.
        slots: how many requests it runs at once.
        handler: ``async (ModelInferRequest) -> ModelInferResponse``.
        config: the app's ``ApplicationSpec.async_mode``; its non-zero limits are registered.
        reclaim_idle_s: take over other workers' requests pending this long.
        exec_timeout_s: a run longer than this counts as failed (None: no limit).
    """

    def __init__(
        self,
        redis_address: str | RedisTarget | TargetSource,
        app: common_pb2.AppRef | str,
        consumer: str,
        slots: int,
        handler: Handler,
        *,
        config: common_pb2.AsyncConfig | None = None,
        reclaim_idle_s: float = settings.broker_reclaim_idle_s,
        exec_timeout_s: float | None = None,
        block_ms: int = settings.broker_block_ms,
        queue: RequestQueue | None = None,
    ) -> None:
        if slots < 1:
            raise ValueError(f"slots must be >= 1, got {slots}")
        self.app = AppId.parse(app).key
        self.consumer = consumer
        self.slots = slots
        self._handler = handler
        self._config = AppConfig.from_proto(config)
        self._reclaim_idle_s = reclaim_idle_s
        self._exec_timeout_s = exec_timeout_s
        self._block_ms = block_ms
        self._source: TargetSource | None = None
        if queue is not None:
            self._queue = queue
        elif callable(redis_address):
            self._source = redis_address
        else:
            self._queue = RedisStreamQueue(redis_address)
            target = self._queue.target

            async def same() -> RedisTarget:
                return target

            self._source = same
        self._stale = not hasattr(self, "_queue")  # connect (again) before the next Redis call
        self._failures = 0  # Redis calls failed in a row
        self._connecting = asyncio.Lock()
        self._running: dict[str, tuple[Entry, asyncio.Task[None]]] = {}
        #: Entries whose handler returned, being stored or re-queued in Redis (not holding a slot).
        self._settling: dict[str, tuple[Entry, asyncio.Task[None]]] = {}
        self._backlog: list[Entry] = []
        self._slot_free = asyncio.Event()
        self._stopped = asyncio.Event()  # set by stop(): ends the loops, wakes the heartbeat's wait
        self._tasks: list[asyncio.Task[None]] = []
        #: Requests this worker ran to a stored result / whose result was a duplicate.
        self.completed = 0
        self.duplicates = 0

    def _failed(self, exc: BaseException) -> None:
        """Reconnect before the next call when Redis refused the credential (ask for a fresh one), or
        after every 5 failures in a row (a fresh client: one left on a layout from before a
        failover can keep calling a dead node)."""
        self._failures += 1
        self._stale = self._stale or refused(exc) or self._failures % 5 == 0

    async def _q(self) -> RequestQueue:
        """The queue, first reconnected (with a fresh credential) when ``_failed`` says so."""
        if self._stale and self._source is not None:
            async with self._connecting:
                if self._stale:
                    target = await self._source()
                    old = getattr(self, "_queue", None)
                    self._queue = RedisStreamQueue(target)
                    self._stale = False
                    if old is not None:
                        with contextlib.suppress(Exception):
                            await old.close()
        return self._queue

    async def start(self) -> None:
        await self._persist(lambda: self._q())
        await self._queue.register_app(self.app, self._config)
        await self._queue.ensure_groups(self.app)
        await self._queue.heartbeat(self.app, self.consumer, [])
        self._slot_free.set()
        self._tasks = [asyncio.create_task(self._pull_loop()), asyncio.create_task(self._heartbeat_loop())]

    async def stop(self, drain: bool = True) -> None:
        """Stop pulling. ``drain``: let running requests finish and store their results first
        (the pull loop ends after its current blocking read, at most ``block_ms``); otherwise
        cancel them, leaving them pending for other workers to reclaim."""
        self._stopped.set()
        self._slot_free.set()
        pull, beat = self._tasks or (None, None)
        if pull is not None:
            if not drain:
                pull.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await pull
        running = [task for _, task in self._running.values()]
        if not drain:
            for task in running:
                task.cancel()
        await asyncio.gather(*running, return_exceptions=True)
        await asyncio.gather(*(task for _, task in self._settling.values()), return_exceptions=True)
        if beat is not None:
            beat.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await beat
        if hasattr(self, "_queue"):  # connected (a worker with a credential source connects at start)
            with contextlib.suppress(*TRANSIENT_ERRORS):
                await self._queue.leave(self.app, self.consumer)
            await self._queue.close()

    @property
    def busy(self) -> int:
        return len(self._running)

    async def _pull_loop(self) -> None:
        next_reclaim = 0.0
        failures = 0
        while not self._stopped.is_set():
            try:
                await self._slot_free.wait()
                free = self.slots - len(self._running)
                while self._backlog and free > 0:
                    self._spawn(self._backlog.pop(0))
                    free -= 1
                if free <= 0 or self._stopped.is_set():
                    self._slot_free.clear()
                    continue
                entries: list[Entry] = []
                if time.monotonic() >= next_reclaim:
                    next_reclaim = time.monotonic() + self._reclaim_idle_s / 2
                    idle_ms = int(self._reclaim_idle_s * 1000)
                    entries = await (await self._q()).reclaim(self.app, self.consumer, free, idle_ms)
                if not entries:
                    entries = await (await self._q()).take(self.app, self.consumer, free, self._block_ms)
                # Only more than `free` if several bands woke one blocking read: run them next.
                for entry in entries:
                    if len(self._running) < self.slots:
                        self._spawn(entry)
                    else:
                        self._backlog.append(entry)
                failures = self._failures = 0
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                failures += 1
                await self._recover(exc, REDIS_RETRY.backoff.delay(failures))

    async def _recover(self, exc: Exception, pause: float) -> None:
        """Redis unreachable or restarted: wait, and recreate the consumer groups if they are gone;
        the credential refused: ask for a fresh one."""
        log.warning("pull worker %s/%s: %s; retrying", self.app, self.consumer, exc)
        self._failed(exc)
        await asyncio.sleep(pause)
        if isinstance(exc, ResponseError) and "NOGROUP" in str(exc):
            with contextlib.suppress(Exception):
                await (await self._q()).register_app(self.app, self._config)
                await self._queue.ensure_groups(self.app)

    async def _heartbeat_loop(self) -> None:
        """Keep running entries fresh (no one reclaims them) and the app registered. Ends on
        ``_stopped`` rather than relying on cancellation alone: a cancel that lands as a Redis call
        returns can be swallowed (CPython 3.11's ``wait_for`` race), and ``stop`` would wait forever."""
        while not self._stopped.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopped.wait(), self._reclaim_idle_s / 3)
            if self._stopped.is_set():
                return
            try:
                await (await self._q()).register_app(self.app, self._config)
                held = [entry for entry, _ in (*self._running.values(), *self._settling.values())]
                await self._queue.heartbeat(self.app, self.consumer, held)
            except Exception as exc:
                await self._recover(exc, 0.0)

    def _spawn(self, entry: Entry) -> None:
        task = asyncio.create_task(self._run(entry))
        self._running[entry.entry_id] = (entry, task)
        if len(self._running) >= self.slots:
            self._slot_free.clear()

        def done(_: asyncio.Task[None]) -> None:
            self._running.pop(entry.entry_id, None)
            self._slot_free.set()

        task.add_done_callback(done)

    async def _persist(self, call: Callable[[], Awaitable[T]]) -> T:
        """Run a queue call until Redis answers: a result computed is never dropped for a blip."""

        def retrying(exc: BaseException, _: float) -> None:
            log.warning("pull worker %s/%s: redis: %s; retrying", self.app, self.consumer, exc)
            self._failed(exc)

        async def attempt() -> T:
            await self._q()
            out = await call()
            self._failures = 0
            return out

        return await REDIS_RETRY.run(attempt, on_retry=retrying)

    async def _run(self, entry: Entry) -> None:
        """Run one started entry; its slot frees when the handler returns, and the result is
        stored (or the failure recorded) in the background, so the next pull overlaps it."""
        try:
            request = service_pb2.ModelInferRequest.FromString(entry.payload)
            request.parameters[TICKET_PARAMETER].string_param = entry.ticket
            response = await asyncio.wait_for(self._handler(request), self._exec_timeout_s)
        except asyncio.CancelledError:
            raise  # stop(drain=False): left pending, another worker reclaims it
        except Exception as exc:
            reason = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
            log.warning("request %s failed on %s: %s", entry.ticket, self.consumer, reason)
            self._settle(entry, lambda: self._queue.fail(self.app, entry, reason))
            return
        payload = response.SerializeToString()
        self._settle(entry, lambda: self._queue.finish(self.app, entry, payload))

    def _settle(self, entry: Entry, call: Callable[[], Awaitable[object]]) -> None:
        async def settle() -> None:
            outcome = await self._persist(call)
            if outcome is True:
                self.completed += 1
            elif outcome is False:
                self.duplicates += 1

        task = asyncio.create_task(settle())
        self._settling[entry.entry_id] = (entry, task)
        task.add_done_callback(lambda _: self._settling.pop(entry.entry_id, None))
