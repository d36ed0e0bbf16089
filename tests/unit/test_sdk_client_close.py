"""Closing the blocking Client ends everything on its loop (no "Task was destroyed" at exit)."""

from __future__ import annotations

import asyncio
import gc
import logging

import pytest

from servefleet.sdk import Client


def test_close_leaves_no_pending_task_behind(caplog: pytest.LogCaptureFixture) -> None:
    client = Client("127.0.0.1:1")  # never contacted: nothing here calls discovery

    async def leave_a_task() -> asyncio.Task[None]:
        # What a channel closing with grace (or a gRPC callback) leaves running at close.
        return asyncio.get_running_loop().create_task(asyncio.sleep(60))

    leftover = client._run(leave_a_task())
    with caplog.at_level(logging.ERROR, logger="asyncio"):
        client.close()
        del client
        gc.collect()
    assert leftover.cancelled()
    assert "Task was destroyed" not in caplog.text
