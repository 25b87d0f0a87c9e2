"""The errors a pool raises when it is used where it cannot be: closed (or not open yet), or
from another event loop or thread than the one it was opened on. Each says what to do instead."""

from __future__ import annotations

import asyncio
import threading
from threading import get_ident
from typing import TYPE_CHECKING

from asyncpool.errors import PoolClosedError, PoolError
from asyncpool.pool.state import CLOSING, NEW

if TYPE_CHECKING:
    from asyncpool.pool.slots import Slots


def refuse_running_elsewhere(slots: Slots, call: str, how: str | None = None) -> None:
    """For the synchronous calls that close connections (`terminate`, `expire_all`) or change
    what logins use (`set_connect_args`): raise a `PoolError` while the pool's loop runs in
    another thread (asyncio's transports are not thread-safe: done from there, a waiter woke
    only when something else woke the loop, and in debug mode the call failed half-way; a
    login under way could read the new config with the old connector). With the loop stopped,
    any thread may. `how`: the way to call it on that loop (default: call_soon_threadsafe)."""
    loop = slots.loop
    if loop is None or not loop.is_running() or (
            loop._thread_id == get_ident() if slots.loop_has_thread_id  # type: ignore[attr-defined]
            else asyncio._get_running_loop() is loop):
        return
    default = f"loop.call_soon_threadsafe(pool.{call.rstrip('()')})"
    raise PoolError(
        f"pool {slots.name!r}: {call} was called from thread "
        f"{threading.current_thread().name!r} while the pool's loop runs in another thread; "
        f"call it on that loop: {how or default}")


def other_loop_error(slots: Slots, loop: asyncio.AbstractEventLoop) -> PoolError:
    """Used on a loop it was not opened on: asyncpg connections belong to their loop. The
    advice depends on what happened to the pool's loop."""
    here = threading.current_thread().name
    if loop.is_closed():
        what = (
            "the loop that opened it has ended (an asyncio.run() that returned, a test's "
            "event loop torn down, a TestClient used without `with`)"
        )
        advice = (
            "open the pool on the loop that uses it: in FastAPI's lifespan (and test with "
            "`with TestClient(app):`), in a pytest fixture with the same loop scope as the "
            "tests that use it, or on Lambda with asyncpool.integrations.lambda_runner"
        )
    elif here != slots.opened_in:
        what = f"its loop runs in thread {slots.opened_in!r} and this call comes from thread {here!r}"
        advice = (
            "run the call on the pool's loop (asyncio.run_coroutine_threadsafe(coro, loop)) "
            "or give this thread a pool of its own"
        )
    else:
        what = "this thread now runs a different event loop than the one that opened it"
        advice = (
            "keep one loop for the pool's life: open and use it under the same asyncio.run(), "
            "or on Lambda use asyncpool.integrations.lambda_runner"
        )
    return PoolError(f"pool {slots.name!r} was opened on another event loop: {what}; {advice}")


#: Why a caller in line got no connection when the first open() failed (it is being undone).
OPEN_FAILED = ("its open() failed or was cancelled while this caller waited for a connection; the "
               "pool can be opened again")


def closed_error(slots: Slots) -> PoolClosedError:
    if slots.undoing_open:
        return PoolClosedError(f"pool {slots.name!r}: {OPEN_FAILED}")
    if slots.state is NEW:
        return PoolClosedError(f"the pool {slots.name!r} is not open yet: await pool.open() first (or "
                               "'pool = await asyncpool.create_pool(...)')")
    if slots.state is CLOSING:
        # close() may wait seconds for held connections: "is closed" then sent readers of
        # the log to look for a close that had not finished (asyncpg says "pool is closing").
        return PoolClosedError(f"the pool {slots.name!r} is closing: close() or terminate() "
                               "has begun, so it hands out no more connections")
    return PoolClosedError(f"the pool {slots.name!r} is closed")
