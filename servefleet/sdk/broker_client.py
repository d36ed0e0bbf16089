"""Asynchronous inference through the broker: submit now, collect the result later.

    client = AsyncBrokerClient("127.0.0.1:7406")
    ticket = await client.submit("team/llm", {"prompt": np.array([b"hello"], dtype=object)})
    outputs = await client.result(ticket, timeout=300)   # dict of numpy arrays
    await client.close()

``result`` raises ``RequestFailed`` (FAILED, e.g. dead-lettered), ``ResultExpired`` (EXPIRED),
``RequestCancelled`` (CANCELLED) — subclasses of the common domain errors — and
``DeadlineExceeded`` when ``timeout`` passes first (the ticket stays valid: call again).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Mapping
from typing import TypeVar

import grpc
import numpy as np
from tritonclient.grpc import service_pb2

from servefleet.api import broker_pb2, broker_pb2_grpc, common_pb2
from servefleet.common.appid import AppId
from servefleet.common.auth import resolve_token
from servefleet.common.channels import aio_channel
from servefleet.common.errors import Cancelled, DeadlineExceeded, Internal, NotFound, from_rpc_error
from servefleet.common.tensors import decode_response, encode_request

State = broker_pb2.TicketStatus.State
#: Longest single GetResult call; result() loops until its own timeout.
_POLL_S = 30.0
T = TypeVar("T")


class RequestFailed(Internal):
    """The request ran and failed (handler error, or too many deliveries: dead-lettered)."""


class ResultExpired(NotFound):
    """The result outlived its TTL and was dropped."""


class RequestCancelled(Cancelled):
    """The request was cancelled before it finished."""


_FINAL_ERRORS: dict[int, type[Exception]] = {
    State.FAILED: RequestFailed,
    State.EXPIRED: ResultExpired,
    State.CANCELLED: RequestCancelled,
}


async def _call(call: Awaitable[T]) -> T:
    """Await one RPC; a status comes back as the matching servefleet domain error."""
    try:
        return await call
    except grpc.RpcError as exc:
        raise from_rpc_error(exc) from None


class AsyncBrokerClient:
    """asyncio client of the broker service; gRPC errors come back as servefleet domain errors.
    ``token``: the caller's token (default ``$SERVEFLEET_TOKEN``); a tenant submits to and reads
    the tickets of its own applications only."""

    def __init__(self, address: str, *, token: str | None = None) -> None:
        self._channel = aio_channel(address, token=resolve_token(token))
        self._stub = broker_pb2_grpc.BrokerStub(self._channel)

    async def submit(
        self,
        app: common_pb2.AppRef | str,
        inputs: Mapping[str, np.ndarray],
        *,
        priority: int = 0,
        idempotency_key: str = "",
        ttl_s: int = 0,
    ) -> str:
        """Queue one request; returns its ticket (the same one again for a repeated idempotency key)."""
        ref = AppId.parse(app).ref()
        request = encode_request(ref.name, inputs)
        return (await self.submit_request(ref, request, priority, idempotency_key, ttl_s)).ticket

    async def submit_request(
        self,
        app: common_pb2.AppRef | str,
        request: service_pb2.ModelInferRequest,
        priority: int = 0,
        idempotency_key: str = "",
        ttl_s: int = 0,
    ) -> broker_pb2.SubmitResponse:
        """Submit an already built ModelInferRequest."""
        message = broker_pb2.SubmitRequest(
            app=AppId.parse(app).ref(),
            infer_request=request.SerializeToString(),
            priority=priority,
            idempotency_key=idempotency_key,
            ttl_s=ttl_s,
        )
        return await _call(self._stub.Submit(message))

    async def status(self, ticket: str, wait_timeout_s: float = 0.0) -> broker_pb2.TicketStatus:
        """The ticket's status, waiting up to ``wait_timeout_s`` for a final one."""
        request = broker_pb2.GetResultRequest(ticket=ticket, wait_timeout_s=wait_timeout_s)
        return await _call(self._stub.GetResult(request, timeout=wait_timeout_s + 10.0))

    async def result(self, ticket: str, timeout: float = 60.0) -> dict[str, np.ndarray]:
        """The outputs of a DONE ticket, waiting up to ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            status = await self.status(ticket, max(0.0, min(left, _POLL_S)))
            if status.state == State.DONE:
                return decode_response(service_pb2.ModelInferResponse.FromString(status.infer_response))
            if status.state in _FINAL_ERRORS:
                raise _FINAL_ERRORS[status.state](f"ticket {ticket}: {status.error}")
            if left <= 0:
                raise DeadlineExceeded(
                    f"ticket {ticket} still {State.Name(status.state)} after {timeout:.1f}s"
                )
            await asyncio.sleep(0)

    async def cancel(self, ticket: str) -> broker_pb2.TicketStatus:
        return await _call(self._stub.Cancel(broker_pb2.CancelRequest(ticket=ticket)))

    async def stats(self, app: common_pb2.AppRef | str) -> broker_pb2.QueueStatsResponse:
        return await _call(self._stub.QueueStats(broker_pb2.QueueStatsRequest(app=AppId.parse(app).ref())))

    async def close(self) -> None:
        await self._channel.close()
