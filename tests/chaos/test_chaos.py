"""The chaos suite, short: one supervised stack under SDK unary + broker async load, and each part
killed in turn (replica, proxy, master, agent, keeper, discovery, broker, Redis, etcd). The Ray
worker node and a whole serving cluster are killed in tests/integration/dataplane/test_multinode.py
and tests/integration/keeper/test_failover.py, on the clusters those need."""

from __future__ import annotations

import json

import pytest

from servefleet import chaos

pytestmark = [pytest.mark.slow, pytest.mark.ray, pytest.mark.timeout(1500)]

#: Parts whose death the platform must absorb with no unary call failed: replicas and proxies are
#: replaced behind the other one (the proxy and SDK retry elsewhere), and the control plane, broker,
#: Redis and etcd are not on the unary request path (discovery's clients keep their last set).
NO_UNARY_COST = set(chaos.ALL_PARTS)
#: Parts whose death must refuse Submits while they are down: the caller is told (UNAVAILABLE),
#: nothing is queued, so nothing is lost; how many depends on how long the restart takes.
REFUSE_SUBMITS = {"broker", "redis"}


def test_every_part_killed_in_turn_loses_nothing() -> None:
    outcomes = chaos.run(before_s=1.5, after_s=1.5, progress=print)
    print(json.dumps(chaos.table(outcomes), indent=1))
    for o in outcomes:
        assert o.unary_ok > 0 and (o.async_ok > 0 or o.part in REFUSE_SUBMITS), o  # load went on
        assert (o.async_lost, o.async_duplicated) == (0, 0), o  # every accepted ticket: one result
        if o.part in NO_UNARY_COST:
            assert o.unary_failed == 0, o
        if o.part not in REFUSE_SUBMITS:
            assert o.async_refused == 0, o
