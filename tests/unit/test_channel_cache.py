"""ChannelCache: a discarded address's channel outlives the calls already on it (an endpoint can
leave discovery while its server still serves, e.g. its lease lapsed while discovery was down)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import grpc

from servefleet.common.channels import ChannelCache
from servefleet.common.telemetry import aio_client_interceptors

METHOD = "/test.Slow/Count"


async def count(requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext) -> AsyncIterator[bytes]:
    async for _ in requests:
        break
    for i in range(5):
        await asyncio.sleep(0.1)
        yield bytes([i])


async def test_a_stream_on_a_discarded_channel_runs_to_its_end() -> None:
    server = grpc.aio.server()
    handler = grpc.stream_stream_rpc_method_handler(count)
    server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler("test.Slow", {"Count": handler})])
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    cache = ChannelCache(interceptors=aio_client_interceptors(), close_grace_s=5.0)  # as the SDK
    address = f"127.0.0.1:{port}"
    try:
        # A one-request bidi stream (the SDK's ModelStreamInfer) read one response per task, as the
        # sync Client does (each chunk is one call into its loop): between two chunks no task is
        # awaiting the call.
        async def one() -> AsyncIterator[bytes]:
            yield b""

        chunks = aiter(cache.channel(address).stream_stream(METHOD)(one()))
        got = [await asyncio.create_task(anext(chunks))]
        await asyncio.sleep(0.05)  # the caller works on the chunk; the call's own tasks are done
        cache.discard([address])
        assert address not in cache  # new calls get a new channel
        await asyncio.sleep(0.05)  # the close has started
        while len(got) < 5:
            got.append(await asyncio.create_task(anext(chunks)))  # not cancelled by the discard
        assert got == [bytes([i]) for i in range(5)]
        cache.discard([])
    finally:
        await cache.close()  # closes the discarded channel still in its grace, at once
        await server.stop(0)
