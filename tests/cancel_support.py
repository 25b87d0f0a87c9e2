"""Cancelling a task while it holds a connection, for the tests of what the holder sees."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from typing import Any

import pytest


async def cancelled_once_running(work: Callable[[], Coroutine[Any, Any, None]],
                                 running: asyncio.Event, after: float = 0.1) -> asyncio.Task[None]:
    """`work()` run as a task, cancelled `after` seconds into its block (once it sets
    `running`, so that a statement is under way); it must end cancelled."""
    task = asyncio.create_task(work())
    await running.wait()
    await asyncio.sleep(after)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    return task
