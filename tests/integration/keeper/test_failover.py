"""Cluster failover with two real Ray clusters: an app on a cluster that goes silent past the grace
period (``SERVEFLEET_KEEPER_CLUSTER_FAILOVER_AFTER_S``, 10 s here) is re-placed on the other one,
SDK callers follow it through discovery, and a cluster that comes back is swept of its stale copy."""

from __future__ import annotations

import os
import signal
import threading
import time
from collections import Counter

import numpy as np
import pytest

from servefleet import Client
from servefleet.api import keeper_pb2
from servefleet.common.net import wait_for
from tests.integration.keeper import test_fleet
from tests.integration.keeper.test_fleet import AppState, Fleet, actors_of, iris, named_actors

pytestmark = [pytest.mark.slow, pytest.mark.ray]
fleet = test_fleet.fleet  # the module-scoped fixture: this module gets two clusters of its own
FEATURES = {"features": np.array([[5.0, 3.4, 1.5, 0.2], [6.7, 3.0, 5.6, 2.1]], dtype=np.float32)}


def deploy(fleet: Fleet, name: str) -> tuple[str, str]:
    """Submit a one-cluster iris app; (cluster it runs on, the other cluster)."""
    fleet.stub().SubmitApplication(
        keeper_pb2.SubmitApplicationRequest(spec=iris(name, spread=1)), metadata=fleet.md(), timeout=10
    )
    [placed] = [p.cluster for p in fleet.wait_state(name, AppState.RUNNING, "1").placements]
    [other] = [c for c in fleet.clusters if c != placed]
    return placed, other


def wait_moved(fleet: Fleet, name: str, to: str, timeout: float = 180) -> None:
    def moved() -> bool:
        status = fleet.status(name)
        return status.state == AppState.RUNNING and [p.cluster for p in status.placements] == [to]

    wait_for(moved, timeout=timeout, interval=0.2, what=f"{name} RUNNING on {to} alone")


def delete(fleet: Fleet, name: str) -> None:
    ref = keeper_pb2.DeleteApplicationRequest(app={"namespace": "default", "name": name})
    fleet.stub().DeleteApplication(ref, metadata=fleet.md(), timeout=10)
    wait_for(lambda: fleet.gone(name), timeout=120, interval=0.5, what=f"{name} deleted")


class SdkLoad:
    """Closed-loop SDK callers (threads over one Client) with a deadline longer than any move."""

    def __init__(
        self, discovery: str, app: str, *, token: str, threads: int = 4, deadline_s: float = 90.0
    ) -> None:
        self.client = Client(discovery, timeout=deadline_s, token=token)
        self.app = app
        self.ok = 0
        self.failures: Counter[str] = Counter()
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._call, daemon=True) for _ in range(threads)]

    def _call(self) -> None:
        while not self._stop.is_set():
            try:
                labels = self.client.infer(self.app, FEATURES)["label"]
                assert labels.tolist() == [0, 2]
                self.ok += 1
            except Exception as exc:
                self.failures[f"{type(exc).__name__}: {str(exc)[:120]}"] += 1

    def __enter__(self) -> SdkLoad:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=120)
        self.client.close()

    def wait_for_calls(self, count: int) -> None:
        start = self.ok
        wait_for(lambda: self.ok - start >= count, timeout=180, interval=0.1, what=f"{count} SDK calls")


def test_a_paused_agent_loses_its_app_and_is_swept_of_the_stale_copy_when_back(fleet: Fleet) -> None:
    placed, other = deploy(fleet, "drifter")
    agent = fleet.agents[placed].proc
    assert agent is not None
    os.killpg(agent.pid, signal.SIGSTOP)  # heartbeats stop; its Ray cluster and the app keep running
    try:
        wait_moved(fleet, "drifter", other)
        assert actors_of(named_actors(fleet.clusters[placed].address), "drifter")["master"] == 1  # stale
    finally:
        os.killpg(agent.pid, signal.SIGCONT)

    def swept() -> bool:
        counts = actors_of(named_actors(fleet.clusters[placed].address), "drifter")
        return counts == {"master": 0, "replica": 0, "proxy": 0}

    wait_for(swept, timeout=120, interval=1, what=f"the stale copy on {placed} removed")
    wait_moved(fleet, "drifter", other, timeout=30)  # and it stays where it was moved
    delete(fleet, "drifter")


class CallsFailed(AssertionError):
    """SDK calls failed although their deadline outlived the move."""


def test_sigkill_a_clusters_ray_head_and_agent_under_sdk_load_moves_the_app_losing_no_call(
    fleet: Fleet,
) -> None:
    placed, other = deploy(fleet, "mover")
    with SdkLoad(fleet.discovery, "mover", token=fleet.procs.admin_token()) as load:
        load.wait_for_calls(50)
        killed_at = time.monotonic()
        fleet.clusters[placed].kill()
        fleet.agents[placed].kill()
        wait_moved(fleet, "mover", other)
        moved_s = time.monotonic() - killed_at
        load.wait_for_calls(50)
        served_s = time.monotonic() - killed_at
    print(
        f"\nSIGKILL Ray head + agent of {placed}: RUNNING on {other} after {moved_s:.1f}s (grace 10 s), "
        f"50 calls served there by {served_s:.1f}s; {load.ok} ok, failures {dict(load.failures)}"
    )
    delete(fleet, "mover")
    if load.failures:
        raise CallsFailed(f"{sum(load.failures.values())} calls failed: {dict(load.failures)}")
