"""What the cluster agent calls to drive application masters on its Ray cluster.

The caller has already done ``ray.init(address=...)``. Masters are detached named actors
(``master:{namespace}/{name}`` in Ray namespace ``servefleet``, ``max_restarts=-1``), so they
outlive the agent and are found again by name after the agent restarts.
"""

from __future__ import annotations

import asyncio
import contextlib
import tempfile
from collections.abc import Mapping
from typing import Any

import ray

from servefleet.api import agent_pb2, common_pb2
from servefleet.common.appid import AppId
from servefleet.common.config import settings
from servefleet.common.errors import FailedPrecondition
from servefleet.services.actors import (
    MASTER_PREFIX,
    RAY_NAMESPACE,
    app_from_master_name,
    master_name,
    passed_env,
    proxy_prefix,
    replica_prefix,
    stage_replica_prefix,
)
from servefleet.services.master import ApplicationMaster
from servefleet.services.pipeline import PipelineMaster
from servefleet.services.sharded_master import ShardedMaster
from servefleet.spec import load_spec

MasterActor = ray.remote(ApplicationMaster)
PipelineMasterActor = ray.remote(PipelineMaster)
#: Kinds this data plane runs.
SERVED_KINDS = ("python", "direct", "triton", "sharded", "pipeline")
ShardedMasterActor = ray.remote(ShardedMaster)
#: Longest a status call may take before a master counts as unreachable (it may be restarting).
STATUS_TIMEOUT_S = 10.0


async def apply(
    spec: common_pb2.ApplicationSpec,
    replicas: int,
    revision: int,
    *,
    cluster: str,
    discovery: str,
    redis: str = "",
    broker: str = "",
    credential: str = "",
    stages: Mapping[str, int] | None = None,
) -> agent_pb2.MasterStatus:
    """Create the app's master if missing (``credential``: the app's endpoint token, used only
    then), else hand it the new desired state (a pipeline's: with each stage's count).

    Returns at once with the master's status (the rollout continues in the master; poll
    :func:`status`). A revision older than the one the master holds is ignored. A new version
    rolls out surge-then-drain; a new replica count only scales.
    """
    spec = load_spec(spec)
    if spec.kind not in SERVED_KINDS:
        raise FailedPrecondition(
            f"spec.kind {spec.kind!r}: this cluster's data plane serves {', '.join(SERVED_KINDS)} apps"
        )
    for deployment in (spec, *spec.stages):
        _upload_working_dir(deployment)
    app = AppId.parse(spec).ref()
    env = passed_env()
    special: dict[str, Any] = {"sharded": ShardedMasterActor, "pipeline": PipelineMasterActor}
    actor = special.get(spec.kind, MasterActor)
    master: Any = actor.options(
        name=master_name(app),
        namespace=RAY_NAMESPACE,
        lifetime="detached",
        get_if_exists=True,
        max_restarts=-1,
        max_task_retries=-1,
        num_cpus=0,
        runtime_env={"env_vars": env} if env else None,
    ).remote(
        app.SerializeToString(),
        cluster=cluster,
        discovery=discovery,
        redis=redis,
        broker=broker,
        credential=credential,
    )
    if spec.kind == "pipeline":
        answer = await master.apply.remote(spec.SerializeToString(), replicas, revision, dict(stages or {}))
    else:
        answer = await master.apply.remote(spec.SerializeToString(), replicas, revision)
    return agent_pb2.MasterStatus.FromString(answer)


async def remove(app: common_pb2.AppRef) -> bool:
    """Kill the app's master and every replica and proxy it owns; False when none existed."""
    master = _master(app)
    removed = False
    if master is not None:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(
                _await(master.shutdown.remote()), STATUS_TIMEOUT_S + settings.shutdown_grace_s
            )
        with contextlib.suppress(Exception):
            ray.kill(master, no_restart=True)
        removed = True
    # Anything the master could not reach (or a master that was already gone) left behind.
    for name in _named(replica_prefix(app), proxy_prefix(app), stage_replica_prefix(app)):
        with contextlib.suppress(ValueError):
            ray.kill(ray.get_actor(name, namespace=RAY_NAMESPACE), no_restart=True)
            removed = True
    return removed


async def status(app: common_pb2.AppRef) -> agent_pb2.MasterStatus | None:
    """The master's status, or None when the app has no master here."""
    master = _master(app)
    if master is None:
        return None
    return await _status(master)


async def list_all() -> list[agent_pb2.MasterStatus]:
    """Status of every master on this cluster (unreachable ones report their error)."""
    names = _named(MASTER_PREFIX)
    found = [(name, _master(app_from_master_name(name))) for name in names]
    answers = await asyncio.gather(*(_status(m) for _, m in found if m is not None), return_exceptions=True)
    out = []
    for (name, _), answer in zip([f for f in found if f[1] is not None], answers, strict=True):
        if isinstance(answer, agent_pb2.MasterStatus):
            out.append(answer)
        else:
            out.append(agent_pb2.MasterStatus(app=app_from_master_name(name), error=f"unreachable: {answer}"))
    return out


async def replica_stats(app: common_pb2.AppRef) -> dict[str, dict[str, Any]]:
    """Per-replica load (in-flight, latency EWMA, counts) of an app; empty when it has no master."""
    master = _master(app)
    if master is None:
        return {}
    stats: dict[str, dict[str, Any]] = await master.replica_stats.remote()
    return stats


def _upload_working_dir(spec: common_pb2.ApplicationSpec) -> None:
    """A local working_dir becomes a content-addressed package in the cluster (a ``gcs://`` URI):
    Ray accepts local paths only from the driver, and replicas are created by the master. Same
    content, same URI, so an unchanged directory never triggers a rollout."""
    if not spec.working_dir or "://" in spec.working_dir:
        return
    from ray._private.runtime_env.working_dir import upload_working_dir_if_needed

    with tempfile.TemporaryDirectory(prefix="sf-wd-") as scratch:
        env = upload_working_dir_if_needed(
            {"working_dir": spec.working_dir}, include_gitignore=True, scratch_dir=scratch
        )
    spec.working_dir = env["working_dir"]


async def _status(master: Any) -> agent_pb2.MasterStatus:
    answer = await asyncio.wait_for(_await(master.status.remote()), STATUS_TIMEOUT_S)
    return agent_pb2.MasterStatus.FromString(answer)


def _master(app: common_pb2.AppRef) -> Any:
    try:
        return ray.get_actor(master_name(app), namespace=RAY_NAMESPACE)
    except ValueError:
        return None


def _named(*prefixes: str) -> list[str]:
    return sorted(
        entry["name"]
        for entry in ray.util.list_named_actors(all_namespaces=True)
        if entry["namespace"] == RAY_NAMESPACE and entry["name"].startswith(prefixes)
    )


async def _await(ref: Any) -> Any:
    return await ref
