"""A pool's lifecycle: open (the credentials provider's first read, `min_size` connections,
housekeeping), close (wait for the connections held, within a time limit, then terminate),
terminate (close everything now), and the connection arguments replaced while open."""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import logging
import os
import threading
import weakref
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, TypeVar

from asyncpool.config import opened_by_open
from asyncpool.connect import blocking_cancel, driver
from asyncpool.connect.connector import provider_call
from asyncpool.errors import CredentialsError, PoolClosedError, PoolError
from asyncpool.observer import PoolObserver
from asyncpool.pool import forks, housekeeping, lost_idle, misuse
from asyncpool.pool.alarms import loop_clock
from asyncpool.pool.forks import FORKS, LIVE
from asyncpool.pool.leaks import LeakTracker, NoLeakTracker, on_leak
from asyncpool.pool.pool_stats import weak_stats
from asyncpool.pool.replaced_credentials import close_credentials as close_provider
from asyncpool.pool.replaced_credentials import in_use, replace
from asyncpool.pool.resets import RELEASE_TIMEOUT
from asyncpool.pool.state import CLOSED_STATE, CLOSING, NEW, OPEN

if TYPE_CHECKING:
    from asyncpool.connect.connector import Connector
    from asyncpool.pool.slots import Slots

logger: logging.Logger = logging.getLogger("asyncpool.pool")
_T = TypeVar("_T")


async def open(slots: Slots, observer: PoolObserver, connector: Connector, wait: bool) -> None:
    slots.forks, slots.pid = FORKS[0], os.getpid()
    slots.loop = asyncio.get_running_loop()
    slots.loop_has_thread_id = isinstance(slots.loop, asyncio.BaseEventLoop)
    slots.opened_in = threading.current_thread().name
    slots.observer = observer
    slots.connector = connector
    slots._may_retire = connector.retire_reasons
    slots._drained = asyncio.Event()
    slots._closed = asyncio.Event()
    cfg = slots.config
    slots.clock = loop_clock(slots.loop)
    if cfg.leak_timeout is not None:
        slots.leaks = LeakTracker(cfg.leak_timeout, _weakly(slots, on_leak), slots.records,
                                 _weakly(slots, _set_leak_timer_unarmed), slots.loop)
        slots.track_leaks = True
    observer.attach(slots.name, weak_stats(slots))
    slots.on_acquired, slots.on_released = observer.checkout_hooks()
    LIVE.add(slots)
    lost_idle.listen()  # (its idle connections closed under it are retired as the close arrives)
    slots._set_state(OPEN)
    slots.opening = opening = slots.loop.create_future()
    try:
        if connector.credentials is not None:
            await _warm(slots, connector)
            slots._check_open()
        count = opened_by_open(cfg)
        if wait and count:
            await housekeeping.fill(slots, count)
        elif count:
            slots._spawn(housekeeping.fill_in_background(slots, count),
                         context=contextvars.Context())
    except BaseException as exc:
        # A close() or terminate() called meanwhile keeps the pool closed; otherwise the
        # failed (or cancelled) open() is undone and open() may be called again: a module-level
        # pool whose database was down at start-up (or a Lambda environment whose first
        # Secrets Manager read failed) must not fail every later request.
        slots.undoing_open = slots.state is OPEN
        try:
            await close(slots, timeout=0)
        finally:
            if slots.undoing_open and slots.state is CLOSED_STATE:
                _back_to_new(slots)
            slots.undoing_open = False
            if isinstance(exc, Exception):
                opening.set_exception(exc)
                opening.exception()  # retrieved: nobody else may be waiting
            else:
                # Cancelled (or interrupted): a concurrent open() was not, and opens it itself.
                opening.set_result(False)
        raise
    opening.set_result(True)
    # The pool's own work runs in a context of its own, not in a copy of the caller's that opened
    # the pool: often a request's (a pool opened lazily, a Lambda's first invocation), whose
    # span would otherwise parent every login it makes for the life of the process, and whose
    # invocation deadline it would keep.
    slots.housekeeper = slots.loop.create_task(
        housekeeping.run(weakref.ref(slots), housekeeping.period_for(cfg)), name=f"asyncpool:{slots.name}",
        context=contextvars.Context(),
    )


def _back_to_new(slots: Slots) -> None:
    """A pool whose open() failed, once closed, as if it had never been opened: what open()
    sets is set again at the next one, and its connections, tasks and credentials provider
    are closed (the built-in providers make a new AWS client at their next read). The
    connector stays, for `Pool.target` to name what the failed open() dialled."""
    slots.observer = PoolObserver()
    slots.on_acquired = slots.on_released = None
    slots.leaks = NoLeakTracker()
    slots.track_leaks = False
    slots._set_state(NEW)


def _nothing_to_close(slots: Slots) -> bool:
    """Whether a close or terminate ends here: closed already, never opened (closed now), or
    inherited across a fork (forgotten: its connections are the parent's)."""
    if slots.state is CLOSED_STATE:
        return True
    if slots.state is NEW:
        slots._set_state(CLOSED_STATE)
        return True
    if forks.inherited(slots):
        forks.forget_inherited(slots)
        return True
    return False


async def close(slots: Slots, timeout: float | None) -> None:
    """Stop handing out connections, wait up to `timeout` for held ones, then terminate.

    Cancelled part-way (a shutdown deadline), it terminates what is left before it ends.
    """
    if _nothing_to_close(slots):
        return
    loop = asyncio.get_running_loop()
    assert slots.loop is not None
    assert slots._drained is not None
    assert slots._closed is not None
    if loop is not slots.loop:
        if slots.loop.is_closed():
            # Its loop is gone (asyncio.run() per call): nothing can be closed politely.
            terminate(slots)
            return
        raise PoolError(
            f"pool {slots.name!r}: close() was called on another event loop than the one the "
            "pool was opened on; call it there (or pool.terminate() from any code on that "
            "loop's thread)"
        )
    if slots.state is CLOSING:
        # Another close() is under way; it waits for what this task holds, which cannot
        # come back while this one waits for it. (One undoing a failed open() would leave the
        # pool new: this close() keeps it closed.)
        slots.undoing_open = False
        _retire_the_callers_own(slots)
        await slots._closed.wait()
        return
    slots._set_state(CLOSING)
    try:
        _stop(slots, "pool closed", graceful=True)
        _retire_the_callers_own(slots)
        if not slots._is_drained():
            slots._drained.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(timeout):
                    await slots._drained.wait()
        # Held past `timeout`, or still being validated or reset: terminated.
        _retire_all(slots, "pool closed")
        # Callers woken by the above give their reserved slots back within an iteration.
        # (Already drained, nothing will set the event: do not wait RELEASE_TIMEOUT for it.)
        if not slots._is_drained():
            slots._drained.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(RELEASE_TIMEOUT):
                    await slots._drained.wait()
        await _end_own_tasks(slots, None if timeout is None else grace(timeout))
        for creds in _take_credentials(slots):
            await close_provider(creds, slots.name)
    except BaseException:
        terminate(slots)
        raise
    _finish(slots, close_credentials=False)


#: What close(timeout=T) gives, after T, to the closes under way (a goodbye to the server, a
#: cancel request to be taken before its connection goes): T, within these bounds. A pooler
#: taking neither (PgBouncer SUSPENDed, a network gone) made close(timeout=0.5) take 5.5 s; the
#: floor keeps close(timeout=0) polite where the pooler answers (in milliseconds).
CLOSE_GRACE = (0.1, 1.0)


def grace(timeout: float) -> float:
    """How long close(`timeout`) waits for the closes under way once `timeout` is spent."""
    low, high = CLOSE_GRACE
    return min(max(timeout, low), high)


async def _end_own_tasks(slots: Slots, within: float | None) -> None:
    """Wait up to `within` (None: as long as they take, each bounded) for the pool's tasks
    (closes, resets); then close the connections they close, at once, and end them.

    A connection whose cancel request is still in flight is closed too, when that request
    goes on by itself (`driver.requests_outlive_close`): measured against PgBouncer 1.18
    (docs/faults.md), closing the cancel request's own socket early crashes it, closing the
    connection the request is for does not. The request then ends by itself, within
    ``driver._CANCEL_REQUEST_TIMEOUT``."""
    tasks = slots.own_tasks()
    if not tasks:
        return
    # (asyncio.wait: a close() cancelled here cancels none of them; one not started yet
    # would never run, and its connection stay open.)
    _, late = await asyncio.wait(tasks, timeout=within)
    if not late:
        return
    kept: set[asyncio.Task[Any]] = set()
    for task, conn in list(slots.closing.items()):
        if driver.pending_cancellations(conn) and not driver.requests_outlive_close(conn):
            kept.add(task)  # (its request would be cut short: left to its own bound)
        else:
            conn.terminate()
    late -= kept
    for task in late:
        task.cancel()
    if late:
        await asyncio.wait(late, timeout=RELEASE_TIMEOUT)


def _retire_the_callers_own(slots: Slots) -> None:
    """Close now the connections that the task calling close() holds: they cannot come back
    while it waits in close() (it waited for them forever with ``timeout=None``, else for
    all of `timeout`). Their holder gets `PoolClosedError` at its next use, as for any
    connection still held when the time is up; the server rolls back what they left open.
    Only close() awaited in the holding task itself is seen: one run in a task of its own
    (``asyncio.gather``, ``asyncio.wait_for`` on Python 3.11) waits as for any holder."""
    own = slots.held_by_current_task()
    if not own:
        return
    task = asyncio.current_task()
    logger.warning(
        "pool %r: close() was called by the task holding %d of its connections (%s): closed "
        "now, as they cannot be given back while it waits; release them (or leave their "
        "block) before closing the pool", slots.name, len(own),
        task.get_name() if task is not None else "no task")
    for record in own:
        slots.retire(record, "pool closed by the task holding it")


def terminate(slots: Slots, cancel_within: float = 0.0) -> None:
    """Close every connection now, without waiting; waiters get `PoolClosedError`. With
    `cancel_within`, the statements running on held connections are cancelled first, from this
    thread, waiting up to that long for the server to take the requests (`Pool.terminate`)."""
    terminate_together([slots], cancel_within)


def terminate_together(pools: Sequence[Slots], cancel_within: float = 0.0) -> None:
    """`terminate` for several pools, their cancel requests sent all at once: a shutdown closing
    several pools takes `cancel_within` once, not once per pool."""
    live = [slots for slots in pools if not _nothing_to_close(slots)]
    for slots in live:
        slots._set_state(CLOSING)
    cancelled: set[int] = set()
    if cancel_within > 0:
        targets = running_targets(live)
        send_cancels(targets, cancel_within)
        cancelled = set(targets)
    for slots in live:
        _stop(slots, "pool terminated", graceful=False)
        _retire_all(slots, "pool terminated", cancelled)
        loop = slots.loop
        for conn in list(slots.closing.values()):
            # Closes under way (graceful ones, and those waiting for a cancel request before
            # terminating) end now. One with a cancel request in flight waits for it, briefly:
            # closed first, the pooler drops the request (its client is gone) and the statement
            # runs on. At most `CLOSE_GRACE`'s upper bound where the request goes on by itself
            # (closing its connection is safe, measured); else its own bound (a connection
            # class of the user's: its request would be cut short).
            if not driver.pending_cancellations(conn):
                conn.terminate()
            elif driver.requests_outlive_close(conn) and loop is not None and not loop.is_closed():
                loop.call_later(CLOSE_GRACE[1], conn.terminate)
        _finish(slots, close_credentials=True)


def _stop(slots: Slots, reason: str, graceful: bool) -> None:
    """The first, synchronous part of closing: nobody waits, logs in or reaps any more."""
    waiters = list(slots.waiters)
    slots.waiters.clear()
    slots.retrying = 0
    attempts = list(slots.attempts.items())
    loop_gone = _loop_gone(slots)
    if loop_gone:
        # Closed with its tasks pending (loop.close() after run_until_complete(), not
        # asyncio.run()): they never run again, and waking one raised RuntimeError ("Event loop
        # is closed") half-way through, the connections left open.
        waiters, attempts = [], []
        slots.attempts.clear()
    why = misuse.OPEN_FAILED if slots.undoing_open else "was closed while waiting"
    for waiter in waiters:
        if not waiter.fut.done():
            waiter.fut.set_exception(PoolClosedError(f"pool {slots.name!r}: {why}"))
    for attempt, cut_short in attempts:
        cut_short.caller_error = PoolClosedError
        attempt.cancel()
    if not loop_gone:
        for task in (slots.housekeeper, slots.lost_refill):
            if task is not None:
                task.cancel()
    for record in list(slots.idle):
        slots.retire(record, reason, graceful=graceful)


#: Cancel requests for the statements of held connections: by the connection's id, its pool's
#: name and where the request goes.
CancelTargets = dict[int, tuple[str, "driver.CancelTarget"]]


def running_targets(pools: Sequence[Slots]) -> CancelTargets:
    """Where to send cancel requests for what the held connections of `pools` run. Every held
    one, as `_retire_all` does: asyncpg does not say whether a statement is running
    (``execute()`` without arguments runs outside its one-at-a-time section), and a server
    ignores a cancel request when none is. On the pools' loop's thread (or while that thread
    is blocked: `asyncpool.pool.shutdown.close_elsewhere`)."""
    return {id(record.conn): (slots.name, target) for slots in pools for record in slots.leased()
            if (target := driver.cancel_target(record.conn)) is not None}


def send_cancels(targets: CancelTargets, timeout: float) -> None:
    """Send `targets`' cancel requests without the loop (`blocking_cancel`), all at once, waiting
    up to `timeout` for the servers to take them: for a process about to end, where no task of
    the loop would run to send them. Any thread; one warning says, pool by pool, which requests
    were sent but not confirmed, and which were not sent and why."""
    if not targets:
        return
    deliveries = blocking_cancel.deliver([target for _, target in targets.values()], timeout)
    missed = _missed_cancels([name for name, _ in targets.values()], deliveries, timeout)
    if missed:
        logger.warning("cancel requests for the connections in use: %s; what those connections "
                       "ran may go on on the server", missed)


def _missed_cancels(pools: list[str], deliveries: list[blocking_cancel.Delivery],
                    timeout: float) -> str:
    """What `send_cancels` warns of: per pool, how many of its requests were sent but not
    confirmed within `timeout`, and not sent (by reason); empty when every one was taken."""
    counts: dict[str, dict[str, int]] = {}
    for pool, delivery in zip(pools, deliveries, strict=True):
        outcomes = counts.setdefault(pool, {})
        if not delivery.taken:
            what = (f"sent, not confirmed within {timeout:.3g}s" if delivery.sent
                    else f"not sent ({delivery.why})")
            outcomes[what] = outcomes.get(what, 0) + 1
    return "; ".join(
        f"pool {pool!r}: " + ", ".join(f"{n} of {pools.count(pool)} {what}" for what, n in outcomes.items())
        for pool, outcomes in counts.items() if outcomes)


def _retire_all(slots: Slots, reason: str, cancelled: set[int] | None = None) -> None:
    for record in list(slots.idle):
        slots.retire(record, reason)
    try:
        running = asyncio.get_running_loop() is slots.loop
    except RuntimeError:  # terminate() outside the loop: no request can be sent
        running = False
    for record in slots.leased():
        if running and (cancelled is None or id(record.conn) not in cancelled):
            # What the holder may be running is cancelled on the server first (as at a
            # leak reclaim), where a cancel can arrive: closing the socket alone leaves it
            # running there until it next writes.
            driver.request_cancel(record.conn)
        slots.retire(record, reason)  # (its lease, if still active, says CLOSED)
    for record in list(slots.checking):
        slots.retire(record, reason)


def _finish(slots: Slots, close_credentials: bool) -> None:
    LIVE.discard(slots)
    slots.handed.clear()  # (a waiter's task the loop never resumes would keep them)
    slots.leaks.close()
    loop = slots.loop
    if close_credentials and loop is not None and not loop.is_closed():
        for creds in _take_credentials(slots):
            slots._spawn(close_provider(creds, slots.name))
    slots._set_state(CLOSED_STATE)
    try:
        slots.observer.detach()
    except Exception:
        logger.exception("pool %r: an observer failed to detach", slots.name)
    if slots._closed is not None and not _loop_gone(slots):
        slots._closed.set()


def _loop_gone(slots: Slots) -> bool:
    """The pool's loop is closed: its tasks and futures can no longer be woken."""
    return slots.loop is not None and slots.loop.is_closed()


def _take_credentials(slots: Slots) -> list[Any]:
    """The credentials providers to close with the pool (each once): the one in use, and those
    replaced that a login still used (`replaced_credentials`)."""
    providers = slots.replaced_credentials
    slots.replaced_credentials = []
    creds = slots.connector.credentials if slots.connector is not None else None
    # By identity: a provider given back by a later set_connect_args() is in both (replaced,
    # then in use again), and a user's provider need not take two closes.
    every = {id(p): p for p in (*providers, creds) if p is not None}
    return list(every.values())


def use_connector(slots: Slots, connector: Connector) -> None:
    """Logins from now on go through `connector` (`Pool.set_connect_args`): the connections
    open now stay until they expire, and logins under way finish as they began."""
    old = slots.connector
    slots.config = connector.config
    slots.connector = connector
    replace(slots, old.credentials if old is not None else None, connector.credentials)


async def _warm(slots: Slots, connector: Connector) -> None:
    """The credentials provider's set-up (a first read of the secret...), within
    `acquire_timeout` as any login: an AWS endpoint that does not answer made open() wait
    for every retry of the AWS client (11 s, past a Lambda INIT's 10)."""
    assert connector.credentials is not None
    limit = slots.config.acquire_timeout
    deadline = asyncio.timeout(limit)
    try:
        async with deadline:
            with in_use(slots, connector.credentials):  # (replaced meanwhile: closed after)
                await provider_call(connector.credentials, "warm", connector.target, slots.name)
    except TimeoutError:
        if not deadline.expired():
            raise
        raise CredentialsError(
            f"pool {slots.name!r}: {type(connector.credentials).__name__} gave no credential "
            f"within acquire_timeout={limit:g}s (its first read, at open()); check that the "
            "service it reads (AWS: a VPC endpoint or a NAT route) answers from here"
        ) from None


def _weakly(slots: Slots, call: Callable[[Slots, _T], None]) -> Callable[[_T], None]:
    """`call(slots, arg)` for the leak tracker, which must not keep a dropped pool alive (its timer
    outlives the pool)."""
    ref = weakref.ref(slots)

    def weak_call(arg: _T) -> None:
        owner = ref()
        if owner is not None:
            call(owner, arg)

    return weak_call


def _set_leak_timer_unarmed(slots: Slots, unarmed: bool) -> None:
    slots.leak_timer_unarmed = unarmed
