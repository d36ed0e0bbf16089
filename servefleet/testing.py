"""Real etcd, Redis and Ray processes on free loopback ports, for tests and benchmarks.

Each owns its process group and data dir; ``stop()`` leaves nothing behind, ``kill()`` and
``start()`` again on the same data dir model a crash and restart.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import urllib.request
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any, Protocol, Self, TypeVar

from servefleet import launch, stack
from servefleet.api import common_pb2, keeper_pb2
from servefleet.broker.acl import ADMIN_USER, redis_config
from servefleet.common import health
from servefleet.common.auth import ADMIN, ENDPOINT, TENANT, Authenticator, EtcdTokens, Principal
from servefleet.common.net import free_port, wait_for
from servefleet.common.redis_target import RedisTarget


class ManagedProcess:
    """A child process (``launch.spawn``) started by ``argv()`` and probed by ``healthy()``; its log
    is ``<data_dir>/<name>.log``."""

    name = "process"
    start_timeout = 30.0

    def __init__(self, data_dir: Path | None = None, *, port: int | None = None) -> None:
        self.data_dir = Path(data_dir or tempfile.mkdtemp(prefix=f"sf-{self.name}-"))
        self.port = port or free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def argv(self) -> list[str]:
        raise NotImplementedError

    def healthy(self) -> bool:
        raise NotImplementedError

    @property
    def log(self) -> Path:
        return self.data_dir / f"{self.name}.log"

    def tail(self, chars: int = 3000) -> str:
        """The end of the process's log (for assertion messages)."""
        return self.log.read_text(errors="replace")[-chars:] if self.log.exists() else ""

    def start(self) -> Self:
        self.spawn()
        try:
            return self.wait_ready()
        except BaseException:
            self.stop()  # not left running behind a start that failed
            raise

    def spawn(self) -> Self:
        """Start the process without waiting for it (members of a cluster start together)."""
        self.proc = launch.spawn(self.argv(), log=self.log, env=self.env(), cwd=self.data_dir)
        return self

    def wait_ready(self) -> Self:
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
            raise RuntimeError(f"{self.name} exited with {self.proc.returncode}:\n{self.tail(2000)}")
        return True

    def _signal(self, sig: int) -> None:
        if self.proc is not None and self.proc.poll() is None:
            launch.signal_group(self.proc.pid, sig)

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
            launch.signal_group(self.proc.pid, signal.SIGKILL)

    def cleanup(self) -> None:
        self.stop()
        shutil.rmtree(self.data_dir, ignore_errors=True)


class EtcdProcess(ManagedProcess):
    """One etcd member: alone, or named ``member`` in ``cluster`` (name -> peer address)."""

    name = "etcd"

    def __init__(
        self,
        data_dir: Path | None = None,
        *,
        member: str = "servefleet",
        cluster: dict[str, str] | None = None,
    ) -> None:
        super().__init__(data_dir)
        self.peer_port = free_port()
        self.member = member
        self.cluster = cluster

    @property
    def peer_address(self) -> str:
        return f"127.0.0.1:{self.peer_port}"

    def argv(self) -> list[str]:
        return launch.etcd_argv(
            data_dir=self.data_dir / "data",
            client=self.address,
            peer=self.peer_address,
            name=self.member,
            cluster=self.cluster,
        )

    def healthy(self) -> bool:
        return health.etcd_health(self.address)[0]


def _leads(address: str) -> bool:
    """Whether the etcd member at ``address`` is its cluster's leader (its own metrics say)."""
    try:
        with urllib.request.urlopen(f"http://{address}/metrics", timeout=2) as response:
            return b"\netcd_server_is_leader 1" in response.read()
    except OSError:
        return False


class EtcdCluster:
    """A real ``size``-member etcd cluster on free loopback ports. ``address`` lists every member
    (``host:port,...``, what ``--etcd`` takes); ``members[i].kill()`` / ``.start()`` crash and
    restart one member on its data."""

    def __init__(self, size: int = 3, data_dir: Path | None = None) -> None:
        self.data_dir = Path(data_dir or tempfile.mkdtemp(prefix="sf-etcd-cluster-"))
        peers: dict[str, str] = {}
        self.members = [
            EtcdProcess(self.data_dir / f"m{i}", member=f"m{i}", cluster=peers) for i in range(size)
        ]
        for member in self.members:
            member.data_dir.mkdir(parents=True, exist_ok=True)
            peers[member.member] = member.peer_address

    @property
    def address(self) -> str:
        return ",".join(m.address for m in self.members)

    def start(self) -> Self:
        """Every member at once (none is healthy before a quorum runs), then wait for each."""
        for member in self.members:
            member.spawn()
        for member in self.members:
            member.wait_ready()
        return self

    def leader(self) -> EtcdProcess:
        """The member that leads now (from each member's own status)."""
        for member in self.members:
            if member.proc is not None and member.proc.poll() is None and _leads(member.address):
                return member
        raise RuntimeError("no etcd member leads")

    def cleanup(self) -> None:
        for member in self.members:
            member.stop()
        shutil.rmtree(self.data_dir, ignore_errors=True)


class RedisProcess(ManagedProcess):
    """One Redis; ``admin_password``: it requires auth (only the broker's admin user, as ``servefleet
    up`` starts it); ``cluster_node_timeout_ms`` > 0: a Redis Cluster node (``LocalRedisCluster``)."""

    name = "redis"

    def __init__(
        self,
        data_dir: Path | None = None,
        *,
        appendfsync: str = launch.REDIS_APPENDFSYNC,
        admin_password: str = "",
        cluster_node_timeout_ms: int = 0,
    ) -> None:
        super().__init__(data_dir)
        self.appendfsync = appendfsync
        self.admin_password = admin_password
        self.cluster_node_timeout_ms = cluster_node_timeout_ms
        self.replica_of = ""  # "host:port": start as a replica of that primary (LocalSentinel)
        self.cluster_port = free_port() if cluster_node_timeout_ms else 0

    @property
    def target(self) -> RedisTarget:
        """How the broker reaches it (with the admin credential when it requires auth)."""
        target = RedisTarget((self.address,), "single")
        return target.with_credential(ADMIN_USER, self.admin_password) if self.admin_password else target

    def argv(self) -> list[str]:
        config = None
        if self.admin_password:
            config = self.data_dir / "redis.conf"
            stack.write_secret(config, redis_config(self.admin_password))
        argv = launch.redis_argv(
            host="127.0.0.1",
            port=self.port,
            data_dir=self.data_dir,
            appendfsync=self.appendfsync,
            config_file=config,
            cluster_node_timeout_ms=self.cluster_node_timeout_ms,
            cluster_port=self.cluster_port,
        )
        return argv + (["--replicaof", *self.replica_of.split(":")] if self.replica_of else [])

    def healthy(self) -> bool:
        return health.redis_health(self.address)[0]

    def in_sync(self) -> bool:
        """A primary, or a replica whose link to its primary is up (its first full sync done)."""
        argv = [launch.binary("redis-cli"), "-p", str(self.port), "info", "replication"]
        info = subprocess.run(argv, capture_output=True, text=True, timeout=10).stdout
        return "role:master" in info or "master_link_status:up" in info


class SentinelProcess(ManagedProcess):
    """One Redis Sentinel watching the primary ``master`` (host:port) under ``name``."""

    name = "sentinel"

    def __init__(self, master: str, service: str, *, down_after_ms: int = 1000) -> None:
        super().__init__()
        self.master = master
        self.service = service
        self.down_after_ms = down_after_ms

    def argv(self) -> list[str]:
        config = self.data_dir / "sentinel.conf"
        if not config.exists():  # Sentinel rewrites it with what it learns: keep it across restarts
            host, port = self.master.split(":")
            config.write_text(
                f"sentinel monitor {self.service} {host} {port} 1\n"
                f"sentinel down-after-milliseconds {self.service} {self.down_after_ms}\n"
                f"sentinel failover-timeout {self.service} 5000\n"
            )
        return launch.redis_sentinel_argv(host="127.0.0.1", port=self.port, config_file=config)

    def healthy(self) -> bool:
        return health.redis_health(self.address)[0]


class LocalSentinel:
    """A Sentinel-managed primary: one primary, ``replicas`` replicas and ``sentinels`` Sentinels
    (quorum 1), all with their AOF on. Kill ``primary`` and a Sentinel promotes a replica."""

    def __init__(self, replicas: int = 1, sentinels: int = 1, *, service: str = "servefleet") -> None:
        self.service = service
        self.primary = RedisProcess()
        self.replicas = [RedisProcess() for _ in range(replicas)]
        for replica in self.replicas:
            replica.replica_of = self.primary.address
        self.sentinels = [SentinelProcess(self.primary.address, service) for _ in range(sentinels)]

    @property
    def target(self) -> RedisTarget:
        return RedisTarget(tuple(s.address for s in self.sentinels), "sentinel", self.service)

    def start(self) -> Self:
        for proc in (self.primary, *self.replicas, *self.sentinels):
            proc.start()
        for replica in self.replicas:  # Redis delays a first (diskless) full sync by 5 s
            wait_for(replica.in_sync, timeout=60, interval=0.2, what=f"replica {replica.address} in sync")
        return self

    def current_primary(self) -> RedisProcess:
        """The node the Sentinels name as primary now."""
        argv = [launch.binary("redis-cli"), "-p", str(self.sentinels[0].port)]
        argv += ["sentinel", "get-master-addr-by-name", self.service]
        port = int(subprocess.run(argv, capture_output=True, text=True, timeout=10).stdout.split()[1])
        return next(p for p in (self.primary, *self.replicas) if p.port == port)

    def cleanup(self) -> None:
        for proc in (*self.sentinels, self.primary, *self.replicas):
            proc.cleanup()


class LocalRedisCluster:
    """A local Redis Cluster: ``primaries`` primaries (the slots spread over them), each with
    ``replicas`` replicas, every node a ``RedisProcess`` with its AOF on. ``kill()``/``start()`` of
    every node models a restart of the whole cluster from its AOFs; killing one primary (``nodes``)
    makes its replica take over after ``node_timeout_ms``."""

    def __init__(self, primaries: int = 3, replicas: int = 0, *, node_timeout_ms: int = 1000) -> None:
        self.replicas = replicas
        self.nodes = [
            RedisProcess(cluster_node_timeout_ms=node_timeout_ms) for _ in range(primaries * (1 + replicas))
        ]

    @property
    def address(self) -> str:
        return ",".join(node.address for node in self.nodes)

    @property
    def target(self) -> RedisTarget:
        return RedisTarget(tuple(node.address for node in self.nodes), "cluster")

    def start(self) -> Self:
        """Start every node; the first time, join them into a cluster. Returns once every slot is served."""
        for node in self.nodes:
            node.start()
        if not (self.nodes[0].data_dir / "nodes.conf").exists() or not self._formed():
            create = launch.redis_cluster_create_argv([n.address for n in self.nodes], replicas=self.replicas)
            done = subprocess.run(create, capture_output=True, text=True, timeout=60)
            if done.returncode != 0:
                raise RuntimeError(f"redis-cli --cluster create failed: {done.stdout[-2000:]}{done.stderr}")
        wait_for(self.ok, timeout=60, interval=0.2, what="the redis cluster to serve every slot")
        for node in self.nodes:  # replicas: Redis delays a first (diskless) full sync by 5 s
            wait_for(node.in_sync, timeout=60, interval=0.2, what=f"redis node {node.address} in sync")
        return self

    def _formed(self) -> bool:
        found = re.search(r"cluster_known_nodes:(\d+)", self._info(self.nodes[0]))
        return found is not None and int(found[1]) == len(self.nodes)

    @staticmethod
    def _info(node: RedisProcess) -> str:
        argv = [launch.binary("redis-cli"), "-p", str(node.port), "cluster", "info"]
        return subprocess.run(argv, capture_output=True, text=True, timeout=10).stdout

    def ok(self) -> bool:
        """Every live node says the cluster serves all its slots."""
        live = [n for n in self.nodes if n.proc is not None and n.proc.poll() is None]
        return bool(live) and all("cluster_state:ok" in self._info(n) for n in live)

    def kill(self) -> None:
        for node in self.nodes:
            node.kill()

    def cleanup(self) -> None:
        for node in self.nodes:
            node.cleanup()


_RAY_TOKEN: Path | None = None


def ray_token_file() -> Path:
    """This process's Ray token (one per test session, shared by every RayCluster it starts), and
    the environment set so that drivers here and children started later use it: a stray
    ``~/.ray/auth_token`` is never read."""
    global _RAY_TOKEN
    if _RAY_TOKEN is None:
        _RAY_TOKEN = stack.ray_token(Path(tempfile.mkdtemp(prefix="sf-raytoken-")) / stack.RAY_TOKEN_FILE)
        os.environ.pop("RAY_AUTH_TOKEN", None)
        os.environ.update(stack.ray_auth_env(_RAY_TOKEN))
        if "ray" in sys.modules:  # Ray read its auth mode at import: make it read again
            from ray._raylet import AuthenticationTokenLoader, Config  # type: ignore[attr-defined]

            Config.initialize("")
            AuthenticationTokenLoader.instance().reset_cache()
    return _RAY_TOKEN


class RayCluster(ManagedProcess):
    """A one-node Ray cluster (``ray start --head --block``) with every port explicit, with token
    auth on (the session's token, ``ray_token_file``)."""

    name = "ray"
    #: `ray start` takes 60 s and more on a 2-core box beside two CPU hogs and other tests.
    start_timeout = 150.0

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
        return launch.ray_head_argv(
            port=self.port,
            ports=self.helper_ports,
            worker_ports=self.worker_ports,
            num_cpus=self.num_cpus,
            temp_dir=temp,
            resources=self.resources,
        )

    def env(self) -> dict[str, str]:
        base = stack.ray_process_env(dict(os.environ), ray_token_file())
        return {**base, "RAY_ADDRESS": self.address, "PYTHONPATH": os.pathsep.join(sys.path)}

    def healthy(self) -> bool:
        return health.ray_health(self.address)[0] and self._raylet_up()

    def _raylet_up(self) -> bool:
        return "Ray runtime started" in self.log.read_text(errors="replace")


# `ray start --address` refuses to join while RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0, which servefleet
# sets to keep Ray on loopback (servefleet/__init__.py). Lift only that refusal: the CLI sees the flag
# on, address resolution still sees it off, so the node joins on 127.0.0.1 like the head.
_JOIN = (
    "import types, ray._private.ray_constants as c, ray.scripts.scripts as s; "
    "s.ray_constants = types.SimpleNamespace(**{**vars(c), 'ENABLE_RAY_CLUSTER': True}); s.main()"
)


class RayHead(Protocol):
    """What a worker node needs of the head it joins: a ``RayCluster``, or a stack's Ray
    (``servefleet.chaos``)."""

    @property
    def address(self) -> str: ...

    @property
    def port(self) -> int: ...

    def env(self) -> dict[str, str]: ...


class RayWorkerNode(ManagedProcess):
    """A second Ray node on this machine joined to ``head`` (``ray start --address --block``), with
    ports of its own and custom ``resources`` (e.g. ``{"accelerator": 1}`` for a GPU node's stand-in).
    """

    name = "ray-worker"
    start_timeout = 150.0

    def __init__(
        self,
        head: RayHead,
        *,
        num_cpus: int = 2,
        resources: Mapping[str, float] | None = None,
        port_slot: int = 30,
    ) -> None:
        """``port_slot``: which 200-port block (of 60, below the ephemeral range) its workers use,
        counted from the head's; nodes joined to one head at the same time need different slots."""
        super().__init__()
        self.head = head
        self.num_cpus = num_cpus
        self.resources = dict(resources or {})
        low = 20000 + ((head.port % 60 + port_slot) % 60) * 200
        self.worker_ports = (low, low + 199)

    def argv(self) -> list[str]:
        ports = [free_port() for _ in range(6)]
        return [
            sys.executable,
            "-c",
            _JOIN,
            "start",
            f"--address={self.head.address}",
            "--block",
            "--node-ip-address=127.0.0.1",
            f"--num-cpus={self.num_cpus}",
            "--num-gpus=0",
            f"--resources={json.dumps(self.resources)}",
            "--disable-usage-stats",
            f"--node-manager-port={ports[0]}",
            f"--object-manager-port={ports[1]}",
            f"--dashboard-agent-listen-port={ports[2]}",
            f"--dashboard-agent-grpc-port={ports[3]}",
            f"--metrics-export-port={ports[4]}",
            f"--runtime-env-agent-port={ports[5]}",
            f"--min-worker-port={self.worker_ports[0]}",
            f"--max-worker-port={self.worker_ports[1]}",
        ]

    def env(self) -> dict[str, str]:
        return self.head.env()

    def healthy(self) -> bool:
        return "Ray runtime started" in self.log.read_text(errors="replace")

    def raylet_pid(self) -> int:
        """The raylet of this node (a child of ``ray start``): SIGKILL it and the node is lost."""
        assert self.proc is not None
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                stat = (entry / "stat").read_text()
                cmdline = (entry / "cmdline").read_bytes().split(b"\0")[0]
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[2]) == self.proc.pid and cmdline.endswith(b"/raylet"):
                return int(entry.name)
        raise RuntimeError(f"no raylet in process group {self.proc.pid}")


class ServiceProcess(ManagedProcess):
    """``python -m servefleet.<module> --listen <address> <flags>`` on a fixed port (free unless
    given; kept across restarts), healthy once it answers the gRPC health protocol. ``env`` adds to
    this process's environment; ``name`` names the log when several share a data dir."""

    def __init__(
        self,
        module: str,
        *flags: str,
        data_dir: Path | None = None,
        port: int | None = None,
        env: Mapping[str, str] | None = None,
        name: str | None = None,
        start_timeout: float | None = None,
    ) -> None:
        self.name = name or module.rsplit(".", 1)[-1]
        super().__init__(data_dir, port=port)
        self.module = module
        self.flags = list(flags)
        self.extra_env = dict(env or {})
        self.start_timeout = start_timeout or self.start_timeout

    def argv(self) -> list[str]:
        return launch.service_argv(self.module, self.address, *self.flags)

    def env(self) -> dict[str, str]:
        return {**os.environ, **self.extra_env}

    def healthy(self) -> bool:
        return health.grpc_health(self.address)[0]


class DiscoveryProcess(ServiceProcess):
    """``python -m servefleet.discovery`` against ``etcd`` (host:port)."""

    def __init__(self, etcd: str, data_dir: Path | None = None, **options: Any) -> None:
        super().__init__("discovery", "--etcd", etcd, data_dir=data_dir, **options)
        self.etcd = etcd

    @property
    def token(self) -> str:
        """An admin token this discovery accepts (tests and benchmarks use it where a tenant's or
        an endpoint's own token is not the point)."""
        return admin_token(self.etcd)


_Ray = TypeVar("_Ray", RayCluster, RayWorkerNode)


def started_ray(make: Callable[[], _Ray], tries: int = 3) -> _Ray:
    """``make()`` started; made and started again (``tries`` in all) while ``ray start`` gives up
    (it does when an overloaded GCS is slow to answer: "The current node timed out during startup",
    after Ray's fixed 30 s; seen at load average 30+ on 2 cores)."""
    for _ in range(tries - 1):
        made = make()
        try:
            return made.start()
        except RuntimeError:
            made.cleanup()
    return make().start()


@contextlib.contextmanager
def joined_node(
    head: RayCluster, *, resources: Mapping[str, float], port_slot: int, timeout: float = 120.0
) -> Iterator[RayWorkerNode]:
    """A ``RayWorkerNode`` joined to ``head`` for the body of the ``with`` (this process must be a Ray
    driver of ``head``): entered once Ray lists it alive, left once Ray marks it dead, since until
    then Ray would still place actors on a node that is gone. ``resources`` must name it uniquely."""
    import ray

    marker = next(iter(resources))

    def listed(alive: bool) -> bool:
        return any(n["Alive"] and marker in n["Resources"] for n in ray.nodes()) == alive

    node = started_ray(lambda: RayWorkerNode(head, resources=resources, port_slot=port_slot))
    try:
        wait_for(lambda: listed(True), timeout=timeout, interval=0.2, what="the worker node to join")
        yield node
    finally:
        node.cleanup()
        wait_for(lambda: listed(False), timeout=timeout, interval=0.5, what="the worker node marked dead")


class Credentials:
    """Tokens for tests, issued through the keeper's own code into the keeper's records in etcd
    (``prefix``: the keeper's etcd prefix), so every service reading that etcd accepts them."""

    def __init__(self, etcd: str, prefix: str = "") -> None:
        from servefleet.keeper.core import Keeper
        from servefleet.keeper.store import KeeperStore

        self.prefix = prefix
        self.store = KeeperStore.connect(etcd, prefix or None)
        self.keeper = Keeper(self.store)
        self._admin = ""

    async def admin(self) -> str:
        if not self._admin:
            self._admin = await self.keeper.service_token(ADMIN, "tests")
        return self._admin

    async def issue(self, role: str, *, tenant: str = "", app: str = "") -> str:
        """A token of ``role``; ``app`` ("ns/name") for endpoint tokens, ``tenant`` for tenant tokens."""
        namespace, _, name = app.rpartition("/")
        request = keeper_pb2.IssueTokenRequest(
            role=role, tenant=tenant, app=common_pb2.AppRef(namespace=namespace, name=name)
        )
        token, _ = await self.keeper.issue_token(Principal(ADMIN, ADMIN), request)
        return token

    async def tenant(self, name: str, *namespaces: str) -> str:
        """A tenant token for ``name`` (created with ``namespaces``, default its own name, if new)."""
        if await self.store.tenant(name) is None:
            await self.store.create_tenant(
                keeper_pb2.TenantInfo(tenant=name, namespaces=namespaces or (name,))
            )
        return await self.issue(TENANT, tenant=name)

    def authenticator(self) -> Authenticator:
        return Authenticator(EtcdTokens(self.store.client, self.prefix))

    async def close(self) -> None:
        await self.store.close()


async def endpoint_token(etcd: str, app: str, prefix: str = "") -> str:
    """``app``'s endpoint token, as a cluster agent gets it for a master it creates (tests that
    drive ``masters.apply`` themselves hand it over)."""
    found = Credentials(etcd, prefix)
    try:
        return await found.issue(ENDPOINT, app=app)
    finally:
        await found.close()


_ADMIN_TOKENS: dict[tuple[str, str], str] = {}


def admin_token(etcd: str, prefix: str = "") -> str:
    """An admin token valid for every service on ``etcd`` (one per etcd and prefix, from sync code)."""
    key = (etcd, prefix)
    if key not in _ADMIN_TOKENS:

        async def issue() -> str:
            found = Credentials(etcd, prefix)
            try:
                return await found.admin()
            finally:
                await found.close()

        with concurrent.futures.ThreadPoolExecutor(1) as pool:  # callers may be inside a running loop
            _ADMIN_TOKENS[key] = pool.submit(asyncio.run, issue()).result(timeout=30)
    return _ADMIN_TOKENS[key]
