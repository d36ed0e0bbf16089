"""Chaos harness: a supervised local stack under mixed load, each part killed in turn, and what it
cost counted per kind of call. Used by ``tests/chaos`` (short windows, in CI) and
``bench/chaos.py`` (longer).

The stack is ``servefleet up --detach`` on a fresh state dir with two apps deployed through the
keeper: ``chaos``, the iris classifier (2 replicas, 2 proxies, ``async_mode`` on so its replicas
also pull from the broker, one ModelStreamInfer response per row), and ``chaos-direct``, a
``kind: direct`` CTR model (2 C++ direct-ingress replicas, no proxy). Load, all through the SDK
with deadline ``deadline_s``, each kind counted on its own (``KINDS``):

- ``unary``: ``Client.infer`` on ``chaos`` (SDK -> proxy -> replica);
- ``stream``: ``Client.stream`` on ``chaos``, 6 responses a stream, 10 ms apart (ModelStreamInfer);
- ``async``: ``Client.submit`` on ``chaos``, every ticket's ``result`` read twice at the end;
- ``direct``: ``Client.infer`` on ``chaos-direct`` (SDK -> C++ ingress, no proxy).

Per part: load runs ``before_s``, the part is SIGKILLed (stack parts, which the supervisor
restarts) or ``ray.kill``ed (data-plane actors, which the master or Ray replaces), the harness
waits until every part is healthy and both apps are served again (``recovery_s``), then load runs
``after_s`` more. Counted per part and kind, over its whole window (``Count``):

- ``failed``: calls that raised or answered wrong (a deadline passed included): lost answers;
- ``cut``: of those, streams that failed after their first response (a retry would repeat what
  the caller already has, so the SDK does not retry them; they can only be cut when something on
  their path dies mid-stream: a proxy or a replica);
- ``refused``: Submits answered with an error (the caller was told: nothing was queued);
- ``never_completed``: calls still running when the load stopped (``deadline_s`` + 30 s later), and
  tickets accepted but with no result at the end;
- ``duplicated``: tickets whose result, read twice, was not the same right answer both times, and
  streams with more responses than rows;
- ``slowest_s``: the longest an answered call waited (what the death cost a caller in time; not
  measured for async requests, whose results are read at the end).

Per part also ``duplicate_runs_discarded`` (growth of the broker's ``duplicate_executions``: a
request that ran again after its worker died or stalled; the later result is discarded, never
delivered).

``EXTRA_PARTS`` need more than the stack and only ``bench/chaos.py`` kills them (the CI suite runs
``CI_PARTS``): ``worker``, a standalone PullWorker process of ``chaos`` (not a replica: nothing
restarts it), SIGKILLed once it holds a ticket in each of its slots (``Outcome.held``), which the
app's replicas must take over; ``node``, a Ray worker node joined to the stack's Ray before the apps
are deployed (so a replica, a proxy and a direct replica run on it), its raylet SIGKILLed;
``cluster``, the whole serving cluster (the stack's Ray head and agent SIGKILLed, its supervisor
paused so neither comes back within the keeper's failover grace), once a second cluster (Ray head +
agent) has joined the keeper: both apps must run and answer on it. ``cluster`` goes last (the apps
are elsewhere after it); the supervisor resumes once it has recovered, so its after-window also sees
the dead cluster's Ray and agent restarted. These parts run with shorter timers (``EXTRA_SETTINGS``).
"""

from __future__ import annotations

import asyncio
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
import redis
import yaml
from tritonclient.grpc import service_pb2

from servefleet import Client, launch, stack
from servefleet.api import broker_pb2, broker_pb2_grpc, common_pb2, keeper_pb2, keeper_pb2_grpc
from servefleet.broker.acl import ADMIN_USER
from servefleet.broker.keys import AppKeys
from servefleet.broker.queue import GROUP
from servefleet.common.channels import sync_channel
from servefleet.common.net import port_in_use, split_address, wait_for
from servefleet.common.tensors import decode_request, encode_response
from servefleet.direct import INPUT_NAME, OUTPUT_NAME, ctr
from servefleet.testing import RayCluster, RayHead, RayWorkerNode, ServiceProcess, started_ray

REPO = Path(__file__).resolve().parents[1]
APP = "chaos"
DIRECT_APP = "chaos-direct"
FEATURES = {"features": np.array([[5.0, 3.4, 1.5, 0.2], [6.7, 3.0, 5.6, 2.1]], dtype=np.float32)}
EXPECTED = [0, 2]
#: A stream: one response per row, so 6 responses.
STREAM_FEATURES = {"features": np.tile(FEATURES["features"], (3, 1))}
STREAM_EXPECTED = EXPECTED * 3
KINDS = ("unary", "stream", "async", "direct")
#: Closed-loop callers per kind (the async submitter is one, paced at ~20 Submits/s).
CALLERS = {"unary": 2, "stream": 2, "direct": 2}
#: Stack parts the harness SIGKILLs (the supervisor restarts them), in the order they are killed.
STACK_PARTS = ("agent", "keeper", "discovery", "broker", "redis", "etcd")
#: Data-plane actors it kills through a Ray driver: part -> (actor role, app, whether Ray restarts
#: it itself; else its master replaces it). ``direct``: a C++ direct-ingress replica.
ACTOR_PARTS = {
    "replica": ("replica", APP, False),
    "proxy": ("proxy", APP, True),
    "master": ("master", APP, True),
    "direct": ("replica", DIRECT_APP, False),
    "direct-master": ("master", DIRECT_APP, True),
}
#: What the CI suite kills; the bench adds ``EXTRA_PARTS`` (see the module docstring).
CI_PARTS = (*ACTOR_PARTS, *STACK_PARTS)
EXTRA_PARTS = ("worker", "node", "cluster")
ALL_PARTS = (*CI_PARTS, *EXTRA_PARTS)
#: Timers the stack (and the second cluster) run with when an extra part is killed: the dead
#: worker's tickets are reclaimed after 5 s idle (default 30 s), a silent cluster's apps move after
#: 10 s (default 30 s). The recovery times of those rows follow from them.
EXTRA_SETTINGS = {"SERVEFLEET_BROKER_RECLAIM_IDLE_S": "5", "SERVEFLEET_KEEPER_CLUSTER_FAILOVER_AFTER_S": "10"}
#: The standalone worker: its consumer name, slots, and how long it holds each request (so that it
#: is killed with every slot taken).
WORKER, WORKER_SLOTS, WORKER_HOLD_S = "chaos-standalone", 4, 2.0
#: The Ray worker node's custom resource (names it in ``ray.nodes()``) and the second cluster.
NODE_RESOURCE, OTHER_CLUSTER = "chaos_node", "chaos-west"
_NODE_ALIVE = f"any(n['Alive'] and {NODE_RESOURCE!r} in n['Resources'] for n in ray.nodes())"
#: The actors a served stack runs: (role, app key) -> how many.
ACTORS = Counter(
    {
        ("master", f"default/{APP}"): 1,
        ("replica", f"default/{APP}"): 2,
        ("proxy", f"default/{APP}"): 2,
        ("master", f"default/{DIRECT_APP}"): 1,
        ("replica", f"default/{DIRECT_APP}"): 2,
    }
)


@dataclass
class Count:
    """One kind of call in one part's window (the fields are described in the module docstring)."""

    ok: int = 0
    failed: int = 0
    cut: int = 0
    refused: int = 0
    never_completed: int = 0
    duplicated: int = 0
    slowest_s: float = 0.0
    #: When each cut stream started, on the window's clock (``Outcome.killed_at`` is on it too).
    cut_started: list[float] = field(default_factory=list)
    errors: dict[str, int] = field(default_factory=dict)


@dataclass
class Outcome:
    part: str
    recovery_s: float = 0.0
    duplicate_runs_discarded: int = 0
    #: ``worker``: tickets it had taken and not finished when it was killed (taken over by others).
    held: int = 0
    #: ``node``: the apps' actors that ran on the node when it was killed ("role app" -> how many).
    on_node: dict[str, int] = field(default_factory=dict)
    #: Seconds from the window's start until the kill was issued and until it had returned.
    killed_at: tuple[float, float] = (0.0, 0.0)
    kinds: dict[str, Count] = field(default_factory=lambda: {kind: Count() for kind in KINDS})
    started: float = field(default_factory=time.monotonic, repr=False)

    def clock(self) -> float:
        return time.monotonic() - self.started


class StreamCut(Exception):
    """A stream that failed after ``responses`` responses had reached the caller."""

    def __init__(self, responses: int, cause: Exception) -> None:
        super().__init__(f"cut after {responses} responses: {type(cause).__name__}: {str(cause)[:80]}")


class Load:
    """Closed-loop callers of every kind over one SDK client, counted into the current window."""

    def __init__(self, chaos: ChaosStack, *, deadline_s: float) -> None:
        discovery, broker = chaos.addresses["discovery"], chaos.addresses["broker"]
        self.client = Client(discovery, timeout=deadline_s, broker=broker, token=chaos.token)
        self.deadline_s = deadline_s
        self.direct_ids, self.direct_expected = chaos.direct_case()
        self.window = Outcome("warm-up")
        self._tickets: list[tuple[Outcome, str]] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        calls = {"unary": self._unary, "stream": self._stream, "direct": self._direct}
        self._running: list[tuple[Outcome, str] | None] = [None] * sum(CALLERS.values())
        slots = iter(range(len(self._running)))
        self._threads = [
            threading.Thread(target=self._caller, args=(next(slots), kind, calls[kind]), daemon=True)
            for kind, callers in CALLERS.items()
            for _ in range(callers)
        ]
        self._threads.append(threading.Thread(target=self._submit, daemon=True))

    def _error(self, count: Count, exc: Exception) -> None:
        key = f"{type(exc).__name__}: {str(exc)[:100]}"
        with self._lock:
            count.errors[key] = count.errors.get(key, 0) + 1

    def _unary(self) -> bool:
        return bool(self.client.infer(APP, FEATURES)["label"].tolist() == EXPECTED)

    def _direct(self) -> bool:
        scores = self.client.infer(DIRECT_APP, {INPUT_NAME: self.direct_ids})[OUTPUT_NAME]
        return bool(np.allclose(scores, self.direct_expected, rtol=1e-5, atol=1e-6))

    def _stream(self) -> bool:
        labels: list[int] = []
        try:
            for chunk in self.client.stream(APP, STREAM_FEATURES):
                labels.extend(chunk["label"].tolist())
        except Exception as exc:
            if labels:
                raise StreamCut(len(labels), exc) from exc
            raise
        if len(labels) > len(STREAM_EXPECTED):
            raise Duplicated(f"{len(labels)} responses for {len(STREAM_EXPECTED)} rows")
        return labels == STREAM_EXPECTED

    def _caller(self, slot: int, kind: str, call: Callable[[], bool]) -> None:
        while not self._stop.is_set():
            window = self.window
            count = window.kinds[kind]
            self._running[slot] = (window, kind)
            started = time.monotonic()
            try:
                right = call()
            except Duplicated as exc:
                count.duplicated += 1
                self._error(count, exc)
            except Exception as exc:
                count.failed += 1
                if isinstance(exc, StreamCut):
                    count.cut += 1
                    count.cut_started.append(round(started - window.started, 3))
                self._error(count, exc)
            else:
                count.ok += right
                count.failed += not right
                count.slowest_s = max(count.slowest_s, round(time.monotonic() - started, 3))
            self._running[slot] = None

    def _submit(self) -> None:
        while not self._stop.is_set():
            window = self.window
            try:
                ticket = self.client.submit(APP, FEATURES)
                with self._lock:
                    self._tickets.append((window, ticket))
            except Exception as exc:
                window.kinds["async"].refused += 1
                self._error(window.kinds["async"], exc)
            self._stop.wait(0.05)

    def start(self) -> None:
        for thread in self._threads:
            thread.start()

    def stop(self) -> None:
        """Stop the callers (a call still running past its deadline + 30 s never completed), then
        collect every accepted ticket's result into its window."""
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=self.deadline_s + 30)
        for running in self._running:
            if running is not None:
                window, kind = running
                window.kinds[kind].never_completed += 1
        for window, ticket in self._tickets:
            count = window.kinds["async"]
            try:
                first = self.client.result(ticket, timeout=self.deadline_s * 4)["label"].tolist()
                again = self.client.result(ticket, timeout=self.deadline_s)["label"].tolist()
            except Exception as exc:
                count.never_completed += 1
                self._error(count, exc)
                continue
            if first == again == EXPECTED:
                count.ok += 1
            else:
                count.duplicated += 1
        self.client.close()


class Duplicated(Exception):
    """A stream answered with more responses than it had rows."""


@dataclass(frozen=True)
class _StackRay:
    """The stack's Ray head as a driver or a joining node sees it (with the stack's own Ray token)."""

    address: str
    token_file: Path

    @property
    def port(self) -> int:
        return split_address(self.address)[1]

    def env(self) -> dict[str, str]:
        return stack.ray_process_env({**os.environ, "PYTHONPATH": str(REPO)}, self.token_file)


class ChaosStack:
    """A ``servefleet up --detach`` stack on a temp state dir with the chaos apps deployed, and what
    the extra ``parts`` need beside it (a worker node, a standalone worker, a second cluster)."""

    def __init__(self, *, base_port: int | None = None, parts: tuple[str, ...] = CI_PARTS) -> None:
        self.state = Path(tempfile.mkdtemp(prefix="sf-chaos-"))
        self.base_port = base_port or _free_base_port()
        self.model_path = self.state / "ctr.bin"
        self.parts = parts
        self.node: RayWorkerNode | None = None
        self.worker: subprocess.Popen[bytes] | None = None
        self.other: tuple[RayCluster, ServiceProcess] | None = None
        self.paused = 0  # the supervisor's pid while it is stopped (``cluster``)
        #: Extra parts killed so far: they do not come back, and ``served`` expects them gone.
        self.lost: set[str] = set()

    def cli(self, *args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
        argv = [sys.executable, "-m", "servefleet.cli", *args, "--state-dir", str(self.state)]
        return subprocess.run(argv, capture_output=True, text=True, timeout=timeout, cwd=REPO, check=False)

    def up(self) -> None:
        done = self.cli("up", "--detach", "--base-port", str(self.base_port))
        if done.returncode != 0:
            raise RuntimeError(f"servefleet up failed: {done.stderr[-2000:]}")
        if "node" in self.parts:  # joined before the apps are deployed, so they spread onto it
            self.node = started_ray(
                lambda: RayWorkerNode(self.stack_ray, resources={NODE_RESOURCE: 1000}, port_slot=15)
            )
            wait_for(lambda: self.node_alive(), timeout=120, interval=1, what="the worker node to join")
        spec = yaml.safe_load((REPO / "examples" / "iris.yaml").read_text())
        spec.update(
            name=APP,
            import_path="examples.iris:StreamingIrisClassifier",
            replicas=2,
            proxies=2,
            async_mode={"enabled": True},
        )
        ctr.export_model(ctr.build_model(num_rows=1 << 14, examples=5_000), self.model_path)
        direct = {
            "name": DIRECT_APP,
            "version": "1",
            "kind": "direct",
            "init_args": {"model_path": str(self.model_path), "workers": 2},
            "inputs": [{"name": INPUT_NAME, "datatype": "INT64", "shape": [-1, 16]}],
            "outputs": [{"name": OUTPUT_NAME, "datatype": "FP32", "shape": [-1]}],
            "resources": {"num_cpus": 0.1},
            "replicas": {"min": 2, "max": 2, "initial": 2},
        }
        for app in (spec, direct):
            path = self.state / f"{app['name']}.yaml"
            path.write_text(yaml.safe_dump(app))
            deployed = self.cli("app", "deploy", str(path), "--timeout", "300")
            if deployed.returncode != 0:
                raise RuntimeError(f"deploy failed: {deployed.stdout[-1000:]} {deployed.stderr[-1000:]}")

    def direct_case(self) -> tuple[np.ndarray, np.ndarray]:
        """Feature ids for the direct app and the reference scores it must answer."""
        model = ctr.load_model(self.model_path)
        rng = np.random.default_rng(18)
        ids = rng.integers(0, model.num_rows, size=(4, model.num_fields), dtype=np.int64)
        return ids, model.score(ids)

    def down(self) -> None:
        """Stop the stack and everything started beside it."""
        self.resume()
        if self.worker is not None and self.worker.poll() is None:
            os.killpg(self.worker.pid, signal.SIGKILL)
            self.worker.wait()
        if self.other is not None:
            self.other[1].stop()
            self.other[0].cleanup()
        if self.node is not None:
            self.node.cleanup()
        self.cli("down")

    @property
    def addresses(self) -> dict[str, str]:
        return stack.addresses(self.state)

    @property
    def token(self) -> str:
        """The stack's admin token: discovery and the broker answer only callers with a token."""
        return (self.state / stack.ADMIN_TOKEN_FILE).read_text().strip()

    @property
    def stack_ray(self) -> _StackRay:
        return _StackRay(self.addresses["ray"], self.state / stack.RAY_TOKEN_FILE)

    def duplicate_executions(self) -> int:
        with sync_channel(self.addresses["broker"], token=self.token) as channel:
            stats = broker_pb2_grpc.BrokerStub(channel).QueueStats(
                broker_pb2.QueueStatsRequest(app=common_pb2.AppRef(namespace="default", name=APP)), timeout=10
            )
        return int(stats.duplicate_executions)

    def healthy(self) -> bool:
        """Every stack part answers (but the dead cluster's Ray and agent once ``cluster`` was killed)."""
        down = {"ray", "agent"} if "cluster" in self.lost else set()
        return all(row["healthy"] for row in stack.status(self.state) if row["name"] not in down)

    def ray(self, code: str, head: RayHead | None = None) -> str:
        """Run ``code`` in a fresh Ray driver of ``head`` (default: the stack's Ray; this process may
        drive another); ``ACTORS`` there: [role, app key, rest...] of every servefleet actor."""
        head = head or self.stack_ray
        prelude = (
            "import servefleet, ray, json; "
            f"ray.init(address={head.address!r}, logging_level='ERROR', log_to_driver=False); "
            "from servefleet.services.actors import RAY_NAMESPACE as NS; "
            "ACTORS = sorted(a['name'].split(':') for a in ray.util.list_named_actors(all_namespaces=True) "
            "if a['namespace'] == NS); "
        )
        done = subprocess.run(
            [sys.executable, "-c", prelude + code],
            capture_output=True,
            text=True,
            timeout=120,
            cwd=REPO,
            env=head.env(),  # with that Ray's token: it refuses drivers without it
            check=False,
        )
        if done.returncode != 0:
            raise RuntimeError(done.stderr[-1500:])
        return done.stdout.strip().splitlines()[-1] if done.stdout.strip() else ""

    def node_alive(self) -> bool:
        return self.ray(f"print({_NODE_ALIVE})") == "True"

    def on_node(self) -> dict[str, int]:
        """The apps' live actors on the worker node, by role and app (from Ray's actor table)."""
        code = (
            "from ray._private.state import state; "
            "[node] = [n['NodeID'] for n in ray.nodes() "
            f"if n['Alive'] and {NODE_RESOURCE!r} in n['Resources']]; "
            "print(json.dumps([a['Name'].split(':')[:2] for a in state.actor_table(None).values() "
            "if a['State'] == 'ALIVE' and a['Address']['NodeID'] == node and a['Name']]))"
        )
        found = Counter(" ".join(name) for name in json.loads(self.ray(code)) if tuple(name) in ACTORS)
        return dict(sorted(found.items()))

    def held_by(self, consumer: str) -> int:
        """Requests of ``APP`` delivered to ``consumer`` and not yet finished (the broker's pending
        entries, read from Redis as its admin)."""
        host, port = split_address(self.addresses["redis"])
        password = (self.state / stack.REDIS_PASSWORD_FILE).read_text().strip()
        client = redis.Redis(host=host, port=port, username=ADMIN_USER, password=password, socket_timeout=10)
        try:
            return sum(
                len(client.xpending_range(key, GROUP, min="-", max="+", count=10_000, consumername=consumer))
                for key in AppKeys(f"default/{APP}").streams
                if client.exists(key)
            )
        finally:
            client.close()

    def placed_on(self, cluster: str) -> bool:
        """Both apps RUNNING on ``cluster`` alone, as the keeper says."""
        with sync_channel(self.addresses["keeper"], token=self.token) as channel:
            stub = keeper_pb2_grpc.KeeperStub(channel)
            for app in (APP, DIRECT_APP):
                ref = keeper_pb2.GetApplicationRequest(app={"namespace": "default", "name": app})
                status = stub.GetApplication(ref, timeout=10)
                if status.state != keeper_pb2.AppState.RUNNING or [p.cluster for p in status.placements] != [
                    cluster
                ]:
                    return False
        return True

    def cluster_alive(self, cluster: str) -> bool:
        with sync_channel(self.addresses["keeper"], token=self.token) as channel:
            found = keeper_pb2_grpc.KeeperStub(channel).ListClusters(
                keeper_pb2.ListClustersRequest(), timeout=10
            )
        return any(c.name == cluster and c.alive for c in found.clusters)

    def prepare(self, part: str) -> None:
        """What killing ``part`` needs first: ``worker`` started and holding a request per slot; for
        ``cluster``, a second serving cluster the keeper counts alive."""
        if part == "worker":
            code = f"from servefleet.chaos import serve_worker; serve_worker({self.addresses['broker']!r})"
            env = {**os.environ, "PYTHONPATH": str(REPO), "SERVEFLEET_CHAOS_TOKEN": self.token}
            self.worker = launch.spawn(
                [sys.executable, "-c", code], log=self.state / "worker.log", env=env, cwd=REPO
            )
            wait_for(
                lambda: self.held_by(WORKER) > 0,
                timeout=120,
                interval=0.1,
                what="the worker to hold requests",
            )
        elif part == "cluster":
            self.add_cluster()

    def add_cluster(self) -> None:
        """A second serving cluster on the stack's keeper: a Ray head of its own and an agent run as
        the stack's agent is (same flags and tokens) but for that Ray, under ``OTHER_CLUSTER``."""
        [agent] = [p for p in stack.load(self.state) if p.name == "agent"]
        flags = agent.argv[agent.argv.index("--listen") + 2 : agent.argv.index("--metrics")]
        ray = started_ray(lambda: RayCluster(num_cpus=2))
        flags[flags.index("--ray") + 1] = ray.address
        flags[flags.index("--cluster") + 1] = OTHER_CLUSTER
        proc = ServiceProcess(
            "services.agent", *flags, data_dir=self.state, name="agent-west", start_timeout=120
        )
        self.other = (ray, proc)
        proc.start()
        wait_for(
            lambda: self.cluster_alive(OTHER_CLUSTER), timeout=120, interval=0.5, what="the second cluster"
        )

    def kill(self, part: str) -> None:
        parts = {p.name: p for p in stack.load(self.state)}
        if part in ACTOR_PARTS:
            role, app, restart = ACTOR_PARTS[part]
            self.ray(
                f"[name] = [':'.join(a) for a in ACTORS if a[:2] == [{role!r}, 'default/{app}']][:1]; "
                f"ray.kill(ray.get_actor(name, namespace=NS), no_restart={not restart})"
            )
        elif part == "worker":
            assert self.worker is not None
            os.killpg(self.worker.pid, signal.SIGKILL)
            self.worker.wait()
        elif part == "node":
            assert self.node is not None
            os.kill(self.node.raylet_pid(), signal.SIGKILL)
        elif part == "cluster":  # lost for good: nothing may bring it back within the grace period
            self.paused = parts["supervisor"].pid
            os.kill(self.paused, signal.SIGSTOP)
            for name in ("ray", "agent"):
                os.killpg(parts[name].pid, signal.SIGKILL)
        else:
            os.killpg(parts[part].pid, signal.SIGKILL)
        if part in EXTRA_PARTS:
            self.lost.add(part)

    def resume(self) -> None:
        """Let the supervisor go on (it brings the dead cluster's Ray and agent back)."""
        if self.paused:
            os.kill(self.paused, signal.SIGCONT)
            self.paused = 0

    def served(self) -> bool:
        """Every part healthy, every actor of both apps back (on the other cluster once ``cluster``
        was killed), what was lost for good gone (the worker's requests taken over, the node marked
        dead), and a fresh client gets both answers."""
        if not self.healthy():
            return False
        if "worker" in self.lost and self.held_by(WORKER):
            return False
        if "cluster" in self.lost and not self.placed_on(OTHER_CLUSTER):
            return False
        head = self.other[0] if self.other is not None and "cluster" in self.lost else None
        listed, node_alive = json.loads(self.ray(f"print(json.dumps([ACTORS, {_NODE_ALIVE}]))", head))
        actors = Counter(tuple(a[:2]) for a in listed)
        if {key: actors[key] for key in ACTORS} != ACTORS or ("node" in self.lost and node_alive):
            return False
        ids, expected = self.direct_case()
        with Client(self.addresses["discovery"], timeout=10, token=self.token) as client:
            try:
                scores = client.infer(DIRECT_APP, {INPUT_NAME: ids})[OUTPUT_NAME]
                labels = client.infer(APP, FEATURES)["label"].tolist()
            except Exception:
                return False
            return labels == EXPECTED and bool(np.allclose(scores, expected, rtol=1e-5, atol=1e-6))


def serve_worker(broker: str) -> None:
    """The standalone PullWorker of ``APP`` (``ChaosStack.prepare("worker")`` runs it in a process of
    its own, the stack's admin token in ``SERVEFLEET_CHAOS_TOKEN``): the iris classifier, holding
    each request ``WORKER_HOLD_S``, until it is killed."""
    from examples.iris import IrisClassifier
    from servefleet.broker.worker import PullWorker, from_broker

    model = IrisClassifier()

    async def handle(request: service_pb2.ModelInferRequest) -> service_pb2.ModelInferResponse:
        await asyncio.sleep(WORKER_HOLD_S)
        return encode_response(request.model_name, model(decode_request(request)), request_id=request.id)

    async def serve() -> None:
        app = f"default/{APP}"
        source = from_broker(broker, os.environ["SERVEFLEET_CHAOS_TOKEN"], app)
        worker = PullWorker(
            source, app, WORKER, WORKER_SLOTS, handle, config=common_pb2.AsyncConfig(enabled=True)
        )
        await worker.start()
        await asyncio.Event().wait()

    asyncio.run(serve())


def _free_base_port() -> int:
    offsets = [*stack.PORTS.values(), *range(stack.RAY_WORKER_PORTS[0], stack.RAY_WORKER_PORTS[1] + 1, 50)]
    for base in range(31000 + (os.getpid() % 20) * 700, 60000, 700):
        if not any(port_in_use(base + off) for off in offsets):
            return base
    raise RuntimeError("no free port block")


@contextmanager
def chaos_stack(parts: tuple[str, ...] = CI_PARTS) -> Iterator[ChaosStack]:
    """The stack, with ``EXTRA_SETTINGS`` in the environment of everything it starts when ``parts``
    has an extra part."""
    settings = EXTRA_SETTINGS if set(parts) & set(EXTRA_PARTS) else {}
    saved = {key: os.environ.get(key) for key in settings}
    os.environ.update(settings)
    running = ChaosStack(parts=parts)
    try:
        running.up()
        yield running
    finally:
        running.down()
        shutil.rmtree(running.state, ignore_errors=True)
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def run(
    parts: tuple[str, ...] = CI_PARTS,
    *,
    before_s: float = 3.0,
    after_s: float = 3.0,
    deadline_s: float = 30.0,
    recovery_timeout_s: float = 240.0,
    progress: Callable[[str], None] = lambda _: None,
    outcomes: list[Outcome] | None = None,
) -> list[Outcome]:
    """Kill each part in turn on one stack under load; one Outcome per part (``outcomes``, when
    given, gets each as it starts, so a caller still has them when a later part raises)."""
    unknown = set(parts) - set(ALL_PARTS)
    if unknown or "cluster" in parts[:-1]:
        raise ValueError(f"parts: any of {ALL_PARTS}, 'cluster' last; got {parts}")
    with chaos_stack(parts) as chaos:
        load = Load(chaos, deadline_s=deadline_s)
        load.start()
        outcomes = [] if outcomes is None else outcomes
        try:
            time.sleep(before_s)
            for part in parts:
                window = load.window = Outcome(part)
                outcomes.append(window)
                time.sleep(before_s)
                dups = chaos.duplicate_executions()
                if part == "node":
                    window.on_node = chaos.on_node()
                chaos.prepare(part)  # the last step before the kill: the worker is full now
                issued = window.clock()
                chaos.kill(part)
                window.killed_at = (round(issued, 3), round(window.clock(), 3))
                if part == "worker":
                    window.held = chaos.held_by(WORKER)
                progress(f"killed {part}")
                while not chaos.served():
                    if window.clock() - issued > recovery_timeout_s:
                        raise TimeoutError(f"not served {recovery_timeout_s}s after killing {part}")
                    time.sleep(0.5)
                window.recovery_s = round(window.clock() - issued, 1)
                progress(f"{part} recovered in {window.recovery_s}s")
                chaos.resume()
                time.sleep(after_s)
                window.duplicate_runs_discarded = chaos.duplicate_executions() - dups
            load.window = Outcome("cool-down")
        finally:
            load.stop()
    return outcomes


def table(outcomes: list[Outcome]) -> list[dict[str, object]]:
    """One row per part and kind: the table of bench/results/chaos.json."""
    rows: list[dict[str, object]] = []
    for o in outcomes:
        for kind, count in o.kinds.items():
            counted = asdict(count)
            rows.append(
                {
                    "part": o.part,
                    "kind": kind,
                    **{k: v for k, v in counted.items() if k != "errors"},
                    "recovery_s": o.recovery_s,
                    "duplicate_runs_discarded": o.duplicate_runs_discarded if kind == "async" else 0,
                    "held_by_killed_worker": o.held if kind == "async" else 0,
                    "actors_on_killed_node": o.on_node,
                    "killed_at": list(o.killed_at),
                    "errors": counted["errors"],
                }
            )
    return rows
