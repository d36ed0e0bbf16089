"""Server-side batching: requests that arrive within ``wait_s`` of each other (up to
``max_batch_size`` of them) become one model call; inputs are joined along axis 0 and each
request gets back its own rows of every output."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import numpy as np

Tensors = dict[str, np.ndarray]
ModelCall = Callable[[Tensors], Awaitable[Tensors]]


class Batcher:
    """Collects requests into batches; a batch is flushed when full or ``wait_s`` after its first."""

    def __init__(self, call: ModelCall, *, max_batch_size: int, wait_s: float) -> None:
        self._call = call
        self._max = max_batch_size
        self._wait_s = wait_s
        self._pending: list[tuple[Tensors, asyncio.Future[Tensors]]] = []
        self._timer: asyncio.TimerHandle | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    async def submit(self, inputs: Tensors) -> Tensors:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Tensors] = loop.create_future()
        self._pending.append((inputs, future))
        if len(self._pending) >= self._max:
            self._flush()
        elif self._timer is None:
            self._timer = loop.call_later(self._wait_s, self._flush)
        return await future

    def _flush(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        batch, self._pending = self._pending[: self._max], self._pending[self._max :]
        if self._pending:
            self._timer = asyncio.get_running_loop().call_later(self._wait_s, self._flush)
        task = asyncio.create_task(self._run(batch))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _run(self, batch: list[tuple[Tensors, asyncio.Future[Tensors]]]) -> None:
        live = [(inputs, future) for inputs, future in batch if not future.done()]
        if not live:
            return
        try:
            outputs = await self._call(join([inputs for inputs, _ in live]))
            parts = split(outputs, [rows(inputs) for inputs, _ in live])
        except Exception as exc:
            for _, future in live:
                if not future.done():
                    future.set_exception(exc)
            return
        for (_, future), part in zip(live, parts, strict=True):
            if not future.done():
                future.set_result(part)


def rows(inputs: Tensors) -> int:
    """Rows a request contributes to a batch (its first tensor's leading dimension)."""
    first = next(iter(inputs.values()))
    return int(first.shape[0]) if first.ndim else 1


def join(requests: list[Tensors]) -> Tensors:
    names = list(requests[0])
    for inputs in requests[1:]:
        if list(inputs) != names:
            raise ValueError(f"batched requests disagree on inputs: {names} vs {list(inputs)}")
    return {name: np.concatenate([np.atleast_1d(r[name]) for r in requests]) for name in names}


def split(outputs: Tensors, sizes: list[int]) -> list[Tensors]:
    total = sum(sizes)
    for name, array in outputs.items():
        if array.ndim == 0 or array.shape[0] != total:
            raise ValueError(f"batched output {name!r} has {array.shape[:1]} rows, expected {total}")
    cuts = np.cumsum(sizes)[:-1]
    pieces = {name: np.split(array, cuts) for name, array in outputs.items()}
    return [{name: pieces[name][i] for name in outputs} for i in range(len(sizes))]
