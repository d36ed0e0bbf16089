"""`servefleet up | status | down` on a temp state dir: real etcd, Redis, Ray and every service."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from servefleet import stack
from servefleet.common import health
from servefleet.common.net import port_in_use, wait_for

pytestmark = pytest.mark.slow

CLI = [sys.executable, "-m", "servefleet.cli"]
IRIS = Path(__file__).resolve().parents[2] / "examples" / "iris.yaml"


def free_base_port() -> int:
    """A base port whose whole block (services and Ray's worker range) is free now."""
    for base in range(31000, 60000, 700):
        offsets = [
            *stack.PORTS.values(),
            *range(stack.EXTRA_ETCD, stack.EXTRA_DISCOVERY_METRICS + 4),
            *range(stack.RAY_WORKER_PORTS[0], stack.RAY_WORKER_PORTS[1] + 1, 50),
        ]
        if not any(port_in_use(base + off) for off in offsets):
            return base
    raise RuntimeError("no free port block")


def run_cli(
    *args: str, env: dict[str, str] | None = None, timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=timeout, env=env)


def error_lines(result: subprocess.CompletedProcess[str]) -> list[str]:
    return [line for line in result.stderr.splitlines() if line.strip() and not line.startswith("  ")]


def _proc_stat(pid: int) -> list[str]:
    """Fields of /proc/PID/stat after the command name: state, ppid, pgrp, session, ... starttime."""
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()


def stack_processes(parts: list[stack.Part]) -> set[tuple[int, str]]:
    """(pid, start time) of every live process the stack runs now: each started part, whatever
    shares its session, and all their descendants (Ray's raylet, workers, actors). Found from the
    process tree, not from the environment marker that ``down`` itself kills by."""
    stats: dict[int, list[str]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stats[int(entry.name)] = _proc_stat(int(entry.name))
            except OSError:
                continue
    roots = {p.pid for p in parts if p.pid}
    found = {pid for pid, f in stats.items() if int(f[3]) in roots or pid in roots}
    grew = True
    while grew:
        children = {pid for pid, f in stats.items() if int(f[1]) in found} - found
        found |= children
        grew = bool(children)
    return {(pid, stats[pid][19]) for pid in found if stats[pid][0] != "Z"}


def still_alive(processes: set[tuple[int, str]]) -> set[tuple[int, str]]:
    """The ones whose pid still runs the same process (same start time: not a reused pid)."""
    alive = set()
    for pid, started in processes:
        try:
            fields = _proc_stat(pid)
        except OSError:
            continue
        if fields[19] == started and fields[0] != "Z":
            alive.add((pid, started))
    return alive


def test_up_status_down(tmp_path: Path) -> None:
    state = tmp_path / "state"
    base = free_base_port()
    started = time.monotonic()
    result = run_cli("up", "--detach", "--state-dir", str(state), "--base-port", str(base))
    elapsed = time.monotonic() - started
    running: set[tuple[int, str]] = set()
    try:
        assert result.returncode == 0, result.stderr
        print(f"stack healthy in {elapsed:.1f}s")
        assert elapsed < 60
        addresses = json.loads((state / "stack.json").read_text())
        for key in ("etcd", "redis", "ray", "discovery", "keeper", "broker", "agent"):
            assert key in addresses
        # Every platform service answers the standard gRPC health protocol.
        for name in ("discovery", "keeper", "broker", "agent"):
            assert health.grpc_health(addresses[name]) == (True, "SERVING"), name

        # A second `up` on a running state dir says so in one line.
        again = run_cli("up", "--detach", "--state-dir", str(state), "--base-port", str(base))
        assert again.returncode != 0
        assert error_lines(again) == [error_lines(again)[0]] and "already running" in again.stderr

        ok = run_cli("status", "--state-dir", str(state), "--output", "json")
        assert ok.returncode == 0, ok.stdout + ok.stderr
        assert all(row["healthy"] for row in json.loads(ok.stdout))

        running = stack_processes(stack.load(state))
        assert len(running) >= 8  # the seven parts, and Ray's own processes under its head

        # A killed part shows as unhealthy at once; the supervisor starts it again (the first restart
        # waits at least half of SERVEFLEET_SUPERVISOR_BACKOFF_S), and `status` counts the restart.
        parts = {p.name: p for p in stack.load(state)}
        os.killpg(parts["etcd"].pid, signal.SIGKILL)
        rows = {row["name"]: row for row in stack.status(state)}
        assert rows["etcd"]["healthy"] is False

        def supervised() -> bool:
            rows = {row["name"]: row for row in stack.status(state)}
            return rows["etcd"]["restarts"] == 1 and all(row["healthy"] for row in rows.values())

        wait_for(supervised, timeout=60, interval=0.2, what="etcd restarted and every part healthy again")
        running |= stack_processes(stack.load(state))

        # The CLI's own view, read until it too says healthy: a service's etcd health may still
        # flap once right after etcd came back (keeper NOT_SERVING between two reads, hog run).
        shown = run_cli("status", "--state-dir", str(state), "--output", "json")

        def shown_healthy() -> bool:
            nonlocal shown
            shown = run_cli("status", "--state-dir", str(state), "--output", "json")
            return shown.returncode == 0

        wait_for(shown_healthy, timeout=60, interval=0.5, what="`status` exit 0 after etcd's restart")
        etcd = {row["name"]: row for row in json.loads(shown.stdout)}["etcd"]
        assert etcd["restarts"] == 1 and "last exit: " in etcd["detail"]
    finally:
        down = run_cli("down", "--state-dir", str(state))
    assert down.returncode == 0, down.stderr
    assert still_alive(running) == set()
    assert not (state / "stack.json").exists()


def test_up_with_three_etcd_members_and_two_discovery_instances(tmp_path: Path) -> None:
    """The stack's own etcd cluster and discovery instances: stack.json lists them, and losing an
    etcd member or a discovery instance leaves every other part healthy."""
    state = tmp_path / "state"
    base = free_base_port()
    flags = ("--etcd-members", "3", "--discovery-instances", "2")
    try:  # up starts six more processes than the plain stack: on a loaded 2-core box it takes minutes
        result = run_cli(
            "up", "--detach", "--state-dir", str(state), "--base-port", str(base), *flags, timeout=300
        )
        assert result.returncode == 0, result.stderr
        addresses = json.loads((state / "stack.json").read_text())
        assert len(addresses["etcd"].split(",")) == 3 and len(addresses["discovery"].split(",")) == 2
        parts = {p.name: p for p in stack.load(state)}
        assert {"etcd", "etcd2", "etcd3", "discovery", "discovery2"} <= set(parts)
        os.killpg(parts["etcd"].pid, signal.SIGKILL)
        os.killpg(parts["discovery"].pid, signal.SIGKILL)
        # Every other part answers through the loss (its etcd calls move on to the other members).
        for name in ("keeper", "discovery2", "broker", "agent", "autoscaler"):
            assert health.grpc_health(parts[name].address, timeout=10) == (True, "SERVING"), name
        # And works: an app deployed now is placed (keeper), started (agent, master), registered
        # (discovery2) and RUNNING, while the supervisor brings the killed member back.
        deployed = run_cli(
            "app", "deploy", str(IRIS), "--timeout", "240", "--state-dir", str(state), timeout=300
        )
        assert deployed.returncode == 0 and "RUNNING" in deployed.stdout, deployed.stdout + deployed.stderr
        listed = run_cli("app", "list", "--state-dir", str(state), "--output", "json")
        assert listed.returncode == 0, listed.stderr
        assert [a["state"] for a in json.loads(listed.stdout)] == ["RUNNING"]
    finally:
        down = run_cli("down", "--state-dir", str(state))
    assert down.returncode == 0, down.stderr


def test_occupied_port_is_one_line(tmp_path: Path) -> None:
    base = free_base_port()
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", base + stack.PORTS["redis"]))
        sock.listen()
        result = run_cli("up", "--detach", "--state-dir", str(tmp_path), "--base-port", str(base))
    assert result.returncode == 1
    assert error_lines(result) == [
        f"error: port {base + 2} (redis) is already in use: free it or pass --base-port"
    ]
    assert stack.marked_processes(tmp_path) == []


def test_missing_binary_is_one_line(tmp_path: Path) -> None:
    env = {**os.environ, "PATH": str(Path(sys.executable).parent)}
    result = run_cli(
        "up", "--detach", "--state-dir", str(tmp_path), "--base-port", str(free_base_port()), env=env
    )
    assert result.returncode == 1
    [line] = error_lines(result)
    assert line.startswith("error: etcd not found on PATH")


def test_bad_flag_is_one_line(tmp_path: Path) -> None:
    result = run_cli("up", "--base-port", "not-a-number", "--state-dir", str(tmp_path))
    assert result.returncode == 2
    [line] = error_lines(result)
    assert line.startswith("error:") and "--base-port" in line
