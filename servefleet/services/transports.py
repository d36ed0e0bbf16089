"""How a proxy reaches a replica: Ray actor calls, the replica's own loopback gRPC endpoint, or
the gRPC one for replicas on the proxy's node and Ray for the rest. Each answers ``(code, payload)``
and raises :class:`ReplicaGone` when the replica cannot be reached (the proxy then tries another)."""

from __future__ import annotations

import asyncio
import functools
from collections.abc import AsyncIterator, Callable
from typing import Protocol

import grpc

from servefleet.common.channels import ChannelCache
from servefleet.common.config import settings
from servefleet.services.replica_wire import OK, REPLICA_SERVICE, Answer, code
from servefleet.services.routing import ReplicaInfo


class ReplicaGone(Exception):
    """The replica's actor died or cannot be reached; the request may go to another replica."""


class ReplicaTransport(Protocol):
    """How a proxy reaches a replica (Ray actor calls in production, a fake in unit tests)."""

    async def infer(
        self, replica: ReplicaInfo, request: bytes, carrier: dict[str, str], timeout_s: float | None
    ) -> Answer: ...

    def stream(
        self, replica: ReplicaInfo, request: bytes, carrier: dict[str, str], timeout_s: float | None
    ) -> AsyncIterator[Answer]: ...


class RayTransport:
    """Replica calls as Ray actor tasks; cancelling the awaiting coroutine cancels the task."""

    def __init__(self) -> None:
        import ray

        self._ray = ray
        self._gone = (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError)

    async def infer(
        self, replica: ReplicaInfo, request: bytes, carrier: dict[str, str], timeout_s: float | None
    ) -> Answer:
        ref = replica.handle.infer.remote(request, carrier, timeout_s)
        try:
            answer: Answer = await ref
            return answer
        except self._gone as exc:
            raise ReplicaGone(str(exc)) from exc
        except asyncio.CancelledError:
            self._ray.cancel(ref)
            raise

    async def stream(
        self, replica: ReplicaInfo, request: bytes, carrier: dict[str, str], timeout_s: float | None
    ) -> AsyncIterator[Answer]:
        refs = replica.handle.stream.options(num_returns="streaming").remote(request, carrier, timeout_s)
        try:
            async for ref in refs:
                yield await ref
        except self._gone as exc:
            raise ReplicaGone(str(exc)) from exc
        except (asyncio.CancelledError, GeneratorExit):
            self._ray.cancel(refs)
            raise


class GrpcTransport:
    """Replica calls over the replica's own loopback gRPC endpoint: one hop of raw bytes, with
    gRPC's deadline and cancellation, and none of a Ray task's scheduling cost. A connection
    failure (UNAVAILABLE) means the replica is gone."""

    def __init__(self) -> None:
        # A drained replica still finishes what it holds: its channel closes after that grace.
        grace = settings.replica_drain_timeout_s + settings.shutdown_grace_s
        self._channels = ChannelCache(close_grace_s=grace)

    def forget(self, live: set[str]) -> None:
        """Close channels of replicas no longer in the table, once their calls are done."""
        self._channels.retain(live)

    async def infer(
        self, replica: ReplicaInfo, request: bytes, carrier: dict[str, str], timeout_s: float | None
    ) -> Answer:
        call = self._channels.stub(replica.address, _unary(replica.infer_method))
        try:
            answer: bytes = await call(request, timeout=timeout_s, metadata=tuple(carrier.items()))
            return OK, answer
        except grpc.aio.AioRpcError as exc:
            return _answer_of(exc)

    async def stream(
        self, replica: ReplicaInfo, request: bytes, carrier: dict[str, str], timeout_s: float | None
    ) -> AsyncIterator[Answer]:
        call = self._channels.stub(replica.address, _STREAM)
        try:
            async for chunk in call(request, timeout=timeout_s, metadata=tuple(carrier.items())):
                yield OK, chunk
        except grpc.aio.AioRpcError as exc:
            yield _answer_of(exc)


@functools.cache
def _unary(method: str) -> Callable[[grpc.aio.Channel], grpc.aio.UnaryUnaryMultiCallable]:
    """The (cached, hashable) factory of a method's callable: one made per channel, not per call."""
    return lambda channel: channel.unary_unary(method)


def _stream_call(channel: grpc.aio.Channel) -> grpc.aio.UnaryStreamMultiCallable:
    return channel.unary_stream(f"/{REPLICA_SERVICE}/Stream")


_STREAM = _stream_call


def _answer_of(exc: grpc.aio.AioRpcError) -> Answer:
    if exc.code() == grpc.StatusCode.UNAVAILABLE:
        raise ReplicaGone(exc.details() or "connection failed") from exc
    return code(exc.code()), exc.details() or exc.code().name


class NodeLocalTransport:
    """Same-node replicas over their gRPC endpoint, others (or ones without one) by Ray call."""

    def __init__(self, node_id: str, local: GrpcTransport, remote: ReplicaTransport) -> None:
        self.node_id = node_id
        self.local = local
        self.remote = remote

    def _pick(self, replica: ReplicaInfo) -> ReplicaTransport:
        return self.local if replica.address and replica.node_id == self.node_id else self.remote

    async def infer(
        self, replica: ReplicaInfo, request: bytes, carrier: dict[str, str], timeout_s: float | None
    ) -> Answer:
        return await self._pick(replica).infer(replica, request, carrier, timeout_s)

    def stream(
        self, replica: ReplicaInfo, request: bytes, carrier: dict[str, str], timeout_s: float | None
    ) -> AsyncIterator[Answer]:
        return self._pick(replica).stream(replica, request, carrier, timeout_s)
