"""``async with registration(...)``: how a server (proxy, direct ingress, Triton) stays discoverable.

The helper registers the endpoint, renews its lease in the background over one KeepAlive stream,
registers again (same endpoint id) whenever the lease is lost (process paused past its TTL, etcd
data replaced) and rides out discovery or etcd restarts by retrying with jittered backoff. On exit
it deregisters and revokes the lease, so clients drop the endpoint at once instead of after a TTL.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Sequence

import grpc

from servefleet.api import discovery_pb2, discovery_pb2_grpc
from servefleet.common.auth import resolve_token
from servefleet.common.channels import aio_channel, discovery_addresses
from servefleet.common.config import settings
from servefleet.common.errors import FailedPrecondition, from_rpc_error
from servefleet.common.retry import Backoff, RetryPolicy

log = logging.getLogger(__name__)

_RETRYABLE = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.CANCELLED)


def _retryable(exc: BaseException) -> bool:
    return isinstance(exc, TimeoutError) or (
        isinstance(exc, grpc.aio.AioRpcError) and exc.code() in _RETRYABLE
    )


def _raise_translated(exc: BaseException) -> None:
    """A gRPC error leaves as the domain error of its status; anything else as it is."""
    if isinstance(exc, grpc.aio.AioRpcError):
        raise from_rpc_error(exc) from None
    raise exc


class Registration:
    """A live registration. ``endpoint_id``/``lease_id`` change only when the lease was lost and the
    endpoint registered again (the id stays the same: discovery picked it, or the caller did)."""

    def __init__(
        self, discovery: str | Sequence[str], endpoint: discovery_pb2.Endpoint, ttl_s: int, token: str = ""
    ) -> None:
        self._endpoint = discovery_pb2.Endpoint()
        self._endpoint.CopyFrom(endpoint)
        self._ttl_s = ttl_s
        self._lease_id = 0
        self._channel = aio_channel(discovery_addresses(discovery), token=token)
        self._stub = discovery_pb2_grpc.DiscoveryStub(self._channel)
        self._lock = asyncio.Lock()
        self._task: asyncio.Task[None] | None = None

    @property
    def endpoint_id(self) -> str:
        return self._endpoint.id

    @property
    def lease_id(self) -> int:
        return self._lease_id

    @property
    def endpoint(self) -> discovery_pb2.Endpoint:
        return self._endpoint

    async def update(self, *, load_hint: float | None = None, labels: dict[str, str] | None = None) -> None:
        """Publish a new load hint and/or replace the labels (watchers see UPDATED)."""
        if load_hint is not None:
            self._endpoint.load_hint = load_hint
        if labels is not None:
            self._endpoint.labels.clear()
            self._endpoint.labels.update(labels)
        await self._register(reuse_lease=True)

    async def _register(self, *, reuse_lease: bool = False) -> None:
        """One Register call; a lost lease (FAILED_PRECONDITION) falls back to a fresh one."""
        async with self._lock:
            lease_id = self._lease_id if reuse_lease else 0
            request = discovery_pb2.RegisterRequest(
                endpoint=self._endpoint, ttl_s=self._ttl_s, lease_id=lease_id
            )
            try:
                reply = await self._stub.Register(request, timeout=self._rpc_timeout)
            except grpc.aio.AioRpcError as exc:
                if not (lease_id and isinstance(from_rpc_error(exc), FailedPrecondition)):
                    raise
                request.lease_id = 0
                reply = await self._stub.Register(request, timeout=self._rpc_timeout)
            self._endpoint.id = reply.endpoint_id
            self._lease_id = reply.lease_id
            log.info(
                "registered endpoint",
                extra={
                    "endpoint_id": reply.endpoint_id,
                    "lease_id": reply.lease_id,
                    "revision": reply.revision,
                },
            )

    @property
    def _rpc_timeout(self) -> float:
        return max(1.0, float(self._ttl_s))

    @property
    def _period(self) -> float:
        """Renew three times per TTL: one lost renewal never costs the lease."""
        return max(0.2, (self._ttl_s or settings.discovery_ttl_s) / 3)

    async def _register_until_done(self, *, give_up_after: float | None) -> None:
        """Register, retrying while discovery or etcd is unreachable; raise other errors at once."""
        policy = RetryPolicy(
            Backoff(initial_s=0.1, max_s=self._period, jitter=0.5),
            deadline_s=give_up_after,
            retry_on=_retryable,
        )

        def retrying(exc: BaseException, _: float) -> None:
            log.warning("discovery unreachable, retrying registration", extra={"error": str(exc)})

        try:
            await policy.run(self._register, on_retry=retrying)
        except Exception as exc:
            _raise_translated(exc)

    async def _keep_alive(self) -> None:
        """Renew forever; re-register after a lost lease; reopen the stream after any failure."""
        while True:
            call = self._stub.KeepAlive()
            try:
                while True:
                    await call.write(discovery_pb2.KeepAliveRequest(lease_id=self._lease_id))
                    reply = await asyncio.wait_for(call.read(), self._rpc_timeout)
                    if reply is grpc.aio.EOF:
                        raise TimeoutError("discovery closed the keep-alive stream")
                    if reply.ttl_s == 0:
                        log.warning("lease lost, registering again", extra={"lease_id": self._lease_id})
                        await self._register_until_done(give_up_after=None)
                    await asyncio.sleep(self._period)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("keep-alive failed, retrying", extra={"error": str(exc)})
                pause = min(self._period, 1.0)
                await asyncio.sleep(Backoff(initial_s=pause, max_s=pause, jitter=0.5).delay(1))
            finally:
                call.cancel()

    async def _start(self) -> None:
        await self._register_until_done(give_up_after=settings.discovery_register_timeout_s)
        self._task = asyncio.create_task(self._keep_alive(), name=f"keepalive-{self.endpoint_id}")

    async def _stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self._lease_id:
            request = discovery_pb2.DeregisterRequest(
                app=self._endpoint.app, endpoint_id=self._endpoint.id, lease_id=self._lease_id
            )
            try:
                await self._stub.Deregister(request, timeout=2.0)
            except grpc.aio.AioRpcError as exc:
                # The lease still lapses within its TTL; exiting must not hang on a dead discovery.
                log.warning("deregister failed; the lease will expire", extra={"error": exc.details()})
        await self._channel.close()


@contextlib.asynccontextmanager
async def registration(
    discovery: str | Sequence[str],
    endpoint: discovery_pb2.Endpoint,
    *,
    ttl_s: int = 5,
    token: str | None = None,
) -> AsyncIterator[Registration]:
    """Keep ``endpoint`` registered at ``discovery`` for the body of the ``async with``: one
    instance (host:port) or several (``a:1,b:2``, a list; "" is ``$SERVEFLEET_DISCOVERY``). When
    the instance in use dies, the next call (a renewal, a retried Register) goes to another.

    ``token`` (default ``$SERVEFLEET_TOKEN``) must be the application's endpoint token (or an
    admin's): anything else is refused with PERMISSION_DENIED or UNAUTHENTICATED, at once.

    Entering waits until the first registration succeeds (retrying while discovery or etcd is
    unreachable, up to ``settings.discovery_register_timeout_s``); bad input raises InvalidArgument
    at once. Inside, the lease is renewed every ``ttl_s / 3`` seconds and the endpoint registered
    again after any loss. Leaving deregisters it.
    """
    reg = Registration(discovery, endpoint, ttl_s, resolve_token(token))
    try:
        await reg._start()
        yield reg
    finally:
        await reg._stop()
