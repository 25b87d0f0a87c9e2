"""Returns that need a round trip first: a connection given back in a transaction, or with a
cancel finishing, is reset (ROLLBACK...) in a task of the pool's own before it is used again;
one given back with a statement still running is closed. `settle` waits for the resets left
running when a process is about to be frozen."""

from __future__ import annotations

import asyncio
import functools
import logging
from asyncio import get_running_loop
from contextvars import ContextVar
from typing import TYPE_CHECKING, Any

from asyncpool.connect import driver
from asyncpool.pool import logins
from asyncpool.pool.forks import pools_on_loop
from asyncpool.pool.record import LEASED, MOVING

if TYPE_CHECKING:
    from asyncpool.pool.lease import Lease
    from asyncpool.pool.record import ConnectionRecord
    from asyncpool.pool.slots import Slots

logger: logging.Logger = logging.getLogger("asyncpool.pool")

# How long a returned connection may spend being reset (cancel finishing, ROLLBACK).
RELEASE_TIMEOUT = 5.0
# Seconds given to logins just given up to close their sockets.
_STOPPED_LOGIN_WAIT = 0.05


class ResetsEnd:
    """The loop time (`at`) by which the reset of a connection returned in a context must end,
    when that is sooner than `RELEASE_TIMEOUT` from the return: an invocation's (`LambdaRunner`),
    since its environment may be frozen, or ended, after its deadline (a reset cut short closes
    the connection). None once the invocation is over: a task it started and left running
    carries the context on, and must not have every later return closed for it."""

    __slots__ = ("at",)

    def __init__(self, at: float | None) -> None:
        self.at: float | None = at


RESETS_END: ContextVar[ResetsEnd | None] = ContextVar("asyncpool_resets_end", default=None)


async def settle_loop(timeout: float, closes_within: float | None = None) -> None:
    """`settle` every pool open on the running loop, attached to a runner or not."""
    await settle(pools_on_loop(), timeout, closes_within)


async def settle(pools: list[Slots], timeout: float, closes_within: float | None = None) -> None:
    """Wait up to `timeout`, all `pools` together, for the resets of connections whose holders
    left before the reset ended (`Slots.checkin`); one still running then is cancelled and its
    connection closed, before this returns (a cancel request in flight is given what is left
    of `timeout`: closing under it crashes PgBouncer 1.18, pgbouncer#801).

    Connections the pools are closing (waiting for a cancel request in flight first: one
    SQLAlchemy invalidated after a cancelled statement, one whose check got no answer) get
    the same wait, at most `closes_within` seconds of it (None: no less), then are closed; so
    do the cancel requests of resets cut short. Nothing is kept by waiting for them (the
    connection is gone either way), and on a network that died none is ever answered: the
    end of a Lambda invocation waited for one up to its deadline's margin.

    The pools' own logins under way (a min_size refill ``open(wait=False)`` or housekeeping
    began, which no caller waits for) are waited for as the closes are, then given up: the
    freeze would cut them part-way, and the next checkout logs in itself. (A login takes tens
    of milliseconds: given up at once, each housekeeping round's refill in an invocation that
    did not use the pool was begun and dropped, one half-done login at the pooler each time.)

    For a process about to be frozen (the end of a Lambda invocation): a reset or a close left
    waiting would keep a pooler's server connection, and a transaction, until the thaw."""
    pending = {task: record for slots in pools for task, record in slots.resets.items()
               if not task.done()}
    loop = get_running_loop()
    deadline = loop.time() + max(timeout, 0.0)
    closes_by = deadline if closes_within is None else min(
        deadline, loop.time() + max(closes_within, 0.0))
    if pending:
        await _end_resets(pending, deadline, closes_by)
    closes = {task: conn for slots in pools for task, conn in slots.closing.items()
              if not task.done()}
    if closes:
        await asyncio.wait(closes, timeout=max(closes_by - loop.time(), 0.0))
        for task, conn in closes.items():
            if not task.done():
                conn.terminate()
    await _end_fills(pools, closes_by)


async def _end_fills(pools: list[Slots], until: float) -> None:
    """Wait until `until` (loop time) for the pools' own logins under way; give up the rest,
    their sockets closed before this returns."""
    loop = get_running_loop()
    fills = [attempt for slots in pools for attempt in slots.fills if not attempt.done()]
    if fills:
        await asyncio.wait(fills, timeout=max(until - loop.time(), 0.0))
    stopped = [attempt for slots in pools
               for attempt in logins.give_up_fills(slots, logins.BEFORE_PAUSE)]
    if stopped:
        # (A cancelled login closes its socket within a turn or two of the loop.)
        await asyncio.wait(stopped, timeout=_STOPPED_LOGIN_WAIT)


async def _end_resets(pending: dict[asyncio.Task[Any], ConnectionRecord], deadline: float,
                      requests_by: float) -> None:
    """Wait for `pending` resets until `deadline`; cancel those still running and close their
    connections (a cancel request in flight given what is left, up to `requests_by`)."""
    loop = get_running_loop()
    _, late = await asyncio.wait(pending, timeout=max(deadline - loop.time(), 0.0))
    for task in late:
        task.cancel()  # `_reset` retires its connection
    if late:
        await asyncio.wait(late)
    for task in late:
        conn = pending[task].conn
        requests = driver.pending_cancellations(conn)
        remaining = requests_by - loop.time()
        if requests and remaining > 0:
            await asyncio.wait(requests, timeout=remaining)
        conn.terminate()  # (at once, where `retire` would have waited for the request)


def retire_busy(slots: Slots, record: ConnectionRecord) -> None:
    """A connection returned while one of its statements still runs: whatever that
    statement leaves (an open transaction, its result) would reach the next holder, whose
    own statements would also fail ("another operation is in progress"). Its statement is
    cancelled where a cancel can arrive, and the connection closed (asyncpg's pool closes it
    too, when its reset fails)."""
    logger.warning(
        "pool %r: a connection was returned while one of its statements was still running "
        "(two statements at once on one connection, such as asyncio.gather over it); the "
        "statement was cancelled and the connection closed. Run one statement at a time on a "
        "connection, or take one connection per concurrent statement", slots.name)
    driver.request_cancel(record.conn)
    slots.retire(record, "returned busy")


def reset_timeout(loop: asyncio.AbstractEventLoop, timeout: float | None = None) -> float:
    """How long a returned connection's reset may take: `timeout` (None: `RELEASE_TIMEOUT`),
    and no later than the `RESETS_END` of the context (a Lambda invocation's)."""
    if timeout is None:
        timeout = RELEASE_TIMEOUT
    end = RESETS_END.get()
    if end is not None and end.at is not None:
        timeout = max(0.0, min(timeout, end.at - loop.time()))
    return timeout


async def checkin(slots: Slots, lease: Lease, timeout: float | None = None) -> None:
    """Finish returning a connection `checkin_nowait` found in need of a reset, within
    `timeout` (None: `RELEASE_TIMEOUT`; in any case by `RESETS_END`; a reset that takes
    longer closes the connection); the slot is never lost, even if cancelled part-way.

    The reset runs in a task of the pool's own, which the caller's cancellation does not
    reach: a holder cancelled again at every await (an anyio cancel scope: a Starlette
    streaming response whose client went away) would otherwise cancel each ROLLBACK, and
    every such return would cost a connection. The connection goes back in the caller's
    task when the caller is still there (before anyone else can take it, as before)."""
    record = lease.record
    assert slots.loop is not None
    reset = slots._spawn(_reset(slots, record, reset_timeout(slots.loop, timeout)))
    slots.resets[reset] = record
    reset.add_done_callback(functools.partial(_reset_done, slots))
    task = asyncio.current_task()
    # The caller's cancel requests so far: only a new one means the caller was cancelled.
    requests = task.cancelling() if task is not None else 0
    try:
        await asyncio.shield(reset)
    except asyncio.CancelledError:
        if reset.done():
            _put_reset(slots, record, reset)
        else:
            reset.add_done_callback(functools.partial(_put_reset, slots, record))
        if reset.cancelled() and task is not None and task.cancelling() <= requests:
            # The pool's close gave the reset up (`_end_resets`) and closed its connection:
            # the shield passes that on as a cancellation, which is not the caller's.
            return
        raise
    _put_reset(slots, record, reset)


def _reset_done(slots: Slots, task: asyncio.Task[bool]) -> None:
    slots.resets.pop(task, None)


async def _reset(slots: Slots, record: ConnectionRecord, timeout: float) -> bool:
    """Reset a returned connection; False if it failed (the connection is closed)."""
    try:
        with slots.observer.pool_statement("reset"):
            await driver.reset(record.conn, timeout, unsynced=record.parse_unsynced())
        record.sync_after = 0
    except Exception as exc:
        # Dropping the connection rolls its transaction back and the slot is restored: the
        # caller's own error (a query timeout, say) must not be replaced by this one.
        logger.info("pool %r: could not reset a returned connection (%s); closed it",
                    slots.name, type(exc).__name__)
        slots.retire(record, "reset failed")
        return False
    except BaseException:
        slots.retire(record, "reset failed")  # (the pool's tasks end: it is being closed)
        raise
    return True


def _put_reset(slots: Slots, record: ConnectionRecord, reset: asyncio.Task[bool]) -> None:
    if reset.cancelled() or reset.exception() is not None or not reset.result():
        return  # closed by `_reset`
    if record.place is not LEASED:
        return  # retired while it was being reset (close, terminate)
    record.lease = None
    record.place = MOVING
    assert slots.loop is not None
    now = slots.loop.time()
    record.touch(now, slots.validate_after)
    slots._put(record, now)
