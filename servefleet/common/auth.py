"""Who is calling, and may they: one credential model for every servefleet service.

The keeper issues every credential: bearer tokens (256-bit random strings, stored in etcd only as
their SHA-256, so a stolen etcd dump authenticates nobody) mapped to a role. Each service checks
the caller the same way: the server interceptor (``servefleet.common.server``) resolves the token
through an ``Authenticator`` reading the keeper's token records, refuses a role the method does
not take (``ALLOWED``, one table for every method of every service, fail closed), and leaves the
``Principal`` for the servicer (``caller()``), which checks the application, ticket or endpoint
it is about.

Roles (the narrowest that lets each part do its job):

- ``admin``: everything (the operator; ``servefleet up`` keeps one in ``<state-dir>/admin.token``).
- ``tenant``: its own namespaces: deploy and manage apps (keeper), resolve and watch their
  endpoints (discovery), submit to them and read their tickets (broker).
- ``keeper``: what a keeper uses to drive cluster agents (minted by each keeper at start).
- ``agent``: a cluster agent: heartbeat to the keeper and obtain ``endpoint`` tokens for the apps
  it runs.
- ``endpoint``: one application's servers (proxies, replicas, direct ingresses, Triton actors):
  register, renew and deregister that application's endpoints in discovery, and obtain its Redis
  credential from the broker (its pull workers), nothing else.
- ``autoscaler``: read applications and scale them (within each spec's range and its owner's quota).

A verified token is cached for ``settings.token_cache_s`` seconds per process: a revoked token
stops working everywhere within that time.
"""

from __future__ import annotations

import contextvars
import hashlib
import os
import secrets
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import aetcd
import grpc

from servefleet.api import keeper_pb2
from servefleet.common.config import settings
from servefleet.common.errors import (
    Internal,
    NotFound,
    PermissionDenied,
    ServefleetError,
    Unauthenticated,
    Unavailable,
)
from servefleet.pipeline_spec import pipeline_of

ADMIN = "admin"
TENANT = "tenant"
KEEPER = "keeper"
AGENT = "agent"
ENDPOINT = "endpoint"
AUTOSCALER = "autoscaler"
ROLES = (ADMIN, TENANT, KEEPER, AGENT, ENDPOINT, AUTOSCALER)
TOKEN_PREFIX = "sft_"
#: Where a process finds its own token when none is passed (``token=`` wins).
TOKEN_ENV = "SERVEFLEET_TOKEN"


def _roles(*names: str) -> frozenset[str]:
    return frozenset((ADMIN, *names))


#: Which roles may call each method, per gRPC service. A served method missing here is refused
#: (``GrpcServer`` will not even start), so no method can be added without deciding who may call it.
ALLOWED: dict[str, dict[str, frozenset[str]]] = {
    "servefleet.api.Keeper": {
        "SubmitApplication": _roles(TENANT),
        "GetApplication": _roles(TENANT, AUTOSCALER),
        "ListApplications": _roles(TENANT, AUTOSCALER),
        "UpdateApplication": _roles(TENANT),
        "ScaleApplication": _roles(TENANT, AUTOSCALER),
        "DeleteApplication": _roles(TENANT),
        "WatchApplication": _roles(TENANT, AUTOSCALER),
        "RegisterCluster": _roles(AGENT),
        "ListClusters": _roles(TENANT, AGENT, AUTOSCALER),
        "CreateTenant": _roles(),
        "IssueToken": _roles(AGENT),  # an agent: endpoint tokens only (checked by the keeper)
        "SetQuota": _roles(),
        "ListTokens": _roles(),
        "RevokeToken": _roles(),
    },
    "servefleet.api.Discovery": {
        "Register": _roles(ENDPOINT),
        "KeepAlive": _roles(ENDPOINT),
        "Deregister": _roles(ENDPOINT),
        "Resolve": _roles(TENANT, AUTOSCALER),
        "Watch": _roles(TENANT, AUTOSCALER),
    },
    "servefleet.api.Broker": {
        "Submit": _roles(TENANT),
        "GetResult": _roles(TENANT),
        "WatchResult": _roles(TENANT),
        "Cancel": _roles(TENANT),
        "QueueStats": _roles(TENANT, AUTOSCALER),
        "GetWorkerCredential": _roles(ENDPOINT),  # the app's own workers (checked by the broker)
    },
    "servefleet.api.ClusterAgent": {
        "ApplyApplication": _roles(KEEPER),
        "RemoveApplication": _roles(KEEPER),
        "GetApplicationState": _roles(KEEPER),
        "ListMasters": _roles(KEEPER),
        "Capacity": _roles(KEEPER),
    },
}


def new_token() -> str:
    return TOKEN_PREFIX + secrets.token_urlsafe(32)


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def token_id(digest: str) -> str:
    """How listings name a token: a prefix of its hash (useless for authenticating)."""
    return digest[:16]


def app_key(namespace: str, name: str) -> str:
    return f"{namespace}/{name}"


@dataclass(frozen=True)
class Principal:
    """An authenticated caller: its role, the namespaces a tenant owns, the app an endpoint serves."""

    tenant: str
    role: str
    namespaces: tuple[str, ...] = field(default=())
    app: str = ""  # role endpoint: "namespace/name"
    token_id: str = ""

    @property
    def is_admin(self) -> bool:
        return self.role == ADMIN

    @property
    def sees_all(self) -> bool:
        return self.role in (ADMIN, AUTOSCALER)

    def sees(self, namespace: str) -> bool:
        return self.sees_all or (self.role == TENANT and namespace in self.namespaces)

    def visible(self, namespace: str = "") -> list[str] | None:
        """Namespaces a listing covers: None for every one (admin, no filter)."""
        if namespace:
            return [namespace] if self.sees(namespace) else []
        return None if self.sees_all else list(self.namespaces)

    def describe(self) -> str:
        if self.role == TENANT:
            return f"tenant {self.tenant!r}"
        if self.role == ENDPOINT:
            return f"the endpoint token of {self.app}"
        return f"a {self.role} token"

    def require_admin(self, what: str) -> None:
        if not self.is_admin:
            raise PermissionDenied(f"{what} needs an admin token; {self.describe()} is not one")

    def require_namespace(self, namespace: str) -> None:
        """For writes into a namespace: a tenant may only use its own."""
        if not self.sees(namespace):
            owned = ", ".join(self.namespaces) or "none"
            raise PermissionDenied(
                f"{self.describe()} may not use namespace {namespace!r} (its namespaces: {owned})"
            )

    def require_visible(self, namespace: str, name: str, what: str = "application") -> None:
        """For reads and changes of an app: another tenant's app does not exist for this caller."""
        if not self.sees(namespace):
            raise NotFound(f"{what} {app_key(namespace, name)} not found")

    def require_serves(self, namespace: str, name: str, what: str = "register endpoints of") -> None:
        """For acting as the app's servers (registering its endpoints, pulling its broker work):
        only the app's own endpoint token (or an admin) may."""
        # A pipeline's stages run as apps ``<app>--<stage>`` (``--`` is reserved in app names, so a
        # stage app belongs to exactly one pipeline): the pipeline's endpoint token serves them too.
        if self.is_admin or (self.role == ENDPOINT and self.app == app_key(namespace, pipeline_of(name))):
            return
        raise PermissionDenied(
            f"{self.describe()} may not {what} {app_key(namespace, name)}: "
            "only that application's endpoint token may (the keeper issues it to the app's cluster)"
        )


def bearer(metadata: Sequence[tuple[str, str | bytes]] | None) -> str:
    """The token in ``authorization: Bearer <token>``; Unauthenticated when absent or malformed."""
    for key, value in metadata or ():
        if key.lower() == "authorization":
            text = value.decode() if isinstance(value, bytes) else value
            scheme, _, token = text.strip().partition(" ")
            if scheme.lower() == "bearer" and token.strip():
                return token.strip()
            raise Unauthenticated("authorization metadata must be 'Bearer <token>'")
    raise Unauthenticated(
        f"missing token: send 'authorization: Bearer <token>' (SDK: token=, CLI: --token, or {TOKEN_ENV})"
    )


class TokenRecords(Protocol):
    """Where token and tenant records live (the keeper's store in etcd; ``EtcdTokens`` reads it)."""

    async def token(self, digest: str) -> keeper_pb2.TokenRecord | None: ...

    async def tenant(self, name: str) -> keeper_pb2.TenantInfo | None: ...


def keeper_key(prefix: str, *parts: str) -> bytes:
    """A key in the keeper's etcd layout (``keeper/store.py`` writes, every service reads tokens)."""
    return f"{prefix or settings.etcd_prefix}/keeper/{'/'.join(parts)}".encode()


class EtcdTokens:
    """Read-only view of the keeper's token and tenant records, for services other than the keeper."""

    def __init__(self, client: aetcd.Client, prefix: str = "") -> None:
        self.client = client
        self.prefix = prefix

    async def token(self, digest: str) -> keeper_pb2.TokenRecord | None:
        found = await self.client.get(keeper_key(self.prefix, "tokens", digest))
        return keeper_pb2.TokenRecord.FromString(found.value) if found else None

    async def tenant(self, name: str) -> keeper_pb2.TenantInfo | None:
        found = await self.client.get(keeper_key(self.prefix, "tenants", name))
        return keeper_pb2.TenantInfo.FromString(found.value) if found else None


class Authenticator:
    """Bearer token -> Principal, with a short positive cache (``settings.token_cache_s``)."""

    def __init__(
        self,
        records: TokenRecords,
        *,
        cache_s: float | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.records = records
        self.cache_s = settings.token_cache_s if cache_s is None else cache_s
        self.clock = clock
        self._cache: dict[str, tuple[Principal, float]] = {}

    async def authenticate(self, metadata: Sequence[tuple[str, str | bytes]] | None) -> Principal:
        digest = hash_token(bearer(metadata))
        hit = self._cache.get(digest)
        now = self.clock()
        if hit is not None and hit[1] > now:
            return hit[0]
        try:
            record = await self.records.token(digest)
        except ServefleetError:
            raise
        except Exception as exc:  # etcd down: say so rather than call the token invalid
            raise Unavailable(f"etcd unavailable: cannot check the token ({exc})") from None
        if record is None:
            raise Unauthenticated(
                "invalid token: unknown or revoked (ask an admin for a new one: servefleet tenant token)"
            )
        namespaces: tuple[str, ...] = ()
        if record.role == TENANT:
            tenant = await self.records.tenant(record.tenant)
            if tenant is None:
                raise Unauthenticated(f"token of tenant {record.tenant!r}, which no longer exists")
            namespaces = tuple(tenant.namespaces)
        app = app_key(record.app.namespace, record.app.name) if record.app.name else ""
        principal = Principal(record.tenant, record.role, namespaces, app, token_id(digest))
        if len(self._cache) > 10_000:
            self._cache.clear()
        self._cache[digest] = (principal, now + self.cache_s)
        return principal


_CALLER: contextvars.ContextVar[Principal] = contextvars.ContextVar("servefleet_caller")


def allowed_roles(method: str) -> frozenset[str] | None:
    """The roles that may call ``/package.Service/Method``; None when the table does not list it."""
    service, _, name = method.lstrip("/").partition("/")
    return ALLOWED.get(service, {}).get(name)


def authorize(method: str, who: Principal) -> None:
    roles = allowed_roles(method)
    if roles is None:
        raise PermissionDenied(f"{method} is not open to any caller")
    if who.role not in roles:
        takes = ", ".join(sorted(roles))
        raise PermissionDenied(
            f"{method.rsplit('/', 1)[-1]} needs a token of role {takes}; {who.describe()} has role {who.role}"
        )


def set_caller(who: Principal) -> contextvars.Token[Principal]:
    return _CALLER.set(who)


def caller() -> Principal:
    """The authenticated caller of the RPC being served (set by the server interceptor)."""
    try:
        return _CALLER.get()
    except LookupError:
        raise Internal("no authenticated caller: the server was built without an Authenticator") from None


# -- client side -------------------------------------------------------------------------------


def resolve_token(token: str | None = None) -> str:
    """``token`` if given (even ""), else ``$SERVEFLEET_TOKEN``, else "" (calls then fail
    UNAUTHENTICATED). Platform parts pass theirs explicitly, so a user's variable never leaks in."""
    return os.environ.get(TOKEN_ENV, "") if token is None else token


def bearer_metadata(token: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {token}"),) if token else ()


def _with_token(details: Any, token: str) -> Any:
    metadata = grpc.aio.Metadata(*(details.metadata or ()), *bearer_metadata(token))
    return grpc.aio.ClientCallDetails(
        details.method, details.timeout, metadata, details.credentials, details.wait_for_ready
    )


class _Bearer:
    def __init__(self, token: str) -> None:
        self.token = token


class _UnaryUnary(_Bearer, grpc.aio.UnaryUnaryClientInterceptor):
    async def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
        return await continuation(_with_token(details, self.token), request)


class _UnaryStream(_Bearer, grpc.aio.UnaryStreamClientInterceptor):
    async def intercept_unary_stream(self, continuation: Any, details: Any, request: Any) -> Any:
        return await continuation(_with_token(details, self.token), request)


class _StreamUnary(_Bearer, grpc.aio.StreamUnaryClientInterceptor):
    async def intercept_stream_unary(self, continuation: Any, details: Any, request_iterator: Any) -> Any:
        return await continuation(_with_token(details, self.token), request_iterator)


class _StreamStream(_Bearer, grpc.aio.StreamStreamClientInterceptor):
    async def intercept_stream_stream(self, continuation: Any, details: Any, request_iterator: Any) -> Any:
        return await continuation(_with_token(details, self.token), request_iterator)


def bearer_interceptors(token: str) -> list[grpc.aio.ClientInterceptor]:
    """Interceptors adding ``authorization: Bearer <token>`` to every call of a grpc.aio channel
    (one per call kind: grpc.aio files each interceptor under the first kind it implements)."""
    return [kind(token) for kind in (_UnaryUnary, _UnaryStream, _StreamUnary, _StreamStream)]
