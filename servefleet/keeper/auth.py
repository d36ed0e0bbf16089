"""Who is calling: bearer tokens (stored only as hashes) mapped to a tenant and a role.

Tokens are 256-bit random strings, so a plain SHA-256 is enough to make a stolen etcd dump
useless (no password stretching needed). A verified token is cached for a few seconds so that a
hot client does not cost one etcd read per call.
"""

from __future__ import annotations

import hashlib
import secrets
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from servefleet.api import keeper_pb2
from servefleet.common.config import settings
from servefleet.common.errors import NotFound, PermissionDenied, Unauthenticated

ADMIN = "admin"
TENANT = "tenant"
ROLES = (ADMIN, TENANT)
TOKEN_PREFIX = "sft_"


def new_token() -> str:
    return TOKEN_PREFIX + secrets.token_urlsafe(32)


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


@dataclass(frozen=True)
class Principal:
    """An authenticated caller. Admins see every namespace; a tenant only its own."""

    tenant: str
    role: str
    namespaces: tuple[str, ...] = field(default=())

    @property
    def is_admin(self) -> bool:
        return self.role == ADMIN

    def sees(self, namespace: str) -> bool:
        return self.is_admin or namespace in self.namespaces

    def visible(self, namespace: str = "") -> list[str] | None:
        """Namespaces a listing covers: None for every one (admin, no filter)."""
        if namespace:
            return [namespace] if self.sees(namespace) else []
        return None if self.is_admin else list(self.namespaces)

    def require_admin(self, what: str) -> None:
        if not self.is_admin:
            raise PermissionDenied(f"{what} needs an admin token; tenant {self.tenant!r} has a tenant token")

    def require_namespace(self, namespace: str) -> None:
        """For writes into a namespace: a tenant may only use its own."""
        if not self.sees(namespace):
            owned = ", ".join(self.namespaces) or "none"
            raise PermissionDenied(
                f"tenant {self.tenant!r} may not use namespace {namespace!r} (its namespaces: {owned})"
            )

    def require_visible(self, namespace: str, name: str) -> None:
        """For reads and changes of an app: another tenant's app does not exist for this caller."""
        if not self.sees(namespace):
            raise NotFound(f"application {namespace}/{name} not found")


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
        "missing token: send 'authorization: Bearer <token>' (CLI: --token or SERVEFLEET_TOKEN)"
    )


class TokenBackend(Protocol):
    """What the authenticator needs from storage (the keeper store satisfies it)."""

    async def token(self, digest: str) -> keeper_pb2.TokenRecord | None: ...

    async def tenant(self, name: str) -> keeper_pb2.TenantInfo | None: ...


class Authenticator:
    """Bearer token -> Principal, with a short positive cache."""

    def __init__(
        self,
        backend: TokenBackend,
        *,
        cache_s: float | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.backend = backend
        self.cache_s = settings.keeper_token_cache_s if cache_s is None else cache_s
        self.clock = clock
        self._cache: dict[str, tuple[Principal, float]] = {}

    async def authenticate(self, metadata: Sequence[tuple[str, str | bytes]] | None) -> Principal:
        digest = hash_token(bearer(metadata))
        hit = self._cache.get(digest)
        now = self.clock()
        if hit is not None and hit[1] > now:
            return hit[0]
        record = await self.backend.token(digest)
        if record is None:
            raise Unauthenticated("invalid token")
        namespaces: tuple[str, ...] = ()
        if record.role != ADMIN:
            tenant = await self.backend.tenant(record.tenant)
            if tenant is None:
                raise Unauthenticated(f"token of tenant {record.tenant!r}, which no longer exists")
            namespaces = tuple(tenant.namespaces)
        principal = Principal(record.tenant, record.role, namespaces)
        if len(self._cache) > 10_000:
            self._cache.clear()
        self._cache[digest] = (principal, now + self.cache_s)
        return principal
