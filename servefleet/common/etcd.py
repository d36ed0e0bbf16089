"""Every etcd client in servefleet comes from here: a list of members, one channel, retries.

An etcd cluster is named by its client endpoints (``host:port,host:port,...``: a flag, or
``SERVEFLEET_ETCD_ENDPOINTS``). The client holds one gRPC channel over all of them, balanced
round robin (reads spread over the members; a member that is gone is skipped once its connection
fails), and retries every unary call that fails with UNAVAILABLE (a killed member, a leader
election: ``etcdserver: leader changed``/``no leader``), or a write whose try outlives
``etcd_attempt_s``, under ``ETCD_RETRY`` on another member.
So losing one member of three costs callers a pause of about one election, never an error.

A retried write may have been applied before its reply was lost (the member died mid-call). Every
write servefleet makes is idempotent or checks afterwards: puts of the same value, lease grants
(an orphan lapses in its TTL), and the keeper's compare-and-swap transactions, which accept their
own earlier write (``KeeperStore``).
"""

from __future__ import annotations

import argparse
import asyncio
from collections.abc import Callable, Sequence
from typing import Any

import aetcd
import grpc
from aetcd import rpc, watcher

from servefleet.common.config import settings
from servefleet.common.net import MULTI_ADDRESS, grpc_target, split_address
from servefleet.common.retry import Backoff, RetryPolicy, on_status

#: How long an etcd call keeps trying while members die or elect: a 3-member cluster elects a new
#: leader in about 1-2 s (election timeout 1 s), longer on a loaded machine.
_UNAVAILABLE = on_status(grpc.StatusCode.UNAVAILABLE)


class _AttemptTimedOut(Exception):
    """One attempt ran out of its own bound (not the caller's deadline): worth another member."""

    def __init__(self, error: grpc.aio.AioRpcError) -> None:
        super().__init__(str(error))
        self.error = error


def _transient(exc: BaseException) -> bool:
    """UNAVAILABLE, raw (inside the channel) or as aetcd translated it; an attempt cut short."""
    return isinstance(exc, aetcd.exceptions.ConnectionFailedError | _AttemptTimedOut) or _UNAVAILABLE(exc)


ETCD_RETRY = RetryPolicy(
    Backoff(initial_s=0.05, max_s=1.0, jitter=0.5), deadline_s=settings.etcd_retry_s, retry_on=_transient
)


def parse_endpoints(endpoints: str | Sequence[str]) -> list[str]:
    """``"a:1,b:2"`` (or a list of such) -> ``["a:1", "b:2"]``; ValueError naming a bad entry."""
    items = endpoints.split(",") if isinstance(endpoints, str) else list(endpoints)
    found = [item.strip() for item in items if item.strip()]
    if not found:
        raise ValueError("no etcd endpoint given: pass --etcd HOST:PORT[,HOST:PORT...]")
    for item in found:
        split_address(item)  # raises naming the entry
    return found


#: etcd calls that go through Raft: a member holds one it forwarded to a leader that died.
_PROPOSALS = frozenset(
    f"/etcdserverpb.{m}".encode()
    for m in ("KV/Put", "KV/Txn", "KV/DeleteRange", "Lease/LeaseGrant", "Lease/LeaseRevoke")
)


class RetryUnary(grpc.aio.UnaryUnaryClientInterceptor):
    """Retries a unary call under ``policy``; a write's attempt is bounded by ``attempt_s``.

    A write that reached a follower just as the leader died waits inside etcd for its request
    timeout (about 7 s) before failing; bounding the attempt and retrying on another member moves
    it on after ``attempt_s`` instead. Reads are not bounded: a big range on a busy etcd is slow,
    not stuck, and cutting it short would only repeat it. An attempt that hits the caller's own
    timeout is final."""

    def __init__(self, policy: RetryPolicy, attempt_s: float) -> None:
        self.policy = policy
        self.attempt_s = attempt_s

    async def intercept_unary_unary(
        self, continuation: Callable[[Any, Any], Any], client_call_details: Any, request: Any
    ) -> Any:
        loop = asyncio.get_running_loop()
        own = client_call_details.timeout
        deadline = None if own is None else loop.time() + own
        method = client_call_details.method
        bound = (
            self.attempt_s
            if (method if isinstance(method, bytes) else method.encode()) in _PROPOSALS
            else None
        )

        async def attempt() -> Any:
            if bound is None:
                left = None if deadline is None else deadline - loop.time()
            else:
                left = bound if deadline is None else min(bound, deadline - loop.time())
            timeout = None if left is None else max(0.001, left)
            call = await continuation(client_call_details._replace(timeout=timeout), request)
            try:
                await call  # raises the call's AioRpcError
            except grpc.aio.AioRpcError as exc:
                cut_short = deadline is None or loop.time() < deadline
                if exc.code() == grpc.StatusCode.DEADLINE_EXCEEDED and cut_short:
                    raise _AttemptTimedOut(exc) from exc
                raise
            return call

        try:
            return await self.policy.run(attempt, deadline=deadline)
        except _AttemptTimedOut as exc:
            raise exc.error from None


class EtcdClient(aetcd.Client):
    """An aetcd client over every member of a cluster (see the module docstring)."""

    def __init__(self, endpoints: Sequence[str], *, timeout: int | None = None) -> None:
        super().__init__(timeout=timeout)
        self.endpoints = list(endpoints)

    async def connect(self) -> None:
        """Open the channel once (aetcd's own connect knows one address and no retries)."""
        if self._connected.is_set():
            return
        self.channel = grpc.aio.insecure_channel(
            grpc_target(self.endpoints),
            options=MULTI_ADDRESS,
            interceptors=[RetryUnary(ETCD_RETRY, settings.etcd_attempt_s)],
        )
        self.kvstub = rpc.KVStub(self.channel)
        self.clusterstub = rpc.ClusterStub(self.channel)
        self.leasestub = rpc.LeaseStub(self.channel)
        self.maintenancestub = rpc.MaintenanceStub(self.channel)
        self._watcher = watcher.Watcher(rpc.WatchStub(self.channel), timeout=self._timeout)
        self._connected.set()

    async def refresh_lease(self, lease_id: int) -> Any:
        """One lease renewal (a one-message stream, so the unary retry misses it), retried."""
        return await ETCD_RETRY.run(lambda: aetcd.Client.refresh_lease(self, lease_id))


def connect_etcd(endpoints: str | Sequence[str] = "", *, timeout: int | None = 5) -> EtcdClient:
    """A client for ``endpoints`` (default ``Settings.etcd_endpoints``); connects on first use."""
    return EtcdClient(parse_endpoints(endpoints or settings.etcd_endpoints), timeout=timeout)


def add_etcd_flag(parser: argparse.ArgumentParser, why: str) -> None:
    """``--etcd HOST:PORT[,HOST:PORT...]`` on a part's command line (default: the setting)."""
    parser.add_argument(
        "--etcd",
        default=settings.etcd_endpoints,
        required=not settings.etcd_endpoints,
        help=f"etcd endpoints host:port[,host:port...] ({why}); default $SERVEFLEET_ETCD_ENDPOINTS",
    )
