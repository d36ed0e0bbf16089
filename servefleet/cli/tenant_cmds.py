"""`servefleet tenant create|token|quota` and `servefleet token issue|list|revoke` (admin): who may
use which namespaces, how much, and with which credentials."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import click

from servefleet.api import common_pb2, keeper_pb2
from servefleet.cli.common import emit, one_line_errors
from servefleet.cli.keeper_conn import KeeperConn, keeper_command, to_dict
from servefleet.common.auth import ROLES


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


@click.group(name="token")
def token_group() -> None:
    """Every credential the keeper issued: issue service tokens, list, revoke (admin token needed)."""


@token_group.command(name="issue")
@click.argument("role", type=click.Choice(ROLES))
@click.option("--tenant", "tenant_name", default="", help="Role tenant: the tenant it acts for.")
@click.option("--app", "app", default="", metavar="NAMESPACE/NAME", help="Role endpoint: its application.")
@click.option("--description", default="", help="What it is for (shown by `token list`).")
@keeper_command
@one_line_errors
def issue(conn: KeeperConn, role: str, tenant_name: str, app: str, description: str) -> None:
    """Issue a token of ROLE (e.g. autoscaler); printed once, only its hash is stored."""
    namespace, _, name = app.rpartition("/")
    request = keeper_pb2.IssueTokenRequest(
        role=role,
        tenant=tenant_name,
        app=common_pb2.AppRef(namespace=namespace, name=name),
        description=description,
    )
    issued = conn.stub.IssueToken(request, metadata=conn.md)
    if conn.output == "json":
        emit([{"token_id": issued.token_id, "role": role, "token": issued.token}], "json")
    else:
        click.echo(issued.token)


@token_group.command(name="list")
@click.option("--tenant", "tenant_name", default="", help="Only this tenant's tokens.")
@keeper_command
@one_line_errors
def list_tokens(conn: KeeperConn, tenant_name: str) -> None:
    """Every token (its id, role, tenant or app, when made); never the tokens themselves."""
    found = conn.stub.ListTokens(keeper_pb2.ListTokensRequest(tenant=tenant_name), metadata=conn.md)
    rows = [
        {
            "token_id": t.token_id,
            "role": t.role,
            "tenant": t.tenant,
            "app": f"{t.app.namespace}/{t.app.name}" if t.app.name else "-",
            "description": t.description or "-",
        }
        for t in found.tokens
    ]
    emit([to_dict(t) for t in found.tokens] if conn.output == "json" else rows, conn.output)


@token_group.command()
@click.argument("token_id")
@keeper_command
@one_line_errors
def revoke(conn: KeeperConn, token_id: str) -> None:
    """Revoke token TOKEN_ID: every service refuses it within SERVEFLEET_TOKEN_CACHE_S (5 s)."""
    gone = conn.stub.RevokeToken(keeper_pb2.RevokeTokenRequest(token_id=token_id), metadata=conn.md)
    emit([to_dict(gone.token)], conn.output)
