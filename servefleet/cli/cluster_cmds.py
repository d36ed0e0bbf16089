"""`servefleet cluster list`: the serving clusters the keeper knows."""

from __future__ import annotations

import time

import click

from servefleet.api import keeper_pb2
from servefleet.cli.common import emit, one_line_errors
from servefleet.cli.keeper_conn import KeeperConn, keeper_command, to_dict


@click.group()
def cluster() -> None:
    """Serving clusters (one Ray cluster each, registered by its agent)."""


def _resources(capacity: dict[str, float], free: dict[str, float], name: str) -> str:
    total = capacity.get(name, 0.0)
    return f"{free.get(name, 0.0):g}/{total:g}" if total else "-"


@cluster.command(name="list")
@keeper_command
@one_line_errors
def list_(conn: KeeperConn) -> None:
    """Every registered cluster: alive, free/total CPU and GPU, labels, last heartbeat."""
    found = conn.stub.ListClusters(keeper_pb2.ListClustersRequest(), metadata=conn.md).clusters
    if conn.output == "json":
        emit([to_dict(c) | {"alive": c.alive} for c in found], "json")
        return
    now = time.time()
    rows = [
        {
            "name": c.name,
            "alive": c.alive,
            "cpu_free": _resources(dict(c.capacity), dict(c.free), "CPU"),
            "gpu_free": _resources(dict(c.capacity), dict(c.free), "GPU"),
            "labels": ",".join(f"{k}={v}" for k, v in sorted(c.labels.items())) or "-",
            "agent": c.agent_address,
            "heartbeat": f"{now - c.heartbeat_at:.0f}s ago",
        }
        for c in found
    ]
    emit(rows, "table")
