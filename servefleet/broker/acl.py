"""Redis users: the broker's admin user, and one ACL user per application for its workers.

The stack's Redis admits no anonymous client (``default`` is off): the broker holds the admin
credential (``servefleet up`` keeps it in ``<state-dir>/redis.password``, mode 0600, and writes it
into Redis's own config file, never onto a command line). A worker gets its app's credential from
the broker (``GetWorkerCredential``, with the app's endpoint token); that user may run only the
commands a pull worker (and the app's semantic cache) runs, on only that app's keys and channel.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from redis.asyncio.cluster import RedisCluster

from servefleet.api import broker_pb2
from servefleet.broker.keys import AppKeys, app_pattern
from servefleet.common.redis_target import Client, RedisTarget

log = logging.getLogger(__name__)

#: The admin is Redis's ``default`` user with a password (so no client gets in without one): Redis
#: 7.0 replays MULTI/EXEC blocks of its AOF (every Lua script's effects) as ``default``, and with
#: ``default`` off it refuses them at load, silently dropping every script's writes on a restart.
ADMIN_USER = "default"


def redis_config(admin_password: str) -> str:
    """Redis config lines for a Redis that requires auth: the admin's password, nothing anonymous."""
    return f"user default on >{admin_password} ~* &* +@all\n"


#: ACL users of apps are named ``sf-app:<namespace>/<name>``.
USER_PREFIX = "sf-app:"
#: What a pull worker runs (queue.py and its Lua scripts) and what the app's semantic cache runs
#: (semantic_cache/store.py), plus what clients send to find a cluster's layout or the primary (redis-py
#: also sends CLIENT SETINFO on connect: Redis 7.0 has no such command, later ones refuse it politely).
WORKER_COMMANDS = (
    # connection, scripts, cluster layout
    "ping", "evalsha", "eval", "script|load", "cluster|slots", "cluster|shards",
    "command", "role", "readonly",
    # the broker's worker side and its scripts
    "hset", "hget", "hincrby", "xgroup|create", "xreadgroup", "xautoclaim", "xclaim", "xack",
    "xdel", "xadd", "xrange", "zadd", "zrem", "incr", "set", "expire", "publish",
    # the semantic cache (its keys: sfc:{namespace/name}:*)
    "hmget", "zcard", "zpopmin", "zrange", "del", "exists", "xread", "xinfo|stream",
)  # fmt: skip


def user_of(app: str) -> str:
    return USER_PREFIX + app


def cache_pattern(app: str) -> str:
    """The semantic cache's keys of ``app`` (``semantic_cache/store.py``)."""
    return f"sfc:{{{app}}}:*"


def worker_rules(app: str, password: str) -> list[str]:
    """``ACL SETUSER`` rules: on, one password, the app's keys and channel only, the worker's
    commands only (everything else, the admin's keys and other apps', answers NOPERM)."""
    return [
        "on",
        "resetpass",
        f">{password}",
        "resetkeys",
        f"~{app_pattern(app)}",
        f"~{cache_pattern(app)}",
        "resetchannels",
        f"&{AppKeys(app).events}",
        "nocommands",
        *(f"+{command}" for command in WORKER_COMMANDS),
    ]


class AppUsers:
    """Creates, rotates and removes the per-app ACL users, on every node (Redis Cluster keeps
    ACLs per node; a promoted replica must already know them).

    A password is derived (HMAC-SHA256) from the broker's admin password, the app and the app's
    generation, so every replica of an app gets the same one and nothing secret is stored;
    ``rotate`` bumps the generation (kept in ``sf:acl:{app}:generation``, outside every app's
    keys). Users are not persisted by Redis: after a Redis restart a worker's credential is
    refused, it asks again, and the user is made anew."""

    def __init__(self, redis: Client, secret: str) -> None:
        self._redis = redis
        self._secret = secret.encode()
        self._everywhere: dict[str, Any] = (
            {"target_nodes": RedisCluster.ALL_NODES} if isinstance(redis, RedisCluster) else {}
        )

    async def _acl(self, *args: str) -> Any:
        return await self._redis.execute_command("ACL", *args, **self._everywhere)

    def _password(self, app: str, generation: int) -> str:
        return hmac.new(self._secret, f"{app}\0{generation}".encode(), hashlib.sha256).hexdigest()

    async def credential(self, app: str, *, rotate: bool = False) -> tuple[str, str]:
        """(username, password) of ``app``'s user, made (or, with ``rotate``, given a new password
        and so forcing every worker of the app to ask again) on every node."""
        key = f"sf:acl:{{{app}}}:generation"
        generation = int(await self._redis.incr(key) if rotate else await self._redis.get(key) or 0)
        if rotate:  # drops every connection logged in with the old password
            await self._acl("DELUSER", user_of(app))
        password = self._password(app, generation)
        await self._acl("SETUSER", user_of(app), *worker_rules(app, password))
        return user_of(app), password

    async def apps(self) -> list[str]:
        """Apps that have a user (on any node)."""
        names = await self._acl("USERS")
        if isinstance(names, dict):  # a cluster: {node: [users]}
            names = [n for found in names.values() for n in found]
        out = {(n.decode() if isinstance(n, bytes) else n) for n in names}
        return sorted(n.removeprefix(USER_PREFIX) for n in out if n.startswith(USER_PREFIX))

    async def close(self) -> None:
        await self._redis.aclose()

    async def remove(self, app: str) -> None:
        """Delete ``app``'s user: Redis drops its connections at once, and nothing can log in as it."""
        await self._acl("DELUSER", user_of(app))


class WorkerCredentials:
    """What ``GetWorkerCredential`` answers: where the Redis is (without the admin's secret) and the
    app's user, or no user when this Redis takes no credential (``users`` None)."""

    def __init__(self, target: RedisTarget, users: AppUsers | None) -> None:
        self.target = target
        self.users = users

    async def issue(self, app: str, *, rotate: bool = False) -> broker_pb2.WorkerCredential:
        out = broker_pb2.WorkerCredential(
            redis=self.target.addresses, mode=self.target.mode, sentinel_master=self.target.sentinel_master
        )
        if self.users is not None:
            out.username, out.password = await self.users.credential(app, rotate=rotate)
        return out

    async def sweep(self, exists: Callable[[str], Awaitable[bool]]) -> list[str]:
        """Remove the users of apps that no longer exist (``exists``: the keeper still has the app);
        returns the apps removed."""
        if self.users is None:
            return []
        gone = [app for app in await self.users.apps() if not await exists(app)]
        for app in gone:
            await self.users.remove(app)
            log.info("removed the redis user of deleted app %s", app)
        return gone

    async def close(self) -> None:
        if self.users is not None:
            await self.users.close()


def target_of(credential: broker_pb2.WorkerCredential) -> RedisTarget:
    """The ``RedisTarget`` a worker connects with."""
    target = RedisTarget(tuple(credential.redis), credential.mode, credential.sentinel_master)
    return target.with_credential(credential.username, credential.password)
