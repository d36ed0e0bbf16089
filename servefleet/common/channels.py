"""One grpc.aio channel per address, reused by every call to it: the SDK's endpoints, a proxy's
same-node replicas and the keeper's cluster agents all keep their channels here."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Collection, Sequence
from typing import Any, TypeVar

import grpc

from servefleet.common.config import grpc_options

S = TypeVar("S")


class ChannelCache:
    """Channels (and stubs over them) by address. ``discard``/``retain`` close channels in the
    background after ``close_grace_s``, so calls already on them finish (closing a channel
    cancels its calls)."""

    def __init__(
        self, *, interceptors: Sequence[grpc.aio.ClientInterceptor] = (), close_grace_s: float = 5.0
    ) -> None:
        self._interceptors = list(interceptors)
        self._close_grace_s = close_grace_s
        self._channels: dict[str, grpc.aio.Channel] = {}
        self._stubs: dict[tuple[str, Any], Any] = {}
        self._closing: set[asyncio.Task[None]] = set()

    def channel(self, address: str) -> grpc.aio.Channel:
        channel = self._channels.get(address)
        if channel is None:
            channel = self._channels[address] = grpc.aio.insecure_channel(
                address, options=grpc_options(), interceptors=self._interceptors or None
            )
        return channel

    def stub(self, address: str, stub_type: Callable[[grpc.aio.Channel], S]) -> S:
        """A ``stub_type`` over the address's channel, made once."""
        key = (address, stub_type)
        stub = self._stubs.get(key)
        if stub is None:
            stub = self._stubs[key] = stub_type(self.channel(address))
        return stub

    def __contains__(self, address: str) -> bool:
        return address in self._channels

    def discard(self, addresses: Collection[str]) -> None:
        """Close the channels of these addresses once their calls are done."""
        for address in addresses:
            channel = self._channels.pop(address, None)
            for key in [k for k in self._stubs if k[0] == address]:
                del self._stubs[key]
            if channel is not None:
                task = asyncio.get_running_loop().create_task(channel.close(self._close_grace_s))
                self._closing.add(task)
                task.add_done_callback(self._closing.discard)

    def retain(self, live: Collection[str]) -> None:
        """Discard every address not in ``live``."""
        self.discard(set(self._channels) - set(live))

    async def close(self) -> None:
        channels = list(self._channels.values())
        self._channels.clear()
        self._stubs.clear()
        await asyncio.gather(*(c.close() for c in channels))
