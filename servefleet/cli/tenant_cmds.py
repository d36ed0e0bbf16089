"""`servefleet tenant create|token|quota` (admin): who may use which namespaces, and how much."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import click

from servefleet.api import keeper_pb2
from servefleet.cli.common import emit, one_line_errors
from servefleet.cli.keeper_conn import KeeperConn, keeper_command, to_dict


@click.group()
def tenant() -> None:
    """Tenants, their tokens and quotas (admin token needed)."""


def quota_options(func: Callable[..., Any]) -> Callable[..., Any]:
    for flag, kind, what in reversed(
        (
            ("--max-applications", int, "applications"),
            ("--max-replicas", int, "replicas over all clusters"),
            ("--max-cpus", float, "CPUs over all replicas"),
            ("--max-gpus", float, "GPUs over all replicas"),
        )
    ):
        func = click.option(
            flag, type=kind, default=0, show_default=True, help=f"Limit on {what} (0: none)."
        )(func)
    return func


def _quota(kwargs: dict[str, Any]) -> keeper_pb2.Quota:
    return keeper_pb2.Quota(
        **{k: kwargs[k] for k in ("max_applications", "max_replicas", "max_cpus", "max_gpus")}
    )


def _show(conn: KeeperConn, info: keeper_pb2.TenantInfo) -> None:
    if conn.output == "json":
        emit([to_dict(info)], "json")
        return
    q = info.quota
    row = {
        "tenant": info.tenant,
        "namespaces": ",".join(info.namespaces),
        "max_applications": q.max_applications or "-",
        "max_replicas": q.max_replicas or "-",
        "max_cpus": f"{q.max_cpus:g}" if q.max_cpus else "-",
        "max_gpus": f"{q.max_gpus:g}" if q.max_gpus else "-",
    }
    emit([row], "table")


@tenant.command()
@click.argument("name")
@click.option(
    "--namespace", "-n", "namespaces", multiple=True, help="Namespace it owns (repeatable; default: NAME)."
)
@quota_options
@keeper_command
@one_line_errors
def create(conn: KeeperConn, name: str, namespaces: tuple[str, ...], **quota: Any) -> None:
    """Create tenant NAME owning its namespaces, with optional quotas."""
    request = keeper_pb2.CreateTenantRequest(
        tenant=name, namespaces=list(namespaces) or [name], quota=_quota(quota)
    )
    _show(conn, conn.stub.CreateTenant(request, metadata=conn.md))


@tenant.command()
@click.argument("name")
@click.option("--role", type=click.Choice(["tenant", "admin"]), default="tenant", show_default=True)
@keeper_command
@one_line_errors
def token(conn: KeeperConn, name: str, role: str) -> None:
    """Issue a token for tenant NAME; it is printed once (only its hash is stored)."""
    issued = conn.stub.IssueToken(keeper_pb2.IssueTokenRequest(tenant=name, role=role), metadata=conn.md)
    if conn.output == "json":
        emit([{"tenant": name, "role": role, "token": issued.token}], "json")
    else:
        click.echo(issued.token)


@tenant.command()
@click.argument("name")
@quota_options
@keeper_command
@one_line_errors
def quota(conn: KeeperConn, name: str, **limits: Any) -> None:
    """Replace tenant NAME's quota (0 lifts a limit)."""
    request = keeper_pb2.SetQuotaRequest(tenant=name, quota=_quota(limits))
    _show(conn, conn.stub.SetQuota(request, metadata=conn.md))
