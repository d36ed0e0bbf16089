"""A small Ray actor hosting a PullWorker with a numpy handler: y = 2 * x after a sleep.

Inputs: ``x`` (int64), ``sleep_ms`` (float64, optional). Any negative ``x`` is a poison request
(the handler raises). Every execution is counted per ticket in a Redis hash on ``counter_address``
before it runs, so executions on a worker that is SIGKILLed later are counted too; the answer's
``run`` output says which execution of its ticket produced it (1 = the first), so a stored result
that a later execution replaced would show.
"""

from __future__ import annotations

import asyncio
import os

import numpy as np
import ray
import redis.asyncio as aioredis
from tritonclient.grpc import service_pb2

from servefleet.api import common_pb2
from servefleet.broker.worker import TICKET_PARAMETER, PullWorker
from servefleet.common.net import split_address
from servefleet.common.tensors import decode_request, encode_response


def executions_key(app: str) -> str:
    """Redis hash: ticket -> how many times a handler started running it."""
    return f"test:broker:executions:{app}"


@ray.remote(num_cpus=0.1, max_restarts=0, scheduling_strategy="SPREAD")  # over both session nodes
class EchoActor:
    def __init__(
        self,
        redis_address: str,
        app: str,
        consumer: str,
        *,
        slots: int = 2,
        counter_address: str = "",
        reclaim_idle_s: float = 2.0,
        max_deliveries: int = 3,
    ) -> None:
        self.worker = PullWorker(
            redis_address,
            app,
            consumer,
            slots,
            self.handle,
            config=common_pb2.AsyncConfig(enabled=True, max_deliveries=max_deliveries),
            reclaim_idle_s=reclaim_idle_s,
            block_ms=200,
        )
        host, port = split_address(counter_address or redis_address)
        self.counter = aioredis.Redis(host=host, port=port)

    async def start(self) -> int:
        await self.worker.start()
        return os.getpid()

    async def busy(self) -> int:
        """Requests this worker is running now (each holds its stream entry pending)."""
        return self.worker.busy

    async def handle(self, request: service_pb2.ModelInferRequest) -> service_pb2.ModelInferResponse:
        inputs = decode_request(request)
        ticket = request.parameters[TICKET_PARAMETER].string_param
        run = await self.counter.hincrby(executions_key(self.worker.app), ticket, 1)
        if (inputs["x"] < 0).any():
            raise ValueError("poison input: negative x")
        if "sleep_ms" in inputs:
            await asyncio.sleep(float(inputs["sleep_ms"][0]) / 1000)
        return encode_response(request.model_name, {"y": inputs["x"] * 2, "run": np.array([run])})

    async def stop(self, drain: bool = True) -> tuple[int, int]:
        await self.worker.stop(drain)
        await self.counter.aclose()
        return self.worker.completed, self.worker.duplicates
