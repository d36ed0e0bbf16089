"""What the replica actors that clients call directly (kinds ``direct`` and ``triton``) share:
their placement labels, and staying registered in discovery while they serve."""

from __future__ import annotations

import asyncio
import contextlib

from servefleet.api import discovery_pb2
from servefleet.common.config import settings

#: Ray node labels that name a node's zone, in order of preference.
ZONE_LABELS = ("zone", "ray.io/availability-zone")


def placement_labels(cluster: str) -> dict[str, str]:
    """``cluster`` (when known), ``node`` and ``zone`` (when the Ray node has one) of this actor."""
    import ray

    context = ray.get_runtime_context()
    labels = {"cluster": cluster} if cluster else {}
    labels["node"] = context.get_node_id()
    node_labels = context.get_node_labels()
    zone = next((str(node_labels[key]) for key in ZONE_LABELS if node_labels.get(key)), "")
    if zone:
        labels["zone"] = zone
    return labels


class Registered:
    """Keeps one endpoint registered in discovery from ``start()`` until ``stop()`` (through
    ``discovery.registration``, so lease renewal and re-registration are the proxy's too). With no
    discovery address it only marks itself registered (unit tests, bare actors)."""

    def __init__(self, discovery: str, endpoint: discovery_pb2.Endpoint) -> None:
        self.discovery = discovery
        self.endpoint = endpoint
        self._registered = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._registered.clear()
        self._task = asyncio.get_running_loop().create_task(self._stay_registered())

    async def _stay_registered(self) -> None:
        if not self.discovery:
            self._registered.set()
            await asyncio.Event().wait()
        from servefleet.discovery.registration import registration

        async with registration(self.discovery, self.endpoint, ttl_s=settings.discovery_ttl_s):
            self._registered.set()
            await asyncio.Event().wait()

    async def wait(self) -> None:
        """Return once registered; raise what registering raised."""
        assert self._task is not None, "start() first"
        registered = asyncio.create_task(self._registered.wait())
        await asyncio.wait({registered, self._task}, return_when=asyncio.FIRST_COMPLETED)
        registered.cancel()
        if not self._registered.is_set():
            self._task.result()

    async def stop(self) -> None:
        """Deregister (clients drop the endpoint at once rather than after a TTL)."""
        if self._task is not None:
            task, self._task = self._task, None
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
