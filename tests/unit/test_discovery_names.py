"""Application names, endpoint validation and etcd event translation (no etcd needed)."""

from __future__ import annotations

import pytest
from aetcd import rpc

from servefleet.api import common_pb2, discovery_pb2
from servefleet.common.appid import AppId
from servefleet.common.errors import InvalidArgument
from servefleet.discovery import names
from servefleet.discovery.core import group_changes, matches, with_endpoints

Event = discovery_pb2.WatchEvent


def test_keys_round_trip_and_prefixes_nest() -> None:
    app = AppId.parse("team/m").ref()
    key = names.endpoint_key(app, "e1")
    back = names.endpoint_from_key(key)
    assert (back.app, back.id) == (app, "e1")
    assert key.startswith(names.watch_prefix(app))
    assert names.watch_prefix(app).startswith(names.watch_prefix(common_pb2.AppRef(namespace="team")))
    assert names.watch_prefix(common_pb2.AppRef()) == names.root()
    # "team/m" must not match "team/m2": every prefix ends with a separator.
    assert not names.endpoint_key(AppId.parse("team/m2").ref(), "e1").startswith(names.watch_prefix(app))


def test_check_ttl_range() -> None:
    assert names.check_ttl(0) > 0
    assert names.check_ttl(7) == 7
    for bad in (-1, 100_000):
        with pytest.raises(InvalidArgument, match="out of range"):
            names.check_ttl(bad)


def test_check_endpoint_normalises_and_rejects() -> None:
    ok = discovery_pb2.Endpoint(app=common_pb2.AppRef(name="m"), kind="proxy", address="[::1]:80")
    assert names.check_endpoint(ok).app.namespace == "default"
    for change, words in [
        ({"address": "host"}, "not host:port"),
        ({"address": "h:70000"}, "not host:port"),
        ({"kind": ""}, "kind is empty"),
        ({"load_hint": float("nan")}, "load_hint"),
        ({"id": "x/y"}, "endpoint id"),
    ]:
        bad = discovery_pb2.Endpoint()
        bad.CopyFrom(ok)
        for field, value in change.items():
            setattr(bad, field, value)
        with pytest.raises(InvalidArgument, match=words):
            names.check_endpoint(bad)


def _put(endpoint: discovery_pb2.Endpoint, revision: int, version: int) -> rpc.Event:
    key = names.endpoint_key(endpoint.app, endpoint.id)
    kv = rpc.KeyValue(key=key, value=endpoint.SerializeToString(), mod_revision=revision, version=version)
    return rpc.Event(type=rpc.Event.PUT, kv=kv)


def _delete(endpoint: discovery_pb2.Endpoint, revision: int, *, with_prev: bool) -> rpc.Event:
    key = names.endpoint_key(endpoint.app, endpoint.id)
    prev = rpc.KeyValue(key=key, value=endpoint.SerializeToString()) if with_prev else rpc.KeyValue()
    return rpc.Event(type=rpc.Event.DELETE, kv=rpc.KeyValue(key=key, mod_revision=revision), prev_kv=prev)


def test_group_changes_maps_kinds_and_merges_one_revision() -> None:
    app = AppId.parse("m").ref()
    a, b, c = (discovery_pb2.Endpoint(id=i, app=app, kind="proxy", address="h:1") for i in "abc")
    events = group_changes(
        [
            _put(a, 10, 1),
            _put(a, 11, 2),
            # a lease expiry: two records gone at one revision -> one REMOVED event
            _delete(b, 12, with_prev=True),
            _delete(c, 12, with_prev=False),
            rpc.Event(
                type=rpc.Event.PUT, kv=rpc.KeyValue(key=b"x", value=b"\xff\xff", mod_revision=13, version=1)
            ),
        ]
    )
    assert [(e.type, e.revision, [x.id for x in e.endpoints]) for e in events] == [
        (Event.ADDED, 10, ["a"]),
        (Event.UPDATED, 11, ["a"]),
        (Event.REMOVED, 12, ["b", "c"]),
    ]
    assert events[2].endpoints[0].address == "h:1"  # from prev_kv
    assert events[2].endpoints[1].app == app  # from the key alone


def test_matches_kind_and_labels() -> None:
    e = discovery_pb2.Endpoint(kind="proxy", labels={"zone": "a", "node": "n1"})
    assert matches(e, "", {})
    assert matches(e, "proxy", {"zone": "a"})
    assert not matches(e, "direct", {})
    assert not matches(e, "", {"zone": "b"})


def test_with_endpoints_splices_records_and_skips_broken_ones() -> None:
    records = [discovery_pb2.Endpoint(id=f"e{i}", kind="proxy", labels={"zone": "a"}) for i in range(300)]
    values = [r.SerializeToString() for r in records]
    snapshot = with_endpoints(Event(type=Event.SNAPSHOT, revision=9, compacted=True), values)
    assert list(snapshot.endpoints) == records
    assert (snapshot.type, snapshot.revision, snapshot.compacted) == (Event.SNAPSHOT, 9, True)
    broken = with_endpoints(discovery_pb2.ResolveResponse(revision=4), [values[0], b"\xff\xff", values[1]])
    assert [e.id for e in broken.endpoints] == ["e0", "e1"] and broken.revision == 4
