"""The request a replica is serving, for model code and stage handles: its deadline and parameters.

The replica sets it around every call (unary, stream, broker), in a context variable, so it follows
the request into coroutines the model awaits and into the executor thread of a sync model. A stage
that calls another one reads the remaining time from here, so the caller's deadline carries across
stages without the model passing it on::

    from servefleet.services import context

    ctx = context.current()
    ctx.parameters.get("cache", True)   # KServe request parameters (bool, int, float, str)
    ctx.remaining()                      # seconds left, None without a deadline
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from tritonclient.grpc import service_pb2

from servefleet.api import common_pb2
from servefleet.common.tensors import Parameter, decode_parameters

if TYPE_CHECKING:
    from servefleet.common.redis_target import TargetSource


@dataclass(frozen=True)
class RequestContext:
    """What a replica knows about the request it is serving."""

    deadline: float | None = None  # time.monotonic() by which the caller wants its answer
    parameters: Mapping[str, Parameter] = field(default_factory=dict)
    request_id: str = ""

    @classmethod
    def of(cls, request: service_pb2.ModelInferRequest, timeout_s: float | None) -> RequestContext:
        """The context of a request arriving now with ``timeout_s`` left (None: no deadline)."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        return cls(deadline=deadline, parameters=decode_parameters(request), request_id=request.id)

    def remaining(self) -> float | None:
        """Seconds left before the deadline (may be negative), None when the caller set none."""
        return None if self.deadline is None else self.deadline - time.monotonic()


@dataclass(frozen=True)
class Deployment:
    """What the replica being built serves (set before the model class is constructed)."""

    app: common_pb2.AppRef  # a pipeline stage's own app (the pipeline's, for the entry stage)
    version: str
    redis: str = ""  # the platform's Redis (the broker's), "" when the cluster has none
    #: Where to get the app's own Redis user (from the broker), None: use ``redis`` as it is.
    redis_source: TargetSource | None = None


_DEPLOYMENT: list[Deployment] = []


def deployment() -> Deployment:
    """The deployment of this replica; model classes read it in ``__init__`` (or later)."""
    if not _DEPLOYMENT:
        raise RuntimeError("not inside a servefleet replica")
    return _DEPLOYMENT[-1]


def set_deployment(value: Deployment) -> None:
    _DEPLOYMENT[:] = [value]


_CURRENT: ContextVar[RequestContext | None] = ContextVar("servefleet_request", default=None)
_NO_REQUEST = RequestContext()


def current() -> RequestContext:
    """The request being served (an empty context outside a request)."""
    return _CURRENT.get() or _NO_REQUEST


@contextmanager
def serving(request: RequestContext) -> Iterator[RequestContext]:
    """Make a request current for the duration of a call."""
    token = _CURRENT.set(request)
    try:
        yield request
    finally:
        _CURRENT.reset(token)
