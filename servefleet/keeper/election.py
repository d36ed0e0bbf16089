"""Leader election over etcd: the leader key is bound to a lease the leader keeps alive.

Every keeper serves reads and accepts writes (they go to etcd); only the leader runs the
reconcile loop. A leader that dies stops renewing, its lease expires within the TTL, and a
follower's next campaign wins. Status writes are fenced on the leader key's value, so a deposed
leader that has not noticed yet cannot overwrite its successor's work.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections.abc import Callable, Coroutine
from typing import Any

from servefleet.common.config import settings
from servefleet.keeper.store import KeeperStore

log = logging.getLogger(__name__)


class Election:
    """Campaign for the leader key; while held, run ``lead(fence)`` and cancel it when lost."""

    def __init__(self, store: KeeperStore, *, ttl_s: int | None = None, ident: str | None = None) -> None:
        self.store = store
        self.ttl_s = ttl_s or settings.keeper_leader_ttl_s
        self.ident = (ident or uuid.uuid4().hex).encode()
        self.leading = asyncio.Event()

    async def run(self, lead: Callable[[bytes], Coroutine[Any, Any, None]]) -> None:
        """Forever: campaign, lead until the lease is lost, campaign again."""
        while True:
            try:
                lease = await self.store.client.lease(self.ttl_s)
                if await self.store.try_lead(self.ident, lease):
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
                reply = await asyncio.wait_for(self.store.client.refresh_lease(lease_id), self.ttl_s / 2)
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
                await self.store.client.revoke_lease(lease_id)

    async def resign(self) -> None:
        """Give the key up at once (graceful stop), so a follower need not wait out the TTL."""
        tx = self.store.client.transactions
        with contextlib.suppress(Exception):
            await self.store.txn(
                compare=[tx.value(self.store.leader_key) == self.ident],
                success=[tx.delete(self.store.leader_key)],
            )
