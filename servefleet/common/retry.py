"""One retry policy for every loop that tries again: capped exponential backoff with jitter, a bound
on attempts, a deadline, and which errors are worth another try.

The policy is data passed in (like gRPC's ``retryPolicy`` and redis-py's ``Retry``); the loops call
:meth:`RetryPolicy.run` or ask :meth:`Backoff.delay` for their pause instead of computing their own.
The exponent is capped, so a counter of consecutive failures can grow without bound (an endpoint
down for days) and the delay stays ``max_s``.
"""

from __future__ import annotations

import asyncio
import math
import random
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TypeVar

import grpc

T = TypeVar("T")


@dataclass(frozen=True)
class Backoff:
    """Pause after the n-th consecutive failure: ``min(max_s, initial_s * multiplier**(n-1))``,
    of which the fraction ``jitter`` is drawn at random (1.0: full jitter, uniform in (0, d];
    0.5: uniform in [d/2, d]; 0: exactly d). Jitter keeps many clients from retrying in step."""

    initial_s: float
    max_s: float
    multiplier: float = 2.0
    jitter: float = 1.0

    def ceiling(self, failures: int) -> float:
        """The un-jittered pause after ``failures`` consecutive failures (0 for none)."""
        if failures <= 0 or self.initial_s <= 0:
            return 0.0
        if self.multiplier <= 1.0 or self.initial_s >= self.max_s:
            return min(self.initial_s, self.max_s)
        # Past this exponent the cap holds: never raise a float to a power that overflows.
        cap = math.log(self.max_s / self.initial_s, self.multiplier)
        exponent = failures - 1
        if exponent >= cap:
            return self.max_s
        return min(self.max_s, self.initial_s * self.multiplier**exponent)

    def delay(self, failures: int, rng: random.Random | None = None) -> float:
        """A jittered pause after ``failures`` consecutive failures."""
        ceiling = self.ceiling(failures)
        draw = (rng or random).random()
        return ceiling * (1.0 - self.jitter * draw)


def _never(exc: BaseException) -> bool:
    return False


def on_status(*codes: grpc.StatusCode) -> Callable[[BaseException], bool]:
    """``retry_on`` for errors carrying one of ``codes``: gRPC errors and domain errors alike."""
    wanted = frozenset(codes)

    def retryable(exc: BaseException) -> bool:
        code = exc.code() if isinstance(exc, grpc.RpcError) else getattr(exc, "code", None)
        return code in wanted

    return retryable


@dataclass(frozen=True)
class RetryPolicy:
    """When and how long to try again.

    ``attempts``: tries in all, the first included (None: until the deadline). ``deadline_s``:
    seconds from the first try after which no retry starts (None: no limit of its own; callers may
    pass a tighter absolute deadline to :meth:`run`). ``retry_on``: which errors are transient.
    """

    backoff: Backoff
    attempts: int | None = None
    deadline_s: float | None = None
    retry_on: Callable[[BaseException], bool] = field(default=_never)

    def retries(self, exc: BaseException) -> bool:
        return self.retry_on(exc)

    def allows(self, failures: int) -> bool:
        """Whether another try may follow ``failures`` failed ones (the attempt bound only)."""
        return self.attempts is None or failures < self.attempts

    async def run(
        self,
        call: Callable[[], Awaitable[T]],
        *,
        deadline: float | None = None,
        on_retry: Callable[[BaseException, float], None] | None = None,
    ) -> T:
        """``await call()`` until it succeeds; a non-transient error, the last allowed attempt, or a
        pause that would end past the deadline (loop time) re-raises the last error."""
        loop = asyncio.get_running_loop()
        if self.deadline_s is not None:
            own = loop.time() + self.deadline_s
            deadline = own if deadline is None else min(deadline, own)
        failures = 0
        while True:
            try:
                return await call()
            except Exception as exc:
                failures += 1
                if not self.retries(exc) or not self.allows(failures):
                    raise
                pause = self.backoff.delay(failures)
                if deadline is not None and loop.time() + pause > deadline:
                    raise
                if on_retry is not None:
                    on_retry(exc, pause)
            await asyncio.sleep(pause)
