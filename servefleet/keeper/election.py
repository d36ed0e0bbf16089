"""Leader election over etcd: the leader key is bound to a lease the leader keeps alive.

Used by the keeper and the autoscaler (each with its own key). Every keeper serves reads and
accepts writes (they go to etcd); only the leader runs the reconcile loop. A leader that dies
stops renewing, its lease expires within the TTL, and a follower's next campaign wins. Status
writes are fenced on the leader key's value, so a deposed leader that has not noticed yet cannot
overwrite its successor's work.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections.abc import Callable, Coroutine
from typing import Any

import aetcd

from servefleet.common.config import settings

log = logging.getLogger(__name__)


class Election:
    """Campaign for the leader key; while held, run ``lead(fence)`` and cancel it when lost."""

    def __init__(
        self, client: aetcd.Client, key: bytes, *, ttl_s: int | None = None, ident: str | None = None
    ) -> None:
        self.client = client
        self.key = key
        self.ttl_s = ttl_s or settings.keeper_leader_ttl_s
        self.ident = (ident or uuid.uuid4().hex).encode()
        self.leading = asyncio.Event()

    async def run(self, lead: Callable[[bytes], Coroutine[Any, Any, None]]) -> None:
        """Forever: campaign, lead until the lease is lost, campaign again."""
        while True:
            try:
                lease = await self.client.lease(self.ttl_s)
                if await self._try_lead(lease):
                    log.info("became leader", extra={"ident": self.ident.decode()})
                    await self._hold(lease.id, lead)
                else:
                    with contextlib.suppress(Exception):
                        await lease.revoke()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.warning("leader election step failed; retrying", exc_info=True)
            await asyncio.sleep(self.ttl_s / 3)

    async def _hold(self, lease_id: int, lead: Callable[[bytes], Coroutine[Any, Any, None]]) -> None:
        self.leading.set()
        task = asyncio.create_task(lead(self.ident))
        try:
            while not task.done():
                await asyncio.wait({task}, timeout=self.ttl_s / 3)
                if task.done():
                    break
                reply = await asyncio.wait_for(self.client.refresh_lease(lease_id), self.ttl_s / 2)
                if reply is None or reply.TTL <= 0:
                    log.warning("leader lease lost", extra={"ident": self.ident.decode()})
                    return
            task.result()  # a crashed leader loop surfaces here and is logged by run()
        finally:
            self.leading.clear()
            task.cancel()
            with contextlib.suppress(BaseException):
                await task
            with contextlib.suppress(Exception):  # frees the key at once for the next campaign
                await self.client.revoke_lease(lease_id)

    async def _try_lead(self, lease: aetcd.leases.Lease) -> bool:
        tx = self.client.transactions
        ok, _ = await self.client.transaction(
            compare=[tx.create(self.key) == 0],
            success=[tx.put(self.key, self.ident, lease=lease)],
            failure=[],
        )
        return bool(ok)

    async def resign(self) -> None:
        """Give the key up at once (graceful stop), so a follower need not wait out the TTL."""
        tx = self.client.transactions
        with contextlib.suppress(Exception):
            await self.client.transaction(
                compare=[tx.value(self.key) == self.ident], success=[tx.delete(self.key)], failure=[]
            )
