"""Which clusters an application goes to: pure functions over the cluster registry.

A cluster is eligible when it is alive, carries every label the spec asks for, and has free
resources for all replicas the app wants there. The app goes to the ``spread`` (at least one)
eligible clusters with the most free CPU. When too few are eligible it goes nowhere and the
reason names each cluster's shortfall, so a person knows what to change.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from servefleet.api import common_pb2, keeper_pb2
from servefleet.spec import actors_per_replica

CPU, GPU, MEMORY = "CPU", "GPU", "memory"


def demand(spec: common_pb2.ApplicationSpec, replicas: int) -> dict[str, float]:
    """Ray resources ``replicas`` replicas of ``spec`` need on one cluster."""
    res, replicas = spec.resources, replicas * actors_per_replica(spec)
    need = {CPU: res.num_cpus * replicas, GPU: res.num_gpus * replicas, MEMORY: float(res.memory * replicas)}
    for name, amount in res.custom.items():
        need[name] = need.get(name, 0.0) + amount * replicas
    return {k: v for k, v in need.items() if v > 0}


def alive(cluster: keeper_pb2.ClusterInfo, now: float, dead_after_s: float) -> bool:
    return now - cluster.heartbeat_at <= dead_after_s


def shortfall(
    cluster: keeper_pb2.ClusterInfo,
    need: Mapping[str, float],
    labels: Mapping[str, str],
    free: Mapping[str, float],
) -> str:
    """Why ``cluster`` cannot take the app ("" when it can)."""
    if not cluster.alive:
        return "not alive (no heartbeat)"
    for key, value in labels.items():
        if cluster.labels.get(key) != value:
            have = cluster.labels.get(key)
            return f"label {key}={value} wanted, cluster has {key}={have}" if have else f"no label {key}"
    for name, amount in need.items():
        if cluster.capacity.get(name, 0.0) < amount:
            return f"{name}: needs {amount:g}, cluster has {cluster.capacity.get(name, 0.0):g} in all"
        if free.get(name, 0.0) < amount:
            return f"{name}: needs {amount:g}, {free.get(name, 0.0):g} free"
    return ""


@dataclass
class Decision:
    clusters: list[str]
    reason: str  # why nothing was chosen ("" when placed)


def place(
    spec: common_pb2.ApplicationSpec,
    replicas: int,
    clusters: Iterable[keeper_pb2.ClusterInfo],
    free: dict[str, dict[str, float]],
    *,
    wanted: int = 0,
) -> Decision:
    """Pick clusters for ``spec`` (``wanted`` of them, default its spread). ``free`` (cluster ->
    resource -> amount) is what is left this pass; the chosen clusters' entries are reduced, so apps
    placed in one pass don't overbook."""
    need = demand(spec, replicas)
    wanted = wanted or max(spec.placement.spread, 1)
    eligible: list[keeper_pb2.ClusterInfo] = []
    why: list[str] = []
    for cluster in sorted(clusters, key=lambda c: c.name):
        left = free.setdefault(cluster.name, dict(cluster.free))
        problem = shortfall(cluster, need, spec.placement.cluster_labels, left)
        if problem:
            why.append(f"{cluster.name}: {problem}")
        else:
            eligible.append(cluster)
    if len(eligible) < wanted:
        detail = "; ".join(why) if why else "no cluster is registered"
        return Decision([], f"needs {wanted} eligible cluster(s), found {len(eligible)}: {detail}")
    eligible.sort(key=lambda c: (-free[c.name].get(CPU, 0.0), c.name))
    chosen = [c.name for c in eligible[:wanted]]
    for name in chosen:
        for resource, amount in need.items():
            free[name][resource] = free[name].get(resource, 0.0) - amount
    return Decision(chosen, "")
