"""The stack supervisor's restart rule, on a real (tiny) child process and an injected clock."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

from servefleet import stack
from servefleet.supervisor import Supervisor

SLEEPER = [sys.executable, "-c", "import time; time.sleep(60)"]


def dead_pid() -> int:
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


def test_a_dead_part_restarts_after_a_growing_backoff_and_the_restarts_are_recorded(tmp_path: Path) -> None:
    (tmp_path / "logs").mkdir()
    stack.save(tmp_path, [stack.Part("sleeper", "127.0.0.1:1", SLEEPER, pid=dead_pid())])
    now = [100.0]
    supervisor = Supervisor(tmp_path, clock=lambda: now[0], rng=random.Random(1))
    try:
        assert supervisor.check() == []  # seen dead: the first restart waits 0.5-1 s
        [part] = stack.load(tmp_path)
        assert part.restarts == 0 and part.last_exit.startswith("gone at ")
        now[0] += 1.0
        assert supervisor.check() == ["sleeper"]
        [part] = stack.load(tmp_path)
        assert part.restarts == 1 and stack.pid_alive(part.pid)

        os.kill(part.pid, signal.SIGKILL)
        while stack.pid_alive(part.pid):  # the signal is sent; the process ends a moment later
            time.sleep(0.01)
        now[0] += 0.1
        assert supervisor.check() == []
        assert stack.load(tmp_path)[0].last_exit.startswith("killed by SIGKILL")
        now[0] += 0.9  # the second delay is 1-2 s: not yet
        assert supervisor.check() == []
        now[0] += 1.2
        assert supervisor.check() == ["sleeper"]
        assert stack.load(tmp_path)[0].restarts == 2
    finally:
        for part in stack.load(tmp_path):
            if stack.pid_alive(part.pid):
                os.kill(part.pid, signal.SIGKILL)


def test_external_parts_and_the_supervisor_itself_are_left_alone(tmp_path: Path) -> None:
    parts = [stack.Part("etcd", "127.0.0.1:1"), stack.Part("supervisor", "", SLEEPER, pid=dead_pid())]
    stack.save(tmp_path, parts)
    assert Supervisor(tmp_path, clock=lambda: 1e6).check() == []
