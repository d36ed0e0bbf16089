"""Health probes for each kind of part the stack runs; each answers (healthy, detail) quickly."""

from __future__ import annotations

import json
import socket
import urllib.request

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from servefleet.common.channels import sync_channel
from servefleet.common.net import split_address, tcp_open


def grpc_health(address: str, service: str = "", timeout: float = 1.0) -> tuple[bool, str]:
    """The standard gRPC health protocol (grpc.health.v1.Health/Check), over TLS when configured."""
    try:
        with sync_channel(address) as channel:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=service), timeout=timeout
            )
    except grpc.RpcError as exc:
        return False, f"{exc.code().name}: {exc.details()}"
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
    return reply.status == health_pb2.HealthCheckResponse.SERVING, status


def etcd_health(address: str, timeout: float = 1.0) -> tuple[bool, str]:
    try:
        with urllib.request.urlopen(f"http://{address}/health", timeout=timeout) as response:
            body = json.loads(response.read())
    except (OSError, ValueError) as exc:
        return False, str(exc)
    healthy = str(body.get("health")) == "true"
    return healthy, "SERVING" if healthy else json.dumps(body)


def redis_health(address: str, timeout: float = 1.0) -> tuple[bool, str]:
    host, port = split_address(address)
    try:
        with socket.create_connection((host, port), timeout=timeout) as sock:
            sock.sendall(b"PING\r\n")
            reply = sock.recv(64)
    except OSError as exc:
        return False, str(exc)
    # A Redis that requires auth answers an anonymous PING with NOAUTH: it is up and serving.
    up = reply.startswith((b"+PONG", b"-NOAUTH"))
    return up, "SERVING" if up else reply.decode(errors="replace")


def ray_health(address: str, timeout: float = 1.0) -> tuple[bool, str]:
    """Ray's GCS accepting connections; the driver-level check is left to the agent's own health."""
    healthy = tcp_open(address, timeout)
    return healthy, "SERVING" if healthy else "GCS not accepting connections"
