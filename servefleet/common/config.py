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
    #: Root etcd key prefix for all servefleet state.
    etcd_prefix: str = "/servefleet"
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
