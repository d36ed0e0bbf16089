"""How keeper commands find the keeper and their token: flags, then the environment, then the
local stack's state dir (``stack.json`` and ``admin.token``), so a local user types neither."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import wraps
from pathlib import Path
from typing import Any, TypeVar

import click
from google.protobuf import json_format
from google.protobuf.message import Message

from servefleet import stack
from servefleet.api import keeper_pb2, keeper_pb2_grpc
from servefleet.cli.common import output_option, state_dir_option
from servefleet.common.channels import TlsFiles, sync_channel, use_tls
from servefleet.pipeline_spec import replicas_wanted

F = TypeVar("F", bound=Callable[..., Any])
ADMIN_TOKEN_FILE = stack.ADMIN_TOKEN_FILE


def stack_address(state_dir: Path, part: str, flag: str) -> str:
    """A part's address from the stack's stack.json; a one-line error naming the flag otherwise."""
    try:
        found = stack.addresses(state_dir).get(part)
    except FileNotFoundError:
        found = None
    if not found:
        raise click.ClickException(
            f"no {part} address: pass {flag} HOST:PORT "
            f"or start a stack with `servefleet up --state-dir {state_dir}`"
        )
    return found


@dataclass
class KeeperConn:
    """A Keeper stub plus the metadata that authenticates every call."""

    address: str
    token: str
    state_dir: Path
    output: str

    def __post_init__(self) -> None:
        self.channel = sync_channel(self.address)
        self.stub = keeper_pb2_grpc.KeeperStub(self.channel)

    @property
    def md(self) -> list[tuple[str, str]]:
        return [("authorization", f"Bearer {self.token}")]


def adopt_stack_tls(state_dir: Path) -> None:
    """Talk TLS (and mTLS) like the local stack when it was started with ``--tls``."""
    try:
        found = stack.tls_files(state_dir)
    except (FileNotFoundError, stack.StackError):
        return
    if found.enabled and not TlsFiles.from_settings().enabled:
        use_tls(found)


def keeper_command(func: F) -> F:
    """Adds --state-dir, --keeper, --token and --output, and passes one ``conn: KeeperConn``."""

    @state_dir_option
    @click.option("--keeper", metavar="HOST:PORT", envvar="SERVEFLEET_KEEPER", help="Keeper address.")
    @click.option(
        "--token",
        envvar="SERVEFLEET_TOKEN",
        help="Bearer token (default: the local stack's admin token in <state-dir>/admin.token).",
    )
    @output_option
    @wraps(func)
    def wrapper(
        *args: Any, state_dir: Path, keeper: str | None, token: str | None, output: str, **kwargs: Any
    ) -> Any:
        address = keeper or stack_address(state_dir, "keeper", "--keeper")
        adopt_stack_tls(state_dir)
        if not token:
            path = state_dir / ADMIN_TOKEN_FILE
            if not path.exists():
                raise click.ClickException(f"no token: pass --token, set SERVEFLEET_TOKEN, or create {path}")
            token = path.read_text().strip()
        return func(*args, conn=KeeperConn(address, token, state_dir, output), **kwargs)

    return wrapper  # type: ignore[return-value]


def to_dict(message: Message) -> dict[str, Any]:
    return json_format.MessageToDict(message, preserving_proto_field_name=True)


def app_row(status: keeper_pb2.ApplicationStatus) -> dict[str, Any]:
    """One application as a table row (JSON output gets the whole message instead)."""
    ready = sum(p.ready_replicas for p in status.placements)
    per_cluster = replicas_wanted(status.spec, status.replicas, status.stage_replicas)
    return {
        "namespace": status.app.namespace,
        "name": status.app.name,
        "version": status.spec.version,
        "state": keeper_pb2.AppState.Name(status.state),
        "replicas": f"{ready}/{per_cluster * max(len(status.placements), 1)}",
        "clusters": ",".join(p.cluster for p in status.placements) or "-",
        "revision": status.revision,
        "reason": status.reason,
    }
