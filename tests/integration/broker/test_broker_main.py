"""`python -m servefleet.broker` serves the broker over Redis, reports health, stops on SIGTERM."""

from __future__ import annotations

import signal
import subprocess
import sys

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from servefleet.api import broker_pb2, broker_pb2_grpc, common_pb2
from servefleet.common.net import free_port, tcp_open, wait_for
from servefleet.testing import RedisProcess


def test_entry_point_serves_and_stops(redis_server: RedisProcess) -> None:
    address = f"127.0.0.1:{free_port()}"
    proc = subprocess.Popen(
        [sys.executable, "-m", "servefleet.broker", "--listen", address, "--redis", redis_server.address],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        wait_for(lambda: tcp_open(address), timeout=60, what="broker listening")
        with grpc.insecure_channel(address) as channel:
            health = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service="servefleet.api.Broker"), timeout=10
            )
            assert health.status == health_pb2.HealthCheckResponse.SERVING
            with pytest.raises(grpc.RpcError) as info:
                broker_pb2_grpc.BrokerStub(channel).QueueStats(
                    broker_pb2.QueueStatsRequest(app=common_pb2.AppRef(namespace="no", name="such")),
                    timeout=10,
                )
            assert info.value.code() == grpc.StatusCode.NOT_FOUND
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
