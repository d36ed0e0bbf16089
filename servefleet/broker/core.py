"""Broker core: asynchronous inference requests queued per application, pulled by its replicas.

Contract (what a client may rely on):

- ``submit`` answers with a ticket as soon as the request is queued. The same idempotency key
  for the same app answers the same ticket (``duplicate=True``) for as long as the ticket lives.
- An app is *known* when its workers (``PullWorker.start``) or the platform registered it with
  the broker; Submit to any other app is NOT_FOUND. Each app's unfinished work (queued plus
  running) is bounded: over the bound Submit answers RESOURCE_EXHAUSTED; queued work is never
  trimmed.
- Priority: three bands (priority > 0, == 0, < 0), each its own Redis stream; a worker always
  takes from the highest non-empty band. Within a band, first in, first out.
- Every queued request runs to a final state: DONE, FAILED (its handler failed, or it was
  delivered ``max_deliveries`` times, for instance because each worker running it died; it is
  then in the app's dead-letter stream with the reason) or CANCELLED. A request may *execute*
  more than once (a worker that died, or stalled past the reclaim threshold, is taken over),
  but its result is stored once: the first to finish wins and later runs are counted as
  ``duplicate_executions``.
- Results live ``ttl_s`` (default: the app's ``result_ttl_s``); then the ticket reads EXPIRED
  for ``broker_tombstone_s`` more, then NOT_FOUND.

Durability across a Redis restart (Redis runs with ``appendonly yes`` and, by default,
``appendfsync always``: ``launch.REDIS_APPENDFSYNC``): Redis writes and fsyncs each write to its
AOF before it answers, so whether the Redis process dies (crash, SIGKILL, OOM kill) or the
machine does, every acknowledged Submit, result and ack survives its restart from the AOF. With
``everysec`` (a person's choice, for Redis throughput) Redis postpones its AOF write up to 2 s
while the last second's fsync is still running and answers meanwhile, so even a SIGKILL of the
process can lose those writes.

While Redis is down, Submit/GetResult answer UNAVAILABLE and workers keep their finished
results in memory, storing them when Redis is back.

Metrics: Submits by app, and each app's queue depth, in-flight work, oldest entry's age, submit and
complete rates and dead letters, refreshed by ``publish_stats`` (the entry point calls it every
``broker_stats_interval_s``).
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import AsyncIterator
from typing import cast

from google.protobuf.message import DecodeError
from prometheus_client import Counter, Gauge
from tritonclient.grpc import service_pb2

from servefleet.api import broker_pb2, common_pb2
from servefleet.broker.acl import WorkerCredentials
from servefleet.broker.keys import new_ticket, ticket_app
from servefleet.broker.queue import AppConfig, RequestQueue, State, band_of
from servefleet.common import metrics
from servefleet.common.appid import AppId
from servefleet.common.auth import Principal
from servefleet.common.config import settings
from servefleet.common.errors import FailedPrecondition, InvalidArgument, NotFound, ServefleetError

log = logging.getLogger(__name__)

SUBMITTED = Counter(
    "servefleet_broker_submitted_total",
    "Requests queued (idempotent repeats not counted), by app.",
    ["app"],
    registry=metrics.REGISTRY,
)
QUEUE = {
    field: Gauge(f"servefleet_broker_{name}", help, ["app"], registry=metrics.REGISTRY)
    for field, name, help in (
        ("depth", "queue_depth", "Requests queued and not yet delivered to a worker."),
        ("in_flight", "in_flight", "Requests delivered to a worker and not yet finished."),
        ("oldest_age_s", "queue_oldest_age_seconds", "Age of the oldest undelivered request."),
        ("submit_rate", "submit_rate", "Requests submitted per second (recent window)."),
        ("complete_rate", "complete_rate", "Requests finished per second (recent window)."),
        ("dead_letters", "dead_letters", "Entries in the app's dead-letter stream."),
        ("workers", "workers", "Workers seen pulling recently."),
    )
}

FINAL = frozenset({State.DONE, State.FAILED, State.EXPIRED, State.CANCELLED})
#: Waiters re-read the ticket at least this often, in case a change event was lost (Redis
#: restarted, pub/sub reconnecting): it bounds the extra latency of a lost event.
_REPOLL_S = 5.0


def _label(app: str) -> str:
    """The ``app`` label every part uses (the KServe model name: no ``default/``)."""
    return AppId.parse(app).model_name


def check_ticket(ticket: str) -> str:
    """``ticket`` if well formed (it names its app: ``keys.new_ticket``); InvalidArgument if not."""
    ticket_app(ticket)
    return ticket


class BrokerCore:
    """Validation and waiting over a RequestQueue; no gRPC here."""

    def __init__(self, queue: RequestQueue, credentials: WorkerCredentials | None = None) -> None:
        self.queue = queue
        self.credentials = credentials

    async def worker_credential(
        self, who: Principal, app: common_pb2.AppRef | str, *, rotate: bool = False
    ) -> broker_pb2.WorkerCredential:
        """The Redis credential of ``app``'s pull workers: only its own endpoint token gets it."""
        parsed = AppId.parse(app)
        who.require_serves(parsed.namespace, parsed.name, "pull the broker work of")
        if self.credentials is None:
            raise FailedPrecondition("this broker hands out no worker credentials (built without them)")
        return await self.credentials.issue(parsed.key, rotate=rotate)

    async def register_app(self, app: common_pb2.AppRef | str, config: AppConfig | None = None) -> None:
        """Enable an app for async requests (its workers do this on start)."""
        await self.queue.register_app(AppId.parse(app).key, config or AppConfig())

    async def own_ticket(self, who: Principal, ticket: str) -> str:
        """``ticket`` when it belongs to an app ``who`` sees; another tenant's is NOT_FOUND."""
        app = await self.queue.ticket_app(check_ticket(ticket))
        if app is None or not who.sees(AppId.parse(app).namespace):
            raise NotFound(f"ticket {ticket} is unknown (never issued, or expired long ago)")
        return ticket

    async def submit(self, who: Principal, request: broker_pb2.SubmitRequest) -> broker_pb2.SubmitResponse:
        parsed = AppId.parse(request.app)
        who.require_visible(parsed.namespace, parsed.name, "app")
        app = parsed.key
        payload = request.infer_request
        if not payload:
            raise InvalidArgument("infer_request is empty: send a serialized inference.ModelInferRequest")
        if len(payload) > settings.broker_max_payload_bytes:
            raise InvalidArgument(
                f"infer_request is {len(payload)} bytes, over the broker's limit of "
                f"{settings.broker_max_payload_bytes} (SERVEFLEET_BROKER_MAX_PAYLOAD_BYTES)"
            )
        try:
            service_pb2.ModelInferRequest.FromString(payload)
        except DecodeError as exc:
            raise InvalidArgument(f"infer_request is not a serialized ModelInferRequest: {exc}") from None
        if not 0 <= request.ttl_s <= settings.broker_max_result_ttl_s:
            raise InvalidArgument(
                f"ttl_s {request.ttl_s} out of range [0, {settings.broker_max_result_ttl_s}] (0: app default)"
            )
        if len(request.idempotency_key) > 256:
            raise InvalidArgument("idempotency_key is longer than 256 characters")
        ticket, duplicate = await self.queue.submit(
            app,
            band_of(request.priority),
            new_ticket(app),
            payload,
            request.ttl_s,
            request.idempotency_key,
        )
        if not duplicate:
            SUBMITTED.labels(_label(app)).inc()
        return broker_pb2.SubmitResponse(ticket=ticket, duplicate=duplicate)

    async def status(self, ticket: str) -> broker_pb2.TicketStatus:
        status = await self.queue.status(check_ticket(ticket))
        if status is None:
            raise NotFound(f"ticket {ticket} is unknown (never issued, or expired long ago)")
        return status

    async def get_result(self, who: Principal, ticket: str, wait_timeout_s: float) -> broker_pb2.TicketStatus:
        """The ticket's status once final, or its current status after ``wait_timeout_s``."""
        if math.isnan(wait_timeout_s) or wait_timeout_s < 0:
            raise InvalidArgument(f"wait_timeout_s must be >= 0, got {wait_timeout_s}")
        await self.own_ticket(who, ticket)
        deadline = time.monotonic() + min(wait_timeout_s, settings.broker_max_wait_s)
        status = await self.status(ticket)
        if status.state in FINAL or wait_timeout_s == 0:
            return status
        async with self.queue.changes(ticket) as next_change:
            status = await self.status(ticket)  # again, now that no change can slip by
            while status.state not in FINAL and (left := deadline - time.monotonic()) > 0:
                change = await next_change(min(left, _REPOLL_S))
                if change is None or change in FINAL:  # read the result only when there is one
                    status = await self.status(ticket)
                else:
                    status.state = cast(State, change)
        return status

    async def watch(self, who: Principal, ticket: str) -> AsyncIterator[broker_pb2.TicketStatus]:
        """Every state the ticket passes through, ending with the final one (with its result)."""
        await self.own_ticket(who, ticket)
        last = None
        async with self.queue.changes(check_ticket(ticket)) as next_change:
            while True:
                status = await self.status(ticket)
                if status.state != last:
                    yield status
                    last = status.state
                if status.state in FINAL:
                    return
                await next_change(_REPOLL_S)

    async def cancel(self, who: Principal, ticket: str) -> broker_pb2.TicketStatus:
        """Cancel a queued or running request; a final ticket is returned unchanged.

        A running request is not interrupted: its result is discarded when it finishes."""
        await self.own_ticket(who, ticket)
        status = await self.queue.cancel(check_ticket(ticket))
        if status is None:
            raise NotFound(f"ticket {ticket} is unknown (never issued, or expired long ago)")
        return status

    async def stats(self, who: Principal, app: common_pb2.AppRef | str) -> broker_pb2.QueueStatsResponse:
        parsed = AppId.parse(app)
        who.require_visible(parsed.namespace, parsed.name, "app")
        return await self.queue.stats(parsed.key)

    async def publish_stats(self) -> None:
        """Set every app's queue gauges from one ``stats`` read each (Redis down: left as they were)."""
        try:
            for app in await self.queue.apps():
                stats = await self.queue.stats(app)
                for field, gauge in QUEUE.items():
                    gauge.labels(_label(app)).set(getattr(stats, field))
        except ServefleetError as exc:
            log.warning("queue stats not refreshed: %s", exc)

    async def publish_stats_forever(self, interval_s: float) -> None:
        while True:
            await self.publish_stats()
            await asyncio.sleep(interval_s)

    async def close(self) -> None:
        await self.queue.close()
        if self.credentials is not None:
            await self.credentials.close()
