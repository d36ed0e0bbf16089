"""`servefleet up | down | status`: the embedded local stack."""

from __future__ import annotations

import json
import signal
import sys
import time
from pathlib import Path

import click

from servefleet import launch, stack
from servefleet.cli.common import emit, one_line_errors, output_option, state_dir_option


def _progress(message: str) -> None:
    click.echo(f"  {message}", err=True)


def _resources(text: str) -> dict[str, float]:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise click.BadParameter(f"not JSON: {exc}", param_hint="--ray-resources") from None
    if not isinstance(value, dict) or not all(isinstance(v, int | float) for v in value.values()):
        raise click.BadParameter('expected {"name": amount, ...}', param_hint="--ray-resources")
    return {str(k): float(v) for k, v in value.items()}


@click.command()
@state_dir_option
@click.option(
    "--base-port",
    type=click.IntRange(1024, 65000),
    default=7400,
    show_default=True,
    help="First of the ports the stack uses (see servefleet.stack.PORTS for offsets).",
)
@click.option(
    "--ray-num-cpus",
    type=click.IntRange(1, 256),
    default=2,
    show_default=True,
    help="CPUs the local Ray head offers to actors.",
)
@click.option(
    "--ray-resources",
    default="{}",
    metavar="JSON",
    help="Custom resources the local Ray head offers, e.g. '{\"accelerator\": 1}' (examples/llm.yaml).",
)
@click.option(
    "--etcd",
    "etcd_address",
    metavar="HOST:PORT[,HOST:PORT...]",
    help="Use this etcd (every member of a cluster) instead of starting one.",
)
@click.option(
    "--etcd-members",
    type=click.Choice(["1", "3", "5"]),
    default="1",
    show_default=True,
    help="Members of the stack's own etcd cluster (3 survives losing one).",
)
@click.option(
    "--discovery-instances",
    type=click.IntRange(1, stack.MAX_DISCOVERY_INSTANCES),
    default=1,
    show_default=True,
    help="Discovery instances behind one name (stack.json lists them; SDKs move between them).",
)
@click.option("--redis", "redis_address", metavar="HOST:PORT", help="Use this Redis instead of starting one.")
@click.option(
    "--ray", "ray_address", metavar="HOST:PORT", help="Use this Ray cluster instead of starting one."
)
@click.option(
    "--redis-appendfsync",
    type=click.Choice(["always", "everysec", "no"]),
    default=launch.REDIS_APPENDFSYNC,
    show_default=True,
    help="Redis AOF fsync policy (the broker's durability window).",
)
@click.option("--detach", is_flag=True, help="Return once healthy; stop later with `servefleet down`.")
@click.option(
    "--tls", is_flag=True, help="TLS and mTLS between the services, with a local CA made in <state-dir>/tls."
)
@one_line_errors
def up(
    state_dir: Path,
    base_port: int,
    ray_num_cpus: int,
    ray_resources: str,
    etcd_address: str | None,
    etcd_members: str,
    discovery_instances: int,
    redis_address: str | None,
    ray_address: str | None,
    redis_appendfsync: str,
    detach: bool,
    tls: bool,
) -> None:
    """Start etcd, Redis, Ray and every servefleet service; wait until all are healthy."""
    config = stack.StackConfig(
        state_dir=state_dir,
        base_port=base_port,
        ray_num_cpus=ray_num_cpus,
        ray_resources=_resources(ray_resources),
        etcd=etcd_address,
        etcd_members=int(etcd_members),
        discovery_instances=discovery_instances,
        redis=redis_address,
        ray=ray_address,
        redis_appendfsync=redis_appendfsync,
        tls=tls,
    )
    parts = stack.preflight(config)
    started = time.monotonic()
    click.echo(f"servefleet up: state dir {state_dir}", err=True)
    stack.up(config, parts, progress=_progress)
    click.echo(f"all {len(parts)} parts healthy in {time.monotonic() - started:.1f}s", err=True)
    emit([{"name": p.name, "address": p.address, "pid": p.pid or "external"} for p in parts], "table")
    if detach:
        return

    def _stop(*_: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, _stop)
    click.echo("running; Ctrl-C stops everything", err=True)
    try:
        while stack.running(state_dir):
            time.sleep(1.0)
    except KeyboardInterrupt:
        pass
    finally:
        if stack.stack_file(state_dir).exists():
            stack.down(state_dir, progress=_progress)
            click.echo("stopped", err=True)


@click.command()
@state_dir_option
@one_line_errors
def down(state_dir: Path) -> None:
    """Stop everything `servefleet up` started in this state dir."""
    stack.down(state_dir, progress=_progress)
    click.echo("stopped", err=True)


@click.command()
@state_dir_option
@output_option
@one_line_errors
def status(state_dir: Path, output: str) -> None:
    """Health of each part of the stack (gRPC health protocol for the services) and how often the
    supervisor restarted it. Exit 1 if any is down."""
    rows = stack.status(state_dir)
    emit(rows, output, ["name", "address", "metrics", "pid", "healthy", "restarts", "detail"])
    if not all(r["healthy"] for r in rows):
        sys.exit(1)
