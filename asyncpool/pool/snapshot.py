"""A pool made ready for a Lambda SnapStart snapshot: no network connection is left in it.

Every environment restored from the snapshot gets a copy of the process, not of its network
connections: a socket kept in it is dead in each copy (or, where its peer still answers, one
server session shared by them all). So nothing that holds one is kept: idle connections say
goodbye, held ones are closed under their holders, those being validated for a caller or reset
after their return are closed, one just handed to a caller in line (not yet taken: its task has
not run since) is closed and its slot left to that caller, and logins under way are stopped
(their callers log in again after the restore, with a new token or secret if the credentials
give one).

A caller still in a checkout (in line, or logging in) goes on after the restore: its
``acquire_timeout`` stops at the snapshot and starts again, whole, at the restore
(`resume_after_restore`), and its ``setup`` hook gets what is left of it then; a ``setup`` hook
already running has its time stopped and restarted the same way, and runs again, after the
restore, on a new connection (its own was closed here under it). The snapshot may
be restored hours later, and the monotonic clock is not known to stand still meanwhile: the
deadline it had would have passed before the first invocation could serve it. No login begins in
between (a caller handed the slot of a connection closed here waits for the restore to log in).
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING, Any

from asyncpool.pool import housekeeping, logins
from asyncpool.pool.lease import ACTIVE, TERMINATED, WITHDRAWN

if TYPE_CHECKING:
    from asyncpool.pool.lease import Lease
    from asyncpool.pool.slots import Slots

logger: logging.Logger = logging.getLogger("asyncpool.pool")

#: Turns of the loop given first to the tasks INIT left scheduled (not yet run once).
_FIRST_TURNS = 3


async def empty_for_snapshot(slots: Slots, budget: float) -> None:
    """Close every connection of `slots` and stop its logins under way, waiting up to
    `budget` seconds for the goodbyes and the logins' sockets to close."""
    for _ in range(_FIRST_TURNS):  # (a login just scheduled, open(wait=False)'s, is begun)
        await asyncio.sleep(0)
    _stop_checkout_times(slots)
    before = set(slots.closing)
    housekeeping.expire_all(slots)  # (idle ones: a goodbye each)
    _close_in_use(slots)
    for record in list(slots.checking):
        # Its check (a round trip) under way: its caller keeps the slot and logs in after the
        # restore (`slow_checkout._check`); in a copy, the check would wait on a dead socket.
        slots.retire(record, "being checked when the snapshot was taken")
    stopped = logins.give_up_logins(slots, logins.BEFORE_SNAPSHOT)
    waits: list[asyncio.Task[Any]] = [
        *stopped, *(task for task in slots.closing if task not in before and not task.done())]
    if waits:
        await asyncio.wait(waits, timeout=budget)


def _close_in_use(slots: Slots) -> None:
    """Close the connections in use: held (the holder warned), under a `setup` hook (which
    runs again after the restore), or being reset after their return (which ends there)."""
    setting_up = {progress.setting_up: progress for progress in slots.checkouts
                  if progress.setting_up is not None}
    for record in slots.leased():
        lease = record.lease
        if lease in slots.handed:
            _withdraw(slots, lease)
            continue
        if lease is None or lease.state is not ACTIVE:
            # Returned, its reset (a round trip, up to RELEASE_TIMEOUT) under way: in a copy it
            # would keep the slot that long on a dead socket (`resets._put_reset` lets it go).
            slots.retire(record, "being reset when the snapshot was taken")
            continue
        progress = setting_up.get(lease)
        if progress is not None:
            # Still in its acquire (the `setup` hook): no holder to warn; the hook runs again
            # on a new connection after the restore (`slow_checkout._run_hook`).
            progress.redo = True
            logger.info("pool %r: a connection whose setup hook was running when the SnapStart "
                        "snapshot was taken is closed; the hook runs again on a new one after "
                        "the restore", slots.name)
            # Its checkout goes on, on the new one: not ended here for the observer (no use time,
            # as its second checkout is no acquire of its own: one acquire, counted once).
            lease.state = TERMINATED  # (before `retire`, which would end a use)
            slots.retire(record, "setup under way when the snapshot was taken")
            continue
        site = lease.acquire_site()
        logger.warning(
            "pool %r: a connection was still held when the SnapStart snapshot was taken; it is "
            "closed (environments restored from the snapshot cannot use it), and its holder's "
            "next use raises PoolError. Release connections taken during INIT before it ends. "
            "Acquired at:\n%s", slots.name, site,
            extra={"asyncpool_pool": slots.name, "asyncpool_acquire_site": site})
        slots.discard(lease, "held when the snapshot was taken", state=TERMINATED)


def _withdraw(slots: Slots, lease: Lease) -> None:
    """A connection handed to a caller in line whose task has not run since (a holder gave it
    back during the first turns): no holder yet, none to warn. It is closed, and its slot
    becomes that caller's, as a granted one: it logs in after the restore (`slow_checkout._wait`).
    Closed as held, the caller got `PoolClosedError` when its task ran."""
    slots.handed.discard(lease)
    lease.state = WITHDRAWN  # (before `retire`: no checkout ends, none began)
    slots.connecting += 1
    slots.retire(lease.record, "handed to a caller in line when the snapshot was taken",
                 keep_slot=True)


def _stop_checkout_times(slots: Slots) -> None:
    """Stop the time limit of every checkout under way until `resume_after_restore`, and hold
    back the logins that begin meanwhile."""
    if slots.restored is None:
        slots.restored = asyncio.Event()
    for progress in slots.checkouts:
        if progress.timer is not None and not progress.timer.expired():
            progress.timer.reschedule(None)
            progress.deadline = None


def resume_after_restore(slots: Slots) -> None:
    """After a restore, on the pool's loop: each checkout under way at the snapshot gets its
    whole ``acquire_timeout`` from now, and the logins held back go ahead."""
    restored, slots.restored = slots.restored, None
    if restored is None:
        return
    restored.set()
    slots.since_restore = True  # (the first invocation's start gives up no refill: `logins`)
    slots.restored_at = slots.clock()  # (the clock the acquires' `setup` time is read by)
    if slots.loop is None:  # never opened: a pool opened lazily, by the first invocation
        return
    now = slots.loop.time()
    for progress in slots.checkouts:
        timer = progress.timer
        if (progress.deadline is None and progress.timeout is not None and timer is not None
                and not timer.expired()):
            progress.started = now
            progress.deadline = now + progress.timeout
            timer.reschedule(progress.deadline)
