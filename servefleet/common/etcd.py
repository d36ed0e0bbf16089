"""Every etcd client in servefleet comes from here: a list of members, one channel, retries.

An etcd cluster is named by its client endpoints (``host:port,host:port,...``: a flag, or
``SERVEFLEET_ETCD_ENDPOINTS``). The client holds one gRPC channel over all of them, balanced
round robin (reads spread over the members; a member that is gone is skipped once its connection
fails), and retries every unary call that fails with UNAVAILABLE (a killed member, a leader
election: ``etcdserver: leader changed``/``no leader``/``request timed out``) under ``ETCD_RETRY``
on another member. So losing one member of three costs callers a pause (at worst etcd's own
request timeout, ~7 s, for a write caught by the leader's death), never an error.

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

#: Longest one etcd call may take, retries included, unless its caller says otherwise: longer than
#: etcd's own request timeout (5 s + 2 elections: a write that reached a member just as the leader
#: died fails UNAVAILABLE after about 7 s, and is then retried on the new leader).
CALL_TIMEOUT_S = 12

#: How long an etcd call keeps trying while members die or elect: a 3-member cluster elects a new
#: leader in about 1-2 s (election timeout 1 s), longer on a loaded machine.
_UNAVAILABLE = on_status(grpc.StatusCode.UNAVAILABLE)


def _transient(exc: BaseException) -> bool:
    """UNAVAILABLE, raw (inside the channel) or as aetcd translated it."""
    return isinstance(exc, aetcd.exceptions.ConnectionFailedError) or _UNAVAILABLE(exc)


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


class RetryUnary(grpc.aio.UnaryUnaryClientInterceptor):
    """Retries a unary call under ``policy``, within the call's own timeout."""

    def __init__(self, policy: RetryPolicy) -> None:
        self.policy = policy

    async def intercept_unary_unary(
        self, continuation: Callable[[Any, Any], Any], client_call_details: Any, request: Any
    ) -> Any:
        loop = asyncio.get_running_loop()
        own = client_call_details.timeout
        deadline = None if own is None else loop.time() + own

        async def attempt() -> Any:
            left = None if deadline is None else max(0.001, deadline - loop.time())
            call = await continuation(client_call_details._replace(timeout=left), request)
            await call  # raises the call's AioRpcError
            return call

        return await self.policy.run(attempt, deadline=deadline)


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
            interceptors=[RetryUnary(ETCD_RETRY)],
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


def connect_etcd(endpoints: str | Sequence[str] = "", *, timeout: int | None = CALL_TIMEOUT_S) -> EtcdClient:
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
