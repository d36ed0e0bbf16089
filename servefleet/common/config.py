"""Tunables in one place. Each has a documented default and an environment override
``SERVEFLEET_<NAME>`` so operators change behaviour without code."""

from __future__ import annotations

import os
from dataclasses import dataclass, fields


def _env(name: str, default: float | int | str) -> float | int | str:
    raw = os.environ.get(f"SERVEFLEET_{name.upper()}")
    if raw is None:
        return default
    return type(default)(raw)


@dataclass(frozen=True)
class Settings:
    #: Largest gRPC message a service sends or accepts (tensors travel as raw bytes).
    max_message_bytes: int = 64 * 1024 * 1024
    #: HTTP/2 keepalive ping period; detects dead peers behind idle connections.
    keepalive_time_ms: int = 20_000
    keepalive_timeout_ms: int = 10_000
    #: Seconds a stopping server lets in-flight RPCs finish.
    shutdown_grace_s: float = 5.0
    #: Default discovery lease TTL in seconds, and the range a registrant may ask for.
    discovery_ttl_s: int = 5
    discovery_min_ttl_s: int = 1
    discovery_max_ttl_s: int = 300
    #: Seconds ``registration(...)`` keeps retrying its first Register while discovery is unreachable.
    discovery_register_timeout_s: float = 30.0
    #: etcd members every part connects to, ``host:port[,host:port...]`` (a part's ``--etcd`` flag
    #: overrides it); calls move to another member when one is lost.
    etcd_endpoints: str = ""
    #: Seconds an etcd call keeps retrying UNAVAILABLE (a lost member, a leader election).
    etcd_retry_s: float = 15.0
    #: Root etcd key prefix for all servefleet state.
    etcd_prefix: str = "/servefleet"
    #: The platform's Redis (broker queues, semantic cache): "single" (one Redis), "cluster" (the
    #: ``--redis`` addresses are Redis Cluster nodes) or "sentinel" (they are Sentinels watching the
    #: primary named ``redis_sentinel_master``).
    redis_mode: str = "single"
    redis_sentinel_master: str = "servefleet"
    #: Broker: largest serialized ModelInferRequest Submit accepts (bytes).
    broker_max_payload_bytes: int = 4 * 1024 * 1024
    #: Broker defaults for an app registered without its own AsyncConfig values.
    broker_max_stream_length: int = 10_000
    broker_max_deliveries: int = 3
    broker_result_ttl_s: int = 3600
    #: Longest result lifetime a Submit may ask for.
    broker_max_result_ttl_s: int = 7 * 24 * 3600
    #: A finished ticket's small status record outlives its result by this long, so a late
    #: reader hears EXPIRED rather than NOT_FOUND.
    broker_tombstone_s: int = 3600
    #: A ticket (and its idempotency key) never queued longer than this.
    broker_ticket_max_age_s: int = 7 * 24 * 3600
    #: Longest single GetResult wait; longer waits return the current status (poll again).
    broker_max_wait_s: float = 60.0
    #: Workers reclaim entries another consumer left pending this long (XAUTOCLAIM min-idle).
    broker_reclaim_idle_s: float = 30.0
    #: Blocking XREADGROUP timeout of a worker (ms); bounds how fast stop() returns.
    broker_block_ms: int = 1000
    #: Broker: seconds between sweeps that remove the Redis users of deleted apps.
    broker_acl_sweep_s: float = 10.0
    #: Broker: seconds between refreshes of the per-app queue gauges on /metrics.
    broker_stats_interval_s: float = 1.0
    #: Autoscaler: seconds of wall-clock time between load readings and decisions.
    autoscaler_interval_s: float = 1.0
    #: Keeper: seconds between cluster agent heartbeats; a cluster silent for ``dead_after`` is not alive.
    keeper_heartbeat_interval_s: int = 2
    keeper_cluster_dead_after_s: float = 6.0
    #: Keeper: a placed cluster silent this long (its agent or Ray head gone) loses its apps to other
    #: eligible clusters; when it heartbeats again, the masters it still runs for them are removed.
    keeper_cluster_failover_after_s: float = 30.0
    #: Keeper: leader lease TTL (a dead leader is replaced within about this long).
    keeper_leader_ttl_s: int = 5
    #: Keeper: seconds between reconcile passes when nothing changes (changes wake it at once).
    keeper_reconcile_interval_s: float = 1.0
    #: Keeper: seconds between checks of an app that is RUNNING at its desired revision.
    keeper_steady_check_s: float = 5.0
    #: Keeper: most apps one reconcile pass looks at (changed ones first), and the resync slice's
    #: pace per interval: a pass stays bounded however many apps are stored (past budget x
    #: steady_check / interval apps, ~10,000, each RUNNING app is checked less often than every 5 s).
    keeper_reconcile_budget: int = 2000
    #: Seconds a verified token is trusted without asking etcd again, in every service: a revoked
    #: token stops working everywhere within this long.
    token_cache_s: float = 5.0
    #: TLS for the control plane (keeper, discovery, broker, agents), PEM paths; empty: plaintext.
    #: ``tls_ca_file`` is the CA every part trusts; ``tls_cert_file``/``tls_key_file`` this part's
    #: certificate (server side, and client side for mTLS). ``servefleet up --tls`` makes them.
    tls_ca_file: str = ""
    tls_cert_file: str = ""
    tls_key_file: str = ""
    #: 1: servers require a client certificate signed by ``tls_ca_file`` (mTLS between parts).
    tls_client_auth: int = 0
    #: Keeper: where working_dir may point (os.pathsep-separated; empty: the keeper's working dir).
    keeper_allowed_roots: str = ""
    #: Keeper: 1 lets specs name URLs (pip from git/http, remote working_dir); 0 refuses them.
    keeper_allow_urls: int = 0
    #: Data plane: seconds between an application master's reconcile passes (health checks too).
    master_reconcile_interval_s: float = 0.5
    #: Data plane: a replica whose stats call takes longer than this counts as unhealthy.
    replica_health_timeout_s: float = 5.0
    #: Data plane: consecutive failed health checks before a live-but-stuck replica is replaced.
    replica_unhealthy_checks: int = 3
    #: Data plane: longest a new replica may take to load (runtime_env setup included).
    replica_start_timeout_s: float = 300.0
    #: Data plane: longest an old replica drains in-flight requests before it is killed.
    replica_drain_timeout_s: float = 30.0
    #: Data plane: attempts per request on distinct replicas when a replica dies or drains.
    proxy_attempts: int = 3
    #: Direct ingress: request threads of each C++ server (init_args.workers overrides per app).
    direct_workers: int = 2
    #: Triton bootstrapper: the virtualenv holding tritonserver (the nvidia-pytriton wheel) and
    #: numpy<2, where python-backend models run (scripts/install.sh makes it); empty: the
    #: ``.venv-triton`` beside the servefleet package.
    triton_env: str = ""
    #: Triton bootstrapper: longest a tritonserver may take to load its repository and be ready.
    triton_start_timeout_s: float = 120.0
    #: Triton bootstrapper: restarts of a dead tritonserver inside one actor before the actor
    #: reports itself unhealthy (and the master replaces it).
    triton_max_restarts: int = 3
    #: Triton bootstrapper: niceness of tritonserver (Ray runs worker processes, and so their
    #: children, at 15; 0 serves like a server started by hand). Kept as inherited if not allowed.
    triton_nice: int = 0
    #: Sharded apps: where hash shards write their part files ("": beside the table file).
    shard_cache_dir: str = ""
    #: Sharded apps: hedged lookups a router may add per shard, as a fraction of its lookups there
    #: (the extra load is bounded by it; 0 turns hedging off).
    shard_hedge_budget: float = 0.25
    #: Sharded apps: hedge delay (ms) while a shard's replicas have too few samples for a p95.
    shard_hedge_default_ms: float = 50.0
    #: Tracing: share of traces started here (a request without a sampled parent) that are
    #: recorded; a request whose caller sampled it is always recorded, one it did not never is
    #: (parent-based). ``OTEL_TRACES_SAMPLER`` in the environment replaces this sampler.
    trace_sample_ratio: float = 0.01
    #: Data plane: 1 puts the C++ ModelInfer forwarder (servefleet/services/forwarder.py) on each
    #: proxy's port, in front of the Python server; 0 (default) serves with Python only.
    proxy_cpp_forward: int = 0
    #: Data plane: 1 (default) puts the C++ fast path of a sharded app's router (servefleet/
    #: services/shard_router.py, cpp/shard_router.cc) on the router's port, in front of its Python
    #: server; 0 routes with Python only.
    shard_router_cpp: int = 1
    #: Data plane: 1 (default) puts the C++ lookup fast path (servefleet/services/shard.py,
    #: cpp/shard_server.cc) on each shard replica's port, in front of its Python server; 0 answers
    #: with Python only.
    shard_lookup_cpp: int = 1
    #: Data plane: CPU share a proxy actor asks Ray for.
    proxy_num_cpus: float = 0.0
    #: Seconds between a service's probes of what it depends on (etcd, Redis, Ray) for its health.
    dependency_probe_interval_s: float = 1.0
    #: Stack supervisor: first restart delay of a crashed part (doubling, jittered, up to the max);
    #: a part that stays up ``stable_s`` after a restart starts again from the first delay.
    supervisor_backoff_s: float = 1.0
    supervisor_max_backoff_s: float = 30.0
    supervisor_stable_s: float = 60.0
    #: Log format: "json" (structured) or "text".
    log_format: str = "json"
    log_level: str = "INFO"

    @classmethod
    def from_env(cls) -> Settings:
        return cls(**{f.name: _env(f.name, f.default) for f in fields(cls)})  # type: ignore[arg-type]


settings = Settings.from_env()


def grpc_options() -> list[tuple[str, int]]:
    """Channel/server options every servefleet endpoint uses: explicit sizes and keepalive."""
    return [
        ("grpc.max_send_message_length", settings.max_message_bytes),
        ("grpc.max_receive_message_length", settings.max_message_bytes),
        ("grpc.keepalive_time_ms", settings.keepalive_time_ms),
        ("grpc.keepalive_timeout_ms", settings.keepalive_timeout_ms),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.max_pings_without_data", 0),
        ("grpc.http2.min_ping_interval_without_data_ms", 5_000),
    ]
