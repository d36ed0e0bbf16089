"""The embedded local stack behind ``servefleet up``: etcd, Redis and a Ray head from their normal
binaries, then every platform service as a child process, each in its own process group so that
``down`` (or Ctrl-C) leaves nothing behind. ``stack.json`` in the state dir is how every other
command finds the stack."""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from servefleet import launch
from servefleet.common import health
from servefleet.common.channels import TlsFiles, use_tls
from servefleet.common.etcd import parse_endpoints
from servefleet.common.net import port_in_use

STACK_FILE = "stack.json"
#: The stack's own secrets in the state dir, each mode 0600.
RAY_TOKEN_FILE = "ray.token"
#: The password of the stack's Redis admin (the broker); Redis's own config file holds it too.
REDIS_PASSWORD_FILE = "redis.password"
REDIS_CONFIG_FILE = "redis/redis.conf"
ADMIN_TOKEN_FILE = "admin.token"
AGENT_TOKEN_FILE = "agent.token"
AUTOSCALER_TOKEN_FILE = "autoscaler.token"
#: Marks every process the stack starts (inherited by Ray's workers) so that none can hide.
STACK_ENV = "SERVEFLEET_STACK"

Probe = Callable[[str], tuple[bool, str]]
PROBES: dict[str, Probe] = {
    "etcd": health.etcd_health,
    "redis": health.redis_health,
    "ray": health.ray_health,
    "supervisor": lambda _: (True, "SUPERVISING"),  # its pid being alive is its health
}


class StackError(Exception):
    """A problem a person can fix, reported as one line."""


@dataclass
class Part:
    name: str
    address: str
    argv: list[str] = field(default_factory=list)  # empty: external, not started by us
    pid: int = 0
    restarts: int = 0  # by the supervisor, since `up`
    last_exit: str = ""  # how its last process ended, when the supervisor saw it die
    metrics: str = ""  # where its Prometheus /metrics is served ("" for etcd/redis)

    @property
    def external(self) -> bool:
        return not self.argv

    @property
    def kind(self) -> str:
        """What it is: its name without an instance number (``etcd2`` is an ``etcd``)."""
        return self.name.rstrip("0123456789")

    def probe(self) -> tuple[bool, str]:
        return PROBES.get(self.kind, health.grpc_health)(self.address)


@dataclass
class StackConfig:
    state_dir: Path
    base_port: int = 7400
    host: str = "127.0.0.1"
    ray_num_cpus: int = 2
    #: Custom resources of the local Ray head, e.g. {"accelerator": 1} to place a pipeline's model stage.
    ray_resources: dict[str, float] = field(default_factory=dict)
    etcd: str | None = None  # external addresses (etcd: host:port[,host:port...]): start nothing for these
    redis: str | None = None
    ray: str | None = None
    redis_appendfsync: str = launch.REDIS_APPENDFSYNC
    cluster_name: str = "local"
    tls: bool = False  # TLS + mTLS between the services, with a CA made for this stack
    #: Members of the stack's own etcd cluster (1, 3 or 5) and discovery instances behind one name.
    etcd_members: int = 1
    discovery_instances: int = 1


# Offsets from --base-port; Ray's own helper ports follow so two stacks never collide.
PORTS = {
    "etcd": 0,
    "etcd_peer": 1,
    "redis": 2,
    "ray": 3,
    "discovery": 4,
    "keeper": 5,
    "broker": 6,
    "agent": 7,
    "ray_client": 8,
    "ray_dashboard_agent": 9,
    "ray_dashboard_grpc": 10,
    "ray_node_manager": 11,
    "ray_object_manager": 12,
    "ray_metrics": 13,
    "ray_runtime_env": 14,
    "autoscaler": 15,
    # Each service's Prometheus /metrics endpoint: metrics_base + its offset above.
    "metrics_base": 20,
}
RAY_WORKER_PORTS = (100, 599)
#: Further instances (``etcd2``, ``discovery2``, ...): etcd member k's client and peer ports at
#: ``EXTRA_ETCD + 2 * (k - 2)`` (+1), discovery instance k at ``EXTRA_DISCOVERY + k - 2`` and its
#: /metrics at ``EXTRA_DISCOVERY_METRICS + k - 2`` (offsets from --base-port, below Ray's workers).
EXTRA_ETCD, EXTRA_DISCOVERY, EXTRA_DISCOVERY_METRICS = 40, 50, 70
MAX_ETCD_MEMBERS, MAX_DISCOVERY_INSTANCES = 5, 20
#: Start order: a wave starts once the one before it is healthy.
WAVES = (
    ("etcd", "redis", "ray"),
    ("discovery", "broker", "keeper"),
    ("agent", "autoscaler"),
    ("supervisor",),
)


def instance_name(kind: str, k: int) -> str:
    """``etcd``, ``etcd2``, ``etcd3``: the k-th instance of a part (1-based)."""
    return kind if k == 1 else f"{kind}{k}"


def joined(parts: list[Part], kind: str) -> str:
    """Every instance's address of ``kind``, comma-separated (what a part's flag takes)."""
    return ",".join(p.address for p in parts if p.kind == kind and p.address)


def _etcd_parts(config: StackConfig, host: str, base: int, state: Path) -> list[Part]:
    """The etcd members: external ones as given, or our own cluster of ``etcd_members``."""
    if config.etcd:
        try:
            given = parse_endpoints(config.etcd)
        except ValueError as exc:
            raise StackError(f"--etcd: {exc}") from None
        return [Part(instance_name("etcd", k), a) for k, a in enumerate(given, 1)]
    if config.etcd_members not in range(1, MAX_ETCD_MEMBERS + 1, 2):
        raise StackError(f"--etcd-members {config.etcd_members}: use 1, 3 or 5 (an odd quorum)")
    ports = [
        (base + PORTS["etcd"], base + PORTS["etcd_peer"]),
        *((base + EXTRA_ETCD + 2 * i, base + EXTRA_ETCD + 2 * i + 1) for i in range(config.etcd_members - 1)),
    ]
    names = [instance_name("etcd", k) for k in range(1, config.etcd_members + 1)]
    cluster = {name: f"{host}:{peer}" for name, (_, peer) in zip(names, ports, strict=True)}
    return [
        Part(
            name,
            f"{host}:{client}",
            _argv(
                "--etcd",
                launch.etcd_argv,
                data_dir=state / name,
                client=f"{host}:{client}",
                peer=f"{host}:{peer}",
                name=name,
                cluster=cluster if config.etcd_members > 1 else None,
            ),
        )
        for name, (client, peer) in zip(names, ports, strict=True)
    ]


def write_secret(path: Path, text: str) -> None:
    """Create or replace ``path`` readable by its owner only (mode 0600 from the first byte)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text + "\n")
    os.chmod(path, 0o600)


def ray_token(path: Path) -> Path:
    """The Ray auth token file at ``path``, made once (a Ray token is 32 random bytes in hex)."""
    if not path.exists() or not path.read_text().strip():
        write_secret(path, secrets.token_hex(32))
    return path


def redis_secrets(state_dir: Path) -> None:
    """The stack's Redis admin password (made once) and the Redis config file that requires it."""
    from servefleet.broker.acl import redis_config

    path = state_dir / REDIS_PASSWORD_FILE
    if not path.exists() or not path.read_text().strip():
        write_secret(path, secrets.token_hex(32))
    write_secret(state_dir / REDIS_CONFIG_FILE, redis_config(path.read_text().strip()))


def ray_auth_env(token_file: Path) -> dict[str, str]:
    """What makes a process (Ray head, driver, worker) use exactly this Ray token: token auth on,
    the token read from ``token_file``, so neither ``~/.ray/auth_token`` nor a ``RAY_AUTH_TOKEN``
    in the caller's environment is used (``ray_process_env`` drops the latter)."""
    return {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token_file)}


def ray_process_env(base: dict[str, str], token_file: Path) -> dict[str, str]:
    """``base`` with the stack's Ray auth in place of whatever Ray auth it carried."""
    env = {k: v for k, v in base.items() if k != "RAY_AUTH_TOKEN"}
    env.update(ray_auth_env(token_file))
    return env


def ray_temp_dir(state_dir: Path) -> Path:
    """Ray's sockets must fit in 107 bytes, so its temp dir is short and derived from the state dir."""
    digest = hashlib.sha1(str(state_dir.resolve()).encode()).hexdigest()[:10]
    return Path("/tmp/servefleet-ray") / digest


def _argv(flag: str, build: Callable[..., list[str]], **kwargs: Any) -> list[str]:
    """``build(**kwargs)``; a missing binary becomes a StackError that also names ``flag``."""
    try:
        return build(**kwargs)
    except FileNotFoundError as exc:
        raise StackError(f"{exc} or pass {flag} HOST:PORT") from None


def plan(config: StackConfig) -> list[Part]:
    """Every part of the stack, in start order, with the command that starts it."""
    host, base, state = config.host, config.base_port, config.state_dir.resolve()
    ports = {name: base + offset for name, offset in PORTS.items()}
    addr = {name: f"{host}:{port}" for name, port in ports.items()}
    parts = _etcd_parts(config, host, base, state)
    if config.redis:
        parts.append(Part("redis", config.redis))
    else:
        redis_argv = _argv(
            "--redis",
            launch.redis_argv,
            host=host,
            port=ports["redis"],
            data_dir=state / "redis",
            appendfsync=config.redis_appendfsync,
            config_file=state / REDIS_CONFIG_FILE,
        )
        parts.append(Part("redis", addr["redis"], redis_argv))
    # Our own Redis requires auth: the broker is its admin and hands each app's workers their own user.
    redis_auth = [] if config.redis else ["--redis-password-file", str(state / REDIS_PASSWORD_FILE)]
    if config.ray:
        parts.append(Part("ray", config.ray))
    else:
        parts.append(
            Part(
                "ray",
                addr["ray"],
                launch.ray_head_argv(
                    port=ports["ray"],
                    ports=ports,
                    num_cpus=config.ray_num_cpus,
                    temp_dir=ray_temp_dir(state),
                    worker_ports=(base + RAY_WORKER_PORTS[0], base + RAY_WORKER_PORTS[1]),
                    host=host,
                    resources=config.ray_resources,
                ),
            )
        )
    etcd, redis, ray = joined(parts, "etcd"), parts[-2].address, parts[-1].address
    if not config.ray:
        parts[-1].metrics = addr["ray_metrics"]
    token = str(state / ADMIN_TOKEN_FILE)
    if not 1 <= config.discovery_instances <= MAX_DISCOVERY_INSTANCES:
        raise StackError(
            f"--discovery-instances {config.discovery_instances}: use 1 to {MAX_DISCOVERY_INSTANCES}"
        )
    for k in range(2, config.discovery_instances + 1):
        addr[instance_name("discovery", k)] = f"{host}:{base + EXTRA_DISCOVERY + k - 2}"
    discovery = ",".join(
        addr[instance_name("discovery", k)] for k in range(1, config.discovery_instances + 1)
    )

    def service(name: str, module: str, *flags: str) -> Part:
        return Part(name, addr[name], launch.service_argv(module, addr[name], *flags))

    services = [
        service(instance_name("discovery", k), "discovery", "--etcd", etcd)
        for k in range(1, config.discovery_instances + 1)
    ]
    parts += services
    parts += [
        service("broker", "broker", "--redis", redis, "--etcd", etcd, *redis_auth),
        service("keeper", "keeper", "--etcd", etcd, "--admin-token-file", token),
        service(
            "agent",
            "services.agent",
            "--ray",
            ray,
            "--keeper",
            addr["keeper"],
            "--discovery",
            discovery,
            "--redis",
            redis,
            "--broker",
            addr["broker"],
            "--cluster",
            config.cluster_name,
            "--etcd",
            etcd,
            "--token-file",
            str(state / AGENT_TOKEN_FILE),
        ),
        service(
            "autoscaler",
            "autoscaler",
            "--etcd",
            etcd,
            "--keeper",
            addr["keeper"],
            "--discovery",
            discovery,
            "--broker",
            addr["broker"],
            "--token-file",
            str(state / AUTOSCALER_TOKEN_FILE),
            "--file-sd",
            str(prometheus_dir(state) / ACTOR_TARGETS),
        ),
        # Last: started once the rest is healthy, and (stopping newest first) stopped before it.
        Part("supervisor", "", [sys.executable, "-m", "servefleet.supervisor", "--state-dir", str(state)]),
    ]
    for part in parts:  # every servefleet service serves /metrics on its own port
        if part.kind in ("etcd", "redis", "ray", "supervisor"):
            continue
        k = int(part.name[len(part.kind) :] or 1)
        offset = PORTS[part.kind] + PORTS["metrics_base"] if k == 1 else EXTRA_DISCOVERY_METRICS + k - 2
        part.metrics = f"{host}:{base + offset}"
        part.argv += ["--metrics", part.metrics]
    return parts


#: Prometheus file service discovery: ``up`` writes the services' targets and a scrape config;
#: the autoscaler keeps the actors' targets (from their discovery registrations) current.
PROMETHEUS_DIR = "prometheus"
SERVICE_TARGETS = "services.json"
ACTOR_TARGETS = "actors.json"


def prometheus_dir(state_dir: Path) -> Path:
    return state_dir.resolve() / PROMETHEUS_DIR


def write_prometheus_config(state_dir: Path, parts: list[Part]) -> Path:
    """``prometheus.yml`` scraping every target file in the state dir (file_sd, re-read on change)."""
    folder = prometheus_dir(state_dir)
    folder.mkdir(parents=True, exist_ok=True)
    targets = [{"targets": [p.metrics], "labels": {"part": p.name}} for p in parts if p.metrics]
    (folder / SERVICE_TARGETS).write_text(json.dumps(targets, indent=2))
    actors = folder / ACTOR_TARGETS
    if not actors.exists():
        actors.write_text("[]")
    config = folder / "prometheus.yml"
    config.write_text(
        "# Written by `servefleet up`: run `prometheus --config.file=" + str(config) + "`.\n"
        "scrape_configs:\n"
        "  - job_name: servefleet\n"
        "    scrape_interval: 5s\n"
        "    file_sd_configs:\n"
        f"      - files: ['{folder / SERVICE_TARGETS}', '{actors}']\n"
        "        refresh_interval: 10s\n"
    )
    return config


TLS_DIR = "tls"


def tls_files(state_dir: Path) -> TlsFiles:
    """The certificates ``up --tls`` made for the stack in ``state_dir`` (disabled when none)."""
    directory = state_dir / TLS_DIR
    if not (directory / "ca.pem").exists():
        return TlsFiles()
    return TlsFiles(
        str(directory / "ca.pem"),
        str(directory / "stack.pem"),
        str(directory / "stack.key"),
        client_auth=True,
    )


def stack_file(state_dir: Path) -> Path:
    return state_dir / STACK_FILE


def load(state_dir: Path) -> list[Part]:
    path = stack_file(state_dir)
    if not path.exists():
        raise StackError(f"no stack in {state_dir}: start one with `servefleet up --state-dir {state_dir}`")
    data = json.loads(path.read_text())
    return [Part(**p) for p in data["parts"]]


def addresses(state_dir: Path) -> dict[str, str]:
    """name -> address for every part, as written by ``up`` (what other commands connect to)."""
    data = json.loads(stack_file(state_dir).read_text())
    return {k: v for k, v in data.items() if k != "parts"}


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie child still answers kill(0); look at its state.
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


def running(state_dir: Path) -> bool:
    try:
        parts = load(state_dir)
    except StackError:
        return False
    return any(p.pid and pid_alive(p.pid) for p in parts)


def save(state_dir: Path, parts: list[Part]) -> None:
    """``stack.json``: each part's address by name, every part; ``etcd`` and ``discovery`` name every
    instance (``host:port,host:port``), as the parts' flags and the SDK take them."""
    data: dict[str, object] = {p.name: p.address for p in parts if p.address}
    data.update({kind: joined(parts, kind) for kind in ("etcd", "discovery") if joined(parts, kind)})
    data["parts"] = [asdict(p) for p in parts]
    tmp = stack_file(state_dir).with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=2))
    tmp.replace(stack_file(state_dir))


def preflight(config: StackConfig) -> list[Part]:
    """The plan, once every check a person can fix before anything starts has passed."""
    if running(config.state_dir):
        raise StackError(
            f"a stack is already running in {config.state_dir}: `servefleet status` shows it, "
            "`servefleet down` stops it"
        )
    parts = plan(config)
    for part in parts:
        if not part.external and part.address:
            port = int(part.address.rsplit(":", 1)[1])
            if port_in_use(port, config.host):
                raise StackError(f"port {port} ({part.name}) is already in use: free it or pass --base-port")
    return parts


def up(
    config: StackConfig, parts: list[Part], *, progress: Callable[[str], None], timeout: float = 90.0
) -> list[Part]:
    """Start every part of ``preflight``'s plan not given as external, wait until each is healthy,
    write stack.json. On any failure everything already started is stopped again."""
    state = config.state_dir
    for sub in ("etcd", "redis", "logs"):
        (state / sub).mkdir(parents=True, exist_ok=True)
    shutil.rmtree(state / TLS_DIR, ignore_errors=True)  # certificates belong to one `up --tls`
    tls = TlsFiles()
    if config.tls:
        from servefleet.common.certs import make_local_pki

        tls = make_local_pki(state.resolve() / TLS_DIR, [config.host, "localhost"])
        progress(f"TLS: local CA and certificates in {state / TLS_DIR}")
    use_tls(tls)  # this process's probes and calls too
    base = dict(os.environ)
    if not config.ray:  # our own Ray head: our own token
        base = ray_process_env(base, ray_token(state.resolve() / RAY_TOKEN_FILE))
    if not config.redis:  # our own Redis: it requires the broker's admin password
        redis_secrets(state.resolve())
    env = {
        **base,
        **tls.env(),
        STACK_ENV: str(state.resolve()),
        "RAY_ADDRESS": joined(parts, "ray"),
        "PYTHONUNBUFFERED": "1",
        # Ray workers import applications' code (`module:Class`) relative to where `up` was run.
        "PYTHONPATH": os.pathsep.join(filter(None, [os.getcwd(), os.environ.get("PYTHONPATH", "")])),
        # The keeper accepts a spec's working_dir under where `up` was run (unless told otherwise).
        "SERVEFLEET_KEEPER_ALLOWED_ROOTS": os.environ.get("SERVEFLEET_KEEPER_ALLOWED_ROOTS", os.getcwd()),
    }
    started: list[Part] = []
    try:
        # Dependencies first (etcd, redis, ray), then services (discovery, broker, keeper), then the
        # agent and the autoscaler, then the supervisor that keeps them all running.
        for kinds in WAVES:
            wave = [p for p in parts if p.kind in kinds]
            for part in wave:
                if part.external:
                    continue
                part.pid = spawn(part, state, env).pid
                started.append(part)
                progress(f"starting {part.name} on {part.address or 'this machine'}")
            save(state, parts)
            _await_healthy(wave, state, progress, deadline=time.monotonic() + timeout)
            if "keeper" in kinds:
                issue_service_token(state, joined(parts, "keeper"), "agent", AGENT_TOKEN_FILE)
                issue_service_token(state, joined(parts, "keeper"), "autoscaler", AUTOSCALER_TOKEN_FILE)
                progress("agent and autoscaler tokens issued")
        write_prometheus_config(state, parts)
    except BaseException:
        stop_parts(started, progress=progress)
        stack_file(state).unlink(missing_ok=True)
        raise
    return parts


def spawn(part: Part, state: Path, env: dict[str, str]) -> subprocess.Popen[bytes]:
    """Start ``part`` in its own process group (``down`` stops the whole group), logging to
    ``<state>/logs/<name>.log``."""
    return launch.spawn(part.argv, log=state / "logs" / f"{part.name}.log", env=env, cwd=state)


def issue_service_token(state: Path, keeper: str, role: str, file: str) -> None:
    """A part's own token with the narrowest role for its job (agent: heartbeat and endpoint tokens;
    autoscaler: read and scale applications), issued with the admin token and kept in ``file``."""
    from servefleet.api import keeper_pb2, keeper_pb2_grpc
    from servefleet.common.channels import sync_channel

    admin = (state / ADMIN_TOKEN_FILE).read_text().strip()
    with sync_channel(keeper, token=admin) as channel:
        reply = keeper_pb2_grpc.KeeperStub(channel).IssueToken(
            keeper_pb2.IssueTokenRequest(role=role, description=f"{role} of the stack in {state}"),
            timeout=10,
        )
    write_secret(state / file, reply.token)


def _await_healthy(
    wave: list[Part], state: Path, progress: Callable[[str], None], *, deadline: float
) -> None:
    pending = list(wave)
    while pending:
        for part in list(pending):
            if part.pid and not pid_alive(part.pid):
                tail = _log_tail(state / "logs" / f"{part.name}.log")
                raise StackError(f"{part.name} exited during start-up; last log line: {tail}")
            ok, _ = part.probe()
            if ok:
                pending.remove(part)
                progress(f"{part.name} healthy")
        if pending and time.monotonic() > deadline:
            names = ", ".join(p.name for p in pending)
            raise StackError(f"timed out waiting for {names} to become healthy (logs in {state / 'logs'})")
        time.sleep(0.1)


def _log_tail(path: Path) -> str:
    try:
        lines = [line for line in path.read_text(errors="replace").splitlines() if line.strip()]
    except OSError:
        return "(no log)"
    return lines[-1][:300] if lines else "(empty log)"


def status(state_dir: Path) -> list[dict[str, object]]:
    """One row per part: name, address, pid, process alive, healthy, detail."""
    found = tls_files(state_dir)
    if found.enabled:
        use_tls(found)
    rows: list[dict[str, object]] = []
    for part in load(state_dir):
        alive = pid_alive(part.pid) if part.pid else None
        healthy, detail = part.probe() if alive is not False else (False, "process not running")
        rows.append(
            {
                "name": part.name,
                "address": part.address,
                "metrics": part.metrics or None,
                "pid": part.pid or None,
                "alive": alive,
                "healthy": healthy,
                "restarts": part.restarts,
                "detail": f"{detail}; last exit: {part.last_exit}" if part.last_exit else detail,
            }
        )
    return rows


#: Seconds a part gets after SIGTERM before SIGKILL. `ray start --block` kills its GCS on SIGTERM but
#: leaves the raylet and workers running for a long while, so Ray gets little grace (like `ray stop --force`).
STOP_GRACE = {"ray": 2.0}


def stop_parts(parts: list[Part], *, progress: Callable[[str], None], grace: float = 10.0) -> None:
    """SIGTERM each started part's process group, newest first; SIGKILL what outlives its grace."""
    for part in reversed(parts):
        if not (part.pid and pid_alive(part.pid)):
            continue
        progress(f"stopping {part.name}")
        launch.stop_group(part.pid, STOP_GRACE.get(part.name, grace))
        try:  # reap it when it is our own child
            os.waitpid(part.pid, os.WNOHANG)
        except ChildProcessError:
            pass


def marked_processes(state_dir: Path) -> list[int]:
    """Live processes carrying this stack's marker in their environment (should be none after down)."""
    marker = f"{STACK_ENV}={state_dir.resolve()}".encode()
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) != os.getpid():
            try:
                if marker in (entry / "environ").read_bytes().split(b"\0") and pid_alive(int(entry.name)):
                    found.append(int(entry.name))
            except OSError:
                continue
    return found


def down(state_dir: Path, *, progress: Callable[[str], None]) -> None:
    # The supervisor first, so nothing stopped here is started again; then the parts as it left them.
    stop_parts([p for p in load(state_dir) if p.name == "supervisor"], progress=progress)
    parts = [p for p in load(state_dir) if p.name != "supervisor"]
    stop_parts(parts, progress=progress)
    leftovers = marked_processes(state_dir)
    for pid in leftovers:
        launch.signal_group(pid, signal.SIGKILL)
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    stack_file(state_dir).unlink(missing_ok=True)
