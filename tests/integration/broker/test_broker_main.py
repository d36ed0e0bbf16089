"""`python -m servefleet.broker` serves the broker over Redis, reports health, stops on SIGTERM."""

from __future__ import annotations

import signal

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from servefleet.api import broker_pb2, broker_pb2_grpc, common_pb2
from servefleet.common.channels import sync_channel
from servefleet.testing import EtcdProcess, RedisProcess, ServiceProcess, admin_token


def test_entry_point_serves_and_stops(redis_server: RedisProcess, etcd: EtcdProcess) -> None:
    broker = ServiceProcess("broker", "--redis", redis_server.address, "--etcd", etcd.address).start()
    try:
        with sync_channel(broker.address, token=admin_token(etcd.address)) as channel:
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
        assert broker.proc is not None
        broker.proc.send_signal(signal.SIGTERM)
        assert broker.proc.wait(timeout=30) == 0
    finally:
        broker.cleanup()
