"""Waiting in a test for something another task or thread brings about."""

from __future__ import annotations

import asyncio
from collections.abc import Callable


async def until(check: Callable[[], object], within: float = 5.0) -> None:
    """Poll `check` on the running loop until it is true; fail if it is not within `within` s."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    while not check():
        assert loop.time() < deadline, f"condition not reached within {within} s"
        await asyncio.sleep(0.005)
