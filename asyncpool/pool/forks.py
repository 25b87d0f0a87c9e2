"""Fork handling: a pool inherited by the child of a fork neither uses nor closes its parent's
connections.

Forks this process has gone through are counted (`FORKS`, bumped in the child). A pool
remembers the count it was opened at: a different one means it was inherited, and its sockets
(and its loop's epoll set) are shared with the parent. The checkout fast path reads it through
each pool's `fast` flags, which the child clears: os.getpid() would be a system call per query.
"""

from __future__ import annotations

import os
import weakref
from asyncio import get_running_loop
from typing import TYPE_CHECKING

from asyncpool.errors import PoolError
from asyncpool.pool.lease import ACTIVE, CLOSED, INHERITED
from asyncpool.pool.record import RETIRED
from asyncpool.pool.state import CLOSED_STATE, NEW

if TYPE_CHECKING:
    from asyncpool.pool.slots import Slots

# (A list, bumped in place: the modules that read it hold the list itself.)
FORKS = [0]
# The pools open in this process, for the child of a fork to clear their `fast` flags.
LIVE: weakref.WeakSet[Slots] = weakref.WeakSet()


def _after_fork_in_child() -> None:
    FORKS[0] += 1
    for slots in list(LIVE):
        slots.fast = slots.fast_statements = False
        for record in slots.records:
            lease = record.lease
            if lease is not None and lease.state is ACTIVE:
                # Held across the fork: using it here would talk on the parent's socket, and
                # giving it back in a transaction would send the parent's session a ROLLBACK.
                lease.state = INHERITED


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


def pools_on_loop() -> list[Slots]:
    """The pools open on the running loop."""
    loop = get_running_loop()
    return [s for s in LIVE if s.loop is loop]


def forget_inherited(slots: Slots) -> None:
    """Closed in a forked child: forget the parent's connections without touching them."""
    slots.idle.clear()
    for record in slots.records:
        lease = record.lease
        if lease is not None and lease.state is ACTIVE:
            lease.state = CLOSED  # a holder's next use is refused, its release does nothing
        record.lease = None
        record.spare = None
        record.place = RETIRED
    slots.records.clear()
    slots.checking.clear()
    slots.waiters.clear()
    slots.attempts.clear()
    slots.provider_users.clear()
    slots.handed.clear()
    slots.connecting = slots.filling = 0
    slots._set_state(CLOSED_STATE)


def inherited(slots: Slots) -> bool:
    """This process is a fork of the one that opened the pool."""
    return slots.forks != FORKS[0] and slots.state is not NEW


def forked_error(slots: Slots) -> PoolError:
    return PoolError(
        f"pool {slots.name!r} was opened in process {slots.pid} and this process "
        f"({os.getpid()}) is a fork of it: its connections belong to the parent, and using or "
        "closing them here would break the parent's. Create the pool in each process after "
        "the fork (Lambda managed instances import the handler in each worker)"
    )
