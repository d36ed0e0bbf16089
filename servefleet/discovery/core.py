"""Discovery over etcd: lease-bound endpoint records, resolve, and ordered watch streams.

The core holds no state of its own (every answer comes from etcd), so any number of discovery
instances can serve side by side and a restart loses nothing. One record per endpoint lives at
``{prefix}/discovery/endpoints/{namespace}/{name}/{endpoint_id}``, value a serialised ``Endpoint``,
bound to the registrant's lease: when the lease lapses etcd deletes the record and every watcher
sees REMOVED.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TypeVar
from uuid import uuid4

import aetcd
import aetcd.rpc
import grpc
from aetcd import utils as etcd_utils
from google.protobuf.message import DecodeError

from servefleet.api import common_pb2, discovery_pb2
from servefleet.common.appid import AppId
from servefleet.common.auth import Principal
from servefleet.common.errors import FailedPrecondition, InvalidArgument, PermissionDenied, Unavailable
from servefleet.discovery import names

log = logging.getLogger(__name__)

Event = discovery_pb2.WatchEvent


@contextmanager
def _etcd_errors() -> Iterator[None]:
    """etcd being down or slow is the caller's UNAVAILABLE, never an INTERNAL crash."""
    try:
        yield
    except (aetcd.exceptions.ConnectionFailedError, aetcd.exceptions.ConnectionTimeoutError) as exc:
        raise Unavailable(f"etcd unavailable: {exc}") from None
    except grpc.aio.AioRpcError as exc:
        if exc.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
            raise Unavailable(f"etcd unavailable: {exc.details()}") from None
        raise


def _decode(value: bytes) -> discovery_pb2.Endpoint | None:
    try:
        return discovery_pb2.Endpoint.FromString(value)
    except DecodeError:
        log.warning("skipping an endpoint record that does not parse")
        return None


@dataclass(frozen=True)
class _Change:
    type: discovery_pb2.WatchEvent.Type
    endpoint: discovery_pb2.Endpoint
    revision: int


def _change(event: aetcd.rpc.Event) -> _Change | None:
    """One etcd event as an endpoint change (None for a record that does not parse)."""
    kv = event.kv
    if event.type == aetcd.rpc.Event.DELETE:
        endpoint = _decode(event.prev_kv.value) if event.prev_kv.key else None
        return _Change(Event.REMOVED, endpoint or names.endpoint_from_key(kv.key), kv.mod_revision)
    endpoint = _decode(kv.value)
    if endpoint is None:
        return None
    return _Change(Event.ADDED if kv.version == 1 else Event.UPDATED, endpoint, kv.mod_revision)


def group_changes(events: Sequence[aetcd.rpc.Event]) -> list[discovery_pb2.WatchEvent]:
    """etcd events -> watch events, consecutive changes of one kind at one revision merged.

    etcd applies a revision atomically (a lease expiry removes all its records at one revision);
    sending that revision as one message means a client that resumes after the last revision it
    saw can never have seen half of one.
    """
    out: list[discovery_pb2.WatchEvent] = []
    for event in events:
        change = _change(event)
        if change is None:
            continue
        last = out[-1] if out else None
        if last is not None and last.type == change.type and last.revision == change.revision:
            last.endpoints.append(change.endpoint)
        else:
            out.append(Event(type=change.type, endpoints=[change.endpoint], revision=change.revision))
    return out


def _varint(value: int) -> bytes:
    out = bytearray()
    while value > 0x7F:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


M = TypeVar("M", discovery_pb2.ResolveResponse, discovery_pb2.WatchEvent)


def with_endpoints(message: M, values: Sequence[bytes]) -> M:
    """A copy of ``message`` with serialised records as its repeated ``endpoints`` field.

    The records are spliced into one buffer and parsed by protobuf's C code in a single call,
    several times faster for big sets than decoding each record into a Python object; a record
    that does not parse is skipped on the slow path.
    """
    field = message.DESCRIPTOR.fields_by_name["endpoints"].number
    tag = _varint(field << 3 | 2)  # wire type 2: length-delimited
    records = b"".join(tag + _varint(len(v)) + v for v in values)
    try:
        # Concatenated serialisations merge: the header fields plus every record, in one parse.
        return type(message).FromString(message.SerializeToString() + records)
    except DecodeError:
        message.endpoints.extend(e for e in map(_decode, values) if e is not None)
        return message


def matches(endpoint: discovery_pb2.Endpoint, kind: str, label_filter: Mapping[str, str]) -> bool:
    if kind and endpoint.kind != kind:
        return False
    return all(endpoint.labels.get(k) == v for k, v in label_filter.items())


def _owner(who: Principal) -> bytes:
    """What a lease records as its registrant: the app an endpoint token serves (admins: "*")."""
    return b"*" if who.is_admin else who.app.encode()


class DiscoveryCore:
    """Register / keep alive / deregister / resolve / watch, each a few etcd calls.

    Every call takes the authenticated caller: only an application's endpoint token (or an admin)
    registers, renews or removes that application's endpoints, and a lease serves the registrant
    that created it only; resolving and watching need a token that sees the namespace (another
    tenant's application is NOT_FOUND)."""

    def __init__(self, etcd: aetcd.Client) -> None:
        self._etcd = etcd

    async def check_lease(self, who: Principal, lease_id: int) -> bool:
        """False when the lease is gone; PERMISSION_DENIED unless ``who`` created it."""
        with _etcd_errors():
            found = await self._etcd.get(names.lease_key(lease_id))
        if found is None:
            return False
        if not (who.is_admin or found.value == _owner(who)):
            raise PermissionDenied(f"lease {lease_id} belongs to another registrant than {who.describe()}")
        return True

    async def register(
        self, who: Principal, endpoint: discovery_pb2.Endpoint, *, ttl_s: int = 0, lease_id: int = 0
    ) -> discovery_pb2.RegisterResponse:
        """Store ``endpoint`` bound to a new lease (or the live ``lease_id``); same id = replace."""
        record = names.check_endpoint(endpoint)
        who.require_serves(record.app.namespace, record.app.name)
        ttl = names.check_ttl(ttl_s)
        if lease_id < 0:
            raise InvalidArgument(f"lease_id {lease_id} must be >= 0")
        record.id = record.id or uuid4().hex[:16]
        if lease_id and not await self.check_lease(who, lease_id):
            raise FailedPrecondition(
                f"lease {lease_id} is gone (expired or revoked): register without lease_id"
            )
        with _etcd_errors():
            if lease_id == 0:
                lease = await self._etcd.lease(ttl)
                lease_id, ttl = lease.id, lease.ttl
                await self._etcd.put(names.lease_key(lease_id), _owner(who), lease=lease_id)
            try:
                put = await self._etcd.put(
                    names.endpoint_key(record.app, record.id), record.SerializeToString(), lease=lease_id
                )
            except aetcd.exceptions.ClientError as exc:
                if "lease not found" in str(exc):
                    raise FailedPrecondition(
                        f"lease {lease_id} is gone (expired or revoked): register without lease_id"
                    ) from None
                raise
        return discovery_pb2.RegisterResponse(
            endpoint_id=record.id, lease_id=lease_id, ttl_s=ttl, revision=put.header.revision
        )

    async def keep_alive(self, lease_id: int) -> discovery_pb2.KeepAliveResponse:
        """Renew a lease; ``ttl_s`` 0 tells the registrant its lease (and records) are gone.
        (The servicer checks the caller owns it, once per lease per stream: ``check_lease``.)"""
        if lease_id <= 0:
            raise InvalidArgument(f"lease_id {lease_id} must be > 0")
        with _etcd_errors():
            reply = await self._etcd.refresh_lease(lease_id)
        return discovery_pb2.KeepAliveResponse(lease_id=lease_id, ttl_s=max(0, int(reply.TTL)))

    async def deregister(
        self, who: Principal, app: common_pb2.AppRef, endpoint_id: str, lease_id: int
    ) -> int:
        """Delete one record and/or revoke a lease (and every record on it); idempotent."""
        if not endpoint_id and lease_id <= 0:
            raise InvalidArgument("deregister needs endpoint_id (with app) or lease_id")
        if endpoint_id:
            ref = AppId.parse(app)
            who.require_serves(ref.namespace, ref.name)
        if lease_id > 0 and not await self.check_lease(who, lease_id):
            lease_id = 0  # already gone: nothing to revoke
        revision = 0
        with _etcd_errors():
            if endpoint_id:
                deleted = await self._etcd.delete(names.endpoint_key(app, endpoint_id))
                revision = deleted.header.revision if deleted is not None else 0
            if lease_id > 0:
                await self._etcd.connect()
                try:
                    revoked = await self._etcd.leasestub.LeaseRevoke(
                        aetcd.rpc.LeaseRevokeRequest(ID=lease_id), timeout=5
                    )
                    revision = max(revision, revoked.header.revision)
                except grpc.aio.AioRpcError as exc:
                    if exc.code() != grpc.StatusCode.NOT_FOUND:
                        raise
            if revision == 0:
                revision = await self.revision()
        return revision

    async def revision(self) -> int:
        with _etcd_errors():
            await self._etcd.connect()
            reply = await self._etcd.kvstub.Range(
                aetcd.rpc.RangeRequest(key=b"\0", limit=1, count_only=True), timeout=5
            )
        return int(reply.header.revision)

    async def _range(self, prefix: bytes) -> tuple[list[bytes], int]:
        """Serialised records under ``prefix`` and the revision they were read at."""
        with _etcd_errors():
            result = await self._etcd.get_prefix(prefix)
        return [kv.value for kv in result.kvs], int(result.header.revision)

    async def resolve(
        self,
        who: Principal,
        app: common_pb2.AppRef,
        *,
        kind: str = "",
        label_filter: Mapping[str, str] | None = None,
    ) -> discovery_pb2.ResolveResponse:
        ref = AppId.parse(app).ref()
        who.require_visible(ref.namespace, ref.name)
        values, revision = await self._range(names.watch_prefix(ref))
        reply = with_endpoints(discovery_pb2.ResolveResponse(revision=revision), values)
        if not kind and not label_filter:
            return reply
        chosen = [e for e in reply.endpoints if matches(e, kind, label_filter or {})]
        return discovery_pb2.ResolveResponse(endpoints=chosen, revision=revision)

    async def watch(
        self, who: Principal, app: common_pb2.AppRef, *, from_revision: int = 0
    ) -> AsyncIterator[discovery_pb2.WatchEvent]:
        """A snapshot (unless resuming), then every change in revision order, until cancelled.

        Resuming from ``from_revision`` replays exactly the changes after it. When etcd has
        compacted that history (or never had it), a fresh snapshot flagged ``compacted`` comes
        first instead. An unknown application is an empty snapshot. Ends with UNAVAILABLE when
        etcd goes away; the client resumes from the last revision it saw.
        """
        if from_revision < 0:
            raise InvalidArgument(f"from_revision {from_revision} must be >= 0")
        prefix = names.watch_prefix(app)
        if not app.namespace and not app.name:
            if not who.sees_all:
                raise PermissionDenied(
                    f"watching every namespace needs an admin token; {who.describe()} may watch its own "
                    f"({', '.join(who.namespaces) or 'none'})"
                )
        else:
            who.require_visible(
                app.namespace or names.DEFAULT_NAMESPACE, app.name or "*", "namespace or application"
            )
        resume = from_revision
        stale = False
        while True:
            if resume == 0 or stale:
                values, revision = await self._range(prefix)
                yield with_endpoints(Event(type=Event.SNAPSHOT, revision=revision, compacted=stale), values)
                resume = revision
            stale = False
            async for event in self._deltas(prefix, resume):
                if event is None:
                    stale = True
                    break
                resume = event.revision
                yield event
            else:
                return

    async def _deltas(self, prefix: bytes, after: int) -> AsyncIterator[discovery_pb2.WatchEvent | None]:
        """Changes under ``prefix`` after revision ``after``; yields None when that history is gone."""
        with _etcd_errors():
            await self._etcd.connect()
            call = aetcd.rpc.WatchStub(self._etcd.channel).Watch()
            try:
                create = aetcd.rpc.WatchCreateRequest(
                    key=prefix,
                    range_end=etcd_utils.prefix_range_end(prefix),
                    start_revision=after + 1,
                    prev_kv=True,
                )
                await call.write(aetcd.rpc.WatchRequest(create_request=create))
                while True:
                    response = await call.read()
                    if response is grpc.aio.EOF:
                        raise Unavailable("etcd closed the watch stream")
                    if response.compact_revision:
                        yield None
                        return
                    if response.created and response.header.revision < after:
                        # The client saw revisions this etcd never had (its data was replaced).
                        yield None
                        return
                    if response.canceled:
                        raise Unavailable(f"etcd cancelled the watch: {response.cancel_reason}")
                    for event in group_changes(response.events):
                        yield event
            finally:
                call.cancel()
