"""Chaos harness: a supervised local stack under mixed load, each part killed in turn, and what it
cost counted. Used by ``tests/chaos`` (short windows, in CI) and ``bench/chaos.py`` (longer).

The stack is ``servefleet up --detach`` on a fresh state dir with one Python app (the iris example,
2 replicas, 2 proxies, ``async_mode`` on so its replicas also pull from the broker) deployed
through the keeper. Load: SDK unary calls (``Client.infer``, deadline ``deadline_s``) and broker
async requests (``Client.submit`` then ``result``). Per part: load runs ``before_s``, the part is
SIGKILLed (stack parts, which the supervisor restarts) or ``ray.kill``ed (data-plane actors, which
the master or Ray replaces), the harness waits until every part is healthy and the app is served
again (recovery), then load runs ``after_s`` more. Counted per part, over its whole window:

- ``unary_failed``: unary calls that raised (any error, a deadline passed included): lost answers;
- ``async_refused``: Submits answered with an error (the caller was told: nothing was queued);
- ``async_lost``: tickets accepted but with no result at the end (``result`` failed or timed out);
- ``async_duplicated``: tickets whose result, read twice, was not the same right answer both times;
- ``duplicate_runs_discarded``: growth of the broker's ``duplicate_executions`` (a request that ran
  again after its worker died or stalled: the later result is discarded, never delivered);
- ``recovery_s``: from the kill until the stack is healthy and a fresh call answers.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import yaml

from servefleet import Client, stack
from servefleet.api import broker_pb2, broker_pb2_grpc, common_pb2
from servefleet.common.channels import sync_channel
from servefleet.common.net import port_in_use

REPO = Path(__file__).resolve().parents[1]
APP = "chaos"
FEATURES = {"features": np.array([[5.0, 3.4, 1.5, 0.2], [6.7, 3.0, 5.6, 2.1]], dtype=np.float32)}
EXPECTED = [0, 2]
#: Stack parts the harness SIGKILLs (the supervisor restarts them), in the order they are killed.
STACK_PARTS = ("agent", "keeper", "discovery", "broker", "redis", "etcd")
#: Data-plane actors it kills through a Ray driver: name prefix -> whether Ray restarts it itself.
ACTOR_PARTS = {"replica": False, "proxy": True, "master": True}
ALL_PARTS = (*ACTOR_PARTS, *STACK_PARTS)


@dataclass
class Outcome:
    part: str
    unary_ok: int = 0
    unary_failed: int = 0
    async_ok: int = 0
    async_refused: int = 0
    async_lost: int = 0
    async_duplicated: int = 0
    duplicate_runs_discarded: int = 0
    recovery_s: float = 0.0
    errors: dict[str, int] = field(default_factory=dict)


class Load:
    """Closed-loop unary callers and async submitters over one SDK client, counted per window."""

    def __init__(
        self, discovery: str, broker: str, *, deadline_s: float, token: str, threads: int = 3
    ) -> None:
        self.client = Client(discovery, timeout=deadline_s, broker=broker, token=token)
        self.deadline_s = deadline_s
        self.window = Outcome("warm-up")
        self._tickets: list[tuple[Outcome, str]] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._unary, daemon=True) for _ in range(threads)]
        self._threads.append(threading.Thread(target=self._submit, daemon=True))

    def _failed(self, exc: Exception) -> str:
        return f"{type(exc).__name__}: {str(exc)[:100]}"

    def _unary(self) -> None:
        while not self._stop.is_set():
            window = self.window
            try:
                ok = self.client.infer(APP, FEATURES)["label"].tolist() == EXPECTED
                window.unary_ok += ok
                window.unary_failed += not ok
            except Exception as exc:
                window.unary_failed += 1
                with self._lock:
                    window.errors[self._failed(exc)] = window.errors.get(self._failed(exc), 0) + 1

    def _submit(self) -> None:
        while not self._stop.is_set():
            window = self.window
            try:
                ticket = self.client.submit(APP, FEATURES)
                with self._lock:
                    self._tickets.append((window, ticket))
            except Exception as exc:
                window.async_refused += 1
                with self._lock:
                    window.errors[self._failed(exc)] = window.errors.get(self._failed(exc), 0) + 1
            self._stop.wait(0.05)

    def start(self) -> None:
        for thread in self._threads:
            thread.start()

    def stop(self) -> None:
        """Stop the callers, then collect every accepted ticket's result into its window."""
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=self.deadline_s + 30)
        for window, ticket in self._tickets:
            try:
                first = self.client.result(ticket, timeout=self.deadline_s * 4)["label"].tolist()
                again = self.client.result(ticket, timeout=self.deadline_s)["label"].tolist()
            except Exception:
                window.async_lost += 1
                continue
            if first == again == EXPECTED:
                window.async_ok += 1
            else:
                window.async_duplicated += 1
        self.client.close()


class ChaosStack:
    """A ``servefleet up --detach`` stack on a temp state dir with the chaos app deployed."""

    def __init__(self, *, base_port: int | None = None) -> None:
        self.state = Path(tempfile.mkdtemp(prefix="sf-chaos-"))
        self.base_port = base_port or _free_base_port()

    def cli(self, *args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
        argv = [sys.executable, "-m", "servefleet.cli", *args, "--state-dir", str(self.state)]
        return subprocess.run(argv, capture_output=True, text=True, timeout=timeout, cwd=REPO, check=False)

    def up(self) -> None:
        done = self.cli("up", "--detach", "--base-port", str(self.base_port))
        if done.returncode != 0:
            raise RuntimeError(f"servefleet up failed: {done.stderr[-2000:]}")
        spec = yaml.safe_load((REPO / "examples" / "iris.yaml").read_text())
        spec.update(name=APP, replicas=2, proxies=2, async_mode={"enabled": True})
        path = self.state / "chaos.yaml"
        path.write_text(yaml.safe_dump(spec))
        deployed = self.cli("app", "deploy", str(path), "--timeout", "300")
        if deployed.returncode != 0:
            raise RuntimeError(f"deploy failed: {deployed.stdout[-1000:]} {deployed.stderr[-1000:]}")

    def down(self) -> None:
        self.cli("down")

    @property
    def addresses(self) -> dict[str, str]:
        return stack.addresses(self.state)

    @property
    def token(self) -> str:
        """The stack's admin token: discovery and the broker answer only callers with a token."""
        return (self.state / stack.ADMIN_TOKEN_FILE).read_text().strip()

    def duplicate_executions(self) -> int:
        with sync_channel(self.addresses["broker"], token=self.token) as channel:
            stats = broker_pb2_grpc.BrokerStub(channel).QueueStats(
                broker_pb2.QueueStatsRequest(app=common_pb2.AppRef(namespace="default", name=APP)), timeout=10
            )
        return int(stats.duplicate_executions)

    def healthy(self) -> bool:
        return all(row["healthy"] for row in stack.status(self.state))

    def ray(self, code: str) -> str:
        """Run ``code`` in a fresh Ray driver of the stack's cluster (this process may drive another)."""
        prelude = (
            "import servefleet, ray, json; "
            f"ray.init(address={self.addresses['ray']!r}, logging_level='ERROR', log_to_driver=False); "
            "from servefleet.services.actors import RAY_NAMESPACE as NS; "
        )
        done = subprocess.run(
            [sys.executable, "-c", prelude + code],
            capture_output=True,
            text=True,
            timeout=120,
            cwd=REPO,
            # The stack's own Ray token: its Ray refuses drivers without it.
            env=stack.ray_process_env(
                {**os.environ, "PYTHONPATH": str(REPO)}, self.state / stack.RAY_TOKEN_FILE
            ),
            check=False,
        )
        if done.returncode != 0:
            raise RuntimeError(done.stderr[-1500:])
        return done.stdout.strip().splitlines()[-1] if done.stdout.strip() else ""

    def kill(self, part: str) -> None:
        if part in ACTOR_PARTS:
            restart = ACTOR_PARTS[part]
            self.ray(
                "names = sorted(a['name'] for a in ray.util.list_named_actors(all_namespaces=True) "
                f"if a['namespace'] == NS and a['name'].startswith('{part}:default/{APP}')); "
                f"ray.kill(ray.get_actor(names[0], namespace=NS), no_restart={not restart})"
            )
            return
        [found] = [p for p in stack.load(self.state) if p.name == part]
        os.killpg(found.pid, signal.SIGKILL)

    def served(self) -> bool:
        """Every part healthy, both replicas and both proxies back, and a fresh client gets an answer."""
        if not self.healthy():
            return False
        counts = json.loads(
            self.ray(
                "print(json.dumps([a['name'].split(':')[0] "
                "for a in ray.util.list_named_actors(all_namespaces=True) "
                f"if a['namespace'] == NS and ':default/{APP}' in a['name']]))"
            )
        )
        if Counter(counts) != Counter({"master": 1, "replica": 2, "proxy": 2}):
            return False
        with Client(self.addresses["discovery"], timeout=10, token=self.token) as client:
            try:
                return bool(client.infer(APP, FEATURES)["label"].tolist() == EXPECTED)
            except Exception:
                return False


def _free_base_port() -> int:
    offsets = [*stack.PORTS.values(), *range(stack.RAY_WORKER_PORTS[0], stack.RAY_WORKER_PORTS[1] + 1, 50)]
    for base in range(31000 + (os.getpid() % 20) * 700, 60000, 700):
        if not any(port_in_use(base + off) for off in offsets):
            return base
    raise RuntimeError("no free port block")


@contextmanager
def chaos_stack() -> Iterator[ChaosStack]:
    running = ChaosStack()
    try:
        running.up()
        yield running
    finally:
        running.down()
        shutil.rmtree(running.state, ignore_errors=True)


def run(
    parts: tuple[str, ...] = ALL_PARTS,
    *,
    before_s: float = 3.0,
    after_s: float = 3.0,
    deadline_s: float = 30.0,
    recovery_timeout_s: float = 240.0,
    progress: Callable[[str], None] = lambda _: None,
) -> list[Outcome]:
    """Kill each part in turn on one stack under load; one Outcome per part."""
    with chaos_stack() as chaos:
        load = Load(
            chaos.addresses["discovery"], chaos.addresses["broker"], deadline_s=deadline_s, token=chaos.token
        )
        load.start()
        outcomes: list[Outcome] = []
        try:
            time.sleep(before_s)
            for part in parts:
                window = load.window = Outcome(part)
                outcomes.append(window)
                time.sleep(before_s)
                dups = chaos.duplicate_executions()
                killed = time.monotonic()
                chaos.kill(part)
                progress(f"killed {part}")
                while not chaos.served():
                    if time.monotonic() - killed > recovery_timeout_s:
                        raise TimeoutError(f"not served {recovery_timeout_s}s after killing {part}")
                    time.sleep(0.5)
                window.recovery_s = round(time.monotonic() - killed, 1)
                progress(f"{part} recovered in {window.recovery_s}s")
                time.sleep(after_s)
                window.duplicate_runs_discarded = chaos.duplicate_executions() - dups
            load.window = Outcome("cool-down")
        finally:
            load.stop()
    return outcomes


def table(outcomes: list[Outcome]) -> list[dict[str, object]]:
    return [asdict(o) for o in outcomes]
