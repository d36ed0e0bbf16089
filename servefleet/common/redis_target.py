"""Where the platform's Redis is and how to reach it: one Redis, a Redis Cluster, or a primary that
Sentinel manages, with the credential to present. The broker and the semantic cache make their
clients here, so every part speaks to the three deployments the same way.

A target is written ``HOST:PORT[,HOST:PORT...]`` (``--redis``); ``settings.redis_mode`` says what
the addresses are: ``single`` (one Redis), ``cluster`` (any nodes of a Redis Cluster: the client
learns the rest and follows MOVED/failover) or ``sentinel`` (Sentinels watching the primary named
``settings.redis_sentinel_master``: the client asks them for the current primary, again after a
failover).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field, replace
from typing import Any, cast

import redis.asyncio as aioredis
from redis.asyncio.cluster import ClusterNode, ClusterPipeline, RedisCluster
from redis.asyncio.retry import Retry
from redis.asyncio.sentinel import Sentinel, SentinelConnectionPool
from redis.backoff import ExponentialBackoff, NoBackoff
from redis.exceptions import (
    AuthenticationError,
    AuthorizationError,
    ClusterDownError,
    NoPermissionError,
    RedisClusterException,
    TryAgainError,
)
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from servefleet.common.config import settings
from servefleet.common.errors import InvalidArgument
from servefleet.common.net import split_address

MODES = ("single", "cluster", "sentinel")
#: Errors that mean "Redis is not reachable right now" (down, restarting, failing over; a cluster
#: with no reachable node raises RedisClusterException): retry later, answer UNAVAILABLE.
UNREACHABLE: tuple[type[BaseException], ...] = (
    RedisConnectionError,
    RedisTimeoutError,
    OSError,
    ClusterDownError,
    TryAgainError,
    RedisClusterException,
)


def refused(exc: BaseException) -> bool:
    """Redis refused this client's credential or command (wrong or removed user, NOPERM): ask for
    a fresh credential rather than retry the same one. (redis-py files some under ConnectionError.)"""
    return isinstance(exc, (AuthenticationError, AuthorizationError, NoPermissionError)) or (
        isinstance(exc, RedisConnectionError) and "WRONGPASS" in str(exc)
    )


#: What a client of any mode is (RedisCluster shares the command API).
Client = Any
#: ``await source()``: where the Redis is, with the credential to present (asked anew whenever Redis
#: refuses the last one: ``broker.worker.from_broker`` asks the broker for an app's own user).
TargetSource = Callable[[], Awaitable["RedisTarget"]]


class _Cluster(RedisCluster):
    """Two fixes over redis-py 8.1's asyncio cluster client:

    - Its per-node pool raises MaxConnectionsError past ``max_connections`` (the broker answered
      500 concurrent GetResults UNAVAILABLE): commands and pipelines beyond ``max_connections`` in
      flight wait for a turn, as they do on one Redis's blocking pool. A turn uses at most one
      connection per node; each node's pool holds ``SUBSCRIPTION_RESERVE`` more for pub/sub, which
      keeps its connection for as long as it listens (without them, a subscription on the node
      that holds a busy app's slot made every command past the 63rd in flight fail).
    - It can hand a command a connection that another task is closing while a failover moves slots
      (AttributeError from the connection's missing writer, raised before anything is sent). Such a
      command never reached Redis, so it is sent again."""

    SUBSCRIPTION_RESERVE = 4

    def __init__(self, *, max_connections: int, **kwargs: Any) -> None:
        super().__init__(max_connections=max_connections + self.SUBSCRIPTION_RESERVE, **kwargs)
        self.turns = asyncio.Semaphore(max_connections)

    async def execute_command(self, *args: Any, **kwargs: Any) -> Any:
        async with self.turns:
            for attempt in range(3):
                try:
                    return await super().execute_command(*args, **kwargs)
                except AttributeError as exc:
                    if "writelines" not in str(exc) or attempt == 2:
                        raise
                    await asyncio.sleep(0.05 * (attempt + 1))
        raise AssertionError("unreachable")

    def pipeline(self, transaction: Any | None = None, shard_hint: Any | None = None) -> ClusterPipeline:
        if shard_hint:
            raise RedisClusterException("shard_hint is deprecated in cluster mode")
        # redis-py's stubs declare an attribute its own ClusterPipeline sets in __init__ abstract.
        return _TurnTakingPipeline(self, transaction)  # type: ignore[abstract]


class _TurnTakingPipeline(ClusterPipeline):
    """A cluster pipeline that takes one of its client's turns while it runs (see ``_Cluster``)."""

    async def execute(self, raise_on_error: bool = True, allow_redirections: bool = True) -> list[Any]:
        client = cast(_Cluster, self.cluster_client)
        async with client.turns:
            return await super().execute(raise_on_error, allow_redirections)


class _BlockingSentinelPool(SentinelConnectionPool, aioredis.BlockingConnectionPool):
    """Sentinel's pool, but callers beyond ``max_connections`` wait rather than fail (as on one Redis)."""


@dataclass(frozen=True)
class RedisTarget:
    """Addresses, mode and credential of the platform's Redis (``password`` never printed)."""

    addresses: tuple[str, ...]
    mode: str = "single"
    sentinel_master: str = ""
    username: str = ""
    password: str = field(default="", repr=False)

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise InvalidArgument(
                f"redis mode {self.mode!r}: one of {', '.join(MODES)} (SERVEFLEET_REDIS_MODE)"
            )
        if not self.addresses:
            raise InvalidArgument("redis: at least one HOST:PORT")
        for address in self.addresses:
            split_address(address)

    @classmethod
    def parse(cls, text: str | RedisTarget, *, mode: str = "", sentinel_master: str = "") -> RedisTarget:
        """``HOST:PORT[,HOST:PORT...]`` in ``mode`` (default ``settings.redis_mode``)."""
        if isinstance(text, RedisTarget):
            return text
        addresses = tuple(a.strip() for a in text.split(",") if a.strip())
        return cls(
            addresses,
            mode or settings.redis_mode,
            sentinel_master or settings.redis_sentinel_master,
        )

    def with_credential(self, username: str, password: str) -> RedisTarget:
        return replace(self, username=username, password=password)

    @property
    def text(self) -> str:
        return ",".join(self.addresses)

    def _auth(self) -> dict[str, Any]:
        return {"username": self.username or None, "password": self.password or None}

    def client(self, *, max_connections: int = 64, **options: Any) -> Client:
        """A client of this target. Connections that the server closed (it restarted, or failed
        over) are found by a health check and a command on a closed socket is sent once more on
        a fresh connection (a closed socket never delivered it)."""
        common: dict[str, Any] = {
            # No call waits forever on a node that stopped answering (longer than any blocking read).
            "socket_timeout": 10.0,
            "socket_connect_timeout": 5.0,
            "health_check_interval": 1,
            "retry_on_error": [RedisConnectionError],
            **self._auth(),
            **options,
        }
        if self.mode == "cluster":
            nodes = [ClusterNode(*split_address(a)) for a in self.addresses]
            # A failover moves slots: retry on the cluster's new layout for a few seconds.
            return _Cluster(
                startup_nodes=nodes,
                max_connections=max_connections,
                retry=Retry(ExponentialBackoff(cap=1.0, base=0.05), 8),
                require_full_coverage=False,
                **{**common, "retry_on_error": [RedisConnectionError, RedisTimeoutError]},
            )
        if self.mode == "sentinel":
            sentinel = Sentinel([split_address(a) for a in self.addresses], socket_timeout=2.0)
            return sentinel.master_for(
                self.sentinel_master,
                connection_pool_class=_BlockingSentinelPool,
                retry=Retry(ExponentialBackoff(cap=1.0, base=0.05), 8),
                max_connections=max_connections,
                **{**common, "retry_on_error": [RedisConnectionError, RedisTimeoutError]},
            )
        host, port = split_address(self.addresses[0])
        pool = aioredis.BlockingConnectionPool(
            host=host, port=port, max_connections=max_connections, retry=Retry(NoBackoff(), 1), **common
        )
        return aioredis.Redis(connection_pool=pool)
