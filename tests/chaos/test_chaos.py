"""The chaos suite, short: one supervised stack under SDK unary, streaming, broker async and
direct-ingress load, and each part killed in turn (replica, proxy, master, a direct-ingress
replica, the direct app's master, agent, keeper, discovery, broker, Redis, etcd). The Ray worker
node (with proxies, replicas and direct-ingress replicas on it) and a whole serving cluster are
killed in tests/integration/dataplane/test_multinode.py, tests/integration/direct/
test_direct_multinode.py and tests/integration/keeper/test_failover.py, on the clusters those need."""

from __future__ import annotations

import json

import pytest

from servefleet import chaos

pytestmark = [pytest.mark.slow, pytest.mark.ray, pytest.mark.timeout(1800)]

#: Parts whose death must refuse Submits while they are down: the caller is told (UNAVAILABLE),
#: nothing is queued, so nothing is lost; how many depends on how long the restart takes.
REFUSE_SUBMITS = {"broker", "redis"}
#: Parts on a stream's path after its first response: a stream that already has responses when
#: its proxy or replica dies is cut (the SDK must not retry it: the caller would get them twice).
#: Nothing else may cut a stream, and unary and direct calls lose nothing to any part: they are
#: retried on the other proxy / replica / direct ingress within their deadline.
CUTS_STREAMS = {"proxy", "replica"}


def test_every_part_killed_in_turn_loses_nothing() -> None:
    outcomes = chaos.run(before_s=1.5, after_s=1.5, progress=print)
    print(json.dumps(chaos.table(outcomes), indent=1))
    for o in outcomes:
        unary, stream, direct, tickets = (o.kinds[k] for k in ("unary", "stream", "direct", "async"))
        assert unary.ok > 0 and stream.ok > 0 and direct.ok > 0, o  # load went on
        assert tickets.ok > 0 or o.part in REFUSE_SUBMITS, o
        for kind, count in o.kinds.items():
            assert (count.never_completed, count.duplicated) == (0, 0), (kind, o)
        assert unary.failed == direct.failed == 0, o
        assert tickets.failed == 0 and (tickets.refused == 0 or o.part in REFUSE_SUBMITS), o
        # Exactly the streams cut mid-way fail, and only streams already running when the part died:
        # at most one per stream caller (each has one stream in flight), and only for its path.
        assert stream.failed == stream.cut, o
        assert stream.cut <= (chaos.CALLERS["stream"] if o.part in CUTS_STREAMS else 0), o
        assert all(started <= o.killed_at[1] for started in stream.cut_started), o
