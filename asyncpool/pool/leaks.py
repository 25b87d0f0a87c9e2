"""Leak detection: notice a lease held past `leak_timeout`, with one alarm for the whole pool;
then report it, or reclaim its connection (`on_leak`). A lease whose holder was collected
without giving it back is reported when an integration finds it (`report_dropped`)."""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from asyncpool.connect import driver
from asyncpool.observer import LeakReport
from asyncpool.pool.alarms import alarm, loop_clock, own_clock
from asyncpool.pool.lease import ACTIVE, LEAKED, Lease

if TYPE_CHECKING:
    from asyncpool.pool.record import ConnectionRecord
    from asyncpool.pool.slots import Slots

logger: logging.Logger = logging.getLogger("asyncpool.leaks")

# Timers may fire a hair early (the loop rounds to its clock resolution).
_EARLY_FIRE_SLACK = 0.001
#: The message of the CancelledError a leak reclaim cancels its holder with.
LEAK_CANCEL_MESSAGE = "asyncpool: connection held past leak_timeout was reclaimed"


def grain(timeout: float) -> float:
    """How late past `timeout` a leak may be noticed: a second, or a tenth of a shorter timeout.

    On asyncio's own loops, deadlines are rounded up to its multiples, so the pools of a process
    whose leases fell due within the same second are checked in one hand-over of the alarm
    thread, not one wake-up of thread and loop each (about 240 µs of CPU apiece; 500 pools used
    at once made their loop wait 0.4 ms at p99 for the half second their deadlines took)."""
    return min(1.0, timeout / 10)


class LeakTracker:
    """Fires `on_leak` for each lease held past `timeout`, with one alarm for the whole pool.

    It reads the pool's own list of connections (each in use carries its lease): every lease has
    the same timeout, so one alarm, set for the oldest active lease, serves them all. A checkout
    adds nothing here: it only arms the alarm when none is armed, and a return removes nothing.
    The alarm waits off the loop's heap where that saves the loop work
    (`asyncpool.pool.alarms`).
    """

    def __init__(self, timeout: float, on_leak: Callable[[Lease], None],
                 records: Sequence[ConnectionRecord], set_unarmed: Callable[[bool], None],
                 loop: asyncio.AbstractEventLoop) -> None:
        self.timeout = timeout
        # Rounded only where the alarms share the thread's hand-overs: a loop with a clock of
        # its own keeps each deadline exact (uvloop's C timers; a test's virtual clock).
        self._grain = grain(timeout) if own_clock(loop) else None
        self._on_leak = on_leak
        self._records = records
        self._clock = loop_clock(loop)
        self._alarm = alarm(loop, self._fire)
        # Told whether no alarm is set (then the next checkout calls `arm`): the pool keeps
        # the flag itself, so a checkout reads one object less.
        self._set_unarmed = set_unarmed
        set_unarmed(True)

    def arm(self, acquired_at: float) -> None:
        """Fire when a lease taken at `acquired_at` (and still held) is due (on asyncio's own
        loops, at the first multiple of the `grain` from then on)."""
        self._set_unarmed(False)
        due = acquired_at + self.timeout
        if self._grain is not None and due < math.inf:  # ceil() has no integer for infinity
            due = math.ceil(due / self._grain) * self._grain
        self._alarm.set(due)

    def _fire(self) -> None:
        self._set_unarmed(True)
        now = self._clock() + _EARLY_FIRE_SLACK
        due: list[Lease] = []
        oldest_not_due = math.inf
        for record in list(self._records):
            lease = record.lease
            # Returned ones being reset, and ones already reported, are not (or no longer) leaks.
            if lease is None or lease.state is not ACTIVE or lease.reported:
                continue
            if lease.acquired_at + self.timeout > now:
                oldest_not_due = min(oldest_not_due, lease.acquired_at)
            else:
                due.append(lease)
        if oldest_not_due < math.inf:
            self.arm(oldest_not_due)
        due.sort(key=_acquired_at)  # reported in the order they were taken
        for lease in due:
            # Marked first: a handler that fails does not get the same lease again.
            lease.reported = True
            context = lease.context
            try:
                if context is None:
                    self._on_leak(lease)
                else:
                    context.run(self._on_leak, lease)
            except Exception:
                logger.exception("leak handler failed")

    def close(self) -> None:
        self._alarm.cancel()
        # Closed for good: no checkout arms it again.
        self._set_unarmed(False)


def _acquired_at(lease: Lease) -> float:
    return lease.acquired_at


class NoLeakTracker:
    """Stands in when leak detection is off (the pool's flag says armed: nothing calls it)."""

    def arm(self, acquired_at: float) -> None:
        pass

    def close(self) -> None:
        pass


def log_leak(pool_name: str, lease: Lease, held: float, reclaimed: bool, site: str, *,
             holder_cancelled: bool, dropped: bool = False) -> None:
    """One structured WARNING on `asyncpool.leaks` with who held the connection and from where
    (`dropped`: its holder let go of it without giving it back, `report_dropped`)."""
    why = "past leak_timeout"
    if dropped:
        why = "then dropped without being given back (garbage-collected)"
        action = "took it back: returned it to the pool, reset first where it needed one"
    elif not reclaimed:
        action = "left it with the holder (leak_action='log')"
    elif holder_cancelled:
        action = "reclaimed it: cancelled the holder and closed the connection"
    else:
        # `conn = await pool.acquire()`: no block would turn a cancellation into
        # ConnectionLeakedError, so the task runs on and meets the error at its next use.
        how = "" if lease.scoped else " (it took the connection without `async with`)"
        action = (f"reclaimed it: closed the connection; the holder is not cancelled{how}, and its "
                  "next use of the connection raises ConnectionLeakedError")
    logger.warning(
        "pool %r: connection held for %.1fs by task %r, %s; %s. Acquired at:\n%s",
        pool_name,
        held,
        lease.task_name(),
        why,
        action,
        site,
        extra={
            "asyncpool_pool": pool_name,
            "asyncpool_held_seconds": round(held, 3),
            "asyncpool_task": lease.task_name(),
            "asyncpool_acquire_site": site,
            "asyncpool_reclaimed": reclaimed,
            "asyncpool_dropped": dropped,
        },
    )


def log_returned(pool_name: str, lease: Lease, held: float) -> None:
    """A connection reported as leaked (leak_action='log') came back after all."""
    logger.warning(
        "pool %r: connection previously reported as leaked was returned after %.1fs by task %r",
        pool_name,
        held,
        lease.task_name(),
        extra={"asyncpool_pool": pool_name, "asyncpool_held_seconds": round(held, 3),
               "asyncpool_task": lease.task_name()},
    )


def on_leak(slots: Slots, lease: Lease) -> None:
    """Called by the leak tracker when a lease outlives `leak_timeout`."""
    if lease.state is not ACTIVE or slots.loop is None or slots.connector is None:
        return
    held = slots.loop.time() - lease.acquired_at
    reclaim = slots.config.leak_action == "reclaim"
    task = lease.holder() if reclaim else lease.task
    # The task that last ran a statement on it, when the block is in an async generator
    # another task drives: the one reported and cancelled, and the one `_raise_leaked`
    # withdraws the request from (a reclaimed lease is no one's: nothing else reads it).
    if task is not lease.task:
        lease.cancel_requests = None  # (counted for the task that entered the block)
    lease.task = task
    site = lease.acquire_site()
    report = LeakReport(slots.name, held, lease.task_name(), site, reclaim, slots.connector.target)
    # A holder inside `async with` is cancelled, and its block ends in ConnectionLeakedError.
    # One that took `conn = await pool.acquire()` has no block to turn the cancellation into
    # that error: only its connection is reclaimed, and its next use raises it.
    cancel_holder = (reclaim and lease.scoped and task is not None and not task.done()
                     and task is not asyncio.current_task())
    log_leak(slots.name, lease, held, reclaim, site, holder_cancelled=cancel_holder)
    slots.leaked_total += 1
    if not reclaim:
        lease.reported = True
        slots.observer.leaked(report)
        return
    lease.state = LEAKED
    slots._end_use(lease)
    lease.forget_site()
    if cancel_holder:
        assert task is not None
        lease.holder_cancelled = task.cancelling()
        task.cancel(LEAK_CANCEL_MESSAGE)
    slots.observer.leaked(report)
    # The statement it may be running is cancelled on the server first, where a cancel can
    # arrive (closing the connection waits for the request); elsewhere it is just closed.
    driver.request_cancel(lease.record.conn)
    slots.retire(lease.record, "leaked")


def report_dropped(slots: Slots, lease: Lease) -> None:
    """Report a checkout its holder dropped without giving it back, found when the garbage
    collector found the holder's object (a SQLAlchemy connection or session never closed), as
    a leak is reported: the WARNING, ``leaked_total`` and the observers' `leaked`, whatever
    `leak_timeout` says it was held (the caller gives the connection back). Not with leak
    detection off, nor for a lease reported already (``leak_action="log"``: its return is
    logged as such)."""
    if (not slots.track_leaks or lease.state is not ACTIVE or lease.reported
            or slots.loop is None or slots.connector is None):
        return
    held = slots.loop.time() - lease.acquired_at
    site = lease.acquire_site(holder_now=False)
    report = LeakReport(slots.name, held, lease.task_name(), site, True, slots.connector.target,
                        dropped=True)
    log_leak(slots.name, lease, held, True, site, holder_cancelled=False, dropped=True)
    slots.leaked_total += 1
    # In the holder's context (its span), as `LeakTracker` reports a leak.
    if lease.context is None:
        slots.observer.leaked(report)
    else:
        lease.context.run(slots.observer.leaked, report)
