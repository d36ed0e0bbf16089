"""BrokerCore's own logic (validation, priority bands, waiting) over a typed in-memory fake queue."""

from __future__ import annotations

import contextlib
import fnmatch
from collections.abc import AsyncIterator, Sequence

import numpy as np
import pytest

from servefleet.api import broker_pb2, common_pb2
from servefleet.broker.core import BrokerCore, check_ticket
from servefleet.broker.keys import AppKeys, app_pattern, new_ticket, ticket_app
from servefleet.broker.queue import AppConfig, Entry, NextChange, RequestQueue, band_of
from servefleet.common.auth import Principal
from servefleet.common.config import settings
from servefleet.common.errors import InvalidArgument, NotFound
from servefleet.common.tensors import encode_request

State = broker_pb2.TicketStatus.State
TICKET = "team.llm." + "0" * 32
ADMIN = Principal("admin", "admin")


class FakeQueue(RequestQueue):
    """Holds submissions in a list; each change feed call moves the ticket one state on."""

    def __init__(self) -> None:
        self.submitted: list[tuple[str, int, int]] = []
        self.states: dict[str, list[int]] = {}
        self.feeds = 0

    async def register_app(self, app: str, config: AppConfig) -> None: ...

    async def submit(
        self, app: str, band: int, ticket: str, payload: bytes, ttl_s: int, idempotency_key: str
    ) -> tuple[str, bool]:
        self.submitted.append((app, band, ttl_s))
        return ticket, False

    async def status(self, ticket: str) -> broker_pb2.TicketStatus | None:
        states = self.states.get(ticket)
        return broker_pb2.TicketStatus(ticket=ticket, state=states[0]) if states else None  # type: ignore[arg-type]

    @contextlib.asynccontextmanager
    async def changes(self, ticket: str) -> AsyncIterator[NextChange]:
        self.feeds += 1

        async def next_change(timeout: float) -> int | None:
            self.states[ticket].pop(0)
            return None

        yield next_change

    async def cancel(self, ticket: str) -> broker_pb2.TicketStatus | None:
        return await self.status(ticket)

    async def ticket_app(self, ticket: str) -> str | None:
        return "team/llm" if ticket in self.states else None

    async def stats(self, app: str) -> broker_pb2.QueueStatsResponse:
        return broker_pb2.QueueStatsResponse()

    async def apps(self) -> list[str]:
        return sorted({app for app, _, _ in self.submitted})

    async def ensure_groups(self, app: str) -> None: ...

    async def take(self, app: str, consumer: str, count: int, block_ms: int) -> list[Entry]:
        raise AssertionError("workers only")

    async def reclaim(self, app: str, consumer: str, count: int, min_idle_ms: int) -> list[Entry]:
        raise AssertionError("workers only")

    async def heartbeat(self, app: str, consumer: str, entries: Sequence[Entry]) -> None: ...

    async def finish(self, app: str, entry: Entry, response: bytes) -> bool:
        raise AssertionError("workers only")

    async def fail(self, app: str, entry: Entry, reason: str) -> str:
        raise AssertionError("workers only")

    async def leave(self, app: str, consumer: str) -> None: ...

    async def close(self) -> None: ...


def submit_request(**kwargs: object) -> broker_pb2.SubmitRequest:
    payload = encode_request("m", {"x": np.zeros(2, dtype=np.float32)}).SerializeToString()
    fields = {"app": common_pb2.AppRef(namespace="team", name="llm"), "infer_request": payload, **kwargs}
    return broker_pb2.SubmitRequest(**fields)  # type: ignore[arg-type]


def test_tickets_name_their_app_and_its_keys_share_one_hash_tag() -> None:
    ticket = new_ticket("team/llm")
    assert check_ticket(ticket) == ticket and ticket_app(ticket) == "team/llm"
    for bad in ("", "xyz", "ab" * 16, "team.llm." + "AB" * 16, "team/llm." + "a" * 32, "t.l." + "a" * 33):
        with pytest.raises(InvalidArgument, match="malformed"):
            check_ticket(bad)
    keys = AppKeys("team/llm")
    every = [keys.config, *keys.streams, keys.ticket(ticket), keys.result(ticket), keys.dead_letters]
    every += [keys.idempotency("k"), keys.counter("submit", 1), keys.workers, keys.duplicates, keys.events]
    assert {key.split("{")[1].split("}")[0] for key in every} == {"team/llm"}
    assert all(fnmatch.fnmatchcase(key, app_pattern("team/llm")) for key in every)
    assert not fnmatch.fnmatchcase(AppKeys("team/other").config, app_pattern("team/llm"))


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"infer_request": b""}, "empty"),
        ({"infer_request": b"\x00" * (settings.broker_max_payload_bytes + 1)}, "over the broker's limit"),
        ({"infer_request": b"\xff\xff"}, "not a serialized ModelInferRequest"),
        ({"ttl_s": -1}, "out of range"),
        ({"ttl_s": settings.broker_max_result_ttl_s + 1}, "out of range"),
        ({"idempotency_key": "k" * 257}, "longer than 256"),
        ({"app": common_pb2.AppRef(namespace="Team", name="llm")}, "namespace"),
    ],
)
async def test_submit_rejects_bad_input_before_queueing(change: dict[str, object], message: str) -> None:
    queue = FakeQueue()
    with pytest.raises(InvalidArgument, match=message):
        await BrokerCore(queue).submit(ADMIN, submit_request(**change))
    assert queue.submitted == []


async def test_an_app_without_namespace_is_in_namespace_default() -> None:
    queue = FakeQueue()
    await BrokerCore(queue).submit(ADMIN, submit_request(app=common_pb2.AppRef(name="llm")))
    assert queue.submitted[0][0] == "default/llm"


async def test_priority_maps_to_three_bands() -> None:
    queue = FakeQueue()
    core = BrokerCore(queue)
    for priority in (7, 1, 0, -1, -9):
        reply = await core.submit(ADMIN, submit_request(priority=priority, ttl_s=5))
        assert ticket_app(reply.ticket) == "team/llm"
    assert [band for _, band, _ in queue.submitted] == [0, 0, 1, 2, 2]
    assert [band_of(p) for p in (1, 0, -1)] == [0, 1, 2]


async def test_get_result_waits_for_a_final_state_and_not_when_told_not_to() -> None:
    queue = FakeQueue()
    core = BrokerCore(queue)
    queue.states[TICKET] = [State.QUEUED, State.QUEUED, State.RUNNING, State.DONE]
    assert (await core.get_result(ADMIN, TICKET, 0)).state == State.QUEUED
    assert queue.feeds == 0  # no wait asked: no subscription
    assert (await core.get_result(ADMIN, TICKET, 30)).state == State.DONE
    watched = FakeQueue()
    watched.states[TICKET] = [State.QUEUED, State.RUNNING, State.RUNNING, State.DONE]
    assert [s.state async for s in BrokerCore(watched).watch(ADMIN, TICKET)] == [
        State.QUEUED,
        State.RUNNING,
        State.DONE,
    ]


async def test_unknown_ticket_and_bad_wait() -> None:
    core = BrokerCore(FakeQueue())
    with pytest.raises(NotFound, match="unknown"):
        await core.get_result(ADMIN, TICKET, 1)
    with pytest.raises(InvalidArgument, match="wait_timeout_s"):
        await core.get_result(ADMIN, TICKET, -1)
    with pytest.raises(NotFound):
        await core.cancel(ADMIN, TICKET)


async def test_a_tenant_sees_only_its_own_apps_and_tickets() -> None:
    queue = FakeQueue()
    core = BrokerCore(queue)
    queue.states[TICKET] = [State.QUEUED]
    owner, other = Principal("team", "tenant", ("team",)), Principal("beta", "tenant", ("beta",))
    assert await core.own_ticket(owner, TICKET) == TICKET
    with pytest.raises(NotFound, match="unknown"):
        await core.own_ticket(other, TICKET)  # exists, but not for this tenant
    with pytest.raises(NotFound, match="team/llm not found"):
        await core.submit(other, submit_request())
    with pytest.raises(NotFound):
        await core.stats(other, "team/llm")
    assert queue.submitted == []
