"""The live endpoint set of one application, kept by one discovery Watch stream.

The stream resumes from the last revision applied after any break, so no change is missed or
applied twice; while discovery is unreachable the last known set keeps serving.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable

import grpc

from servefleet.api import common_pb2, discovery_pb2, discovery_pb2_grpc
from servefleet.common.errors import ServefleetError, from_rpc_error
from servefleet.common.metrics import METRICS_KIND
from servefleet.common.retry import Backoff

#: Answers that retrying cannot change: a bad name, or a token that may not (or no longer) see the app.
_FINAL = (
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.PERMISSION_DENIED,
    grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.UNAUTHENTICATED,
)

log = logging.getLogger(__name__)

Event = discovery_pb2.WatchEvent
#: Pause before reopening a broken Watch stream (reset by the first event that arrives).
WATCH_BACKOFF = Backoff(initial_s=0.05, max_s=2.0, jitter=0.5)
#: Called with the endpoints an event removed (their channels can be closed).
OnRemoved = Callable[[list[discovery_pb2.Endpoint]], None]


class EndpointSet:
    """Inference endpoints by id plus the etcd revision they reflect; ``apply`` is the whole state
    machine. Registrations of kind ``metrics`` (where actors serve /metrics) are not endpoints."""

    def __init__(self) -> None:
        self.endpoints: dict[str, discovery_pb2.Endpoint] = {}
        self.revision = 0
        self.synced = False
        self.snapshots = 0  # more than one: the stream could not resume (history compacted)

    def apply(self, event: discovery_pb2.WatchEvent) -> list[discovery_pb2.Endpoint]:
        """Apply one event in stream order; returns the endpoints it removed."""
        removed: list[discovery_pb2.Endpoint] = []
        if event.type == Event.SNAPSHOT:
            fresh = {e.id: e for e in event.endpoints if e.kind != METRICS_KIND}
            removed = [e for i, e in self.endpoints.items() if i not in fresh]
            self.endpoints = fresh
            self.synced = True
            self.snapshots += 1
        elif event.type in (Event.ADDED, Event.UPDATED):
            for endpoint in event.endpoints:
                if endpoint.kind != METRICS_KIND:
                    self.endpoints[endpoint.id] = endpoint
        elif event.type == Event.REMOVED:
            removed = [e for e in (self.endpoints.pop(x.id, None) for x in event.endpoints) if e is not None]
        self.revision = event.revision
        return removed


class AppWatch:
    """Runs the Watch stream of one app in a task; reconnects with jittered backoff."""

    def __init__(
        self,
        stub: discovery_pb2_grpc.DiscoveryStub,
        app: common_pb2.AppRef,
        *,
        on_removed: OnRemoved | None = None,
        backoff: Backoff = WATCH_BACKOFF,
    ) -> None:
        self.app = app
        self.state = EndpointSet()
        self.error: ServefleetError | None = None  # set when discovery rejects the app for good
        self.connected = False
        self._stub = stub
        self._on_removed = on_removed
        self._backoff = backoff
        self._changed = asyncio.Event()
        self._task = asyncio.create_task(self._run(), name=f"watch-{app.namespace}/{app.name}")

    @property
    def endpoints(self) -> list[discovery_pb2.Endpoint]:
        return list(self.state.endpoints.values())

    async def wait_changed(self, timeout: float) -> bool:
        """Wait until the set changes (or the first snapshot lands); False on timeout."""
        event = self._changed
        try:
            await asyncio.wait_for(event.wait(), timeout)
        except TimeoutError:
            return False
        return True

    async def wait_synced(self, timeout: float) -> bool:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while not self.state.synced and self.error is None:
            if not await self.wait_changed(deadline - loop.time()):
                break
        return self.state.synced

    def _notify(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    async def _run(self) -> None:
        failures = 0
        while True:
            try:
                call = self._stub.Watch(
                    discovery_pb2.WatchRequest(app=self.app, from_revision=self.state.revision)
                )
                async for event in call:
                    self.connected = True
                    failures = 0
                    removed = self.state.apply(event)
                    if removed and self._on_removed is not None:
                        self._on_removed(removed)
                    self._notify()
            except grpc.aio.AioRpcError as exc:
                if exc.code() in _FINAL:
                    self.error = from_rpc_error(exc)
                    self._notify()
                    return
                log.info("discovery watch broke; resuming", extra={"error": exc.details()})
            self.connected = False
            failures += 1
            await asyncio.sleep(self._backoff.delay(failures))

    async def close(self) -> None:
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
