"""The one way servefleet starts the processes it runs: etcd, Redis and a Ray head from their normal
binaries, and its own services as ``python -m servefleet.<module>``. Each child gets its own
process group (so a stop reaches Ray's raylet and workers too) and its output in a log file.

``servefleet up`` (``stack.py``) and the test and benchmark fixtures (``testing.py``) build their
command lines and spawn their children here, so the flags a part starts with are written once.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Mapping
from pathlib import Path

#: Debian package that provides each external binary (named in the error when it is missing).
PACKAGES = {"etcd": "etcd-server", "redis-server": "redis-server", "redis-cli": "redis-tools"}


def binary(name: str) -> str:
    """The path of an external binary; FileNotFoundError saying how to install it."""
    path = shutil.which(name)
    if path is None:
        raise FileNotFoundError(f"{name} not found on PATH: install it (apt-get install {PACKAGES[name]})")
    return path


def etcd_argv(
    *,
    data_dir: Path,
    client: str,
    peer: str,
    name: str = "servefleet",
    cluster: Mapping[str, str] | None = None,
) -> list[str]:
    """An etcd member ``name`` serving ``client`` (host:port), its peer port on ``peer``; alone, or
    one of ``cluster`` (every member's name -> peer host:port, this one included)."""
    client_url, peer_url = f"http://{client}", f"http://{peer}"
    members = cluster or {name: peer}
    return [
        binary("etcd"),
        "--name",
        name,
        "--data-dir",
        str(data_dir),
        "--listen-client-urls",
        client_url,
        "--advertise-client-urls",
        client_url,
        "--listen-peer-urls",
        peer_url,
        "--initial-advertise-peer-urls",
        peer_url,
        "--initial-cluster",
        ",".join(f"{member}=http://{address}" for member, address in members.items()),
    ]


#: Redis's AOF fsync policy unless a person picks another (``servefleet up --redis-appendfsync``).
#: ``always``: Redis writes and fsyncs each event loop's commands before it replies, so an
#: acknowledged Submit, result or ack survives the death of the Redis process and of the machine.
#: With ``everysec`` Redis postpones the AOF write (up to 2 s) while its background fsync of the
#: last second is still running, and replies meanwhile: a SIGKILL then loses acknowledged writes
#: (one accepted Submit lost in a chaos run beside two CPU hogs). The price of ``always`` on the
#: dev box: a lone client's Submit-like Lua write 1.80 ms vs 0.15 ms (median of 3 interleaved
#: runs of 400, load 7), and 28% of Redis's SET/LPUSH throughput at 50 clients (48.6k vs 67.7k/s,
#: redis-benchmark), which groups the fsync of concurrent writers.
REDIS_APPENDFSYNC = "always"


def redis_argv(
    *,
    host: str,
    port: int,
    data_dir: Path,
    appendfsync: str = REDIS_APPENDFSYNC,
    config_file: Path | None = None,
    cluster_node_timeout_ms: int = 0,
    cluster_port: int = 0,
) -> list[str]:
    """Redis in the foreground with the AOF on (the broker's durability rests on it), no RDB.

    ``config_file``: read first (``redis_config``: the users and their passwords, kept out of the
    command line); ``cluster_node_timeout_ms`` > 0: a Redis Cluster node (its layout in
    ``nodes.conf`` in ``data_dir``), which the cluster fails over after that long unreachable; its
    cluster bus on ``cluster_port`` (0: port + 10000)."""
    cluster = (
        ["--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf"]
        + ["--cluster-node-timeout", str(cluster_node_timeout_ms)]
        + (["--cluster-port", str(cluster_port)] if cluster_port else [])
        if cluster_node_timeout_ms > 0
        else []
    )
    return [
        binary("redis-server"),
        *([str(config_file)] if config_file else []),
        "--bind",
        host,
        "--port",
        str(port),
        "--dir",
        str(data_dir),
        "--appendonly",
        "yes",
        "--appendfsync",
        appendfsync,
        "--save",
        "",
        "--daemonize",
        "no",
        "--protected-mode",
        "no",
        *cluster,
    ]


def redis_sentinel_argv(*, host: str, port: int, config_file: Path) -> list[str]:
    """A Redis Sentinel on ``port``; ``config_file`` (which Sentinel rewrites) names what it monitors."""
    return [binary("redis-server"), str(config_file), "--sentinel", "--bind", host, "--port", str(port)]


def redis_cluster_create_argv(nodes: list[str], *, replicas: int = 0) -> list[str]:
    """``redis-cli --cluster create``: join ``nodes`` (host:port, started as cluster nodes) into one
    Redis Cluster, slots spread over the primaries, ``replicas`` replicas per primary."""
    return [
        binary("redis-cli"),
        "--cluster",
        "create",
        *nodes,
        "--cluster-replicas",
        str(replicas),
        "--cluster-yes",
    ]


def ray_head_argv(
    *,
    port: int,
    ports: Mapping[str, int],
    worker_ports: tuple[int, int],
    num_cpus: int,
    temp_dir: Path,
    host: str = "127.0.0.1",
    resources: dict[str, float] | None = None,
) -> list[str]:
    """``ray start --head --block`` with every port explicit, so several heads can share a machine.

    ``ports`` holds Ray's helper ports under the names of ``stack.PORTS`` (``ray_client``, ...)."""
    argv = [
        str(Path(sys.executable).with_name("ray")),
        "start",
        "--head",
        "--block",
        f"--port={port}",
        f"--node-ip-address={host}",
        f"--num-cpus={num_cpus}",
        "--num-gpus=0",
        f"--temp-dir={temp_dir}",
        "--include-dashboard=false",
        "--disable-usage-stats",
        f"--ray-client-server-port={ports['ray_client']}",
        f"--dashboard-agent-listen-port={ports['ray_dashboard_agent']}",
        f"--dashboard-agent-grpc-port={ports['ray_dashboard_grpc']}",
        f"--node-manager-port={ports['ray_node_manager']}",
        f"--object-manager-port={ports['ray_object_manager']}",
        f"--metrics-export-port={ports['ray_metrics']}",
        f"--runtime-env-agent-port={ports['ray_runtime_env']}",
        f"--min-worker-port={worker_ports[0]}",
        f"--max-worker-port={worker_ports[1]}",
    ]
    if resources:
        argv.append(f"--resources={json.dumps(resources)}")
    return argv


def service_argv(module: str, listen: str, *flags: str) -> list[str]:
    """``python -m servefleet.<module> --listen <listen> <flags>`` with this interpreter."""
    return [sys.executable, "-m", f"servefleet.{module}", "--listen", listen, *flags]


def spawn(argv: list[str], *, log: Path, env: Mapping[str, str], cwd: Path) -> subprocess.Popen[bytes]:
    """Start ``argv`` in a new process group, stdout and stderr appended to ``log``."""
    with open(log, "ab") as out:
        return subprocess.Popen(
            argv, stdout=out, stderr=subprocess.STDOUT, env=dict(env), cwd=cwd, start_new_session=True
        )


def signal_group(pgid: int, sig: int) -> None:
    """Signal a child's whole process group; a group already gone (or not ours) is no error."""
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def group_alive(pgid: int) -> bool:
    """Whether any non-zombie process of the group lives (Ray's raylet outlives its leader)."""
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[2]) == pgid and fields[0] != "Z":
                return True
    return False


def stop_group(pgid: int, grace: float) -> None:
    """SIGTERM the group, SIGKILL whatever of it outlives ``grace`` seconds."""
    signal_group(pgid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while group_alive(pgid) and time.monotonic() < deadline:
        time.sleep(0.05)
    if group_alive(pgid):
        signal_group(pgid, signal.SIGKILL)
