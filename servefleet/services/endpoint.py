"""What the replica actors that clients call directly (kinds ``direct`` and ``triton``) share:
their placement labels, and staying registered in discovery while they serve."""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass
from typing import Any

from servefleet.api import common_pb2, discovery_pb2
from servefleet.common.appid import AppId
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


@dataclass(frozen=True)
class Identity:
    """Who a self-registering replica is: what its ``ready`` reports and its endpoint says."""

    name: str
    app: common_pb2.AppRef
    version: str
    capacity: int  # max_concurrency + max_queued
    node_id: str
    labels: dict[str, str]

    @classmethod
    def of(cls, spec: common_pb2.ApplicationSpec, name: str, cluster: str) -> Identity:
        labels = placement_labels(cluster)
        capacity = spec.max_concurrency + spec.max_queued
        return cls(name, AppId.parse(spec).ref(), spec.version, capacity, labels["node"], labels)

    def endpoint(self, kind: str, address: str, **labels: str) -> discovery_pb2.Endpoint:
        return discovery_pb2.Endpoint(
            app=self.app, version=self.version, kind=kind, address=address, labels={**self.labels, **labels}
        )

    def ready(self, address: str, **more: Any) -> dict[str, Any]:
        """The master's ``ready`` answer (what becomes the replica's routing entry)."""
        return {
            "name": self.name,
            "version": self.version,
            "node_id": self.node_id,
            "capacity": self.capacity,
            "streaming": False,
            "address": address,
            **more,
        }


class Registered:
    """Keeps one endpoint registered in discovery from ``start()`` until ``stop()`` (through
    ``discovery.registration``, so lease renewal and re-registration are the proxy's too). With no
    discovery address it only marks itself registered (unit tests, bare actors). ``credential`` is
    the app's endpoint token, which the master hands every actor it starts."""

    def __init__(self, discovery: str, endpoint: discovery_pb2.Endpoint, credential: str = "") -> None:
        self.discovery = discovery
        self.endpoint = endpoint
        self.credential = credential
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

        async with registration(
            self.discovery, self.endpoint, ttl_s=settings.discovery_ttl_s, token=self.credential
        ):
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
