"""asyncpg's ``loop=`` pool option: taken when it names the loop the pool is opened on.

A pool uses the event loop that runs its `open()` (as asyncpg's does once it is awaited), so
``loop=`` adds nothing but a check: code written for asyncpg (``create_pool(dsn,
loop=asyncio.get_running_loop())``) keeps working, and a loop other than the one that opens the
pool is refused at `open()`, before anything is connected, rather than left to fail later.
"""

from __future__ import annotations

import asyncio

from asyncpool.errors import PoolConfigError


def checked(loop: object) -> asyncio.AbstractEventLoop | None:
    """``loop=`` as `Pool()` takes it: None (asyncpg's default, asking for nothing) or an event
    loop; anything else is a `PoolConfigError`."""
    if loop is None or isinstance(loop, asyncio.AbstractEventLoop):
        return loop
    raise PoolConfigError(
        f"loop={type(loop).__name__}: must be an asyncio event loop (the one that opens the "
        "pool) or None; a pool uses the event loop it is opened on")


def refuse_another(pool_name: str, given: asyncio.AbstractEventLoop | None) -> None:
    """Raise `PoolConfigError` if `given` (``loop=``) is not the running loop, which `open()`
    is about to bind the pool to."""
    if given is None or asyncio.get_running_loop() is given:
        return
    state = "a closed event loop" if given.is_closed() else "another event loop"
    raise PoolConfigError(
        f"pool {pool_name!r}: loop= names {state}, not the one running open(): a pool uses "
        "the loop it is opened on; open it on the loop given (loop.run_until_complete(pool.open()), "
        "or from a task of that loop), or leave loop= out")
