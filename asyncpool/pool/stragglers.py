"""Tasks an invocation started and left holding a connection when it returned.

The environment may be frozen once the response is posted: such a task would keep the pooler's
server connection, and its transaction if it opened one, until the thaw (a handler's
``asyncio.create_task(...)`` that it did not await, or Powertools' batch utility scheduling
records on the runner's loop and failing). They are given a little time to give it back, then
cancelled, and a connection still held after that is closed.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING, Any

from asyncpool.pool.handed import refers_to
from asyncpool.pool.lease import ACTIVE, TERMINATED, Lease
from asyncpool.pool.resets import RESETS_END

if TYPE_CHECKING:
    from asyncpool.pool.resets import ResetsEnd
    from asyncpool.pool.slots import Slots

logger: logging.Logger = logging.getLogger("asyncpool.pool")

#: How often the holders are looked at while they are waited for.
_POLL = 0.01
#: Turns of the loop given to tasks just started, before the holders are looked for.
_FIRST_TURNS = 3
CANCEL_MESSAGE = "asyncpool: the invocation that started this task returned while it held a connection"


def held_by_other_tasks(pools: list[Slots]) -> list[tuple[Slots, Lease]]:
    """The checkouts of `pools` taken in an invocation's context (by a task it started, this
    invocation or an earlier one) and still held by a running task other than the current one.
    Where leaks are not tracked (``leak_timeout=None``) no context is kept, and none is found:
    a task started at INIT must not be taken for one."""
    current = asyncio.current_task()
    held: list[tuple[Slots, Lease]] = []
    for slots in pools:
        for record in slots.leased():
            lease = record.lease
            if lease is None or lease.state is not ACTIVE:
                continue
            task = lease.task
            if task is None or task is current or task.done():
                continue
            if lease.context is not None and lease.context.get(RESETS_END) is not None:
                held.append((slots, lease))
    return held


def held_in_suspended_blocks(pools: list[Slots], end: ResetsEnd, since: float, *,
                             scoped: bool = True) -> list[tuple[Slots, Lease]]:
    """The checkouts of `pools` taken inside ``async with`` during the invocation whose resets
    end by `end`, still held though no other task runs their block: the block waits in an async
    generator (or an exit stack) the handler kept past the invocation, module-level or in a
    cache. Nothing would give them back before ``leak_timeout``, and later invocations would
    wait for them. Not tracked without leak tracking (no context is kept), as for tasks.
    ``scoped=False``: those taken with ``conn = await pool.acquire()`` instead, kept past the
    invocation by its own task or by a task of it that has ended (`end_kept_checkouts`).
    Taken during the invocation (since `since`, the pools' clock) by a task an earlier one
    started counts too: that task carries the earlier invocation's context, not this one's."""
    current = asyncio.current_task()
    held: list[tuple[Slots, Lease]] = []
    for slots in pools:
        for record in slots.leased():
            lease = record.lease
            if (lease is None or lease.state is not ACTIVE or lease.scoped is not scoped
                    or lease.context is None):
                continue
            taken_in = lease.context.get(RESETS_END)
            if taken_in is not end and (taken_in is None or lease.acquired_at < since):
                continue
            # A task still running the block is a straggler (`held_by_other_tasks`).
            if any(task is not None and task is not current and not task.done()
                   for task in (lease.task, lease.user)):
                continue
            held.append((slots, lease))
    return held


def end_suspended_blocks(pools: list[Slots], invocation: str, end: ResetsEnd,
                         since: float) -> None:
    """Close the connections `held_in_suspended_blocks` finds, with a WARNING naming where
    each was acquired: a suspended block cannot be waited for nor cancelled as a task can, so
    its connection is closed at once (a transaction in it rolled back by the server), as a
    straggler's still held after its cancellation is; the block's next statement raises
    `PoolError`, and its end gives nothing back."""
    for slots, lease in held_in_suspended_blocks(pools, end, since):
        site = lease.acquire_site()
        logger.warning(
            "pool %r: a connection taken in invocation %s is still held by a block that no task "
            "runs (an `async with` in an async generator, or an exit stack, kept past the "
            "invocation); it is closed now rather than kept from the next invocations while "
            "the environment is frozen. Finish such generators (aclose()) before the handler "
            "returns. Acquired at:\n%s", slots.name, invocation, site,
            extra={"asyncpool_pool": slots.name, "asyncpool_acquire_site": site})
        slots.discard(lease, "held past the end of its invocation", state=TERMINATED)


def end_kept_checkouts(pools: list[Slots], invocation: str, end: ResetsEnd,
                       since: float) -> None:
    """Report the connections taken with ``conn = await pool.acquire()`` during the invocation
    whose resets end by `end` (begun at `since`, the pools' clock) and not released when it
    returned (kept module-level, or by a task that has ended), with a WARNING naming where each
    was acquired; and close them, under ``leak_action="reclaim"``, unless a running task holds
    the connection in its locals (`refers_to`).

    Closed because nothing else gives them back in time: ``leak_timeout`` (the function
    timeout, with `lambda_config`) says a checkout outliving an invocation is a leak, and would
    reclaim it anyway, but only in some later invocation, half-way through its use, after the
    next ones waited for it (``max_size=1``), and with its transaction, and so the pooler's
    server connection, kept while the environment is frozen. Closed now, the holder's next use
    raises `PoolError`, and its release does nothing. Not closed: one taken outside any
    invocation (at INIT: never reported here), the pool told so (``leak_action="log"``), and
    one a running task refers to (handed to it: a lease names the task that acquired, not the
    one it was given to), which may give it back. A task that runs on unrelated (a background
    refresh) does not keep it: it kept every such connection to leak_timeout."""
    kept = held_in_suspended_blocks(pools, end, since, scoped=False)
    if not kept:
        return
    own = {task for slots in pools for task in (*slots.own_tasks(), *slots.fills)}
    current = asyncio.current_task()
    running = [task for task in asyncio.all_tasks()
               if task is not current and not task.done() and task not in own]
    for slots, lease in kept:
        site = lease.acquire_site()
        holders = [task for task in running if refers_to(task, lease)]
        close = slots.config.leak_action == "reclaim" and not holders
        if close:
            what = ("it is closed now rather than kept from the next invocations while the "
                    "environment is frozen, and its next use raises PoolError")
        elif holders:
            what = (f"it is left with its holder, as running task(s) refer to it "
                    f"({', '.join(repr(task.get_name()) for task in holders[:3])}) and may "
                    "give it back; leak_timeout reclaims it otherwise")
        else:
            what = "it is left with its holder (leak_action='log')"
        logger.warning(
            "pool %r: a connection taken with `conn = await pool.acquire()` in invocation %s "
            "was not released when it returned; %s. Release it before the handler returns "
            "(`await pool.release(conn)`, or `async with pool.acquire() as conn`). Acquired "
            "at:\n%s", slots.name, invocation, what, site,
            extra={"asyncpool_pool": slots.name, "asyncpool_acquire_site": site,
                   "asyncpool_reclaimed": close})
        if close:
            slots.discard(lease, "held past the end of its invocation", state=TERMINATED)


def getting_in_other_tasks(pools: list[Slots]) -> list[tuple[Slots, asyncio.Task[Any]]]:
    """The tasks, other than the current one, getting a connection from `pools` (checking an
    idle one, logging in, in line) in an invocation's context: each holds one once it has it."""
    current = asyncio.current_task()
    return [(slots, task) for slots in pools for task in slots.getting
            if task is not current and not task.done()]


async def free_stragglers(pools: list[Slots], invocation: str, give: float, bound: float) -> None:
    """Wait up to `give` seconds for the tasks holding `held_by_other_tasks` checkouts, or
    getting one (`getting_in_other_tasks`), to give them back, then cancel those tasks and wait
    for their blocks to end (rolled back and returned), up to `bound` seconds from now in all; a
    connection still held then is closed. Tasks started just before get a few turns of the loop
    first, to take theirs."""
    for _ in range(_FIRST_TURNS):
        await asyncio.sleep(0)
    loop = asyncio.get_running_loop()
    started = loop.time()
    until_given = started + give
    warned: set[asyncio.Task[Any]] = set()
    while True:
        # (Each with its task now: once given back, a lease may be another checkout's.)
        held = [(slots, lease, lease.task) for slots, lease in held_by_other_tasks(pools)]
        # A task still getting its connection (the first checkout of an invocation checks the
        # connection, or logs in) would have it while the environment is frozen, and keep it
        # from the next invocation: it is waited for as a holder.
        getting = getting_in_other_tasks(pools)
        if not held and not getting:
            return
        for slots, task in [(slots, task) for slots, _, task in held] + getting:
            assert task is not None
            if task not in warned:
                warned.add(task)
                logger.warning(
                    "pool %r: task %r, started during an invocation, still %s when invocation "
                    "%s returned; it has %.2fs to give it back, then it is cancelled (the "
                    "environment may be frozen after the response, with its transaction open). "
                    "Await the tasks a handler starts", slots.name, task.get_name(),
                    "held a connection" if any(t is task for _, _, t in held)
                    else "was getting a connection", invocation,
                    max(until_given - loop.time(), 0.0))
        if loop.time() >= until_given:
            break
        await asyncio.sleep(_POLL)
    # Those still holding, or getting, one now.
    cancelled = list(dict.fromkeys(
        [task for _, _, task in held if task is not None] + [task for _, task in getting]))
    for task in cancelled:
        task.cancel(CANCEL_MESSAGE)
    until = started + max(bound, give)
    # A cancelled holder puts its connection back in its own task once the reset is done: that
    # task must run again before the response goes, or the connection stays out until the thaw.
    if cancelled and (left := until - loop.time()) > 0:
        await asyncio.wait(cancelled, timeout=left)
    for slots, lease, _ in await _still_held(held, until):
        slots.discard(lease, "held past the end of its invocation", state=TERMINATED)


_Held = list[tuple["Slots", Lease, "asyncio.Task[Any] | None"]]


async def _still_held(held: _Held, until: float) -> _Held:
    """`held`, less the checkouts given back by `until` (loop time), waiting for that."""
    loop = asyncio.get_running_loop()
    while True:
        # (A task that ended holding one, with `conn = await pool.acquire()`, will not give it
        # back: `end_kept_checkouts` closes it next.)
        held = [(slots, lease, task) for slots, lease, task in held
                if lease.state is ACTIVE and task is lease.task
                and task is not None and not task.done()]
        if not held or loop.time() >= until:
            return held
        await asyncio.sleep(_POLL)
