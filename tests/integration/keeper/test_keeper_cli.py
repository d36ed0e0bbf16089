"""`servefleet app|cluster|tenant` against a keeper process, finding it through the state dir."""

from __future__ import annotations

import json
import stat
from pathlib import Path

from click.testing import CliRunner, Result

from servefleet.cli.main import cli
from tests.integration.keeper.conftest import Procs

IRIS = Path(__file__).resolve().parents[3] / "examples" / "iris.yaml"


def run(state_dir: Path, *args: str, token: str | None = None) -> Result:
    argv = [*args, "--state-dir", str(state_dir)] + (["--token", token] if token else [])
    return CliRunner().invoke(cli, argv, env={"SERVEFLEET_TOKEN": None})


def test_cli_tenant_app_lifecycle_and_errors(procs: Procs) -> None:
    _, address = procs.keeper()
    state = procs.workdir
    assert stat.S_IMODE(procs.token_file.stat().st_mode) == 0o600
    (state / "stack.json").write_text(json.dumps({"keeper": address, "parts": []}))

    clusters = run(state, "cluster", "list", "-o", "json")
    assert clusters.exit_code == 0, clusters.output
    assert json.loads(clusters.output) == []
    created = run(state, "tenant", "create", "acme", "--max-applications", "1", "--max-replicas", "3")
    assert created.exit_code == 0 and "acme" in created.output, created.output
    token = run(state, "tenant", "token", "acme").output.strip()
    assert token.startswith("sft_")

    deployed = run(state, "app", "deploy", str(IRIS), "--no-wait", token=token)
    assert deployed.exit_code == 0, deployed.output
    assert "submitted acme/iris revision" in deployed.output and "PENDING" in deployed.output
    listed = json.loads(run(state, "app", "list", "-o", "json", token=token).output)
    assert [(a["app"]["namespace"], a["app"]["name"], a["state"]) for a in listed] == [
        ("acme", "iris", "PENDING")
    ]
    assert (
        json.loads(run(state, "app", "list", "-o", "json").output)[0]["app"]["name"] == "iris"
    )  # admin sees it

    over = run(state, "app", "scale", "iris", "4", "-n", "acme", token=token)
    assert over.exit_code == 1
    assert (
        over.output.strip()
        .splitlines()[-1]
        .lower()
        .startswith("error: resource_exhausted: quota of tenant 'acme'")
    )
    scaled = run(state, "app", "scale", "iris", "3", "-n", "acme", "-o", "json", token=token)
    assert json.loads(scaled.output)[0]["replicas"] == 3

    again = run(state, "app", "deploy", str(IRIS), token=token)
    assert again.exit_code == 1 and "applications would be 2, limit 1 (in use 1" in again.output
    unauthenticated = run(state, "app", "list", token="sft_wrong")
    assert unauthenticated.exit_code == 1 and "UNAUTHENTICATED: invalid token" in unauthenticated.output
    pending = run(state, "app", "status", "iris", "-n", "acme", token=token)
    assert "unplaceable" in pending.output or "submitted" in pending.output

    deleted = run(state, "app", "delete", "iris", "-n", "acme", "--wait", "--timeout", "30", token=token)
    assert deleted.exit_code == 0, deleted.output
    assert "DELETED" in deleted.output
    missing = run(state, "app", "status", "iris", "-n", "acme", token=token)
    assert missing.exit_code == 1 and "NOT_FOUND" in missing.output
