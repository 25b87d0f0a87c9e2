"""What reaches the running loop's exception handler during a test ("Future exception was never
retrieved", "Task exception was never retrieved")."""

from __future__ import annotations

import asyncio
import contextlib
import gc
from collections.abc import Iterator
from typing import Any


@contextlib.contextmanager
def caught_by_loop() -> Iterator[list[dict[str, Any]]]:
    """The contexts the running loop's exception handler is given while the block runs."""
    loop = asyncio.get_running_loop()
    errors: list[dict[str, Any]] = []
    old = loop.get_exception_handler()
    loop.set_exception_handler(lambda _, context: errors.append(context))
    try:
        yield errors
    finally:
        loop.set_exception_handler(old)


async def collected(errors: list[dict[str, Any]]) -> list[str]:
    """`errors` once every dropped future has been collected (and would have been reported)."""
    for _ in range(3):
        gc.collect()
        await asyncio.sleep(0.05)
    return [f"{context.get('message')}: {context.get('exception')!r}" for context in errors]
