"""Small network helpers: free loopback ports, address parsing, and waiting for a condition."""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

#: Channel options for a multi-address target: balance calls over every address, and retry a lost
#: one within a second (gRPC's default reconnect backoff grows to 2 minutes, so an instance that came
#: back would sit unused, and when the other one died every call would fail meanwhile).
MULTI_ADDRESS = [
    ("grpc.lb_policy_name", "round_robin"),
    ("grpc.initial_reconnect_backoff_ms", 200),
    ("grpc.min_reconnect_backoff_ms", 200),
    ("grpc.max_reconnect_backoff_ms", 1000),
]


def free_port(host: str = "127.0.0.1") -> int:
    """A port the OS says is free now (callers bind it soon after; good enough on loopback)."""
    with socket.socket() as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def port_in_use(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return True
    return False


def split_address(address: str) -> tuple[str, int]:
    """``host:port`` (or ``[v6]:port``) -> (host, port); ValueError with the reason otherwise."""
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"address {address!r} is not host:port")
    return host.strip("[]"), int(port)


def grpc_target(addresses: Sequence[str]) -> str:
    """One gRPC target for several ``host:port`` addresses: ``ipv4:``/``ipv6:`` lists of resolved
    addresses (gRPC balances over them); a single address stays as it is (DNS re-resolves it)."""
    if len(addresses) == 1:
        return addresses[0]
    resolved: list[tuple[int, str]] = []
    for address in addresses:
        host, port = split_address(address)
        family, *_, sockaddr = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        ip = str(sockaddr[0])
        resolved.append((family, f"[{ip}]:{port}" if family == socket.AF_INET6 else f"{ip}:{port}"))
    if len({family for family, _ in resolved}) > 1:
        raise ValueError(f"addresses {', '.join(addresses)} mix IPv4 and IPv6: use one family")
    scheme = "ipv6" if resolved[0][0] == socket.AF_INET6 else "ipv4"
    return f"{scheme}:" + ",".join(address for _, address in resolved)


def channel_target(addresses: str | Sequence[str]) -> tuple[str, list[tuple[str, Any]]]:
    """The gRPC target and extra channel options for one or several addresses (``a:1,b:2``):
    several are balanced round robin, and a call moves on when one of them dies."""
    items = [a.strip() for a in addresses.split(",")] if isinstance(addresses, str) else list(addresses)
    items = [a for a in items if a]
    if len(items) <= 1:
        return (items[0] if items else ""), []
    return grpc_target(items), [*MULTI_ADDRESS, ("grpc.default_authority", items[0])]


def tcp_open(address: str, timeout: float = 0.5) -> bool:
    host, port = split_address(address)
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def wait_for(
    condition: Callable[[], object], *, timeout: float, interval: float = 0.05, what: str = "condition"
) -> object:
    """Poll ``condition`` until it returns something truthy; TimeoutError naming ``what`` otherwise."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise TimeoutError(f"timed out after {timeout:.1f}s waiting for {what}")
        time.sleep(interval)


async def async_wait_for(
    condition: Callable[[], Awaitable[object]],
    *,
    timeout: float,
    interval: float = 0.05,
    what: str = "condition",
) -> object:
    """Async twin of :func:`wait_for` for conditions that must await."""
    deadline = time.monotonic() + timeout
    while True:
        value = await condition()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise TimeoutError(f"timed out after {timeout:.1f}s waiting for {what}")
        await asyncio.sleep(interval)
