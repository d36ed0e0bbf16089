"""One traced grpc.aio channel per endpoint address, reused by every request to it."""

from __future__ import annotations

import asyncio
from collections.abc import Collection

import grpc
from tritonclient.grpc import service_pb2_grpc

from servefleet.common.config import grpc_options
from servefleet.common.telemetry import aio_client_interceptors


class ChannelPool:
    def __init__(self) -> None:
        self._channels: dict[str, grpc.aio.Channel] = {}
        self._stubs: dict[str, service_pb2_grpc.GRPCInferenceServiceStub] = {}
        self._closing: set[asyncio.Task[None]] = set()

    def stub(self, address: str) -> service_pb2_grpc.GRPCInferenceServiceStub:
        stub = self._stubs.get(address)
        if stub is None:
            channel = grpc.aio.insecure_channel(
                address, options=grpc_options(), interceptors=aio_client_interceptors()
            )
            self._channels[address] = channel
            stub = self._stubs[address] = service_pb2_grpc.GRPCInferenceServiceStub(channel)
        return stub

    def __contains__(self, address: str) -> bool:
        return address in self._channels

    def discard(self, addresses: Collection[str]) -> None:
        """Close the channels of addresses no longer in any endpoint set (in-flight calls finish)."""
        for address in addresses:
            channel = self._channels.pop(address, None)
            self._stubs.pop(address, None)
            if channel is not None:
                task = asyncio.get_running_loop().create_task(channel.close(grace=5.0))
                self._closing.add(task)
                task.add_done_callback(self._closing.discard)

    async def close(self) -> None:
        channels = list(self._channels.values())
        self._channels.clear()
        self._stubs.clear()
        await asyncio.gather(*(c.close() for c in channels))
