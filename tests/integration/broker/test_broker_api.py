"""The broker's RPCs over real Redis: precise codes for bad input, idempotency, priority,
cancel, watch, expiry, the stream bound and queue stats."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable

import grpc
import numpy as np
import pytest
from tritonclient.grpc import service_pb2

from servefleet.api import broker_pb2, broker_pb2_grpc, common_pb2
from servefleet.broker.keys import new_ticket, ticket_app
from servefleet.broker.queue import AppConfig
from servefleet.broker.worker import PullWorker
from servefleet.common.channels import aio_channel
from servefleet.common.config import settings
from servefleet.common.errors import Unavailable
from servefleet.common.net import async_wait_for
from servefleet.common.tensors import decode_request, encode_request, encode_response
from servefleet.sdk.broker_client import ResultExpired
from servefleet.testing import Credentials, RedisProcess
from tests.integration.broker.conftest import AS_ADMIN, BrokerService

State = broker_pb2.TicketStatus.State


def new_app() -> str:
    return f"test/app-{uuid.uuid4().hex[:8]}"


def payload(x: int = 1) -> bytes:
    return encode_request("m", {"x": np.array([x], dtype=np.int64)}).SerializeToString()


async def doubler(request: service_pb2.ModelInferRequest) -> service_pb2.ModelInferResponse:
    x = decode_request(request)["x"]
    return encode_response(request.model_name, {"y": x * 2})


@pytest.fixture
async def stub(broker: BrokerService) -> AsyncIterator[broker_pb2_grpc.BrokerStub]:
    async with aio_channel(broker.server.address, token=broker.token) as channel:
        yield broker_pb2_grpc.BrokerStub(channel)


async def registered(broker: BrokerService, config: AppConfig | None = None) -> str:
    app = new_app()
    await broker.core.register_app(app, config)
    return app


async def code_of(call: Awaitable[object]) -> grpc.StatusCode:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await call
    assert info.value.details()  # a message a person can act on
    return info.value.code()


async def is_state(broker: BrokerService, ticket: str, state: int) -> bool:
    return (await broker.core.status(ticket)).state == state


def ref(app: str) -> common_pb2.AppRef:
    namespace, name = app.split("/")
    return common_pb2.AppRef(namespace=namespace, name=name)


async def test_bad_input_gets_precise_codes(broker: BrokerService, stub: broker_pb2_grpc.BrokerStub) -> None:
    app = await registered(broker)
    submit: Callable[..., Awaitable[object]] = stub.Submit
    cases = {
        "unknown app": (
            submit(broker_pb2.SubmitRequest(app=ref(new_app()), infer_request=payload())),
            grpc.StatusCode.NOT_FOUND,
        ),
        "bad app name": (
            submit(broker_pb2.SubmitRequest(app=ref("Bad Name/x"), infer_request=payload())),
            grpc.StatusCode.INVALID_ARGUMENT,
        ),
        "empty payload": (submit(broker_pb2.SubmitRequest(app=ref(app))), grpc.StatusCode.INVALID_ARGUMENT),
        "oversize payload": (
            submit(
                broker_pb2.SubmitRequest(
                    app=ref(app), infer_request=b"\x00" * (settings.broker_max_payload_bytes + 1)
                )
            ),
            grpc.StatusCode.INVALID_ARGUMENT,
        ),
        "garbled payload": (
            submit(broker_pb2.SubmitRequest(app=ref(app), infer_request=b"\xff\xff\xff")),
            grpc.StatusCode.INVALID_ARGUMENT,
        ),
        "negative ttl": (
            submit(broker_pb2.SubmitRequest(app=ref(app), infer_request=payload(), ttl_s=-1)),
            grpc.StatusCode.INVALID_ARGUMENT,
        ),
        "malformed ticket": (
            stub.GetResult(broker_pb2.GetResultRequest(ticket="nope")),
            grpc.StatusCode.INVALID_ARGUMENT,
        ),
        "unknown ticket": (
            stub.GetResult(broker_pb2.GetResultRequest(ticket=new_ticket(new_app()))),
            grpc.StatusCode.NOT_FOUND,
        ),
        "negative wait": (
            stub.GetResult(broker_pb2.GetResultRequest(ticket=new_ticket(new_app()), wait_timeout_s=-1)),
            grpc.StatusCode.INVALID_ARGUMENT,
        ),
        "cancel unknown ticket": (
            stub.Cancel(broker_pb2.CancelRequest(ticket=new_ticket(new_app()))),
            grpc.StatusCode.NOT_FOUND,
        ),
        "stats of unknown app": (
            stub.QueueStats(broker_pb2.QueueStatsRequest(app=ref(new_app()))),
            grpc.StatusCode.NOT_FOUND,
        ),
    }
    got = {name: await code_of(call) for name, (call, _) in cases.items()}
    assert got == {name: code for name, (_, code) in cases.items()}
    # The service is unharmed: a good request still queues.
    ok = await stub.Submit(broker_pb2.SubmitRequest(app=ref(app), infer_request=payload()))
    assert ticket_app(ok.ticket) == app


async def test_full_queue_is_resource_exhausted_and_nothing_is_trimmed(
    broker: BrokerService, stub: broker_pb2_grpc.BrokerStub
) -> None:
    app = await registered(broker, AppConfig(max_stream_length=3))
    tickets = [
        (await stub.Submit(broker_pb2.SubmitRequest(app=ref(app), infer_request=payload(i)))).ticket
        for i in range(3)
    ]
    full = stub.Submit(broker_pb2.SubmitRequest(app=ref(app), infer_request=payload(9)))
    assert await code_of(full) == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert [(await broker.core.status(t)).state for t in tickets] == [State.QUEUED] * 3
    stats = await broker.core.stats(AS_ADMIN, app)
    assert (stats.depth, stats.in_flight) == (3, 0)
    assert stats.oldest_age_s >= 0


async def test_same_idempotency_key_same_ticket(broker: BrokerService) -> None:
    assert broker.client is not None
    app = await registered(broker)
    x = {"x": np.array([1], dtype=np.int64)}
    first = await broker.client.submit(app, x, idempotency_key="order-42")
    again = await broker.client.submit(app, x, idempotency_key="order-42")
    other = await broker.client.submit(app, x, idempotency_key="order-43")
    assert first == again != other
    assert (await broker.core.stats(AS_ADMIN, app)).depth == 2


async def test_priority_band_runs_first_and_watch_streams_states(broker: BrokerService) -> None:
    assert broker.client is not None
    app = await registered(broker)
    order: list[int] = []

    async def record(request: service_pb2.ModelInferRequest) -> service_pb2.ModelInferResponse:
        order.append(int(decode_request(request)["x"][0]))
        return await doubler(request)

    low = [await broker.client.submit(app, {"x": np.array([i])}, priority=-1) for i in range(3)]
    normal = [await broker.client.submit(app, {"x": np.array([10 + i])}) for i in range(3)]
    high = [await broker.client.submit(app, {"x": np.array([20 + i])}, priority=5) for i in range(3)]
    watch = broker.core.watch(AS_ADMIN, normal[0])
    assert (await anext(watch)).state == State.QUEUED
    worker = PullWorker(broker.redis_address, app, "w1", 1, record)
    await worker.start()
    try:
        states = [s async for s in broker.core.watch(AS_ADMIN, low[-1])]
        assert states[-1].state == State.DONE and states[-1].infer_response
        assert (await anext(watch)).state in (State.RUNNING, State.DONE)
        assert order == [20, 21, 22, 10, 11, 12, 0, 1, 2]
        out = await broker.client.result(high[0], timeout=30)
        assert out["y"].tolist() == [40]
    finally:
        await worker.stop()


async def test_cancel_queued_request_and_results_expire(broker: BrokerService) -> None:
    assert broker.client is not None
    app = await registered(broker)
    ticket = await broker.client.submit(app, {"x": np.array([1])})
    cancelled = await broker.client.cancel(ticket)
    assert cancelled.state == State.CANCELLED
    assert (await broker.core.stats(AS_ADMIN, app)).depth == 0
    short = await broker.client.submit(app, {"x": np.array([2])}, ttl_s=1)
    worker = PullWorker(broker.redis_address, app, "w1", 2, doubler)
    await worker.start()
    try:
        assert (await broker.client.result(short, timeout=30))["y"].tolist() == [4]
        assert (await broker.client.cancel(short)).state == State.DONE  # final: unchanged
        await async_wait_for(
            lambda: is_state(broker, short, State.EXPIRED), timeout=30, what="result to expire"
        )
        with pytest.raises(ResultExpired):
            await broker.client.result(short, timeout=1)
        assert worker.completed == 1
    finally:
        await worker.stop()


async def test_redis_down_is_unavailable(credentials: Credentials) -> None:
    redis = RedisProcess().start()
    service = await BrokerService(redis.address, credentials).start()
    try:
        redis.kill()
        assert service.client is not None
        with pytest.raises(Unavailable):
            await service.client.submit(new_app(), {"x": np.array([1])})
    finally:
        await service.stop()
        redis.cleanup()


async def test_worker_holds_no_more_than_its_free_slots(broker: BrokerService) -> None:
    assert broker.client is not None
    app = await registered(broker)
    tickets = [await broker.client.submit(app, {"x": np.array([i])}) for i in range(12)]
    release = asyncio.Event()
    running = 0
    most = 0

    async def gated(request: service_pb2.ModelInferRequest) -> service_pb2.ModelInferResponse:
        nonlocal running, most
        running += 1
        most = max(most, running)
        await release.wait()
        running -= 1
        return await doubler(request)

    worker = PullWorker(broker.redis_address, app, "w1", 3, gated)
    await worker.start()
    try:

        async def three_running() -> bool:
            return running == 3 and (await broker.core.stats(AS_ADMIN, app)).in_flight == 3

        await async_wait_for(three_running, timeout=30, what="3 running")
        stats = await broker.core.stats(AS_ADMIN, app)
        assert (stats.in_flight, stats.depth, stats.workers) == (3, 9, 1)  # pulled 3, left 9 queued
        release.set()
        outputs = [await broker.client.result(t, timeout=30) for t in tickets]
        assert [int(o["y"][0]) for o in outputs] == [2 * i for i in range(12)]
        assert most == 3
    finally:
        await worker.stop()


async def test_watch_over_grpc_and_cancel_while_running(
    broker: BrokerService, stub: broker_pb2_grpc.BrokerStub
) -> None:
    assert broker.client is not None
    app = await registered(broker)
    release = asyncio.Event()

    async def gated(request: service_pb2.ModelInferRequest) -> service_pb2.ModelInferResponse:
        await release.wait()
        return await doubler(request)

    watched, doomed = [await broker.client.submit(app, {"x": np.array([i])}) for i in (1, 2)]
    stream = stub.WatchResult(broker_pb2.WatchResultRequest(ticket=watched))
    first = await stream.read()
    worker = PullWorker(broker.redis_address, app, "w1", 2, gated)
    await worker.start()
    try:
        await async_wait_for(lambda: is_state(broker, doomed, State.RUNNING), timeout=30, what="running")
        cancelled = await broker.client.cancel(doomed)
        assert cancelled.state == State.CANCELLED
        release.set()
        states = [first]
        while (status := await stream.read()) is not grpc.aio.EOF:
            states.append(status)
        assert [s.state for s in states] == [State.QUEUED, State.RUNNING, State.DONE]
        assert states[-1].infer_response
        await async_wait_for(lambda: _settled(worker), timeout=30, what="both runs settled")
        # The cancelled run's result was dropped, not stored, and is not a duplicate.
        assert (await broker.core.status(doomed)).state == State.CANCELLED
        assert (await broker.core.stats(AS_ADMIN, app)).duplicate_executions == 0
    finally:
        await worker.stop()


async def _settled(worker: PullWorker) -> bool:
    return worker.busy == 0 and worker.completed == 1
