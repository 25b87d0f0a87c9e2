"""Logins cancelled at random moments, and what the loop is told of them afterwards: for the
tests that no exception of a cancelled login is left never retrieved."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import random
from collections.abc import AsyncIterator

from asyncpool import Pool


@contextlib.asynccontextmanager
async def loop_messages(*, debug: bool = False) -> AsyncIterator[list[str]]:
    """The messages the running loop's exception handler gets meanwhile (asyncio's debug mode on
    if `debug`); garbage is collected before the end, so that an exception never retrieved is
    reported in time."""
    loop = asyncio.get_running_loop()
    seen: list[str] = []
    handler, was_debug = loop.get_exception_handler(), loop.get_debug()
    loop.set_exception_handler(lambda _, context: seen.append(str(context.get("message"))))
    if debug:
        loop.set_debug(True)
    try:
        yield seen
        await asyncio.sleep(0.1)
        gc.collect()
        await asyncio.sleep(0)
    finally:
        loop.set_exception_handler(handler)
        loop.set_debug(was_debug)


async def cancel_logins(pool: Pool, times: int, seed: int = 46) -> None:
    """Log in anew `times` times, each login cancelled at a random moment of its first 4 ms
    (seeded)."""
    rng = random.Random(seed)
    for _ in range(times):
        pool.expire_all()  # each acquire logs in anew

        async def use() -> None:
            async with pool.acquire() as conn:
                await conn.fetchval("SELECT 1")

        task = asyncio.create_task(use())
        await asyncio.sleep(rng.uniform(0, 0.004))
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
