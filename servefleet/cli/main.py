"""`servefleet`: the command line for everything a user does."""

from __future__ import annotations

import sys

import click

from servefleet import __version__
from servefleet.cli import app_cmds, cluster_cmds, stack_cmds, tenant_cmds


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="servefleet")
def cli() -> None:
    """servefleet: serverless model serving on Ray."""


cli.add_command(stack_cmds.up)
cli.add_command(stack_cmds.down)
cli.add_command(stack_cmds.status)
cli.add_command(app_cmds.app)
cli.add_command(cluster_cmds.cluster)
cli.add_command(tenant_cmds.tenant)
cli.add_command(tenant_cmds.token_group)


def main(argv: list[str] | None = None) -> None:
    """Run the CLI; usage mistakes print one line (`error: ...`) and exit 2, not a usage page."""
    try:
        cli.main(args=argv, standalone_mode=False)
    except click.exceptions.Abort:
        sys.exit(130)
    except click.UsageError as exc:
        hint = f" (see `{exc.ctx.command_path} --help`)" if exc.ctx else ""
        click.echo(f"error: {exc.format_message()}{hint}", err=True)
        sys.exit(2)
    except click.ClickException as exc:
        click.echo(f"error: {exc.format_message()}", err=True)
        sys.exit(exc.exit_code)
