"""Idle connections closed under the pool (``pg_terminate_backend``, ``idle_session_timeout``,
PgBouncer's ``KILL`` or ``client_idle_timeout``, RDS Proxy's idle client timeout, a restart):
retired as the close arrives, and `min_size` refilled, not at the next checkout or housekeeping
round (up to 5 s later), meanwhile counted as idle in `PoolStats` and the telemetry gauges.

asyncpg cleans a connection up when its protocol finds it lost (`driver.CLEANUP_LISTENERS`); a
turn of the loop later, if it is still idle in an open pool, it is retired as the housekeeping
would (`Slots.retire_lost`, reason "broken"). Nothing else is touched: a held connection is its
holder's (its next statement reports the loss), one being checked or reset is its checker's, and
one the pool closes itself is retired already. Nothing runs on the checkout path."""

from __future__ import annotations

import asyncio
import contextvars
import weakref
from typing import TYPE_CHECKING, cast

from asyncpool.connect import driver
from asyncpool.pool import housekeeping
from asyncpool.pool.backoff import Backoff
from asyncpool.pool.forks import FORKS
from asyncpool.pool.record import IDLE, ConnectionRecord, record_of
from asyncpool.pool.state import OPEN

if TYPE_CHECKING:
    from asyncpool.pool.slots import Slots

#: Why such a connection is retired: as the checkout check and the housekeeping say of an idle
#: connection found closed.
REASON = "broken"


def connection_cleaned_up(conn: object) -> None:
    """`driver.CLEANUP_LISTENERS`' listener: an idle connection of an open pool that asyncpg
    found closed is retired a turn of the loop later (`retire_if_idle`), out of asyncpg's
    protocol callback. Only on the pool's loop, in its thread, while that loop is open."""
    record = record_of(conn)
    if record is None or record.place is not IDLE:
        return  # retired (the pool closed it), held, being checked or reset: not ours here
    slots = cast("Slots", record.owner)
    loop = slots.loop
    if loop is None or loop.is_closed() or asyncio._get_running_loop() is not loop:
        return  # (the housekeeping, or the next checkout, finds it)
    loop.call_soon(retire_if_idle, record)


def retire_if_idle(record: ConnectionRecord) -> None:
    """Retire `record`'s connection if it is still idle in an open pool, and start a refill if
    that leaves fewer than `min_size`. A checkout in between took it (then its holder finds it
    lost), or found it closed and retired it (`Slots.retire_lost`): nothing left to do."""
    slots = cast("Slots", record.owner)
    if record.place is not IDLE or slots.state is not OPEN or slots.forks != FORKS[0]:
        return
    slots.retire_lost(record, REASON)
    assert slots.loop is not None
    refill(slots, lived=slots.loop.time() - record.created_at)  # (the clock `created_at` is on)


def refill(slots: Slots, lived: float) -> None:
    """Open connections back up to `min_size` after one was lost, in a task of the pool's own,
    one at a time, each after a delay from `Slots.lost_backoff`: a server that closes every
    connection as soon as it is made gets at most one login per delay, growing to the backoff's
    cap (the delay starts over after a connection that lived longer than that cap); one that
    refuses the login leaves the next try to the housekeeping (`fill_in_background`). Not
    between a SnapStart snapshot and its restore (`Slots.restored`): the restore's housekeeping
    round refills."""
    if slots.size() >= slots.config.min_size or slots.restored is not None:
        return
    if slots.lost_refill is not None and not slots.lost_refill.done():
        return  # it fills up to min_size, this loss included
    if lived >= slots.lost_backoff.cap:
        slots.lost_backoff = Backoff()
    delay = slots.lost_backoff.next_delay()
    assert slots.loop is not None
    # In a context of its own, as the housekeeping: not the one the close arrived in.
    slots.lost_refill = slots.loop.create_task(
        _refill_after(weakref.ref(slots), delay), name=f"asyncpool:{slots.name}:refill",
        context=contextvars.Context())


async def _refill_after(ref: weakref.ref[Slots], delay: float) -> None:
    await asyncio.sleep(delay)
    slots = ref()  # (only a weak reference while it waits: a dropped pool can be collected)
    if slots is None or slots.state is not OPEN or slots.restored is not None:
        return
    await housekeeping.fill_in_background(slots, slots.config.min_size)


def listen() -> None:
    """Have asyncpg's cleanups told here (once per process; each pool's open() asks)."""
    if connection_cleaned_up not in driver.CLEANUP_LISTENERS:
        driver.CLEANUP_LISTENERS.append(connection_cleaned_up)
