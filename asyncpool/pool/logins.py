"""Logins: open a connection in a slot a caller holds, each attempt in a task of its own within
`connect_timeout` (close() can stop it; a connection it opens after nobody waits any more is
closed), retrying transient failures with backoff while the caller waits in line for a returned
connection."""

from __future__ import annotations

import asyncio
import functools
import logging
from typing import TYPE_CHECKING, Any

from asyncpool.connect.connector import CutShort
from asyncpool.errors import ConnectError, PoolTimeoutError
from asyncpool.pool import closing, misuse, slow_checkout
from asyncpool.pool.backoff import Backoff
from asyncpool.pool.connection import proxy_class_for
from asyncpool.pool.lease import ACTIVE, WITHDRAWN
from asyncpool.pool.record import ConnectionRecord
from asyncpool.pool.replaced_credentials import track_login
from asyncpool.pool.state import OPEN

if TYPE_CHECKING:
    from types import FrameType

    from asyncpool.pool.lease import Lease
    from asyncpool.pool.slots import Slots
    from asyncpool.pool.slow_checkout import Progress

logger: logging.Logger = logging.getLogger("asyncpool.pool")

# asyncio runs a timer up to one clock resolution early: a login cancelled this close to the
# caller's deadline was cancelled by it.
CLOCK_SLACK = 0.01


async def connect_for(slots: Slots, frame: FrameType | None, progress: Progress) -> Lease | None:
    """Open a connection in the slot this caller holds (`progress.holding`), retrying
    transient failures with backoff. Between attempts the caller queues for a returned
    connection. None: the slot went back to the pool, start over."""
    loop = slots.loop
    assert loop is not None
    backoff = Backoff()
    try:
        while True:
            slots._check_open()
            progress.phase = "connecting"
            generation = slots.generation
            try:
                conn = await log_in(slots, progress.deadline)
            except ConnectError as exc:
                progress.last_error = exc
                delay = backoff.next_delay()
                deadline = progress.deadline
                if not exc.transient or (deadline is not None and loop.time() + delay >= deadline):
                    # No time left for another try: the caller sees what went wrong.
                    logger.warning("%s", named(slots.name, exc))
                    raise
                logger.info("%s; retrying in %.2fs", named(slots.name, exc), delay)
                slots._check_open()
                if slots.idle:
                    # Returned while this caller was logging in: take it instead.
                    progress.holding = False
                    slots._release_slot()
                    return None
                lease = await _wait_between_attempts(slots, delay, progress)
                if lease is not None:
                    # Its slot went back to the pool (`_put`): None starts over.
                    return await slow_checkout.check_handed(slots, lease, frame, progress)
                continue
            record = new_record(slots, conn)
            slots.connecting -= 1
            progress.holding = False
            if slots.state is not OPEN:
                slots.retire(record, "pool closed")
                raise misuse.closed_error(slots)
            if generation != slots.generation:
                slots.retire(record, "expired by expire_all", graceful=True)
                return None
            lease = slots._new_lease(record, loop.time(), frame)
            slots._hold(record, lease)
            return lease
    finally:
        if progress.holding:
            progress.holding = False
            slots._release_slot()


async def _after_any_snapshot(slots: Slots) -> None:
    """Between a SnapStart snapshot and its restore (a caller handed the slot of a connection
    the snapshot closed, a refill), wait for the restore: a login begun now would be in the
    snapshot."""
    if slots.restored is not None:
        await slots.restored.wait()
        slots._check_open()


def new_record(slots: Slots, conn: Any) -> ConnectionRecord:
    assert slots.loop is not None
    slots.created_total += 1
    cfg = slots.config
    now = slots.loop.time()
    record = ConnectionRecord(conn, now, cfg.max_lifetime, cfg.lifetime_jitter, slots,
                              proxy_class=proxy_class_for(type(conn)))
    record.touch(now, slots.validate_after)
    slots.records.append(record)
    return record


async def _wait_between_attempts(slots: Slots, delay: float, progress: Progress) -> Lease | None:
    """Wait `delay` in line with the waiters; a connection handed over ends the wait (and
    frees this caller's slot, see `_put`)."""
    assert slots.loop is not None
    waiter = slow_checkout.Waiter(slots.loop.create_future(), None, slots.loop.time(), retrying=True)
    slots.waiters.append(waiter)
    slots.fast = slots.fast_statements = False
    slots.retrying += 1
    try:
        async with asyncio.timeout(delay):
            got = await waiter.fut
    except TimeoutError:
        got = slow_checkout.leave(slots, waiter)  # handed over in the instant the delay ran out?
        if got is None:
            return None
    except BaseException:
        got = slow_checkout.leave(slots, waiter)
        if got is not None:
            progress.holding = False
            slow_checkout.undo_handoff(slots, got)
        raise
    progress.holding = False
    lease: Lease = got
    slots.handed.discard(lease)
    if lease.state is WITHDRAWN:
        # Closed for a SnapStart snapshot before this task ran (`snapshot._withdraw`): the slot
        # given back to this caller, which logs in again in it.
        progress.holding = True
        return None
    if lease.state is not ACTIVE or slots.state is not OPEN:
        slow_checkout.undo_handoff(slots, lease)
        raise misuse.closed_error(slots)
    return lease


async def log_in(slots: Slots, deadline: float | None = None, *, own: bool = False) -> Any:
    """One login, within `connect_timeout`, in a task of its own that close() can stop.

    `deadline`: when the caller's acquire_timeout ends, if it has one. A login stopped
    part-way is reported (to telemetry) with the error its caller is given instead. `own`: a
    login of the pool's own (a min_size refill), which `give_up_fills` may stop."""
    loop = slots.loop
    assert loop is not None
    assert slots.connector is not None
    await _after_any_snapshot(slots)
    cut_short = CutShort()
    connector = slots.connector
    attempt = loop.create_task(connector.connect(cut_short))
    slots.attempts[attempt] = cut_short
    track_login(slots, attempt, connector.credentials)
    if own:
        slots.fills.add(attempt)
        attempt.add_done_callback(slots.fills.discard)
    limit = asyncio.timeout(slots.config.connect_timeout)
    task = asyncio.current_task()
    # The caller's cancel requests so far (one may be left over from earlier code): only
    # a new one means the caller itself was cancelled, as asyncio.timeout counts.
    requests = task.cancelling() if task is not None else 0
    try:
        async with limit:
            # Shielded so the login is stopped only after `cut_short` says why.
            conn = await asyncio.shield(attempt)
    except BaseException as exc:
        if slots.attempts.pop(attempt, None) is None:
            # Let go by the pool: its loop was closed with this login pending (`lifecycle._stop`)
            # and the coroutine is being closed, or this is a forked child (`forks`). Nothing is
            # left to undo, and on a closed loop nothing could be.
            raise
        closed = (isinstance(exc, asyncio.CancelledError) and attempt.cancelled()
                  and task is not None and task.cancelling() <= requests)
        error = _cut_short(slots, exc, cut_short, limit, deadline, closed=closed)
        _abandon(slots, attempt)
        if isinstance(exc, ConnectError) or error is not None:
            slots.connect_errors_total += 1
        elif closed:
            error = _stopped(slots, attempt, own=own)
        if error is None:
            raise
        raise error from error.__cause__
    del slots.attempts[attempt]
    return conn


def _cut_short(slots: Slots, exc: BaseException, cut_short: CutShort,
               limit: asyncio.Timeout, deadline: float | None, *, closed: bool
               ) -> BaseException | None:
    """The caller's error for a login ended by a time limit (`exc`), None for any other end;
    says what the caller is given in `cut_short` (telemetry reports the login with it)."""
    connector, loop = slots.connector, slots.loop
    assert connector is not None
    assert loop is not None
    error: BaseException | None = None
    if isinstance(exc, TimeoutError):
        if not cut_short.in_init:
            error = connector.timed_out(exc, cut_short)
        elif limit.expired():
            error = _slow_init_error(slots)
        else:
            # The hook's own time limit (a statement's timeout=): said so, and kept as the
            # cause, rather than read by the caller as acquire_timeout running out.
            error = ConnectError(
                f"pool {slots.name!r}: the init hook raised TimeoutError on a new connection "
                f"to {connector.target} (a time limit of its own, not "
                "connect_timeout); the connection was closed")
            error.__cause__ = exc
        cut_short.caller_error = type(error)
    elif isinstance(exc, asyncio.CancelledError) and not closed and deadline is not None \
            and loop.time() >= deadline - CLOCK_SLACK:
        cut_short.caller_error = PoolTimeoutError
    return error


def _stopped(slots: Slots, attempt: asyncio.Task[Any], *, own: bool) -> Exception:
    """The caller's error for a login the pool stopped (`give_up_fills`, `give_up_logins`,
    ``close()``)."""
    connector = slots.connector
    assert connector is not None
    if slots.state is OPEN and own:
        return FillGivenUp(  # `give_up_fills`
            f"pool {slots.name!r}: a login of its own to {connector.target} was given up: "
            f"{_cancel_reason(attempt)}; the next checkout logs in again")
    if slots.state is OPEN and _cancel_reason(attempt) == BEFORE_SNAPSHOT:
        # `give_up_logins`: the caller's checkout logs in again (transient).
        return ConnectError(f"pool {slots.name!r}: a login to {connector.target} was given "
                            f"up: {BEFORE_SNAPSHOT}")
    return misuse.closed_error(slots)  # close() stopped the login


class FillGivenUp(ConnectError):
    """A login of the pool's own (a min_size refill) stopped by `give_up_fills`: nobody waited
    for it, and the next checkout logs in itself (not a failure: logged at INFO)."""


#: Why `give_up_fills` stops a login: after a pause...
AFTER_PAUSE = ("it was under way when the process was paused (a frozen Lambda environment), "
               "and its socket may have died meanwhile")
#: ...or before one: at the end of a Lambda invocation.
BEFORE_PAUSE = ("it was still under way when the Lambda invocation ended, and the environment "
                "may be frozen once the response goes, cutting it part-way")


#: ...or before a SnapStart snapshot, for the callers' logins too (`give_up_logins`).
BEFORE_SNAPSHOT = ("it was under way when the SnapStart snapshot was taken, and environments "
                   "restored from it do not have its socket")


def give_up_logins(slots: Slots, why: str) -> list[asyncio.Task[Any]]:
    """`give_up_fills`, and the callers' logins as well: each such caller gets a transient
    `ConnectError` inside its checkout, which logs in again (after a backoff) within its
    acquire_timeout. For a process about to be copied (a SnapStart snapshot): a login would
    go on after the restore on a socket the copy does not have, up to connect_timeout, with a
    token or secret read before the snapshot."""
    stopped = [attempt for attempt in slots.attempts if not attempt.done()]
    for attempt in stopped:
        attempt.cancel(why)
    return stopped


def give_up_fills(slots: Slots, why: str = AFTER_PAUSE) -> list[asyncio.Task[Any]]:
    """Stop the pool's own logins under way (min_size refills; callers' logins are left alone);
    returns their tasks, which end once their sockets are closed.

    After a pause (a frozen Lambda environment) such a login may wait on a socket that died
    meanwhile, for up to connect_timeout, in a slot the next caller needs: with max_size=1 the
    next invocation failed (PoolTimeoutError) though the pooler was back. Its slot goes to the
    caller, which logs in itself. Before a pause (`BEFORE_PAUSE`), it would be cut part-way by
    the freeze, holding a login slot at the pooler until the thaw.

    The first call after a SnapStart restore (`Slots.since_restore`) stops none as begun before
    a pause (`AFTER_PAUSE`, the first invocation's start): each began after the restore (the
    snapshot stopped those under way, and held back those begun after it:
    `_after_any_snapshot`), in the loop's run that serves the first invocation. Stopped there,
    the refill the restore began was lost, and its slot's caller logged in again: two logins
    per restore for one connection."""
    since_restore, slots.since_restore = slots.since_restore, False
    if since_restore and why == AFTER_PAUSE:
        return []
    stopped = [attempt for attempt in slots.fills if not attempt.done()]
    for attempt in stopped:
        attempt.cancel(why)
    return stopped


def _cancel_reason(attempt: asyncio.Task[Any]) -> str:
    """The message `give_up_fills` cancelled `attempt` with."""
    try:
        attempt.result()
    except asyncio.CancelledError as exc:
        if exc.args and isinstance(exc.args[0], str):
            return exc.args[0]
    except BaseException:  # noqa: S110 - (not cancelled: no reason to read)
        pass
    return AFTER_PAUSE


def _slow_init_error(slots: Slots) -> ConnectError:
    assert slots.connector is not None
    return ConnectError(
        f"pool {slots.name!r}: logged in to {slots.connector.target}, but the init hook was "
        f"still running on the new connection when connect_timeout="
        f"{slots.config.connect_timeout:g}s ran out (the connection was closed); make init "
        "faster or raise connect_timeout, which covers the login and init together"
    )


def _abandon(slots: Slots, attempt: asyncio.Task[Any]) -> None:
    """A login nobody waits for any more: a connection it still opens is closed and counted."""
    if attempt.done():
        _discard_attempt(slots, attempt)
    else:
        attempt.cancel()
        attempt.add_done_callback(functools.partial(_discard_attempt, slots))


def _discard_attempt(slots: Slots, attempt: asyncio.Task[Any]) -> None:
    if attempt.cancelled() or attempt.exception() is not None:
        return
    slots.created_total += 1
    slots.closed_total += 1
    slots.observer.connection_closed("abandoned login")
    closing.close_connection(slots, attempt.result(), graceful=False)


def named(name: str, exc: BaseException) -> str:
    """`exc`'s message for a log line: it names the pool itself (connect errors do), or is
    prefixed with the pool's name."""
    text = str(exc)
    return text if text.startswith(f"pool {name!r}") else f"pool {name!r}: {text}"
