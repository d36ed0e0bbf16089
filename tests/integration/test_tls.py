"""`servefleet up --tls`: every service serves TLS with client certificates (a plaintext client is
refused) and the README flow (deploy, infer) works unchanged."""

from __future__ import annotations

import json
import time
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tests.integration.test_stack import free_base_port, run_cli

pytestmark = [pytest.mark.slow, pytest.mark.ray]
IRIS_INPUT = "features=[[5.1, 3.5, 1.4, 0.2], [6.7, 3.0, 5.2, 2.3]]"


def test_with_tls_every_part_talks_tls_and_the_readme_flow_works(tmp_path: Path) -> None:
    state = str(tmp_path / "state")
    up = run_cli(
        "up", "--tls", "--detach", "--state-dir", state, "--base-port", str(free_base_port()), timeout=240
    )
    try:
        assert up.returncode == 0, up.stderr
        addresses = json.loads((tmp_path / "state" / "stack.json").read_text())
        for part in ("keeper", "discovery", "broker", "agent"):
            with grpc.insecure_channel(addresses[part]) as plain, pytest.raises(grpc.RpcError) as exc:
                health_pb2_grpc.HealthStub(plain).Check(health_pb2.HealthCheckRequest(), timeout=5)
            assert exc.value.code() == grpc.StatusCode.UNAVAILABLE, part
        status = run_cli("status", "--state-dir", state, "-o", "json")
        assert status.returncode == 0, status.stdout + status.stderr
        assert all(row["healthy"] for row in json.loads(status.stdout)), status.stdout

        deploy = run_cli("app", "deploy", "examples/iris.yaml", "--no-wait", "--state-dir", state)
        assert deploy.returncode == 0, deploy.stderr
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:  # a loaded machine may report a slow pass on the way
            shown = run_cli("app", "status", "iris", "-o", "json", "--state-dir", state)
            assert shown.returncode == 0, shown.stderr
            if json.loads(shown.stdout)[0]["state"] == "RUNNING":
                break
            time.sleep(2)
        infer = run_cli(
            "app", "infer", "iris", "-i", IRIS_INPUT, "--requests", "20", "-o", "json", "--state-dir", state
        )
        assert infer.returncode == 0, infer.stderr
        [label] = [row for row in json.loads(infer.stdout) if row["output"] == "label"]
        assert label["value"] == [0, 2]
    finally:
        down = run_cli("down", "--state-dir", state)
        assert down.returncode == 0, down.stderr
