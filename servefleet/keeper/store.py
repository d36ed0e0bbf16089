"""The keeper's state in etcd: desired state and status per application, clusters, tenants, tokens.

Layout under ``<prefix>/keeper/``::

    apps/<ns>/<name>/desired   DesiredState   (its mod revision is the application's revision)
    apps/<ns>/<name>/status    ApplicationStatus (state, reason, placements; ``revision`` = the
                               desired revision it was computed for)
    clusters/<name>            ClusterInfo (heartbeat_at is the keeper's clock)
    tenants/<name>             TenantInfo
    namespaces/<ns>            owning tenant's name
    tokens/<sha256 of token>   TokenRecord
    leader                     the leading keeper's id, bound to its lease

Desired state and status live in two keys so that status writes never bump the revision a user
compares against. Every write that must not race is one etcd transaction.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Any

import aetcd
from aetcd import rpc

from servefleet import pipeline_spec
from servefleet.api import common_pb2, keeper_pb2
from servefleet.common.appid import AppId
from servefleet.common.config import settings
from servefleet.common.errors import AlreadyExists, Conflict, NotFound
from servefleet.common.etcd import connect_etcd

AppRef = common_pb2.AppRef


@dataclass
class AppRecord:
    """One application as stored: desired state, its revision, and the last status written."""

    desired: keeper_pb2.DesiredState
    revision: int
    status: keeper_pb2.ApplicationStatus
    status_revision: int = 0  # mod revision of the status key (where a watch starts)

    @property
    def ref(self) -> AppRef:
        return AppRef(namespace=self.desired.spec.namespace, name=self.desired.spec.name)

    def view(self) -> keeper_pb2.ApplicationStatus:
        """What users see: the status with the spec, the desired replicas and the current revision."""
        out = keeper_pb2.ApplicationStatus()
        out.CopyFrom(self.status)
        out.app.CopyFrom(self.ref)
        out.spec.CopyFrom(self.desired.spec)
        out.revision = self.revision
        out.replicas = self.desired.replicas
        out.scaling.CopyFrom(self.desired.scaling)
        out.scaling.autoscaled = pipeline_spec.autoscaled(self.desired.spec)
        out.stage_replicas.update(pipeline_spec.stage_counts(self.desired.spec, self.desired.stage_replicas))
        served = (keeper_pb2.AppState.RUNNING, keeper_pb2.AppState.DEGRADED)
        if self.status.revision and self.status.revision != self.revision and out.state in served:
            # The change is stored but not yet acted on: say so rather than show the old RUNNING.
            out.state = keeper_pb2.AppState.UPDATING
            out.reason = f"revision {self.revision} accepted; waiting for the reconciler"
        return out


@dataclass(frozen=True)
class QuotaFence:
    """A tenant's usage as read for a quota check: the write that relies on that check commits only
    if no other quota-checked write of the tenant committed since (see ``KeeperStore.quota_fence``)."""

    key: bytes
    revision: int  # mod revision of ``key`` when the usage was read; 0: never written


class QuotaRace(Exception):
    """Another quota-checked write of the tenant committed between our check and our write: check again."""


@dataclass
class Page:
    apps: list[AppRecord]
    next_key: str  # "" when nothing follows


class KeeperStore:
    """Typed reads and transactional writes over one aetcd client."""

    def __init__(self, client: aetcd.Client, prefix: str | None = None) -> None:
        self.client = client
        self.root = f"{prefix or settings.etcd_prefix}/keeper/"

    @classmethod
    def connect(cls, endpoints: str, prefix: str | None = None) -> KeeperStore:
        """A store over the etcd members ``endpoints`` (``host:port[,host:port...]``)."""
        return cls(connect_etcd(endpoints, timeout=None), prefix)

    async def close(self) -> None:
        await self.client.close()

    async def txn(
        self, compare: list[Any], success: list[Any], failure: list[Any] | None = None
    ) -> tuple[bool, list[Any]]:
        """One etcd transaction (aetcd wants every op list present)."""
        ok, responses = await self.client.transaction(compare=compare, success=success, failure=failure or [])
        return bool(ok), responses

    def key(self, *parts: str) -> bytes:
        return (self.root + "/".join(parts)).encode()

    def _desired_key(self, ref: AppRef) -> bytes:
        return self.key("apps", ref.namespace, ref.name, "desired")

    def _status_key(self, ref: AppRef) -> bytes:
        return self.key("apps", ref.namespace, ref.name, "status")

    async def quota_fence(self, tenant: str) -> QuotaFence:
        """Read before the usage a quota check sums; every quota-checked write bumps it in its own txn,
        so two concurrent writes can't both pass a limit on the same usage."""
        key = self.key("quota-fence", tenant)
        found = await self.client.get(key)
        return QuotaFence(key, found.mod_revision if found is not None else 0)

    def _fenced(self, fence: QuotaFence | None) -> tuple[list[Any], list[Any], list[Any]]:
        """Compare, success and failure ops that tie a write to ``fence`` (none without one)."""
        if fence is None:
            return [], [], []
        tx = self.client.transactions
        return [tx.mod(fence.key) == fence.revision], [tx.put(fence.key, b"")], [tx.get(fence.key)]

    @staticmethod
    def _check_fence(fence: QuotaFence | None, got: Any) -> None:
        current = got[0][1].mod_revision if got else 0
        if fence is not None and current != fence.revision:
            raise QuotaRace(fence.key.decode())

    @property
    def leader_key(self) -> bytes:
        return self.key("leader")

    # -- applications --------------------------------------------------------------------------

    async def get_app(self, ref: AppRef) -> AppRecord | None:
        _, responses = await self.txn(
            compare=[],
            success=[
                self.client.transactions.get(self._desired_key(ref)),
                self.client.transactions.get(self._status_key(ref)),
            ],
        )
        desired_kv, status_kv = responses
        if not desired_kv:
            return None
        desired = keeper_pb2.DesiredState.FromString(desired_kv[0][0])
        status = keeper_pb2.ApplicationStatus.FromString(status_kv[0][0]) if status_kv else None
        status_revision = status_kv[0][1].mod_revision if status_kv else 0
        return AppRecord(
            desired, desired_kv[0][1].mod_revision, status or keeper_pb2.ApplicationStatus(), status_revision
        )

    async def create_app(
        self,
        desired: keeper_pb2.DesiredState,
        status: keeper_pb2.ApplicationStatus,
        fence: QuotaFence | None = None,
    ) -> int:
        """Store a new application; AlreadyExists when the name is taken (or still being deleted);
        QuotaRace when ``fence`` moved. Finding exactly this desired state stored is success: a
        retried transaction whose first try committed (``servefleet.common.etcd``)."""
        ref = AppRef(namespace=desired.spec.namespace, name=desired.spec.name)
        tx = self.client.transactions
        fence_compare, fence_put, fence_get = self._fenced(fence)
        value = desired.SerializeToString()
        ok, responses = await self.txn(
            compare=[tx.create(self._desired_key(ref)) == 0, *fence_compare],
            success=[
                tx.put(self._desired_key(ref), value),
                tx.put(self._status_key(ref), status.SerializeToString()),
                *fence_put,
            ],
            failure=[tx.get(self._desired_key(ref)), *fence_get],
        )
        if not ok and not responses[0]:
            self._check_fence(fence, responses[1])
        if not ok and responses[0][0][0] == value:
            return int(responses[0][0][1].mod_revision)
        if not ok:
            current = keeper_pb2.DesiredState.FromString(responses[0][0][0])
            if current.deleting:
                raise AlreadyExists(
                    f"application {AppId.parse(ref).key} is still being deleted; submit it again soon"
                )
            revision = responses[0][0][1].mod_revision
            raise AlreadyExists(
                f"application {AppId.parse(ref).key} already exists (revision {revision}); "
                "use update to change it"
            )
        return int(responses[0].response_put.header.revision)

    async def replace_desired(
        self, desired: keeper_pb2.DesiredState, expected_revision: int, fence: QuotaFence | None = None
    ) -> int:
        """Compare-and-swap the desired state; Conflict naming the current revision when it moved,
        QuotaRace when only ``fence`` moved. Exactly this desired state stored is success (a
        retried transaction whose first try committed)."""
        ref = AppRef(namespace=desired.spec.namespace, name=desired.spec.name)
        key = self._desired_key(ref)
        tx = self.client.transactions
        fence_compare, fence_put, fence_get = self._fenced(fence)
        value = desired.SerializeToString()
        ok, responses = await self.txn(
            compare=[tx.mod(key) == expected_revision, *fence_compare],
            success=[tx.put(key, value), *fence_put],
            failure=[tx.get(key), *fence_get],
        )
        if ok:
            return int(responses[0].response_put.header.revision)
        if not responses[0]:
            raise NotFound(f"application {AppId.parse(ref).key} not found")
        current = responses[0][0][1].mod_revision
        if responses[0][0][0] == value:
            return int(current)
        if current == expected_revision:
            self._check_fence(fence, responses[1])
        raise Conflict(
            f"application {AppId.parse(ref).key} changed: you sent revision {expected_revision}, "
            f"current revision is {current}; read it again and retry"
        )

    async def write_status(
        self, ref: AppRef, status: keeper_pb2.ApplicationStatus, *, revision: int, fence: bytes
    ) -> bool:
        """Write status computed for desired ``revision``, only while ``fence`` still leads and the
        desired state has not moved on. False when either changed (the next pass redoes it)."""
        tx = self.client.transactions
        ok, _ = await self.txn(
            compare=[tx.value(self.leader_key) == fence, tx.mod(self._desired_key(ref)) == revision],
            success=[tx.put(self._status_key(ref), status.SerializeToString())],
        )
        return bool(ok)

    async def remove_app(self, ref: AppRef, *, revision: int, fence: bytes) -> bool:
        """Drop both keys of a deleted application (after its DELETED status was written)."""
        tx = self.client.transactions
        ok, _ = await self.txn(
            compare=[tx.value(self.leader_key) == fence, tx.mod(self._desired_key(ref)) == revision],
            success=[tx.delete(self._desired_key(ref)), tx.delete(self._status_key(ref))],
        )
        return bool(ok)

    async def list_apps(
        self, namespaces: Sequence[str] | None, *, start_after: str = "", limit: int = 0
    ) -> Page:
        """Applications in key order across ``namespaces`` (None: all), after ``start_after``
        (``ns/name``), at most ``limit`` (0: all). Reads in chunks so a page never loads the world."""
        prefixes = (
            [self.key("apps", "")]
            if namespaces is None
            else [self.key("apps", ns, "") for ns in sorted(namespaces)]
        )
        after = self.key("apps", start_after) + b"/\xff" if start_after else b""
        out: list[AppRecord] = []
        for prefix in prefixes:
            end = _prefix_end(prefix)
            start = max(prefix, after)
            if start >= end:
                continue
            async for record in self._scan_apps(start, end):
                if limit and len(out) == limit:
                    return Page(out, AppId.parse(out[-1].ref).key)
                out.append(record)
        return Page(out, "")

    async def all_apps(self) -> tuple[list[AppRecord], int]:
        """Every application as of one etcd revision (a consistent snapshot), and that revision."""
        head = await self.client.kvstub.Range(rpc.RangeRequest(key=self.leader_key, count_only=True))
        revision = int(head.header.revision)
        prefix = self.key("apps", "")
        return [r async for r in self._scan_apps(prefix, _prefix_end(prefix), revision=revision)], revision

    async def _scan_apps(
        self, start: bytes, end: bytes, *, revision: int = 0, chunk: int = 256
    ) -> AsyncIterator[AppRecord]:
        pending: dict[str, Any] = {}
        while start < end:
            response = await self.client.kvstub.Range(
                rpc.RangeRequest(key=start, range_end=end, limit=chunk, revision=revision)
            )
            for kv in response.kvs:
                app, kind = self.parse_app_key(kv.key)
                if kind == "desired":
                    pending = {"app": app, "desired": kv}
                elif pending.get("app") == app:
                    desired = keeper_pb2.DesiredState.FromString(pending["desired"].value)
                    status = keeper_pb2.ApplicationStatus.FromString(kv.value)
                    yield AppRecord(desired, pending["desired"].mod_revision, status, kv.mod_revision)
                    pending = {}
            if not response.more or not response.kvs:
                return
            start = response.kvs[-1].key + b"\0"

    async def watch_status(self, ref: AppRef, after_revision: int) -> aetcd.rtypes.Watch:
        return await self.client.watch(self._status_key(ref), start_revision=after_revision + 1)

    async def watch_apps(self, after_revision: int) -> aetcd.rtypes.Watch:
        """Every change to any application's keys after ``after_revision``, in order."""
        prefix = self.key("apps", "")
        return await self.client.watch(
            prefix, range_end=_prefix_end(prefix), start_revision=after_revision + 1
        )

    def parse_app_key(self, key: bytes) -> tuple[str, str]:
        """``(ns/name, "desired" | "status")`` of an application key."""
        app, _, kind = key[len(self.root) + len("apps/") :].decode().rpartition("/")
        return app, kind

    # -- clusters ------------------------------------------------------------------------------

    async def put_cluster(self, info: keeper_pb2.ClusterInfo) -> None:
        await self.client.put(self.key("clusters", info.name), info.SerializeToString())

    async def clusters(self) -> list[keeper_pb2.ClusterInfo]:
        found = await self.client.get_prefix(self.key("clusters", ""))
        return [keeper_pb2.ClusterInfo.FromString(kv.value) for kv in found]

    # -- tenants and tokens --------------------------------------------------------------------

    async def create_tenant(self, info: keeper_pb2.TenantInfo) -> None:
        """Store a tenant and claim its namespaces in one transaction; AlreadyExists names the clash."""
        tx = self.client.transactions
        tenant_key = self.key("tenants", info.tenant)
        ns_keys = [self.key("namespaces", ns) for ns in info.namespaces]
        ok, _ = await self.txn(
            compare=[tx.create(tenant_key) == 0, *[tx.create(k) == 0 for k in ns_keys]],
            success=[
                tx.put(tenant_key, info.SerializeToString()),
                *[tx.put(k, info.tenant.encode()) for k in ns_keys],
            ],
        )
        if ok:
            return
        if await self.client.get(tenant_key) is not None:
            raise AlreadyExists(f"tenant {info.tenant!r} already exists")
        for ns, key in zip(info.namespaces, ns_keys, strict=True):
            owner = await self.client.get(key)
            if owner is not None:
                raise AlreadyExists(f"namespace {ns!r} already belongs to tenant {owner.value.decode()!r}")
        raise Conflict(f"tenant {info.tenant!r} changed while being created; retry")

    async def tenant(self, name: str) -> keeper_pb2.TenantInfo | None:
        found = await self.client.get(self.key("tenants", name))
        return keeper_pb2.TenantInfo.FromString(found.value) if found else None

    async def put_tenant(self, info: keeper_pb2.TenantInfo) -> None:
        await self.client.put(self.key("tenants", info.tenant), info.SerializeToString())

    async def put_token(self, digest: str, record: keeper_pb2.TokenRecord) -> None:
        await self.client.put(self.key("tokens", digest), record.SerializeToString())

    async def token(self, digest: str) -> keeper_pb2.TokenRecord | None:
        found = await self.client.get(self.key("tokens", digest))
        return keeper_pb2.TokenRecord.FromString(found.value) if found else None

    async def tokens(self) -> list[tuple[str, keeper_pb2.TokenRecord]]:
        """Every token record as (digest, record)."""
        found = await self.client.get_prefix(self.key("tokens", ""))
        root = len(self.key("tokens", ""))
        return [(kv.key[root:].decode(), keeper_pb2.TokenRecord.FromString(kv.value)) for kv in found]

    async def find_token(self, token_id: str) -> tuple[str, keeper_pb2.TokenRecord] | None:
        """The token whose digest starts with ``token_id`` (ids are 16 hex digits: unique in practice)."""
        found = list(await self.client.get_prefix(self.key("tokens", token_id)))
        if len(found) != 1:
            return None
        root = len(self.key("tokens", ""))
        return found[0].key[root:].decode(), keeper_pb2.TokenRecord.FromString(found[0].value)

    async def delete_token(self, digest: str) -> None:
        await self.client.delete(self.key("tokens", digest))

    async def revoke_app_tokens(self, ref: AppRef) -> int:
        """Delete the endpoint tokens of an application that is gone; how many there were."""
        gone = [
            digest
            for digest, record in await self.tokens()
            if record.role == "endpoint"
            and (record.app.namespace, record.app.name) == (ref.namespace, ref.name)
        ]
        for digest in gone:
            await self.delete_token(digest)
        return len(gone)

    async def claim_bootstrap(self, digest: str, record: keeper_pb2.TokenRecord) -> bool:
        """Store the first admin token unless one was made before (two keepers may start together)."""
        tx = self.client.transactions
        marker = self.key("bootstrap")
        ok, _ = await self.txn(
            compare=[tx.create(marker) == 0],
            success=[tx.put(marker, b"1"), tx.put(self.key("tokens", digest), record.SerializeToString())],
        )
        return bool(ok)

    # -- leadership ------------------------------------------------------------------------------

    async def leader(self) -> bytes:
        found = await self.client.get(self.leader_key)
        return bytes(found.value) if found else b""


def _prefix_end(prefix: bytes) -> bytes:
    return prefix[:-1] + bytes([prefix[-1] + 1])


async def cancel_watch(watch: aetcd.rtypes.Watch) -> None:
    """Cancel a watch without letting a closed connection's error escape a finally block."""
    try:
        await asyncio.wait_for(watch.cancel(), timeout=2.0)
    except Exception:  # the connection may already be gone
        pass
