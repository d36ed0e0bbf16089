"""Placement: labels, GPU need, spread, free resources, and reasons a person can act on."""

from __future__ import annotations

from servefleet.api import common_pb2, keeper_pb2
from servefleet.keeper.placement import alive, demand, place


def cluster(
    name: str, cpus: float, *, gpus: float = 0, free_cpus: float | None = None, **labels: str
) -> keeper_pb2.ClusterInfo:
    capacity = {"CPU": cpus, **({"GPU": gpus} if gpus else {})}
    free = {"CPU": cpus if free_cpus is None else free_cpus, **({"GPU": gpus} if gpus else {})}
    return keeper_pb2.ClusterInfo(name=name, capacity=capacity, free=free, labels=labels, alive=True)


def app(cpus: float = 0.5, gpus: float = 0, spread: int = 0, **labels: str) -> common_pb2.ApplicationSpec:
    spec = common_pb2.ApplicationSpec(name="a")
    spec.resources.num_cpus = cpus
    spec.resources.num_gpus = gpus
    spec.placement.spread = spread
    spec.placement.cluster_labels.update(labels)
    return spec


def test_demand_multiplies_by_replicas_and_keeps_custom_resources() -> None:
    spec = app(cpus=0.5, gpus=1)
    spec.resources.custom["gpu_node"] = 1
    assert demand(spec, 3) == {"CPU": 1.5, "GPU": 3, "gpu_node": 3}


def test_picks_the_cluster_with_most_free_cpu_and_books_it() -> None:
    clusters = [cluster("a", 4, free_cpus=1), cluster("b", 4, free_cpus=3)]
    free: dict[str, dict[str, float]] = {}
    first = place(app(cpus=2), 1, clusters, free)
    assert first.clusters == ["b"] and free["b"]["CPU"] == 1
    second = place(app(cpus=1), 1, clusters, free)  # b now has 1 left, a has 1: name breaks the tie
    assert second.clusters == ["a"]
    third = place(app(cpus=1), 2, clusters, free)
    assert third.clusters == [] and "CPU: needs 2, 0 free" in third.reason


def test_labels_gpu_and_spread() -> None:
    clusters = [cluster("cpu", 8, zone="eu"), cluster("gpu", 8, gpus=2, zone="us")]
    assert place(app(gpus=1), 1, clusters, {}).clusters == ["gpu"]
    assert place(app(zone="eu"), 1, clusters, {}).clusters == ["cpu"]
    assert sorted(place(app(spread=2), 1, clusters, {}).clusters) == ["cpu", "gpu"]
    nowhere = place(app(gpus=1, zone="eu"), 1, clusters, {})
    assert nowhere.clusters == []
    assert "cpu: GPU: needs 1, cluster has 0 in all" in nowhere.reason
    assert "gpu: label zone=eu wanted, cluster has zone=us" in nowhere.reason
    assert "needs 2 eligible cluster(s), found 1" in place(app(spread=2, zone="us"), 1, clusters, {}).reason


def test_dead_clusters_and_empty_registry() -> None:
    dead = cluster("old", 8)
    dead.alive = False
    assert "old: not alive" in place(app(), 1, [dead], {}).reason
    assert "no cluster is registered" in place(app(), 1, [], {}).reason
    info = keeper_pb2.ClusterInfo(heartbeat_at=100.0)
    assert alive(info, 105.0, 6.0) and not alive(info, 107.0, 6.0)
