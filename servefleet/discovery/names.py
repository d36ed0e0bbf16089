"""Endpoint validation and the etcd key layout of discovery (applications are ``AppId``s).

Pure functions shared by the discovery service, the registration helper and the SDK, so an
endpoint is checked the same way on both sides of the wire.
"""

from __future__ import annotations

import math
import re

from servefleet.api import common_pb2, discovery_pb2
from servefleet.common.appid import DEFAULT_NAMESPACE, AppId, check_name
from servefleet.common.config import settings
from servefleet.common.errors import InvalidArgument
from servefleet.common.net import split_address

# Endpoint ids and kinds (chosen by servers, not by the application naming rule): DNS-label-like,
# plus dots, underscores and capitals; never "/" so an id is exactly one key segment.
_SEGMENT = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9._-]{0,61}[A-Za-z0-9])?$")


def check_segment(what: str, value: str) -> str:
    """``value`` when it is a valid endpoint id or kind; InvalidArgument saying what is wrong."""
    if not value:
        raise InvalidArgument(f"{what} is empty")
    if not _SEGMENT.match(value):
        raise InvalidArgument(
            f"{what} {value!r} is not a valid name: use 1-63 letters, digits, '.', '_' or '-', "
            "starting and ending with a letter or digit"
        )
    return value


def root() -> bytes:
    return f"{settings.etcd_prefix}/discovery/endpoints/".encode()


def lease_key(lease_id: int) -> bytes:
    """Who registered on a lease (bound to the lease itself, so it goes when the lease goes)."""
    return f"{settings.etcd_prefix}/discovery/leases/{lease_id}".encode()


def watch_prefix(app: common_pb2.AppRef) -> bytes:
    """Key prefix for one application, one namespace (empty name) or everything (both empty)."""
    if not app.name and not app.namespace:
        return root()
    if not app.name:
        namespace = check_name(app.namespace or DEFAULT_NAMESPACE, "application namespace")
        return root() + f"{namespace}/".encode()
    return root() + f"{AppId.parse(app).key}/".encode()


def endpoint_key(app: common_pb2.AppRef, endpoint_id: str) -> bytes:
    return root() + f"{AppId.parse(app).key}/{check_segment('endpoint id', endpoint_id)}".encode()


def endpoint_from_key(key: bytes) -> discovery_pb2.Endpoint:
    """The identity (app and id) of an endpoint whose record is gone, recovered from its key."""
    namespace, name, endpoint_id = key[len(root()) :].decode().split("/", 2)
    return discovery_pb2.Endpoint(id=endpoint_id, app=common_pb2.AppRef(namespace=namespace, name=name))


def check_ttl(ttl_s: int) -> int:
    """The TTL to grant: the service default for 0, else ``ttl_s`` when within the allowed range."""
    if ttl_s == 0:
        return settings.discovery_ttl_s
    low, high = settings.discovery_min_ttl_s, settings.discovery_max_ttl_s
    if not low <= ttl_s <= high:
        raise InvalidArgument(f"ttl_s {ttl_s} is out of range: use {low}..{high} seconds (0: default)")
    return ttl_s


def check_endpoint(endpoint: discovery_pb2.Endpoint) -> discovery_pb2.Endpoint:
    """A normalised copy of ``endpoint`` (namespace filled in); InvalidArgument on the first problem."""
    out = discovery_pb2.Endpoint()
    out.CopyFrom(endpoint)
    out.app.CopyFrom(AppId.parse(endpoint.app).ref())
    if endpoint.id:
        check_segment("endpoint id", endpoint.id)
    check_segment("endpoint kind", endpoint.kind)
    try:
        split_address(endpoint.address)
    except ValueError as exc:
        raise InvalidArgument(f"endpoint address: {exc}") from None
    for field in ("weight", "load_hint"):
        value = getattr(endpoint, field)
        if not math.isfinite(value) or value < 0:
            raise InvalidArgument(f"endpoint {field} {value} must be a finite number >= 0")
    for label in endpoint.labels:
        if not label:
            raise InvalidArgument("endpoint label names must not be empty")
    return out
