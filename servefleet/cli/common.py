"""What every CLI command shares: the state dir option, one-line errors, tables and JSON output."""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from functools import wraps
from pathlib import Path
from typing import Any, TypeVar

import click
import grpc

from servefleet.common.errors import ServefleetError, from_rpc_error
from servefleet.stack import StackError

F = TypeVar("F", bound=Callable[..., Any])

state_dir_option = click.option(
    "--state-dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=Path(".servefleet"),
    show_default=True,
    envvar="SERVEFLEET_STATE_DIR",
    help="Where the local stack keeps its data and stack.json.",
)

output_option = click.option(
    "--output", "-o", type=click.Choice(["table", "json"]), default="table", show_default=True
)


def one_line_errors(func: F) -> F:
    """Turn the errors a person can act on into one line on stderr and exit code 1, no traceback."""

    @wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except grpc.RpcError as exc:
            err = from_rpc_error(exc)
            raise click.ClickException(f"{exc.code().name}: {err}") from None
        except (StackError, ServefleetError, TimeoutError, FileNotFoundError) as exc:
            raise click.ClickException(str(exc)) from None

    return wrapper  # type: ignore[return-value]


def emit(rows: Sequence[dict[str, Any]], output: str, columns: Sequence[str] | None = None) -> None:
    """Print rows as an aligned table or as JSON."""
    if output == "json":
        click.echo(json.dumps(list(rows), indent=2, default=str))
        return
    if not rows:
        click.echo("(none)")
        return
    cols = list(columns or rows[0].keys())
    cells = [[("" if r.get(c) is None else str(r.get(c))) for c in cols] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(cols)]
    click.echo("  ".join(c.upper().ljust(w) for c, w in zip(cols, widths, strict=True)))
    for row in cells:
        click.echo("  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)))
