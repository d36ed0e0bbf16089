"""Deployment actor of a ``kind: triton`` application: a tritonserver inside a Ray actor.

The actor launches ``tritonserver`` on the app's model repository (``TritonServer``: free loopback
ports, tied to the actor's life), waits until it and its models are ready, and registers the
server's gRPC address in discovery as kind ``triton`` (labels cluster, node, zone, ``models``,
and ``metrics``: the server's Prometheus address). Clients call Triton directly; the app's
proxies (if any) reach it over the same address on their node, or through :meth:`infer` (a Ray
call) from another node, so Triton's answers and error statuses pass through unchanged.

The actor health-checks its child: a server that exits or stops answering ServerLive is taken out
of discovery at once, killed with its process group and started again behind the same address (up
to ``settings.triton_max_restarts`` times); after that, or if a restart fails, ``stats`` raises and
the master replaces the actor. A bad repository fails ``ready`` with Triton's own reason.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import tempfile
import time
from pathlib import Path
from typing import Any

import grpc
from tritonclient.grpc import service_pb2

from servefleet.api import common_pb2
from servefleet.common import metrics
from servefleet.common.appid import AppId
from servefleet.common.config import settings
from servefleet.common.errors import Unavailable
from servefleet.services.endpoint import Identity, Registered
from servefleet.services.replica_wire import OK, code
from servefleet.services.triton import install
from servefleet.services.triton.metrics import Totals, TritonCollector, inference_families, totals
from servefleet.services.triton.server import TritonServer

log = logging.getLogger(__name__)

#: The method a proxy calls on a Triton endpoint (raw ModelInferRequest bytes in and out).
INFER_METHOD = "/inference.GRPCInferenceService/ModelInfer"
#: How often the actor looks at its child, and probes ServerLive (every ``_PROBE_EVERY`` looks).
_CHECK_INTERVAL_S = 0.2
_PROBE_EVERY = 10
_PROBE_FAILURES = 2
#: Drain: after deregistering, requests still arriving or finishing keep the server up until
#: Triton's counters have been still this long (Triton answers NOT_FOUND once it is stopping).
_QUIET_S = 0.5
_STATS_TTL_S = 1.0


def _identity(data: bytes) -> bytes:
    return data


class TritonReplica:
    """One Triton replica (a Ray actor in production; same calls as the other replica kinds)."""

    def __init__(
        self,
        spec_bytes: bytes,
        name: str,
        *,
        cluster: str = "",
        discovery: str = "",
        credential: str = "",
        host: str = "127.0.0.1",
    ) -> None:
        spec = common_pb2.ApplicationSpec.FromString(spec_bytes)
        self.id = Identity.of(spec, name, cluster)
        repository = Path(spec.triton.model_repository)
        # A relative repository lives in working_dir, which Ray unpacked as this actor's cwd.
        repository = repository if repository.is_absolute() else Path.cwd() / repository
        log_dir = Path(tempfile.mkdtemp(prefix=f"sf-triton-{self.id.app.name}-"))
        self.server = TritonServer(install.find(), repository, spec.triton.args, log_dir=log_dir, host=host)
        self.discovery = discovery
        self.credential = credential  # the app's endpoint token: registers it in discovery
        self.draining = False
        self.failed = ""
        self.restarts = 0
        self.metadata: dict[str, bytes] = {}
        self._proxied = 0  # requests in flight through infer() (proxies on other nodes)
        self._registration: Registered | None = None
        self._stats: tuple[float, Totals] = (0.0, Totals())
        self._started = asyncio.get_running_loop().create_task(self._start())
        self._watcher: asyncio.Task[None] | None = None
        self._metrics: asyncio.Task[None] | None = None

    async def _start(self) -> None:
        await self.server.start(settings.triton_start_timeout_s)
        for model in self.server.models:
            reply = await self.server.stub.ModelMetadata(
                service_pb2.ModelMetadataRequest(name=model), timeout=5
            )
            self.metadata[model] = reply.SerializeToString()
        await self._register()
        # Triton's nv_inference_* series on the actor's own /metrics (servefleet.common.metrics).
        labels = {"app": AppId.parse(self.id.app).model_name, "replica": self.id.name}
        metrics.REGISTRY.register(TritonCollector(self.server.metrics_text, labels))
        self._metrics = metrics.expose(
            self.discovery,
            self.id.app,
            "triton",
            {**self.id.labels, "replica": self.id.name},
            credential=self.credential,
        )
        self._watcher = asyncio.get_running_loop().create_task(self._watch())

    async def _register(self) -> None:
        models = ",".join(self.server.models)
        endpoint = self.id.endpoint(
            "triton", self.server.address, models=models, metrics=self.server.metrics_address
        )
        self._registration = Registered(self.discovery, endpoint, self.credential)
        self._registration.start()
        await self._registration.wait()

    async def ready(self) -> dict[str, Any]:
        """Identity, placement and models once the server serves and is registered; raises
        Triton's reason (TritonStartError) when the repository does not load."""
        await self._started
        return self.id.ready(
            self.server.address,
            infer_method=INFER_METHOD,
            models=list(self.server.models),
            metadata=dict(self.metadata),
            pids=self.server.pids(),
        )

    # ---- health ------------------------------------------------------------------------------

    async def _watch(self) -> None:
        """Restart a server that died or hangs, behind the same ports, or give up (``failed``)."""
        looks = probe_failures = 0
        while not self.draining:
            await asyncio.sleep(_CHECK_INTERVAL_S)
            looks += 1
            if self.server.alive() and looks % _PROBE_EVERY:
                continue
            if self.server.alive() and await self.server.live():
                probe_failures = 0
                continue
            probe_failures += 1
            if self.server.alive() and probe_failures < _PROBE_FAILURES:
                continue
            if self.draining:
                return
            await self._restart()
            probe_failures = 0

    async def _restart(self) -> None:
        pid, why = self.server.pid, self.server.reason()
        log.warning("tritonserver %d of %s is down (%s); restarting", pid, self.id.name, why)
        if self._registration is not None:
            await self._registration.stop()  # clients leave it now, not after a TTL
        ports = (self.server.grpc_port, self.server.http_port, self.server.metrics_port)
        await self.server.kill()  # the stubs too (same process group)
        if self.restarts >= settings.triton_max_restarts:
            self.failed = f"tritonserver died {self.restarts + 1} times; last: {why}"
            return
        self.restarts += 1
        try:
            await self.server.start(settings.triton_start_timeout_s, ports=ports)
            await self._register()
        except Exception as exc:
            self.failed = f"tritonserver restart failed: {exc}"
            log.warning("%s: %s", self.id.name, self.failed)

    async def stats(self) -> dict[str, Any]:
        """Load as the master's health check and the autoscaler see it, from Triton's counters;
        raises once the actor gave up on its server (the master then replaces it)."""
        if self.failed:
            raise Unavailable(self.failed)
        now = time.monotonic()
        if now - self._stats[0] > _STATS_TTL_S and self.server.alive():
            with contextlib.suppress(OSError):
                self._stats = (now, totals(inference_families(await self._scrape())))
        counts = self._stats[1]
        return {
            "in_flight": int(counts.pending) + self._proxied,
            "capacity": self.id.capacity,
            "served": int(counts.success),
            "failed": int(counts.failure),
            "rejected": 0,
            "draining": self.draining,
            "version": self.id.version,
            "address": self.server.address,
            "restarts": self.restarts,
            "pids": self.server.pids(),
        }

    async def _scrape(self) -> str:
        return await asyncio.to_thread(self.server.metrics_text)

    async def metrics(self) -> str:
        """Triton's ``nv_inference_*`` lines as Prometheus text (raw, as the server wrote them)."""
        text = await self._scrape()
        return "".join(line + "\n" for line in text.splitlines() if "nv_inference_" in line)

    # ---- request path of proxies on other nodes ----------------------------------------------

    async def infer(
        self, request: bytes, carrier: dict[str, str], timeout_s: float | None
    ) -> tuple[int, Any]:
        """One ModelInfer forwarded to the local server as bytes; Triton's status comes back as is."""
        if not self.server.alive():
            return code(grpc.StatusCode.UNAVAILABLE), f"tritonserver of {self.id.name} is restarting"
        call = self.server.channel.unary_unary(
            INFER_METHOD, request_serializer=_identity, response_deserializer=_identity
        )
        self._proxied += 1
        try:
            answer: bytes = await call(request, timeout=timeout_s, metadata=tuple(carrier.items()))
            return OK, answer
        except grpc.aio.AioRpcError as exc:
            return code(exc.code()), exc.details() or exc.code().name
        finally:
            self._proxied -= 1

    # ---- drain -------------------------------------------------------------------------------

    async def drain(self, timeout_s: float) -> int:
        """Deregister first (clients move away), let the calls still arriving or running finish
        (up to ``timeout_s``), then stop the server with a grace period. Returns the requests
        pending when the drain began."""
        self.draining = True
        if self._metrics is not None:
            self._metrics.cancel()
        if self._watcher is not None:
            self._watcher.cancel()
        if self._registration is not None:
            await self._registration.stop()
        if not self.server.alive():
            await self.server.kill()
            return 0
        first = await self._totals()
        deadline = time.monotonic() + timeout_s
        last, still_since = first, time.monotonic()
        while time.monotonic() < deadline:
            await asyncio.sleep(0.1)
            now = await self._totals()
            if now.finished != last.finished or now.pending or self._proxied:
                last, still_since = now, time.monotonic()
            elif time.monotonic() - still_since >= _QUIET_S:
                break
        await self.server.stop(settings.shutdown_grace_s)
        return int(first.pending)

    async def _totals(self) -> Totals:
        try:
            return totals(inference_families(await self._scrape()))
        except OSError:
            return Totals()

    async def pids(self) -> list[int]:
        """The server's process and its stubs now (what must be gone once the actor is)."""
        return self.server.pids()
