"""`servefleet app deploy|list|status|update|scale|delete|watch|endpoints|infer`."""

from __future__ import annotations

import json
import time
from collections.abc import Iterable
from pathlib import Path

import click
import grpc
import numpy as np

from servefleet import spec as specs
from servefleet.api import common_pb2, discovery_pb2, discovery_pb2_grpc, keeper_pb2
from servefleet.cli.common import emit, one_line_errors
from servefleet.cli.keeper_conn import KeeperConn, app_row, keeper_command, stack_address, to_dict
from servefleet.common.appid import AppId
from servefleet.common.channels import sync_channel
from servefleet.common.metrics import METRICS_KIND
from servefleet.common.tensors import DTYPES, datatype_of
from servefleet.pipeline_spec import stage_counts
from servefleet.sdk import Client
from servefleet.sdk.client import served_model

AppState = keeper_pb2.AppState
#: Where deploy/update stop following: the app serves, or it cannot.
SETTLED: set[int] = {AppState.RUNNING, AppState.FAILED, AppState.DELETED}

AppRef = common_pb2.AppRef
namespace_option = click.option(
    "--namespace", "-n", default="", help="Application namespace (default: 'default', or a tenant's own)."
)


@click.group()
def app() -> None:
    """Deploy and manage applications through the keeper."""


def _show(conn: KeeperConn, statuses: Iterable[keeper_pb2.ApplicationStatus]) -> None:
    statuses = list(statuses)
    if conn.output == "json":
        emit([to_dict(s) for s in statuses], "json")
    else:
        emit([app_row(s) for s in statuses], "table")


def _print_event(conn: KeeperConn, event: keeper_pb2.StatusEvent) -> None:
    """Progress goes to stderr as a line in table mode, to stdout as JSON in json mode."""
    if conn.output == "table":
        click.echo(f"{time.strftime('%H:%M:%S')} {AppState.Name(event.state):<9} {event.reason}", err=True)
    else:
        click.echo(json.dumps(to_dict(event)))


def _follow(conn: KeeperConn, ref: common_pb2.AppRef, timeout: float, until: set[int], since: int = 0) -> int:
    """Print status events until one of ``until`` for revision ``since`` or later (or the timeout);
    returns the last state. A keeper that restarts meanwhile (UNAVAILABLE) is waited for and the
    watch opened again."""
    state, last = AppState.APP_STATE_UNSPECIFIED, ("", 0)
    deadline = time.monotonic() + timeout
    while True:
        events = conn.stub.WatchApplication(
            keeper_pb2.WatchApplicationRequest(app=ref), metadata=conn.md, timeout=deadline - time.monotonic()
        )
        try:
            for event in events:
                state = event.state
                if (event.reason, event.state) != last:  # a reopened watch repeats the current status
                    last = (event.reason, event.state)
                    _print_event(conn, event)
                if event.state in until and (event.revision >= since or event.state == AppState.DELETED):
                    return state
            return state
        except grpc.RpcError as exc:
            if exc.code() == grpc.StatusCode.NOT_FOUND and AppState.DELETED in until:
                _print_event(conn, keeper_pb2.StatusEvent(app=ref, state=AppState.DELETED, reason="gone"))
                return AppState.DELETED  # it went before the watch opened
            if exc.code() == grpc.StatusCode.UNAVAILABLE and time.monotonic() + 1 < deadline:
                time.sleep(1.0)  # the keeper is restarting: reconnect
                continue
            if exc.code() != grpc.StatusCode.DEADLINE_EXCEEDED:
                raise
            raise click.ClickException(
                f"{ref.namespace}/{ref.name} still {AppState.Name(state)} after {timeout:g}s "
                "(it keeps going; `servefleet app watch` follows it)"
            ) from None
        finally:
            events.cancel()


def _finish(conn: KeeperConn, status: keeper_pb2.ApplicationStatus, wait: bool, timeout: float) -> None:
    """Follow a change to its end (RUNNING or FAILED at its revision), then show the app."""
    ref = status.app
    state = _follow(conn, ref, timeout, SETTLED, status.revision) if wait else AppState.APP_STATE_UNSPECIFIED
    if state != AppState.DELETED:
        _show(conn, [conn.stub.GetApplication(keeper_pb2.GetApplicationRequest(app=ref), metadata=conn.md)])
    if state == AppState.FAILED:
        raise click.ClickException(f"{ref.namespace}/{ref.name} FAILED")


wait_option = click.option("--wait/--no-wait", default=True, show_default=True, help="Follow until settled.")
timeout_option = click.option("--timeout", default=600.0, show_default=True, help="Seconds to follow.")


@app.command()
@click.argument("spec_file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@wait_option
@timeout_option
@keeper_command
@one_line_errors
def deploy(conn: KeeperConn, spec_file: Path, wait: bool, timeout: float) -> None:
    """Submit SPEC_FILE (YAML) and show progress until RUNNING or FAILED."""
    spec = specs.load_spec(spec_file)
    submitted = conn.stub.SubmitApplication(keeper_pb2.SubmitApplicationRequest(spec=spec), metadata=conn.md)
    click.echo(
        f"submitted {submitted.app.namespace}/{submitted.app.name} revision {submitted.revision}", err=True
    )
    _finish(conn, submitted, wait, timeout)


@app.command()
@click.argument("spec_file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--revision", type=int, default=0, help="Expected revision (default: the current one).")
@wait_option
@timeout_option
@keeper_command
@one_line_errors
def update(conn: KeeperConn, spec_file: Path, revision: int, wait: bool, timeout: float) -> None:
    """Roll out SPEC_FILE as the new desired state (compare-and-swap on the revision)."""
    spec = specs.load_spec(spec_file)
    if not revision:
        current = conn.stub.GetApplication(
            keeper_pb2.GetApplicationRequest(app=AppId.parse(spec).ref()), metadata=conn.md
        )
        revision = current.revision
    updated = conn.stub.UpdateApplication(
        keeper_pb2.UpdateApplicationRequest(spec=spec, expected_revision=revision), metadata=conn.md
    )
    click.echo(f"updated {updated.app.namespace}/{updated.app.name} to revision {updated.revision}", err=True)
    _finish(conn, updated, wait, timeout)


@app.command(name="list")
@namespace_option
@click.option("--label", "-l", multiple=True, help="Label filter key=value (repeatable).")
@click.option("--state", type=click.Choice([s for s in AppState.keys() if s != "APP_STATE_UNSPECIFIED"]))
@keeper_command
@one_line_errors
def list_(conn: KeeperConn, namespace: str, label: tuple[str, ...], state: str | None) -> None:
    """Applications you may see, every page."""
    selector = dict(item.partition("=")[::2] for item in label)
    request = keeper_pb2.ListApplicationsRequest(namespace=namespace, label_selector=selector, state=state)
    found: list[keeper_pb2.ApplicationStatus] = []
    while True:
        page = conn.stub.ListApplications(request, metadata=conn.md)
        found += page.applications
        if not page.next_page_token:
            break
        request.page_token = page.next_page_token
    _show(conn, found)


def shard_rows(status: keeper_pb2.ApplicationStatus) -> list[dict[str, object]]:
    """kind sharded: one row per shard replica, with its table part and the part's resident memory
    as the replica measured it."""
    return [
        {
            "cluster": p.cluster,
            "shard": s.shard,
            "layout": s.layout,
            "ready": s.ready,
            "rows": s.rows,
            "table_mib": round(s.table_bytes / 2**20, 1),
            "resident_mib": round(s.resident_bytes / 2**20, 1),
            "node": s.node_id[:12],
        }
        for p in status.placements
        for s in p.shards
    ]


@app.command()
@click.argument("name")
@namespace_option
@keeper_command
@one_line_errors
def status(conn: KeeperConn, name: str, namespace: str) -> None:
    """One application's state, reason and placements."""
    got = conn.stub.GetApplication(
        keeper_pb2.GetApplicationRequest(app=AppId.parse(AppRef(namespace=namespace, name=name)).ref()),
        metadata=conn.md,
    )
    if conn.output == "json":
        emit([to_dict(got)], "json")
        return
    _show(conn, [got])
    click.echo(f"scaling: {scaling_line(got.scaling, got.replicas)}")
    if got.stage_replicas:  # kind pipeline: each stage scales on its own
        click.echo("")
        emit(stage_rows(got), "table")
    rows = [
        {"cluster": p.cluster, "replicas": p.replicas, "ready": p.ready_replicas, "version": p.version}
        for p in got.placements
    ]
    if rows:
        click.echo("")
        emit(rows, "table")
    shards = shard_rows(got)
    if shards:  # kind sharded: what each shard replica holds, measured in the replica
        click.echo("")
        emit(shards, "table")


def stage_rows(got: keeper_pb2.ApplicationStatus) -> list[dict[str, object]]:
    """A pipeline's stages: the count the keeper holds for each, its range, who drives it."""
    counts = stage_counts(got.spec, got.stage_replicas)
    return [
        {
            "stage": stage.name,
            "replicas": counts[stage.name],
            "range": f"[{stage.replicas.min}, {stage.replicas.max}]",
            "autoscaled": "yes" if stage.HasField("autoscaling") else "no",
        }
        for stage in got.spec.stages
    ]


def scaling_line(scaling: keeper_pb2.Scaling, replicas: int) -> str:
    """Who holds the replica count and why, in one line (the precedence rule made visible)."""
    when = time.strftime("%H:%M:%S", time.localtime(scaling.at)) if scaling.at else "-"
    if not scaling.autoscaled:
        owner = "fixed (no autoscaling block)"
    elif scaling.paused:
        owner = "person (autoscaler paused; `app scale NAME --auto` resumes it)"
    else:
        owner = "autoscaler"
    return (
        f"{replicas} replica(s) held by {owner}; last set by {scaling.by or '-'} at {when}: {scaling.reason}"
    )


@app.command()
@click.argument("name")
@click.argument("replicas", type=click.IntRange(0), required=False)
@namespace_option
@click.option(
    "--auto", is_flag=True, help="Hand the count back to the autoscaler (after a person pinned it)."
)
@click.option("--reason", default="", help="Why, shown in `app status`.")
@click.option("--stage", default="", help="A pipeline's stage to scale (pipelines scale per stage).")
@keeper_command
@one_line_errors
def scale(
    conn: KeeperConn, name: str, replicas: int | None, namespace: str, auto: bool, reason: str, stage: str
) -> None:
    """Set REPLICAS per cluster (of one --stage of a pipeline). On an autoscaled app a person
    wins: this pins the count and pauses the autoscaler for the app until `--auto` hands it back."""
    if (replicas is None) == (not auto):
        raise click.UsageError("give either REPLICAS or --auto")
    request = keeper_pb2.ScaleApplicationRequest(
        app=AppId.parse(AppRef(namespace=namespace, name=name)).ref(),
        replicas=replicas or 0,
        reason=reason,
        resume_autoscaling=auto,
        stage=stage,
    )
    _show(conn, [conn.stub.ScaleApplication(request, metadata=conn.md)])


@app.command()
@click.argument("name")
@namespace_option
@click.option("--wait/--no-wait", default=False, show_default=True, help="Follow until DELETED.")
@timeout_option
@keeper_command
@one_line_errors
def delete(conn: KeeperConn, name: str, namespace: str, wait: bool, timeout: float) -> None:
    """Remove the application from every cluster."""
    ref = AppId.parse(AppRef(namespace=namespace, name=name)).ref()
    deleting = conn.stub.DeleteApplication(keeper_pb2.DeleteApplicationRequest(app=ref), metadata=conn.md)
    if wait:
        _follow(conn, ref, timeout, {AppState.DELETED})
    else:
        _show(conn, [deleting])


@app.command()
@click.argument("name")
@namespace_option
@timeout_option
@keeper_command
@one_line_errors
def watch(conn: KeeperConn, name: str, namespace: str, timeout: float) -> None:
    """Print status events as they happen, until DELETED (Ctrl-C to stop)."""
    _follow(conn, AppId.parse(AppRef(namespace=namespace, name=name)).ref(), timeout, {AppState.DELETED})


@app.command()
@click.argument("name")
@namespace_option
@click.option("--discovery", metavar="HOST:PORT", envvar="SERVEFLEET_DISCOVERY", help="Discovery address.")
@click.option(
    "--kind", default="", help="Only endpoints of this kind (proxy, direct, triton; metrics: /metrics pages)."
)
@keeper_command
@one_line_errors
def endpoints(conn: KeeperConn, name: str, namespace: str, discovery: str | None, kind: str) -> None:
    """Live endpoints of an application, as discovery knows them now."""
    ref = AppId.parse(AppRef(namespace=namespace, name=name)).ref()
    conn.stub.GetApplication(keeper_pb2.GetApplicationRequest(app=ref), metadata=conn.md)  # visibility check
    address = discovery or stack_address(conn.state_dir, "discovery", "--discovery")
    with sync_channel(address, token=conn.token) as channel:
        found = discovery_pb2_grpc.DiscoveryStub(channel).Resolve(
            discovery_pb2.ResolveRequest(app=ref, kind=kind), timeout=10
        )
    # Inference endpoints by default: the parts' /metrics registrations only when asked for by kind.
    rows = [
        {"address": e.address, "kind": e.kind, "version": e.version, "labels": dict(e.labels)}
        for e in found.endpoints
        if kind or e.kind != METRICS_KIND
    ]
    emit(rows, conn.output)


def _parse_inputs(pairs: tuple[str, ...], declared: dict[str, str]) -> dict[str, np.ndarray]:
    """``NAME=JSON`` pairs as arrays of the datatypes the model declares (name -> KServe datatype)."""
    arrays: dict[str, np.ndarray] = {}
    for pair in pairs:
        name, sep, text = pair.partition("=")
        if not sep or name not in declared:
            raise click.BadParameter(f"{pair!r}: expected NAME=JSON with NAME one of {sorted(declared)}")
        try:
            value = json.loads(text)
        except json.JSONDecodeError as exc:
            raise click.BadParameter(f"{name}: not JSON ({exc.msg})") from None
        datatype = declared[name]
        arrays[name] = (
            np.array([str(v).encode() for v in np.ravel(value)], dtype=np.object_).reshape(np.shape(value))
            if datatype == "BYTES"
            else np.asarray(value, dtype=DTYPES[datatype])
        )
    return arrays


@app.command()
@click.argument("name")
@namespace_option
@click.option(
    "--input",
    "-i",
    "inputs",
    multiple=True,
    required=True,
    metavar="NAME=JSON",
    help="An input tensor, e.g. features='[[5.1, 3.5, 1.4, 0.2]]' (repeatable).",
)
@click.option(
    "--requests",
    type=click.IntRange(1, 1_000_000),
    default=1,
    show_default=True,
    help="Send the request this many times and report latency.",
)
@click.option("--discovery", metavar="HOST:PORT", envvar="SERVEFLEET_DISCOVERY", help="Discovery address.")
@keeper_command
@one_line_errors
def infer(
    conn: KeeperConn, name: str, namespace: str, inputs: tuple[str, ...], requests: int, discovery: str | None
) -> None:
    """Call the application through the SDK (discovery picks the endpoint) and print its outputs."""
    ref = AppId.parse(AppRef(namespace=namespace, name=name)).ref()
    conn.stub.GetApplication(keeper_pb2.GetApplicationRequest(app=ref), metadata=conn.md)  # visibility check
    app_name = f"{ref.namespace}/{ref.name}"
    latencies: list[float] = []
    address = discovery or stack_address(conn.state_dir, "discovery", "--discovery")
    with Client(address, token=conn.token) as client:
        # The endpoint's own KServe ModelMetadata says which inputs it takes, for every kind of app
        # (a Triton app's model is named by its repository).
        model = served_model(client.endpoints(app_name)[0], ref)
        metadata = client.triton_client(app_name).get_model_metadata(model, as_json=True)
        arrays = _parse_inputs(inputs, {t["name"]: t["datatype"] for t in metadata.get("inputs", [])})
        for _ in range(requests):
            started = time.perf_counter()
            outputs = client.infer(app_name, arrays)
            latencies.append((time.perf_counter() - started) * 1000)
    rows = [
        {"output": k, "datatype": datatype_of(v), "shape": list(v.shape), "value": v.tolist()}
        for k, v in outputs.items()
    ]
    emit(rows, conn.output)
    if conn.output == "table" and requests > 1:
        p50, p99 = np.percentile(latencies, [50, 99])
        click.echo(f"{requests} requests: p50 {p50:.2f} ms, p99 {p99:.2f} ms", err=True)
