"""The stack's process supervisor: ``python -m servefleet.supervisor --state-dir DIR``.

``servefleet up`` starts it once every part is healthy (foreground and ``--detach`` alike), with the
stack's own environment, so a part it restarts runs exactly as ``up`` started it. It watches the
pid of every part ``up`` started; a part whose process is gone is started again from the same
command line (same ports, same data dir: etcd and Redis come back with their data) after a
jittered, growing backoff (``SERVEFLEET_SUPERVISOR_BACKOFF_S`` doubling up to
``SERVEFLEET_SUPERVISOR_MAX_BACKOFF_S``; a part that then stays up ``..._STABLE_S`` starts again from
the first step). Each restart is recorded in ``stack.json`` (``restarts``, ``last_exit``), which is
what ``servefleet status`` shows. ``servefleet down`` stops the supervisor before anything else, so
nothing it stops is started again.
"""

from __future__ import annotations

import argparse
import logging
import os
import random
import signal
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from servefleet import stack
from servefleet.common.config import settings
from servefleet.common.logs import setup_logging
from servefleet.common.retry import Backoff

log = logging.getLogger(__name__)


@dataclass
class _Watch:
    started_at: float
    failures: int = 0  # consecutive restarts without a stable run in between
    next_try: float = 0.0


class Supervisor:
    """One pass (``check``) restarts what died and is due; ``run`` repeats it until stopped."""

    def __init__(
        self,
        state_dir: Path,
        *,
        env: dict[str, str] | None = None,
        clock: Callable[[], float] = time.monotonic,
        rng: random.Random | None = None,
    ) -> None:
        self.state_dir = state_dir
        self.env = dict(os.environ if env is None else env)
        self._clock = clock
        self._rng = rng or random.Random()
        self._watches: dict[str, _Watch] = {}
        self._children: dict[int, subprocess.Popen[bytes]] = {}  # the processes it started itself

    def _delay(self, failures: int) -> float:
        backoff = Backoff(settings.supervisor_backoff_s, settings.supervisor_max_backoff_s, jitter=0.5)
        return backoff.delay(failures + 1, self._rng)  # base * 2**failures, capped, half-jittered

    def check(self) -> list[str]:
        """Restart every started part whose process is gone and whose backoff has passed; returns
        the names restarted."""
        parts = stack.load(self.state_dir)
        now = self._clock()
        restarted: list[str] = []
        changed = False
        for part in parts:
            if part.external or not part.pid or part.name == "supervisor":
                continue
            watch = self._watches.setdefault(part.name, _Watch(started_at=now))
            if stack.pid_alive(part.pid):
                if watch.failures and now - watch.started_at >= settings.supervisor_stable_s:
                    watch.failures = 0
                continue
            if watch.next_try == 0.0:  # just found dead: wait out the backoff first
                watch.next_try = now + self._delay(watch.failures)
                part.last_exit = self._exit_of(part.pid)
                changed = True
                log.warning("part died", extra={"part": part.name, "exit": part.last_exit})
            if now < watch.next_try:
                continue
            child = stack.spawn(part, self.state_dir, self.env)
            self._children[child.pid] = child
            part.pid = child.pid
            part.restarts += 1
            watch.started_at, watch.next_try = now, 0.0
            watch.failures += 1
            restarted.append(part.name)
            log.warning(
                "part restarted", extra={"part": part.name, "pid": part.pid, "restarts": part.restarts}
            )
        if restarted or changed:
            stack.save(self.state_dir, parts)
        return restarted

    def _exit_of(self, pid: int) -> str:
        """How ``pid`` ended: its exit status when this supervisor started it (reaping it), else
        only when it was seen gone (``up`` started it, from another process)."""
        when = time.strftime("%H:%M:%S")
        child = self._children.pop(pid, None)
        code = child.wait() if child is not None else None
        if code is None:
            return f"gone at {when}"
        if code < 0:
            return f"killed by {signal.Signals(-code).name} at {when}"
        return f"exit {code} at {when}"

    def run(self, stop: threading.Event, *, interval_s: float = 0.2) -> None:
        while not stop.is_set():
            try:
                self.check()
            except stack.StackError:
                return  # stack.json gone: `down` ran
            except Exception:
                log.exception("supervisor pass failed")
            stop.wait(interval_s)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m servefleet.supervisor", description=__doc__)
    parser.add_argument("--state-dir", type=Path, required=True)
    args = parser.parse_args(argv)
    setup_logging("supervisor")
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    Supervisor(args.state_dir).run(stop)


if __name__ == "__main__":
    main()
