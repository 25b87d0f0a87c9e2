"""The slow checkout, for when `Slots.checkout_nowait` cannot serve: check an idle connection
due a look, open one in a free slot (`logins`), or wait in line for a returned connection or a
freed slot; and the `setup` hook run on each connection checked out. Errors say what the
caller was doing when its time ran out."""

from __future__ import annotations

import asyncio
import logging
from contextvars import Context, copy_context
from types import FrameType
from typing import TYPE_CHECKING, Any

import asyncpg

from asyncpool.config import hook_awaitable
from asyncpool.errors import ConnectError, PoolTimeoutError
from asyncpool.pool import forks, logins, misuse, pool_stats
from asyncpool.pool.lease import ACTIVE, RELEASED, WITHDRAWN
from asyncpool.pool.record import CHECKING, MOVING
from asyncpool.pool.resets import RESETS_END
from asyncpool.pool.state import NEW, OPEN

if TYPE_CHECKING:
    from asyncpool.pool.connection import PooledConnection
    from asyncpool.pool.lease import Lease
    from asyncpool.pool.record import ConnectionRecord
    from asyncpool.pool.slots import Slots

logger: logging.Logger = logging.getLogger("asyncpool.pool")

#: What `Pool.acquire(timeout=...)` receives when the caller gave no timeout.
UNSET: Any = object()
# A waiter's future resolves to a Lease, or to this: "a slot is yours, open a connection in it".
GRANT: Any = object()

_VALIDATION_QUERY = "SELECT 1"


class Waiter:
    """A caller queued for a connection. `retrying` callers already hold a slot (they are between
    two login attempts) and take only connections; the others take connections or slots."""

    __slots__ = ("context", "frame", "fut", "retrying", "started", "task")

    def __init__(self, fut: asyncio.Future[Any], frame: FrameType | None, started: float,
                 retrying: bool) -> None:
        self.fut: asyncio.Future[Any] = fut
        self.frame: FrameType | None = frame
        self.started: float = started
        self.retrying: bool = retrying
        self.task: asyncio.Task[Any] | None = asyncio.current_task()
        self.context: Context = copy_context()


class Progress:
    """What a slow checkout (or a `setup` hook) is doing, for the error it raises if its time
    runs out, and its time limit (`timer`, None until armed), which a SnapStart snapshot stops
    until the restore (`asyncpool.pool.snapshot`)."""

    __slots__ = ("deadline", "holding", "last_error", "phase", "queued", "redo", "setting_up",
                 "started", "timeout", "timer")

    def __init__(self, started: float, timeout: float | None) -> None:
        self.started: float = started
        self.timeout: float | None = timeout
        self.deadline: float | None = None if timeout is None else started + timeout
        self.timer: asyncio.Timeout | None = None
        self.phase: str = "waiting"
        self.last_error: BaseException | None = None
        self.holding: bool = False  # this caller holds a reserved slot (counted in `connecting`)
        self.queued: float = 0.0  # seconds spent in line before a slot or connection came
        # The checkout a `setup` hook runs on (`set_up`), and whether a snapshot closed its
        # connection under the hook (`snapshot.empty_for_snapshot`): then it runs again on a
        # new one after the restore.
        self.setting_up: Lease | None = None
        self.redo: bool = False


async def checkout(slots: Slots, timeout: float | None, frame: FrameType | None, *,
                   counted: bool = True) -> Lease:
    """The slow path: check an idle connection, open one, or wait in line. Not `counted`:
    the acquire it serves was counted already (a `setup` hook's second run: `_run_hook`)."""
    loop = slots.loop
    if slots.forks != forks.FORKS[0] and slots.state is not NEW:
        raise forks.forked_error(slots)
    if slots.state is not OPEN or loop is None:
        raise misuse.closed_error(slots)
    if asyncio.get_running_loop() is not loop:
        raise misuse.other_loop_error(slots, loop)
    if timeout is UNSET:
        timeout = slots.config.acquire_timeout
    progress = Progress(loop.time(), timeout)
    # A task of a Lambda invocation, known while it gets its connection: one the invocation
    # started and left behind holds it once it has it (`stragglers.free_stragglers`).
    getting = (asyncio.current_task() if slots.track_leaks and RESETS_END.get() is not None
               else None)
    if getting is not None:
        slots.getting.add(getting)
    slots.checkouts.add(progress)
    try:
        async with asyncio.timeout(timeout) as progress.timer:
            lease = await _obtain(slots, frame, progress)
    except TimeoutError:
        slots.timeouts_total += 1
        slots.observer.timed_out()
        raise _timeout_error(slots, timeout, progress) from None
    finally:
        slots.checkouts.discard(progress)
        if getting is not None:
            slots.getting.discard(getting)
    if counted:
        slots.acquired_total += 1
        if slots.on_acquired is not None:
            slots.on_acquired(loop.time() - progress.started)
    return lease


async def _obtain(slots: Slots, frame: FrameType | None, progress: Progress) -> Lease:
    loop = slots.loop
    assert loop is not None
    while True:
        slots._check_open()
        if slots.idle and not slots.waiters:
            record = slots.idle.pop()
            record.place = MOVING
            now = loop.time()
            if now < record.check_at and not record.conn.is_closed():
                lease = slots._new_lease(record, now, frame)
                slots._hold(record, lease)
                return lease
            lease_or_none = await _check(slots, record, now, frame, progress)
            if lease_or_none is not None:
                return lease_or_none
            continue
        if slots.size() < slots.config.max_size:
            slots.connecting += 1
            progress.holding = True
            lease_or_none = await logins.connect_for(slots, frame, progress)
            if lease_or_none is not None:
                return lease_or_none
            continue
        return await _wait(slots, frame, progress)


async def _check(slots: Slots, record: ConnectionRecord, now: float, frame: FrameType | None,
                 progress: Progress) -> Lease | None:
    """An idle connection due a look (`MOVING`): hand it out if it passes, else retire it
    and open one in its slot. None: the slot went back to the pool, start over."""
    if record.conn.is_closed():
        # Closed while idle (server restart, pooler timeout seen by the driver).
        _count_failed_check(slots)
        slots.retire_lost(record)
        return None
    if record.expired(now):
        slots.retire(record, "expired", graceful=True)
        return None
    record.place = CHECKING
    slots.checking.add(record)
    slots.connecting += 1
    progress.holding = True
    progress.phase = "validating"
    try:
        # Marked stale (a freeze, a snapshot restore: the path may have vanished without a
        # word), the check leaves time for a replacement; otherwise a slow answer is a queue
        # (a busy pooler) and the connection is waited for, as healthy.
        failure = await _validate(slots, record, progress.deadline if record.stale else None)
    except BaseException:
        slots.retire(record, "cancelled during validation")
        progress.holding = False
        slots._release_slot()
        raise
    if record.place is not CHECKING:  # retired meanwhile (close, terminate, a snapshot)
        if slots.state is OPEN:
            # By a SnapStart snapshot (`snapshot.empty_for_snapshot`): the slot is still this
            # caller's, to log in after the restore.
            return await logins.connect_for(slots, frame, progress)
        progress.holding = False
        slots._release_slot()
        raise misuse.closed_error(slots)
    if failure is not None:
        progress.last_error = failure
        _count_failed_check(slots)
        # Its slot stays with this caller. Closed, it was lost (not a slow answer).
        if record.conn.is_closed():
            slots.retire_lost(record, "failed validation")
        else:
            slots.retire(record, "failed validation")
        return await logins.connect_for(slots, frame, progress)
    slots.checking.discard(record)
    slots.connecting -= 1
    progress.holding = False
    record.place = MOVING
    record.stale = False
    if slots.state is not OPEN:
        slots.retire(record, "pool closed", graceful=True)
        raise misuse.closed_error(slots)
    lease = slots._new_lease(record, slots.loop.time() if slots.loop else now, frame)
    slots._hold(record, lease)
    return lease


async def _validate(slots: Slots, record: ConnectionRecord,
                    deadline: float | None) -> ConnectError | None:
    """One round trip on a connection that sat idle: None if it answered, else what it did.

    Within `connect_timeout`, and with a `deadline` (the acquire's, for a connection marked
    stale) within half of what is left of it: a connection that vanished without a word
    answers nothing, and the time to open its replacement must be left (with Lambda's
    defaults both are 5 s, and the check used to take all of it, failing the acquire)."""
    timeout = slots.config.connect_timeout
    if deadline is not None and slots.loop is not None:
        timeout = min(timeout, max((deadline - slots.loop.time()) / 2, logins.CLOCK_SLACK))
    try:
        with slots.observer.pool_statement("validate"):
            await record.conn.execute(_VALIDATION_QUERY, timeout=timeout)
    # InternalClientError: the server's FATAL (pg_terminate_backend, pooler shutdown) arrived
    # but the driver has not yet seen the socket close.
    except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError,
            asyncpg.InternalClientError) as exc:
        logger.info("pool %r: idle connection failed its check (%s); replacing it", slots.name,
                    type(exc).__name__)
        what = (f"no answer within {timeout:g}s" if isinstance(exc, TimeoutError)
                else type(exc).__name__)
        return ConnectError(f"an idle connection failed its check ({what}) and was replaced")
    return None


def _count_failed_check(slots: Slots) -> None:
    slots.validation_failures_total += 1
    slots.observer.validation_failed()


async def _wait(slots: Slots, frame: FrameType | None, progress: Progress) -> Lease:
    """Queue until a connection is handed over or a slot is granted."""
    assert slots.loop is not None
    waiter = Waiter(slots.loop.create_future(), frame, progress.started, retrying=False)
    slots.waiters.append(waiter)
    slots.fast = slots.fast_statements = False
    progress.phase = "waiting"
    try:
        got = await waiter.fut
    except BaseException:
        got = leave(slots, waiter)
        if got is GRANT:
            slots._release_slot()
        elif got is not None:
            undo_handoff(slots, got)
        raise
    if got is GRANT or got.state is WITHDRAWN:
        # A slot (WITHDRAWN: that of a connection handed over here, then closed for a
        # SnapStart snapshot before this task ran: `snapshot._withdraw`).
        progress.holding = True
        progress.queued = slots.loop.time() - progress.started
        connected = await logins.connect_for(slots, frame, progress)
        if connected is None:
            return await _obtain(slots, frame, progress)
        return connected
    lease: Lease = got
    slots.handed.discard(lease)
    if lease.state is not ACTIVE or slots.state is not OPEN:
        # close() began after the connection was handed over.
        undo_handoff(slots, lease)
        raise misuse.closed_error(slots)
    checked = await check_handed(slots, lease, frame, progress)
    return checked if checked is not None else await _obtain(slots, frame, progress)


def leave(slots: Slots, waiter: Waiter) -> Any:
    """Step out of the queue: what was handed to `waiter` before it left (a lease or a
    slot), or None."""
    fut = waiter.fut
    if fut.done() and not fut.cancelled() and fut.exception() is None:
        got = fut.result()
        slots.handed.discard(got)
        return got
    if not fut.get_loop().is_closed():  # (a caller collected after its loop was closed)
        fut.cancel()
    try:
        slots.waiters.remove(waiter)
    except ValueError:
        return None  # already taken out (by close(), or skipped as cancelled)
    slots._refresh_fast()
    if waiter.retrying:
        slots.retrying -= 1
    return None


def undo_handoff(slots: Slots, lease: Lease) -> None:
    """A lease handed to a waiter that gave up in the same instant goes to the next one (the
    slot, if a snapshot withdrew its connection: `snapshot._withdraw`)."""
    if lease.state is WITHDRAWN:
        slots._release_slot()
        return
    if lease.state is not ACTIVE:
        return
    slots._put(_taken_back(lease), slots.loop.time() if slots.loop else 0.0)


async def check_handed(slots: Slots, lease: Lease, frame: FrameType | None,
                        progress: Progress) -> Lease | None:
    """A connection handed over in line, as it was returned: `lease` as it is, or, if it was
    marked stale while held (`mark_stale`), a lease on it once it passed its check, or on
    the connection opened in its place. None: the slot went back to the pool, start over."""
    if not lease.record.stale:
        return lease
    assert slots.loop is not None
    return await _check(slots, _taken_back(lease), slots.loop.time(), frame, progress)


def _timeout_error(slots: Slots, timeout: float | None, progress: Progress) -> PoolTimeoutError:
    s = pool_stats.stats(slots)
    sizes = (f"size={s.size}, in_use={s.in_use}, idle={s.idle}, waiting={s.waiting}, "
             f"max_size={s.max_size}")
    if progress.phase == "waiting":
        own = len(slots.held_by_current_task())
        if own and own >= s.in_use:
            # Only this task could give one back: more time or connections would not help.
            return PoolTimeoutError(
                f"pool {slots.name!r}: no connection within {timeout:g}s ({sizes}): the task "
                f"waiting holds {own} of them itself, so it waited for a connection only it "
                "could give back (an acquire nested in another acquire block, or a query "
                "helper such as pool.fetchval() called inside one). Run the statement on the "
                "connection the block holds, or give that one back first"
            )
        mine = (f" (the task waiting holds {own} of them itself: an acquire nested in another "
                "acquire block holds a connection the pool could have lent)") if own else ""
        return PoolTimeoutError(
            f"pool {slots.name!r}: no connection within {timeout:g}s ({sizes}){mine}; release "
            "connections sooner, raise max_size or acquire_timeout"
        )
    last = f"; last error: {progress.last_error}" if progress.last_error else ""
    doing = "still connecting to" if progress.phase == "connecting" else "checking a connection to"
    if timeout is not None and progress.queued > timeout / 2:
        # Most of the time went in line (a slot freed late: a long hold, a leak reclaimed),
        # not to the server: say so, or the advice points at the network.
        return PoolTimeoutError(
            f"pool {slots.name!r}: no connection within {timeout:g}s: waited "
            f"{progress.queued:.2f}s in line while every connection was held, then was "
            f"{doing} {slots.target} when the time ran out ({sizes}){last}; release "
            "connections sooner, raise max_size or acquire_timeout"
        )
    return PoolTimeoutError(
        f"pool {slots.name!r}: no connection within {timeout:g}s: {doing} {slots.target} "
        f"({sizes}){last}; check that the server or pooler is reachable and accepts logins, "
        "or raise acquire_timeout"
    )


async def set_up(slots: Slots, conn: PooledConnection, timeout: float | None,
                 started: float) -> None:
    """Run the `setup` hook on a connection just checked out, within what is left of the
    acquire's `timeout` (`UNSET`: ``acquire_timeout``; `started`: the pool's clock when
    the acquire began, or the SnapStart restore since), which counts it as asyncpg's does. If
    it fails or runs out of time, the connection is closed (what the hook left is unknown) and
    the error raised: out of time, `PoolTimeoutError`.

    A hook still running when a SnapStart snapshot is taken has its time stopped there and
    counted again, whole, from the restore (as a checkout in line), and its connection, closed
    for the snapshot, replaced: `conn` is pointed at a new checkout, and the hook runs again on
    it (`_run_hook`)."""
    assert slots.setup is not None
    assert slots.loop is not None
    if timeout is UNSET:
        timeout = slots.config.acquire_timeout
    # An acquire under way at a SnapStart snapshot had its whole timeout again from the restore
    # (`snapshot.resume_after_restore`): the hook gets what is left of that one.
    started = max(started, slots.restored_at)
    left = None if timeout is None else timeout - (slots.clock() - started)
    progress = Progress(slots.loop.time(), left)
    progress.timeout = timeout  # (what a restore gives it again)
    progress.phase = "setup"
    deadline = asyncio.timeout(left)
    slots.checkouts.add(progress)
    try:
        async with deadline as progress.timer:
            await _run_hook(slots, conn, progress)
        return
    except BaseException as exc:
        slots.discard(conn._lease, "setup failed")
        if not (isinstance(exc, TimeoutError) and deadline.expired()):
            raise
        error = exc
    finally:
        slots.checkouts.discard(progress)
        progress.setting_up = None
    slots.timeouts_total += 1
    slots.observer.timed_out()
    doing = ("the setup hook was still running on it when the time ran out (the connection "
             "was closed); make setup faster" if progress.phase == "setup" else
             "the SnapStart snapshot closed the connection its setup hook was running on, and "
             "no new one was checked out and set up in time after the restore; make setup "
             "faster")
    raise PoolTimeoutError(
        f"pool {slots.name!r}: no connection within {timeout:g}s: {doing} or raise "
        "acquire_timeout") from error


async def _run_hook(slots: Slots, conn: PooledConnection, progress: Progress) -> None:
    """The `setup` hook on `conn`; if a snapshot closed its connection under it, once more,
    after the restore, on a new checkout (within `progress`'s time limit, which a restore
    re-arms). Whatever the first run raised then is moot: it was the closed connection's."""
    assert slots.setup is not None
    frame = conn._lease.frame
    while True:
        progress.setting_up = conn._lease
        try:
            await hook_awaitable(slots.name, "setup", slots.setup(conn))
        except Exception:
            if not progress.redo:
                raise
        if not progress.redo:
            return
        progress.redo = False
        progress.setting_up = None
        progress.phase = "checkout"
        # (A login waits for the restore: `logins.log_in`.) The same acquire: counted once,
        # its first checkout's use not ended (`snapshot._close_in_use`).
        conn._lease = await checkout(slots, None, frame if isinstance(frame, FrameType) else None,
                                     counted=False)
        progress.phase = "setup"


def _taken_back(lease: Lease) -> ConnectionRecord:
    """The connection of a lease handed over in line and not used: the lease ends, the record
    moves (`MOVING`, carrying its slot) for the caller to pass on or check."""
    lease.state = RELEASED
    record = lease.record
    record.lease = None
    record.place = MOVING
    return record
