"""How a retired connection is closed: politely or at once, never cutting short a cancel
request in flight (closing that request's socket early crashes PgBouncer 1.18, pgbouncer#801),
and never touching one inherited across a fork."""

from __future__ import annotations

import asyncio
import contextlib
import functools
from typing import TYPE_CHECKING, Any

from asyncpool.connect import driver
from asyncpool.pool.forks import FORKS
from asyncpool.pool.resets import RELEASE_TIMEOUT

if TYPE_CHECKING:
    from asyncpool.pool.slots import Slots

# How long a graceful close may take before the connection is terminated.
_CLOSE_TIMEOUT = 2.0


def close_connection(slots: Slots, conn: Any, graceful: bool) -> None:
    if slots.forks != FORKS[0]:
        # Inherited: the socket and its event-loop registration are the parent's too. Leave
        # them alone: closing through the transport would take the socket out of the epoll
        # set the parent's loop shares, and a Terminate would end the parent's session.
        return
    loop = slots.loop
    if loop is None or loop.is_closed():
        with contextlib.suppress(Exception):
            conn.terminate()
        return
    if graceful and not conn.is_closed():
        task = slots._spawn(_close_gracefully(conn))
        slots.closing[task] = conn
        task.add_done_callback(functools.partial(_closed, slots))
        return
    if driver.pending_cancellations(conn):
        # Closed first, the pooler drops the request (its client is gone) and the statement
        # runs on; and where the request does not go on by itself (a connection class of the
        # user's), closing cuts it short, which crashes PgBouncer 1.18 (pgbouncer#801).
        # (close() and terminate() stop waiting sooner: `lifecycle`.)
        # (in `closing` too: the end of a Lambda invocation waits for it, `resets.settle`)
        task = slots._spawn(_terminate_after(conn))
        slots.closing[task] = conn
        task.add_done_callback(functools.partial(_closed, slots))
    else:
        conn.terminate()


def _closed(slots: Slots, task: asyncio.Task[Any]) -> None:
    slots.closing.pop(task, None)


async def _cancel_requests_done(conn: Any) -> None:
    """Wait (up to RELEASE_TIMEOUT) until no cancel request is in flight on `conn`: closing it
    would cut one short, and closing a cancel request's socket early crashes PgBouncer 1.18
    (pgbouncer#801). Asked again after each wait: a holder cancelled just before (a leak
    reclaim) makes asyncpg send a request of its own once it runs, beside the pool's; and
    after each request done, since the connection closed meanwhile (terminate()) leaves the
    requests still in flight to go on alone (`driver.pending_cancellations`)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + RELEASE_TIMEOUT
    while True:
        await asyncio.sleep(0)  # let a holder cancelled just now reach asyncpg's cancel
        pending = driver.pending_cancellations(conn)
        remaining = deadline - loop.time()
        if not pending or remaining <= 0:
            return
        await asyncio.wait(pending, timeout=remaining, return_when=asyncio.FIRST_COMPLETED)


async def _close_gracefully(conn: Any) -> None:
    try:
        await _cancel_requests_done(conn)
        await conn.close(timeout=_CLOSE_TIMEOUT)
    except Exception:
        conn.terminate()
    except BaseException:
        conn.terminate()  # terminate() or a cancelled close() wants it gone now
        raise


async def _terminate_after(conn: Any) -> None:
    try:
        await _cancel_requests_done(conn)
    finally:
        conn.terminate()
