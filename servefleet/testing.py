"""Real etcd, Redis and Ray processes on free loopback ports, for tests and benchmarks.

Each owns its process group and data dir; ``stop()`` leaves nothing behind, ``kill()`` and
``start()`` again on the same data dir model a crash and restart.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

from servefleet import stack
from servefleet.common import health
from servefleet.common.net import free_port, wait_for


class ManagedProcess:
    """A child process in its own process group, started by ``argv()`` and probed by ``healthy()``."""

    name = "process"
    start_timeout = 30.0

    def __init__(self, data_dir: Path | None = None) -> None:
        self.data_dir = Path(data_dir or tempfile.mkdtemp(prefix=f"sf-{self.name}-"))
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def argv(self) -> list[str]:
        raise NotImplementedError

    def healthy(self) -> bool:
        raise NotImplementedError

    def start(self) -> ManagedProcess:
        log = open(self.data_dir / f"{self.name}.log", "ab")
        self.proc = subprocess.Popen(
            self.argv(),
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            cwd=self.data_dir,
            env=self.env(),
        )
        log.close()
        wait_for(
            lambda: self._check_alive() and self.healthy(),
            timeout=self.start_timeout,
            interval=0.1,
            what=f"{self.name} on {self.address}",
        )
        return self

    def env(self) -> dict[str, str]:
        return dict(os.environ)

    def _check_alive(self) -> bool:
        assert self.proc is not None
        if self.proc.poll() is not None:
            log = (self.data_dir / f"{self.name}.log").read_text(errors="replace")[-2000:]
            raise RuntimeError(f"{self.name} exited with {self.proc.returncode}:\n{log}")
        return True

    def _signal(self, sig: int) -> None:
        if self.proc is not None and self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, sig)
            except ProcessLookupError:
                pass

    def kill(self) -> None:
        """SIGKILL the whole process group (a crash); data on disk stays."""
        self._signal(signal.SIGKILL)
        if self.proc is not None:
            self.proc.wait(timeout=10)

    def pause(self) -> None:
        self._signal(signal.SIGSTOP)

    def resume(self) -> None:
        self._signal(signal.SIGCONT)

    def stop(self) -> None:
        self._signal(signal.SIGTERM)
        if self.proc is not None:
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self._signal(signal.SIGKILL)
                self.proc.wait(timeout=10)
        # Members of the group that outlived the leader (Ray's raylet, workers).
        if self.proc is not None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    def cleanup(self) -> None:
        self.stop()
        shutil.rmtree(self.data_dir, ignore_errors=True)


class EtcdProcess(ManagedProcess):
    name = "etcd"

    def __init__(self, data_dir: Path | None = None) -> None:
        super().__init__(data_dir)
        self.peer_port = free_port()

    def argv(self) -> list[str]:
        etcd = shutil.which("etcd")
        if etcd is None:
            raise RuntimeError("etcd not on PATH (apt-get install etcd-server)")
        client, peer = f"http://{self.address}", f"http://127.0.0.1:{self.peer_port}"
        return [
            etcd,
            "--name",
            "test",
            "--data-dir",
            str(self.data_dir / "data"),
            "--listen-client-urls",
            client,
            "--advertise-client-urls",
            client,
            "--listen-peer-urls",
            peer,
            "--initial-advertise-peer-urls",
            peer,
            "--initial-cluster",
            f"test={peer}",
        ]

    def healthy(self) -> bool:
        return health.etcd_health(self.address)[0]


class RedisProcess(ManagedProcess):
    name = "redis"

    def __init__(self, data_dir: Path | None = None, *, appendfsync: str = "everysec") -> None:
        super().__init__(data_dir)
        self.appendfsync = appendfsync

    def argv(self) -> list[str]:
        redis = shutil.which("redis-server")
        if redis is None:
            raise RuntimeError("redis-server not on PATH (apt-get install redis-server)")
        return [
            redis,
            "--bind",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--dir",
            str(self.data_dir),
            "--appendonly",
            "yes",
            "--appendfsync",
            self.appendfsync,
            "--save",
            "",
            "--protected-mode",
            "no",
        ]

    def healthy(self) -> bool:
        return health.redis_health(self.address)[0]


class RayCluster(ManagedProcess):
    """A one-node Ray cluster (``ray start --head --block``) with every port explicit."""

    name = "ray"
    start_timeout = 60.0

    def __init__(
        self, num_cpus: int = 2, resources: dict[str, float] | None = None, data_dir: Path | None = None
    ) -> None:
        super().__init__(data_dir)
        self.num_cpus = num_cpus
        self.resources = resources or {}
        self.helper_ports = {name: free_port() for name in stack.PORTS if name.startswith("ray_")}
        # Below Linux's ephemeral range (32768+), so no port free_port() hands out can fall inside it.
        low = 20000 + (self.port % 60) * 200
        self.worker_ports = (low, low + 199)

    def argv(self) -> list[str]:
        temp = Path(tempfile.mkdtemp(prefix="r", dir="/tmp"))
        return stack.ray_head_argv(
            port=self.port,
            ports=self.helper_ports,
            worker_ports=self.worker_ports,
            num_cpus=self.num_cpus,
            temp_dir=temp,
            resources=self.resources,
        )

    def env(self) -> dict[str, str]:
        return {**os.environ, "RAY_ADDRESS": self.address, "PYTHONPATH": os.pathsep.join(sys.path)}

    def healthy(self) -> bool:
        return health.ray_health(self.address)[0] and self._raylet_up()

    def _raylet_up(self) -> bool:
        log = (self.data_dir / f"{self.name}.log").read_text(errors="replace")
        return "Ray runtime started" in log


class ServiceProcess(ManagedProcess):
    """``python -m servefleet.<module> --listen <address> <flags>`` on a fixed free port (kept across
    restarts), healthy once it answers the gRPC health protocol."""

    def __init__(self, module: str, *flags: str, data_dir: Path | None = None) -> None:
        self.name = module.rsplit(".", 1)[-1]
        super().__init__(data_dir)
        self.module = module
        self.flags = list(flags)

    def argv(self) -> list[str]:
        return [sys.executable, "-m", f"servefleet.{self.module}", "--listen", self.address, *self.flags]

    def healthy(self) -> bool:
        return health.grpc_health(self.address)[0]
