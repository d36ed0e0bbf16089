"""One ``tritonserver`` child process: launched on free loopback ports, tied to its parent's life,
ready only when its models are, stopped with a grace period.

No orphan survives the parent: the child gets ``PR_SET_PDEATHSIG`` = SIGKILL (so a SIGKILLed actor
takes its server along; the python-backend stubs notice their server is gone and exit) and its own
process group (so ``stop``/``kill`` reach the stubs too). It runs at ``settings.triton_nice``, not
at the niceness it would inherit from a Ray worker (15), which would put Triton's request threads
behind everything else on a busy node. The death signal fires when the *thread*
that forked the child ends, so ``start`` runs on the caller's event-loop thread, which lives as
long as the actor, never on a pool thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import os
import re
import signal
import subprocess
import time
import urllib.request
from collections.abc import Callable, Mapping
from pathlib import Path

import grpc
from tritonclient.grpc import service_pb2, service_pb2_grpc

from servefleet.common.config import grpc_options, settings
from servefleet.common.errors import FailedPrecondition
from servefleet.common.net import free_port
from servefleet.services.triton.install import TritonInstall

PR_SET_PDEATHSIG = 1
_libc = ctypes.CDLL(None, use_errno=True)
#: Triton's error log lines (``E1201 18:00:39.9 123 file.cc:45] "why"``) carry the reason to show.
_ERROR_LINE = re.compile(r'^E\d{4} [\d:.]+\s+\d+ \S+\] "?(.*?)"?$')
_PORT_TAKEN = "already in use"
#: Error lines Triton prints on every CPU-only start: not a reason.
_NOISE = ("CudaDriverHelper has not been initialized",)
_START_ATTEMPTS = 3


class TritonStartError(FailedPrecondition):
    """tritonserver did not come up; the message is Triton's own reason (its error log lines)."""


def _die_with_parent(parent: int, nice: int) -> Callable[[], None]:
    def preexec() -> None:  # runs in the child between fork and exec: plain syscalls only
        _libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
        if os.getppid() != parent:  # the parent died before prctl took effect
            os._exit(1)
        with contextlib.suppress(OSError):  # not allowed to lower it: keep the inherited one
            os.setpriority(os.PRIO_PROCESS, 0, nice)

    return preexec


class TritonServer:
    """A tritonserver serving ``repository`` (plain class: the actor owns one, tests use it bare)."""

    def __init__(
        self,
        install: TritonInstall,
        repository: Path,
        args: Mapping[str, str],
        *,
        log_dir: Path,
        host: str = "127.0.0.1",
    ) -> None:
        self.install = install
        self.repository = repository.resolve()
        self.args = dict(args)
        self.host = host
        self.log_path = log_dir / "tritonserver.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.grpc_port = self.http_port = self.metrics_port = 0
        self.models: list[str] = []
        self._channel: grpc.aio.Channel | None = None

    @property
    def address(self) -> str:
        return f"{self.host}:{self.grpc_port}"

    @property
    def metrics_address(self) -> str:
        return f"{self.host}:{self.metrics_port}"

    @property
    def pid(self) -> int:
        return self.proc.pid if self.proc is not None else 0

    @property
    def stub(self) -> service_pb2_grpc.GRPCInferenceServiceStub:
        assert self._channel is not None, "server not started"
        return service_pb2_grpc.GRPCInferenceServiceStub(self._channel)

    @property
    def channel(self) -> grpc.aio.Channel:
        assert self._channel is not None, "server not started"
        return self._channel

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def argv(self) -> list[str]:
        argv = [
            str(self.install.binary),
            f"--model-repository={self.repository}",
            f"--backend-directory={self.install.backends()}",
            f"--grpc-address={self.host}",
            f"--grpc-port={self.grpc_port}",
            f"--http-address={self.host}",
            f"--http-port={self.http_port}",
            f"--metrics-address={self.host}",
            f"--metrics-port={self.metrics_port}",
            "--allow-gpu-metrics=false",
            # Accept the keepalive pings of servefleet's (and the SDK's) channels: Triton's default
            # (one idle ping per 5 min) answers them with GOAWAY too_many_pings, failing calls.
            "--grpc-keepalive-permit-without-calls=1",
            f"--grpc-http2-min-recv-ping-interval-without-data={settings.keepalive_time_ms // 2}",
        ]
        for key, value in sorted(self.args.items()):
            values = value.split(",") if key == "load-model" else [value]
            argv += [f"--{key}={v}" for v in values]
        return argv

    async def start(self, timeout_s: float, *, ports: tuple[int, int, int] | None = None) -> None:
        """Launch and wait until the server and every model it loaded are ready. ``ports`` (gRPC,
        HTTP, metrics) reuses known ports, e.g. a restart behind the same address; otherwise free
        ones are picked (and picked again if another process took one first). Raises
        TritonStartError with Triton's reason when it exits or is not ready in time."""
        if not self.repository.is_dir():
            raise TritonStartError(f"model repository {self.repository} is not a directory on this node")
        for attempt in range(_START_ATTEMPTS):
            picked = ports or (free_port(), free_port(), free_port())
            self.grpc_port, self.http_port, self.metrics_port = picked
            try:
                await self._launch(timeout_s)
                return
            except TritonStartError as exc:
                if ports is not None or _PORT_TAKEN not in str(exc) or attempt + 1 == _START_ATTEMPTS:
                    raise

    def _spawn(self) -> None:
        """Fork on this (the event loop's) thread: the death signal is tied to the forking thread."""
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                self.argv(),
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=self.install.child_env(),
                cwd=self.log_path.parent,
                start_new_session=True,
                preexec_fn=_die_with_parent(os.getpid(), settings.triton_nice),  # see the docstring
            )

    async def _launch(self, timeout_s: float) -> None:
        self._spawn()
        self._channel = grpc.aio.insecure_channel(self.address, options=grpc_options())
        deadline = time.monotonic() + timeout_s
        while not await self._ready():
            if not self.alive():
                status = await self.kill()  # its stubs may still run
                raise TritonStartError(f"tritonserver exited with {status}: {self.reason()}")
            if time.monotonic() > deadline:
                await self.kill()
                raise TritonStartError(f"tritonserver not ready within {timeout_s:.0f}s: {self.reason()}")
            await asyncio.sleep(0.1)
        index = await self.stub.RepositoryIndex(service_pb2.RepositoryIndexRequest(ready=True), timeout=5)
        self.models = sorted({m.name for m in index.models})
        if not self.models:
            await self.kill()
            raise TritonStartError(f"tritonserver loaded no model from {self.repository}: {self.reason()}")

    async def _ready(self) -> bool:
        """Ready means every loaded model is (Triton's strict readiness, its default)."""
        try:
            reply = await self.stub.ServerReady(service_pb2.ServerReadyRequest(), timeout=1.0)
        except grpc.aio.AioRpcError:
            return False
        return bool(reply.ready)

    async def live(self, timeout_s: float = 2.0) -> bool:
        """The process runs and answers ServerLive: what a health check asks."""
        if not self.alive():
            return False
        try:
            reply = await self.stub.ServerLive(service_pb2.ServerLiveRequest(), timeout=timeout_s)
        except grpc.aio.AioRpcError:
            return False
        return bool(reply.live)

    def reason(self, lines: int = 5) -> str:
        """Triton's last error lines (what a failed start reports), else its last log line."""
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return "no log"
        errors = [
            m.group(1)
            for line in text.splitlines()
            if (m := _ERROR_LINE.match(line.strip())) and not m.group(1).startswith(_NOISE)
        ]
        if errors:
            return "; ".join(errors[-lines:])
        tail = [line for line in text.splitlines() if line.strip()]
        return tail[-1] if tail else "no output"

    def pids(self) -> list[int]:
        """The server and its children (the python-backend stubs), for checks that none outlives it."""
        if not self.alive():
            return []
        children: list[int] = []
        with contextlib.suppress(OSError):
            for task in Path(f"/proc/{self.pid}/task").iterdir():
                with contextlib.suppress(OSError):
                    children += [int(p) for p in (task / "children").read_text().split()]
        return [self.pid, *sorted(set(children))]

    def metrics_text(self, timeout_s: float = 2.0) -> str:
        """Triton's Prometheus text (blocking: call from a thread or a collector)."""
        url = f"http://{self.metrics_address}/metrics"
        with urllib.request.urlopen(url, timeout=timeout_s) as reply:
            return str(reply.read().decode())

    async def stop(self, grace_s: float) -> int | None:
        """SIGTERM the group (Triton finishes in-flight inferences, unloads models), SIGKILL what
        is left after ``grace_s``; returns the exit status."""
        if self.alive():
            self._signal(signal.SIGTERM)
            await self._exited(grace_s)
        return await self.kill()

    async def kill(self) -> int | None:
        """SIGKILL the group (server and stubs) and reap the server."""
        self._signal(signal.SIGKILL)
        await self._exited(None)
        await self._close_channel()
        return self.proc.returncode if self.proc is not None else None

    async def _exited(self, timeout_s: float | None) -> bool:
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while self.alive():
            if deadline is not None and time.monotonic() >= deadline:
                return False
            await asyncio.sleep(0.02)
        return True

    def _signal(self, sig: int) -> None:
        if self.proc is not None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.proc.pid, sig)

    async def _close_channel(self) -> None:
        if self._channel is not None:
            channel, self._channel = self._channel, None
            await channel.close()
