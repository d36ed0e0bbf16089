"""Pipeline master: the application master of a ``kind: pipeline`` app, one stage master per stage.

It is the app's master actor (same name, same calls as :class:`ApplicationMaster`, so the cluster
agent and the keeper drive it like any app) and holds one ``ApplicationMaster`` per stage in the
same actor: each stage gets the whole data plane of a deployment (rollout, health checks,
replacement of dead replicas, adoption after a restart, Ray placement by its own resources). The
entry stage runs under the pipeline's own name, so its proxies, discovery entries and broker
stream are the app's; every other stage runs as ``<app>--<stage>`` with no proxy, called by its
callers' :class:`~servefleet.services.stages.StageHandle` with the table from
:meth:`stage_routing`.

The desired pipeline spec is kept in Ray's GCS key-value store like a master's, so a restarted
pipeline master recreates its stage masters, which then adopt the live replicas.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Mapping
from typing import Any

from ray.experimental import internal_kv

from servefleet.api import agent_pb2, common_pb2
from servefleet.common.appid import AppId
from servefleet.pipeline_spec import entry_stage, stage_app, stage_counts, stage_spec
from servefleet.services.actors import RAY_NAMESPACE
from servefleet.services.master import ApplicationMaster
from servefleet.services.routing import Routing

log = logging.getLogger(__name__)


class PipelineMaster:
    """Reconciles every stage of one pipeline (runs as the app's detached master actor)."""

    def __init__(
        self,
        app: bytes,
        *,
        cluster: str,
        discovery: str,
        redis: str = "",
        broker: str = "",
        credential: str = "",
    ) -> None:
        self.app = common_pb2.AppRef.FromString(app)
        # Every stage master registers with the pipeline's endpoint token (it serves its stages).
        self._where = {
            "cluster": cluster,
            "discovery": discovery,
            "redis": redis,
            "broker": broker,
            "credential": credential,
        }
        self._kv_key = f"pipeline:{AppId.parse(self.app).key}".encode()
        self.spec: common_pb2.ApplicationSpec | None = None
        self.revision = -1
        self._stages: dict[str, ApplicationMaster] = {}  # by stage app name
        self._entry = ""
        self._retiring: set[asyncio.Task[int]] = set()
        stored = internal_kv._internal_kv_get(self._kv_key, namespace=RAY_NAMESPACE)
        if stored:
            request = agent_pb2.ApplyApplicationRequest.FromString(stored)
            self.spec, self.revision = request.spec, request.revision
            self._stage_masters(self.spec)  # each loads its own desired state and adopts its actors

    async def apply(
        self, spec: bytes, replicas: int, revision: int, stages: Mapping[str, int] | None = None
    ) -> bytes:
        """Adopt a desired pipeline unless older than the one held. ``replicas`` is the app-level
        count, which a pipeline does not use: each stage runs the count the keeper holds for it
        in ``stages`` (its initial count until scaled)."""
        if revision >= self.revision:
            self.spec = common_pb2.ApplicationSpec.FromString(spec)
            self.revision = revision
            counts = stage_counts(self.spec, stages or {})
            request = agent_pb2.ApplyApplicationRequest(
                spec=self.spec, replicas=replicas, revision=revision, stage_replicas=counts
            )
            internal_kv._internal_kv_put(
                self._kv_key, request.SerializeToString(), overwrite=True, namespace=RAY_NAMESPACE
            )
            masters = self._stage_masters(self.spec)
            for stage in reversed(self.spec.stages):  # callees first: their replicas start first
                derived = stage_spec(self.spec, stage.name)
                await masters[derived.name].apply(derived.SerializeToString(), counts[stage.name], revision)
        return await self.status()

    async def status(self) -> bytes:
        """One status for the app: replicas summed over stages, updating while any stage is,
        the first stage error named by its stage, the entry's proxies."""
        answers = {
            name: agent_pb2.MasterStatus.FromString(await master.status())
            for name, master in self._stages.items()
        }
        versions = {a.version for a in answers.values()}
        errors = [f"stage {name}: {a.error}" for name, a in answers.items() if a.error]
        entry = answers.get(self._entry, agent_pb2.MasterStatus())
        status = agent_pb2.MasterStatus(
            app=self.app,
            version=versions.pop() if len(versions) == 1 else "",
            replicas=sum(a.replicas for a in answers.values()),
            ready_replicas=sum(a.ready_replicas for a in answers.values()),
            updating=not answers or any(a.updating for a in answers.values()),
            revision=max(self.revision, 0),
            error="; ".join(errors),
            proxy_addresses=entry.proxy_addresses,
        )
        return status.SerializeToString()

    async def stages(self) -> dict[str, bytes]:
        """Each stage's own MasterStatus, by stage app name (tests and ``replica_stats`` callers)."""
        return {name: await master.status() for name, master in self._stages.items()}

    async def routing(self) -> Routing | None:
        """The entry stage's table: what the app's proxies serve from."""
        return await _table(self._stages.get(self._entry))

    async def stage_routing(self, stage_app_name: str) -> Routing | None:
        """A stage's table, for its callers' stage handles (None until the stage has one)."""
        return await _table(self._stages.get(stage_app_name))

    async def info(self) -> dict[str, Any]:
        adopted = {name: master.adopted for name, master in self._stages.items()}
        return {"pid": os.getpid(), "adopted": adopted}

    async def replica_stats(self) -> dict[str, dict[str, Any]]:
        """Every stage's replicas' load, keyed by replica name (the names carry the stage app)."""
        stats: dict[str, dict[str, Any]] = {}
        for master in self._stages.values():
            stats.update(await master.replica_stats())
        return stats

    async def shutdown(self) -> int:
        """Stop every stage (callers first) and forget the desired state; returns actors killed."""
        killed = 0
        for master in reversed(list(self._stages.values())):
            killed += await master.shutdown()
        self._stages.clear()
        internal_kv._internal_kv_del(self._kv_key, namespace=RAY_NAMESPACE)
        return killed

    def _stage_masters(self, spec: common_pb2.ApplicationSpec) -> dict[str, ApplicationMaster]:
        """A stage master per stage of ``spec`` (created when missing); removed stages shut down."""
        entry = entry_stage(spec)
        self._entry = stage_app(self.app, entry, entry=True).name
        wanted = {stage_app(self.app, s.name, entry=s.name == entry).name for s in spec.stages}
        for name in sorted(set(self._stages) - wanted):
            task = asyncio.get_running_loop().create_task(self._stages.pop(name).shutdown())
            self._retiring.add(task)
            task.add_done_callback(self._retiring.discard)
        for name in sorted(wanted - set(self._stages)):
            ref = common_pb2.AppRef(namespace=self.app.namespace, name=name)
            self._stages[name] = ApplicationMaster(ref.SerializeToString(), **self._where)
        return self._stages


async def _table(master: ApplicationMaster | None) -> Routing | None:
    """A stage master's table (stages are Python deployments: always a replica table)."""
    routing = await master.routing() if master is not None else None
    return routing if isinstance(routing, Routing) else None
