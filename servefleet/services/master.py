"""Application master: one detached, named Ray actor per application per cluster.

It reconciles the desired state (spec, replica count; written to Ray's GCS key-value store before
it acts) with the actual one (the live named actors ``replica:{namespace}/{name}:{generation}:{id}``
and ``proxy:{namespace}/{name}:{i}``, named by ``services.actors``), so a master that Ray restarts
rebuilds its view from what is alive, not from memory, and resumes where the last one stopped.

Rollout is surge-then-drain: replicas of the new generation start beside the old ones; while they
come up both serve; once enough are ready, every proxy gets a table with only the new ones (and
acknowledges it) before the old ones drain their in-flight requests and are killed. A generation is
the spec minus what only scales it (replicas, proxies), so scaling never restarts a replica.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import ray
from prometheus_client import Gauge
from ray.experimental import internal_kv
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from servefleet.api import agent_pb2, common_pb2
from servefleet.common import metrics
from servefleet.common.appid import AppId
from servefleet.common.config import settings
from servefleet.common.retry import Backoff
from servefleet.services.actors import (
    RAY_NAMESPACE,
    master_name,
    passed_env,
    proxy_name,
    proxy_prefix,
    replica_generation,
    replica_name,
    replica_prefix,
)
from servefleet.services.direct_replica import DirectReplica
from servefleet.services.proxy import Proxy
from servefleet.services.replica import Replica
from servefleet.services.routing import ReplicaInfo, Routing
from servefleet.services.triton.replica import TritonReplica

if TYPE_CHECKING:
    from servefleet.services.shard_router import ShardRouting

log = logging.getLogger(__name__)

ReplicaActor = ray.remote(Replica)
DirectReplicaActor = ray.remote(DirectReplica)
TritonReplicaActor = ray.remote(TritonReplica)
#: Kinds whose replicas run their own server and register it in discovery themselves.
SELF_REGISTERING: dict[str, Any] = {"direct": DirectReplicaActor, "triton": TritonReplicaActor}
ProxyActor = ray.remote(Proxy)
_GONE = (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError)
#: An actor that will never answer again (dead, or unschedulable: pinned to a lost node).
_LOST = (ray.exceptions.ActorDiedError, ray.exceptions.ActorUnschedulableError)
#: After a replica failed to start, the next start waits 2, 4, 8 ... 30 s (a broken image or
#: import path must not spin the cluster).
REPLICA_START_BACKOFF = Backoff(initial_s=2.0, max_s=30.0, jitter=0.0)

DESIRED = Gauge(
    "servefleet_master_replicas_desired",
    "Replicas the application master is told to run on this cluster.",
    ["app"],
    registry=metrics.REGISTRY,
)
READY = Gauge(
    "servefleet_master_replicas_ready",
    "Replicas of the current generation that every proxy routes to.",
    ["app"],
    registry=metrics.REGISTRY,
)


def generation(spec: common_pb2.ApplicationSpec) -> str:
    """Identity of what a replica runs: version plus a hash of every field that changes it."""
    serving = common_pb2.ApplicationSpec()
    serving.CopyFrom(spec)
    for name in ("replicas", "proxies", "placement", "labels", "autoscaling"):
        serving.ClearField(name)
    digest = hashlib.sha1(serving.SerializeToString(deterministic=True)).hexdigest()[:8]
    return f"{spec.version}-{digest}"


def runtime_env(spec: common_pb2.ApplicationSpec) -> dict[str, Any]:
    env: dict[str, Any] = {}
    env_vars = {**passed_env(), **spec.runtime_env.env_vars}
    if env_vars:
        env["env_vars"] = env_vars
    if spec.runtime_env.pip:
        env["pip"] = list(spec.runtime_env.pip)
    if spec.working_dir:
        env["working_dir"] = spec.working_dir
    return env


def actor_options(spec: common_pb2.ApplicationSpec) -> dict[str, Any]:
    """Ray options of a replica: the spec's resources and runtime_env."""
    resources = spec.resources
    options: dict[str, Any] = {
        "namespace": RAY_NAMESPACE,
        "lifetime": "detached",
        "max_restarts": 0,  # the master replaces dead replicas itself (and knows it did)
        "scheduling_strategy": "SPREAD",  # over nodes: losing one never takes every replica
        "num_cpus": resources.num_cpus,
        "num_gpus": resources.num_gpus,
    }
    if resources.memory:
        options["memory"] = resources.memory
    if resources.custom:
        options["resources"] = dict(resources.custom)
    env = runtime_env(spec)
    if env:
        options["runtime_env"] = env
    return options


@dataclass
class ReplicaState:
    name: str
    handle: Any
    generation: str
    ready: bool = False
    info: ReplicaInfo | None = None
    failed_checks: int = 0
    starting: asyncio.Task[None] | None = None
    error: str = ""
    stats: dict[str, Any] = field(default_factory=dict)  # its last health-check answer


@dataclass
class ProxyState:
    name: str
    handle: Any
    address: str = ""
    starting: asyncio.Task[None] | None = field(default=None, repr=False)


class ApplicationMaster:
    """Reconciles one application's replicas and proxies (runs as a detached Ray actor)."""

    #: The ingress actor it keeps ``spec.proxies`` of (a sharded app's master keeps routers).
    proxy_actor: Any = ProxyActor

    def __init__(
        self,
        app: bytes,
        *,
        cluster: str,
        discovery: str,
        redis: str = "",
        broker: str = "",
        credential: str = "",
    ) -> None:
        self.app = common_pb2.AppRef.FromString(app)
        self.cluster = cluster
        self.discovery = discovery
        self.redis = redis
        #: Where async replicas get their app's Redis credential ("": they use ``redis`` as is).
        self.broker = broker
        #: The app's endpoint token (role endpoint, this app only): what its proxies and replicas
        #: register in discovery with. Ray keeps constructor arguments, so a restarted master has it.
        self.credential = credential
        self._kv_key = f"desired:{AppId.parse(self.app).key}".encode()
        self.spec: common_pb2.ApplicationSpec | None = None
        self.replica_count = 0
        self.revision = -1
        self._load_desired()
        self._replicas: dict[str, ReplicaState] = {}
        self._proxies: dict[str, ProxyState] = {}
        self._routed: tuple[bytes, frozenset[str]] | None = None
        self._routing: Routing | ShardRouting | None = None
        self._start_failures = 0
        self._next_start = 0.0
        self.error = ""
        self._wake = asyncio.Event()
        self._stopping = False
        self._tasks: set[asyncio.Task[Any]] = set()
        self._adopt_live_actors()
        self._loop = asyncio.get_running_loop().create_task(self._run())
        name = AppId.parse(self.app).model_name  # the same app label as its proxies' and replicas' series
        DESIRED.labels(name).set_function(lambda: self.replica_count)
        READY.labels(name).set_function(self._ready_count)
        self._metrics = metrics.expose(
            discovery, self.app, "master", {"cluster": cluster}, credential=credential
        )

    # ---- API (called through agent/masters.py) ---------------------------------------------------

    async def apply(self, spec: bytes, replicas: int, revision: int) -> bytes:
        """Adopt a desired state unless it is older than the one held; returns MasterStatus bytes."""
        if revision >= self.revision:
            self.spec = common_pb2.ApplicationSpec.FromString(spec)
            self.replica_count = replicas
            self.revision = revision
            request = agent_pb2.ApplyApplicationRequest(spec=self.spec, replicas=replicas, revision=revision)
            internal_kv._internal_kv_put(
                self._kv_key, request.SerializeToString(), overwrite=True, namespace=RAY_NAMESPACE
            )
            self._wake.set()
        return await self.status()

    def _ready_count(self) -> int:
        routed = self._routed[1] if self._routed else frozenset()
        current = generation(self.spec) if self.spec else ""
        replicas = list(self._replicas.values())  # read from the scrape thread: copy first
        return sum(r.ready and r.name in routed and r.generation == current for r in replicas)

    async def status(self) -> bytes:
        current = generation(self.spec) if self.spec else ""
        serving = self._routed_replicas()
        new_ready = sum(r.generation == current for r in serving)
        stale = any(r.generation != current for r in self._replicas.values())
        return self._status(serving, new_ready, stale).SerializeToString()

    def _routed_replicas(self) -> list[ReplicaState]:
        """Ready means routed: in the table every proxy has acknowledged, not merely started."""
        routed = self._routed[1] if self._routed else frozenset()
        return [r for r in self._replicas.values() if r.name in routed and r.info is not None]

    def _status(self, serving: list[ReplicaState], ready: int, stale: bool) -> agent_pb2.MasterStatus:
        """The status message for ``ready`` replicas of the current generation (``stale``: others
        remain), in one form for every kind of master."""
        versions = {r.info.version for r in serving if r.info is not None}
        return agent_pb2.MasterStatus(
            app=self.app,
            version=versions.pop() if len(versions) == 1 else "",
            replicas=self.replica_count,
            ready_replicas=ready,
            updating=ready < self.replica_count or stale,
            revision=max(self.revision, 0),
            error=self.error,
            proxy_addresses=sorted(p.address for p in self._proxies.values() if p.address),
        )

    async def routing(self) -> Routing | ShardRouting | None:
        """The table proxies serve from (a starting proxy pulls it; later ones are pushed)."""
        return self._routing

    async def info(self) -> dict[str, Any]:
        """This master's process and what it found alive when it started (after a restart: the
        replicas and proxies it adopted instead of creating)."""
        return {"pid": os.getpid(), "adopted": self.adopted}

    async def replica_stats(self) -> dict[str, dict[str, Any]]:
        """Each ready replica's load (in-flight, latency EWMA): what an autoscaler reads."""
        ready = [r for r in self._replicas.values() if r.ready]
        answers = await asyncio.gather(*(r.handle.stats.remote() for r in ready), return_exceptions=True)
        return {r.name: a for r, a in zip(ready, answers, strict=True) if isinstance(a, dict)}

    async def shutdown(self) -> int:
        """Stop reconciling and kill every actor of the app; returns how many were killed."""
        self._stopping = True
        self._metrics.cancel()
        self._loop.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._loop
        stops = [p.handle.stop.remote() for p in self._proxies.values()]
        # Replicas that registered themselves in discovery (kind direct) deregister in drain.
        stops += [r.handle.drain.remote(0.0) for r in self._replicas.values() if r.ready]
        with contextlib.suppress(Exception):
            await asyncio.wait_for(asyncio.gather(*stops, return_exceptions=True), settings.shutdown_grace_s)
        handles = [p.handle for p in self._proxies.values()] + [r.handle for r in self._replicas.values()]
        for handle in handles:
            with contextlib.suppress(Exception):
                ray.kill(handle, no_restart=True)
        internal_kv._internal_kv_del(self._kv_key, namespace=RAY_NAMESPACE)
        self._proxies.clear()
        self._replicas.clear()
        return len(handles)

    # ---- reconciliation ----------------------------------------------------------------------

    def _load_desired(self) -> None:
        stored = internal_kv._internal_kv_get(self._kv_key, namespace=RAY_NAMESPACE)
        if stored:
            request = agent_pb2.ApplyApplicationRequest.FromString(stored)
            self.spec, self.replica_count, self.revision = request.spec, request.replicas, request.revision

    def _adopt_live_actors(self) -> None:
        """Rebuild the actual state from the named actors alive in the cluster."""
        replicas, proxies = replica_prefix(self.app), proxy_prefix(self.app)
        for entry in ray.util.list_named_actors(all_namespaces=True):
            name = entry["name"]
            if entry["namespace"] != RAY_NAMESPACE or not name.startswith((replicas, proxies)):
                continue
            try:
                handle = ray.get_actor(name, namespace=RAY_NAMESPACE)
            except ValueError:
                continue  # died between the listing and now
            if name.startswith(replicas):
                self._track_replica(ReplicaState(name, handle, replica_generation(self.app, name)))
            else:
                self._track_proxy(ProxyState(name, handle))
        self.adopted = {"replicas": len(self._replicas), "proxies": len(self._proxies)}
        log.info("master %s adopted %s", AppId.parse(self.app).key, self.adopted)

    async def _run(self) -> None:
        # Learn which adopted replicas are alive before publishing anything: a table built
        # earlier would take live replicas away from the proxies.
        await asyncio.gather(*(r.starting for r in self._replicas.values() if r.starting is not None))
        while not self._stopping:
            try:
                await self._reconcile()
                self.error = "" if not self._start_failures else self.error
            except Exception as exc:
                log.exception("reconcile of %s failed", AppId.parse(self.app).key)
                self.error = f"reconcile: {type(exc).__name__}: {exc}"
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), settings.master_reconcile_interval_s)

    async def _reconcile(self) -> None:
        if self.spec is None:
            return
        await self._health_check()
        current = generation(self.spec)
        wanted = self.replica_count
        mine = [r for r in self._replicas.values() if r.generation == current]
        if len(mine) < wanted and time.monotonic() >= self._next_start:
            for _ in range(wanted - len(mine)):
                self._start_replica(self.spec, current)
        elif len(mine) > wanted:
            surplus = sorted(mine, key=lambda r: r.ready)[: len(mine) - wanted]
            await self._retire(surplus)
        ready_mine = [r for r in self._replicas.values() if r.ready and r.generation == current]
        old = [r for r in self._replicas.values() if r.generation != current]
        if len(ready_mine) >= wanted:
            await self._publish(ready_mine)  # every proxy moved to the new generation first ...
            await self._retire(old)  # ... then the old one drains
        else:  # rollout (or recovery) under way: whatever is ready serves
            await self._publish([r for r in self._replicas.values() if r.ready])
        # Clients call direct replicas straight from discovery: no proxy for those apps.
        await self._ensure_proxies(0 if self.spec.kind == "direct" else self.spec.proxies)

    async def _health_check(self) -> None:
        ready = [r for r in self._replicas.values() if r.ready]
        timeout = settings.replica_health_timeout_s
        answers = await asyncio.gather(
            *(asyncio.wait_for(_await(r.handle.stats.remote()), timeout) for r in ready),
            return_exceptions=True,
        )
        for replica, answer in zip(ready, answers, strict=True):
            if isinstance(answer, _GONE):
                log.warning("replica %s died: %s", replica.name, answer)
                self._forget(replica)
            elif isinstance(answer, BaseException):
                replica.failed_checks += 1
                if replica.failed_checks >= settings.replica_unhealthy_checks:
                    log.warning("replica %s unhealthy (%s); replacing it", replica.name, answer)
                    self._forget(replica)
                    _kill(replica.handle)
            else:
                replica.failed_checks = 0
                replica.stats = answer
        await self._check_proxies()

    async def _check_proxies(self) -> None:
        """A proxy that Ray restarted listens on a new port: keep status (and its table) current."""
        started = [p for p in self._proxies.values() if p.starting is not None and p.starting.done()]
        timeout = settings.replica_health_timeout_s
        answers = await asyncio.gather(
            *(asyncio.wait_for(_await(p.handle.address.remote()), timeout) for p in started),
            return_exceptions=True,
        )
        for proxy, answer in zip(started, answers, strict=True):
            if isinstance(answer, _LOST):  # its node is gone (pinned there): start another elsewhere
                log.warning("proxy %s is gone for good (%s); starting another", proxy.name, answer)
                self._proxies.pop(proxy.name, None)
            elif isinstance(answer, str) and answer != proxy.address:
                proxy.address = answer
                await self._push([proxy])

    def _start_replica(self, spec: common_pb2.ApplicationSpec, gen: str) -> None:
        name = replica_name(self.app, gen)
        handle: Any
        if spec.kind in SELF_REGISTERING:  # its own server in the actor, registered in discovery
            handle = (
                SELF_REGISTERING[spec.kind]
                .options(name=name, **actor_options(spec))
                .remote(
                    spec.SerializeToString(),
                    name,
                    cluster=self.cluster,
                    discovery=self.discovery,
                    credential=self.credential,
                )
            )
        else:
            handle = ReplicaActor.options(name=name, **actor_options(spec)).remote(
                spec.SerializeToString(),
                name,
                redis=self.redis,
                broker=self.broker,
                discovery=self.discovery,
                cluster=self.cluster,
                credential=self.credential,
            )
        self._track_replica(ReplicaState(name, handle, gen))

    def _track_replica(self, replica: ReplicaState) -> None:
        self._replicas[replica.name] = replica
        replica.starting = self._spawn(self._await_ready(replica))

    async def _await_ready(self, replica: ReplicaState) -> None:
        try:
            info = await asyncio.wait_for(
                _await(replica.handle.ready.remote()), settings.replica_start_timeout_s
            )
        except Exception as exc:
            self._start_failed(replica, exc)
            return
        replica.info = ReplicaInfo(
            name=replica.name,
            handle=replica.handle,
            node_id=info["node_id"],
            version=info["version"],
            capacity=info["capacity"],
            address=info.get("address", ""),
            unary_streams=not info.get("streaming", True) and "infer_method" not in info,
            **_triton_routing(info),
        )
        replica.ready = True
        self._start_failures = 0
        self._next_start = 0.0
        self._wake.set()

    def _start_failed(self, replica: ReplicaState, exc: BaseException) -> None:
        cause = getattr(exc, "cause", None) or exc
        self.error = f"replica failed to start: {type(cause).__name__}: {cause}"
        log.warning("replica %s of %s: %s", replica.name, AppId.parse(self.app).key, self.error)
        self._forget(replica)
        _kill(replica.handle)
        self._start_failures += 1
        self._next_start = time.monotonic() + REPLICA_START_BACKOFF.delay(self._start_failures)
        self._wake.set()

    def _forget(self, replica: ReplicaState) -> None:
        self._replicas.pop(replica.name, None)
        self._wake.set()

    async def _publish(self, replicas: list[ReplicaState]) -> None:
        """Push a new table to every proxy (when it changed) and wait until each has it."""
        assert self.spec is not None
        spec = self.spec.SerializeToString()
        names = frozenset(r.name for r in replicas)
        if self._routed == (spec, names) and self._routing is not None:
            return
        infos = tuple(r.info for r in replicas if r.info is not None)
        self._routing = Routing(epoch=time.time_ns(), spec=spec, replicas=infos)
        await self._push(list(self._proxies.values()))
        self._routed = (spec, names)

    async def _push(self, proxies: list[ProxyState]) -> None:
        if self._routing is None or not proxies:
            return
        pushes = [_await(p.handle.update.remote(self._routing)) for p in proxies]
        # A proxy that is restarting pulls the table itself when it comes back.
        await asyncio.wait_for(asyncio.gather(*pushes, return_exceptions=True), settings.shutdown_grace_s)

    async def _retire(self, replicas: list[ReplicaState]) -> None:
        """Take replicas out of the tables first, then drain and kill them in the background."""
        if not replicas:
            return
        for replica in replicas:
            self._replicas.pop(replica.name, None)
        if self._routing is not None and any(
            r.name in {i.name for i in self._routing.replicas} for r in replicas
        ):
            await self._publish([r for r in self._replicas.values() if r.ready])
        for replica in replicas:
            self._spawn(self._drain(replica))

    async def _drain(self, replica: ReplicaState) -> None:
        if replica.ready:
            with contextlib.suppress(Exception):
                timeout = settings.replica_drain_timeout_s
                await asyncio.wait_for(_await(replica.handle.drain.remote(timeout)), timeout + 5)
        _kill(replica.handle)

    async def _ensure_proxies(self, count: int) -> None:
        wanted = {proxy_name(self.app, i): i for i in range(count)}
        for name in sorted(set(self._proxies) - set(wanted)):
            proxy = self._proxies.pop(name)
            with contextlib.suppress(Exception):
                await asyncio.wait_for(_await(proxy.handle.stop.remote()), settings.shutdown_grace_s)
            _kill(proxy.handle)
        missing = sorted(set(wanted) - set(self._proxies))
        # One proxy per node where there are several. Pinned (Ray ignores a soft affinity for these
        # 0-CPU actors): when that node is lost the proxy cannot restart, and _check_proxies
        # replaces it on a node that is alive.
        nodes = sorted(n["NodeID"] for n in ray.nodes() if n["Alive"]) if missing else []
        for name in missing:
            node = nodes[wanted[name] % len(nodes)]
            handle = self.proxy_actor.options(
                name=name,
                namespace=RAY_NAMESPACE,
                lifetime="detached",
                get_if_exists=True,
                max_restarts=-1,
                num_cpus=settings.proxy_num_cpus,
                scheduling_strategy=NodeAffinitySchedulingStrategy(node, soft=False),
                runtime_env={"env_vars": passed_env()} if passed_env() else None,
            ).remote(
                self.app.SerializeToString(),
                master_name(self.app),
                cluster=self.cluster,
                # Discovery hands out a Triton app's servers themselves; its proxies serve the
                # clients that know their address (app status) and stay out of discovery.
                discovery="" if self.spec is not None and self.spec.kind == "triton" else self.discovery,
                credential=self.credential,
            )
            self._track_proxy(ProxyState(name, handle))

    def _track_proxy(self, proxy: ProxyState) -> None:
        self._proxies[proxy.name] = proxy
        proxy.starting = self._spawn(self._await_proxy(proxy))

    async def _await_proxy(self, proxy: ProxyState) -> None:
        try:
            proxy.address = await asyncio.wait_for(
                _await(proxy.handle.address.remote()), settings.replica_start_timeout_s
            )
        except Exception as exc:
            self.error = f"proxy {proxy.name} failed to start: {exc}"
            log.warning("%s", self.error)
            return
        await self._push([proxy])

    def _spawn(self, coro: Any) -> asyncio.Task[Any]:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task


def _triton_routing(info: dict[str, Any]) -> dict[str, Any]:
    """What a proxy needs to route to a Triton server: its method and models (from ``ready``)."""
    if "infer_method" not in info:
        return {}
    return {
        "infer_method": info["infer_method"],
        "models": tuple(info["models"]),
        "metadata": tuple(sorted(info["metadata"].items())),
    }


async def _await(ref: Any) -> Any:
    """Await an ObjectRef inside a coroutine (so ``asyncio.wait_for`` can wrap it)."""
    return await ref


def _kill(handle: Any) -> None:
    with contextlib.suppress(Exception):
        ray.kill(handle, no_restart=True)
