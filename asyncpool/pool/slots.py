"""The one owner of a pool's slots.

`Slots` alone holds the idle connections, the callers waiting, the connections held, and the slots
reserved for connections being opened or checked; a pool's size is their sum, computed, never
kept. Every way a connection leaves (error, idle reaping, lifetime, `expire_all`, leak reclaim,
`close`, `terminate`) goes through `retire`, and whatever frees a slot or returns a connection
hands it straight to the first waiter. Each record's `place` says where it is.

The pool's lifecycle is an explicit `PoolState`; code that awaits re-checks it afterwards, so
nothing is handed out once `close()` has begun. Bookkeeping is synchronous: between two awaits no
other task can see a half-moved connection.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import enum
import functools
import logging
import math
import os
import threading
import time
import weakref
from asyncio import get_running_loop
from collections.abc import Callable, Coroutine
from contextvars import ContextVar, copy_context
from threading import get_ident
from types import FrameType
from typing import TYPE_CHECKING, Any, TypeVar

import asyncpg

from asyncpool.config import hook_awaitable
from asyncpool.connect import driver
from asyncpool.connect.connector import CutShort
from asyncpool.connect.driver import BROKEN, BUSY, CLEAN, NEEDS_RESET, returned
from asyncpool.connect.failures import translate
from asyncpool.errors import (
    ConnectError,
    CredentialsError,
    PoolClosedError,
    PoolError,
    PoolTimeoutError,
)
from asyncpool.observer import LeakReport, PoolObserver
from asyncpool.pool import alarms
from asyncpool.pool.alarms import loop_clock
from asyncpool.pool.backoff import Backoff
from asyncpool.pool.leaks import LeakTracker, NoLeakTracker, log_leak, log_returned
from asyncpool.pool.lease import (
    ACTIVE,
    CLOSED,
    INHERITED,
    LEAKED,
    RELEASED,
    Lease,
    LeaseState,
    spare_lease,
    task_of,
)
from asyncpool.pool.record import CHECKING, IDLE, LEASED, MOVING, RETIRED, ConnectionRecord
from asyncpool.stats import PoolStats, StatementCacheStats

if TYPE_CHECKING:
    from asyncpool.config import PoolConfig
    from asyncpool.connect.connector import Connector
    from asyncpool.pool.connection import PooledConnection

logger = logging.getLogger("asyncpool.pool")
_T = TypeVar("_T")


class PoolState(enum.Enum):
    NEW = "new"  # created, not opened
    OPEN = "open"
    CLOSING = "closing"  # close() or terminate() has begun: nothing is handed out any more
    CLOSED = "closed"


NEW = PoolState.NEW
OPEN = PoolState.OPEN
CLOSING = PoolState.CLOSING
CLOSED_STATE = PoolState.CLOSED

#: What `Pool.acquire(timeout=...)` receives when the caller gave no timeout.
UNSET: Any = object()
# A waiter's future resolves to a Lease, or to this: "a slot is yours, open a connection in it".
GRANT: Any = object()

_VALIDATION_QUERY = "SELECT 1"
# asyncio runs a timer up to one clock resolution early: a login cancelled this close to the
# caller's deadline was cancelled by it.
_CLOCK_SLACK = 0.01
# How long a returned connection may spend being reset (cancel finishing, ROLLBACK).
RELEASE_TIMEOUT = 5.0
# How long a graceful close may take before the connection is terminated.
_CLOSE_TIMEOUT = 2.0
_LEAK_CANCEL_MESSAGE = "asyncpool: connection held past leak_timeout was reclaimed"


class ResetsEnd:
    """The loop time (`at`) by which the reset of a connection returned in a context must end,
    when that is sooner than `RELEASE_TIMEOUT` from the return: an invocation's (`LambdaRunner`),
    since its environment may be frozen, or ended, after its deadline (a reset cut short closes
    the connection). None once the invocation is over: a task it started and left running
    carries the context on, and must not have every later return closed for it."""

    __slots__ = ("at",)

    def __init__(self, at: float | None) -> None:
        self.at = at


RESETS_END: ContextVar[ResetsEnd | None] = ContextVar("asyncpool_resets_end", default=None)

# Forks this process has gone through (bumped in the child). A pool remembers the count it was
# opened at: a different one means it was inherited, and its sockets (and its loop's epoll set)
# are shared with the parent, so it must neither use nor close them. The checkout fast path
# reads it through each pool's `fast` flags, which the child clears: os.getpid() would be a
# system call per query.
_FORKS = [0]
# The pools open in this process, for the child of a fork to clear their `fast` flags.
_LIVE: weakref.WeakSet[Slots] = weakref.WeakSet()


def _after_fork_in_child() -> None:
    _FORKS[0] += 1
    for slots in list(_LIVE):
        slots.fast = slots.fast_statements = False
        for record in slots.records:
            lease = record.lease
            if lease is not None and lease.state is ACTIVE:
                # Held across the fork: using it here would talk on the parent's socket, and
                # giving it back in a transaction would send the parent's session a ROLLBACK.
                lease.state = INHERITED


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


async def settle_loop(timeout: float) -> None:
    """`settle` every pool open on the running loop, attached to a runner or not."""
    await settle(pools_on_loop(), timeout)


def pools_on_loop() -> list[Slots]:
    """The pools open on the running loop."""
    loop = get_running_loop()
    return [s for s in _LIVE if s.loop is loop]


async def settle(pools: list[Slots], timeout: float) -> None:
    """Wait up to `timeout`, all `pools` together, for the resets of connections whose holders
    left before the reset ended (`Slots.checkin`); one still running then is cancelled and its
    connection closed, before this returns (a cancel request in flight is given what is left
    of `timeout`: closing under it crashes PgBouncer 1.18, pgbouncer#801).

    For a process about to be frozen (the end of a Lambda invocation): a reset left waiting
    would keep a pooler's server connection, and a transaction, until the thaw."""
    pending = {task: record for slots in pools for task, record in slots.resets.items()
               if not task.done()}
    if not pending:
        return
    loop = get_running_loop()
    deadline = loop.time() + max(timeout, 0.0)
    _, late = await asyncio.wait(pending, timeout=max(timeout, 0.0))
    for task in late:
        task.cancel()  # `_reset` retires its connection
    if late:
        await asyncio.wait(late)
    for task in late:
        conn = pending[task].conn
        requests = driver.pending_cancellations(conn)
        remaining = deadline - loop.time()
        if requests and remaining > 0:
            await asyncio.wait(requests, timeout=remaining)
        conn.terminate()  # (at once, where `retire` would have waited for the request)


class Waiter:
    """A caller queued for a connection. `retrying` callers already hold a slot (they are between
    two login attempts) and take only connections; the others take connections or slots."""

    __slots__ = ("context", "frame", "fut", "retrying", "started", "task")

    def __init__(self, fut: asyncio.Future[Any], frame: FrameType | None, started: float,
                 retrying: bool) -> None:
        self.fut = fut
        self.frame = frame
        self.started = started
        self.retrying = retrying
        self.task = asyncio.current_task()
        self.context = copy_context()


class _Progress:
    """What a slow checkout is doing, for the error it raises if its time runs out."""

    __slots__ = ("deadline", "holding", "last_error", "phase", "queued")

    def __init__(self, deadline: float | None) -> None:
        self.deadline = deadline
        self.phase = "waiting"
        self.last_error: BaseException | None = None
        self.holding = False  # this caller holds a reserved slot (counted in `connecting`)
        self.queued = 0.0  # seconds spent in line before a slot or connection came


class _HotSlots:
    """The attributes of `Slots` that every checkout and return reads, in a class of their own.

    CPython lays a class's ``__slots__`` out in sorted order, whatever order they are written in;
    only a base class's come first, together. With hundreds of pools in one process, each query
    finds its pool's lines cold: these fit in three lines instead of being spread over all six.
    """

    __slots__ = ("_may_retire", "acquired_total", "clock", "fast", "fast_statements", "idle",
                 "leak_timer_unarmed", "leaks", "loop", "loop_has_thread_id", "max_queries",
                 "on_acquired", "on_released", "setup", "track_leaks", "validate_after")


class Slots(_HotSlots):
    """Owns every connection and slot of one pool; provides the `Checkouts` interface.

    Sizes: ``size = len(idle) + in use + connecting`` and never exceeds ``max_size``;
    `connecting` counts slots reserved by a caller (opening a connection, validating one, or
    granted to a waiter that has not run yet). A record in use carries its lease (`record.lease`).
    """

    # Slots, not a __dict__: with more than 30 attributes an instance's dict no longer shares its
    # class's keys, and each read on the query path becomes a hashed lookup.
    __slots__ = (
        "__weakref__", "_closed", "_drained", "attempts", "background", "checking", "closed_total",
        "closing", "config", "connect_errors_total", "connecting", "connector", "created_total",
        "filling", "forks", "generation", "handed", "housekeeper", "leaked_total", "name",
        "observer", "opened_in", "opening", "pid",
        "records", "replaced_credentials", "resets", "retrying", "state", "timeouts_total",
        "validation_failures_total", "waiters",
    )

    def __init__(self, name: str, config: PoolConfig) -> None:
        # Idle connections, the most recently used last (taken from and put back at the end).
        # A deque, not a list: CPython gives a list's items back when it empties and allocates
        # them again at the next append (through libc: 880 instructions per query on a pool of
        # one, benchmarks/README.md); a deque keeps its block.
        self.idle: collections.deque[ConnectionRecord] = collections.deque()
        self.waiters: collections.deque[Waiter] = collections.deque()
        self.state = NEW
        self.forks = _FORKS[0]
        # Every connection of the pool (idle, in use, being checked or moved), retired ones not.
        self.records: list[ConnectionRecord] = []
        # A checkout may take an idle connection without asking more of the pool: it is open, in
        # the process that opened it, and nobody is in line (`_refresh_fast` keeps it so). One
        # read instead of four on every checkout and return.
        self.fast = False
        # `fast`, and no hook or limit asks for more on each checkout (no `setup`, no
        # `max_queries`): the statement runners' one test, where they would make three.
        self.fast_statements = False
        # The loop's clock: time.monotonic itself under asyncio's loops (their time() is only a
        # Python call around it), the loop's own method otherwise (uvloop's is its cached clock).
        self.clock: Callable[[], float] = time.monotonic
        self.loop: asyncio.AbstractEventLoop | None = None
        # An asyncio loop says which thread runs it (``_thread_id``, None when stopped), and a
        # thread runs one loop at a time: the fast paths ask that instead of get_running_loop(),
        # which on Python 3.11 makes a getpid() system call each time (to notice a fork; the pool
        # has its own fork check): about 0.6 µs per query here (benchmarks/README.md). Other
        # loops (uvloop) are asked with get_running_loop().
        self.loop_has_thread_id = False
        # Leases carry the holder's context only for a leak report to be made in it.
        self.track_leaks = False
        self.leaks: LeakTracker | NoLeakTracker = NoLeakTracker()
        # The leak tracker's timer is not armed: the next checkout arms it (`leaks.arm`).
        self.leak_timer_unarmed = False
        self.acquired_total = 0
        # The observer's per-checkout hooks, None when they would do nothing (not called then).
        self.on_acquired: Callable[[float], None] | None = None
        self.on_released: Callable[[float], None] | None = None
        # Infinite for never (`None`): the return adds it to the time without a test.
        self.validate_after = math.inf if config.validate_after is None else config.validate_after
        # The connections can ask to be retired: they have a `retire_reason` ("unnamed" mode's
        # connection class; set from the connector at open), read as an attribute per return.
        self._may_retire = False
        self.max_queries = config.max_queries
        #: asyncpg's ``setup`` hook, awaited by the acquire contexts at each checkout.
        self.setup = config.setup
        self.name = name
        self.config = config
        self.opened_in = ""  # the name of the thread whose loop opened the pool
        self.connector: Connector | None = None
        # Providers of connectors replaced by new connection arguments: closed with the pool (a
        # login under way may still be using one).
        self.replaced_credentials: list[Any] = []
        self.observer: PoolObserver = PoolObserver()
        self.connecting = 0
        # Of `connecting`: slots `fill` reserved (min_size, at open or housekeeping), no caller's.
        self.filling = 0
        self.checking: set[ConnectionRecord] = set()
        # Leases handed to a waiter whose task has not resumed to take them (`_put`): not yet a
        # checkout, so one retired meanwhile has no use time (`_end_use`), and the waiter still
        # counts as pending (`stats`).
        self.handed: set[Lease] = set()
        self.retrying = 0  # waiters in `waiters` that are between login attempts
        # Logins in progress, each with what its caller is told if it is stopped part-way.
        self.attempts: dict[asyncio.Task[Any], CutShort] = {}
        self.background: set[asyncio.Task[Any]] = set()
        # Resets of returned connections (among `background`) and their records, for `settle`.
        self.resets: dict[asyncio.Task[bool], ConnectionRecord] = {}
        # Connections being closed politely, by the task doing it (terminate() cuts them short).
        self.closing: dict[asyncio.Task[Any], Any] = {}
        self.housekeeper: asyncio.Task[None] | None = None
        # The outcome of the open() under way (or done): a concurrent open() waits for it.
        self.opening: asyncio.Future[None] | None = None
        # Bumped by expire_all(): a login that began before it does not join the pool.
        self.generation = 0
        self.pid = os.getpid()
        self._drained: asyncio.Event | None = None
        self._closed: asyncio.Event | None = None
        self.created_total = 0
        self.closed_total = 0
        self.timeouts_total = 0
        self.leaked_total = 0
        self.validation_failures_total = 0
        self.connect_errors_total = 0

    def __repr__(self) -> str:
        # What ``repr(pool.fetchval)`` shows: the helpers are statement runners bound to this.
        return f"pool {self.name!r}"

    # -- lifecycle ----------------------------------------------------------------------------

    async def open(self, observer: PoolObserver, connector: Connector, wait: bool) -> None:
        self.forks, self.pid = _FORKS[0], os.getpid()
        self.loop = asyncio.get_running_loop()
        self.loop_has_thread_id = isinstance(self.loop, asyncio.BaseEventLoop)
        self.opened_in = threading.current_thread().name
        self.observer = observer
        self.connector = connector
        self._may_retire = connector.retire_reasons
        self._drained = asyncio.Event()
        self._closed = asyncio.Event()
        cfg = self.config
        self.clock = loop_clock(self.loop)
        if cfg.leak_timeout is not None:
            self.leaks = LeakTracker(cfg.leak_timeout, _weakly(self, Slots.on_leak), self.records,
                                     _weakly(self, _set_leak_timer_unarmed), self.loop)
            self.track_leaks = True
        observer.attach(self.name, _weak_stats(self))
        self.on_acquired, self.on_released = observer.checkout_hooks()
        _LIVE.add(self)
        self._set_state(OPEN)
        self.opening = opening = self.loop.create_future()
        try:
            if connector.credentials is not None:
                await self._warm(connector)
                self._check_open()
            if wait and cfg.min_size:
                await self.fill(cfg.min_size)
            elif cfg.min_size:
                self._spawn(self._fill_in_background(cfg.min_size))
        except BaseException as exc:
            await self.close(timeout=0)
            opening.set_exception(exc if isinstance(exc, Exception) else PoolClosedError(
                f"pool {self.name!r}: the open() under way was cancelled; open the pool again"))
            opening.exception()  # retrieved: nobody else may be waiting
            raise
        opening.set_result(None)
        self.housekeeper = self.loop.create_task(
            housekeeping(weakref.ref(self), _housekeeping_period(cfg)), name=f"asyncpool:{self.name}"
        )

    async def close(self, timeout: float | None) -> None:
        """Stop handing out connections, wait up to `timeout` for held ones, then terminate.

        Cancelled part-way (a shutdown deadline), it terminates what is left before it ends.
        """
        if self.state is CLOSED_STATE:
            return
        if self.state is NEW:
            self._set_state(CLOSED_STATE)
            return
        if self.inherited():
            self._forget_inherited()
            return
        loop = asyncio.get_running_loop()
        assert self.loop is not None
        assert self._drained is not None
        assert self._closed is not None
        if loop is not self.loop:
            if self.loop.is_closed():
                # Its loop is gone (asyncio.run() per call): nothing can be closed politely.
                self.terminate()
                return
            raise PoolError(
                f"pool {self.name!r}: close() was called on another event loop than the one the "
                "pool was opened on; call it there (or pool.terminate() from any code on that "
                "loop's thread)"
            )
        if self.state is CLOSING:
            # Another close() is under way; it waits for what this task holds, which cannot
            # come back while this one waits for it.
            self._retire_the_callers_own()
            await self._closed.wait()
            return
        self._set_state(CLOSING)
        try:
            self._stop("pool closed", graceful=True)
            self._retire_the_callers_own()
            if not self._is_drained():
                self._drained.clear()
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(timeout):
                        await self._drained.wait()
            # Held past `timeout`, or still being validated or reset: terminated.
            self._retire_all("pool closed")
            # Callers woken by the above give their reserved slots back within an iteration.
            # (Already drained, nothing will set the event: do not wait RELEASE_TIMEOUT for it.)
            if not self._is_drained():
                self._drained.clear()
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(RELEASE_TIMEOUT):
                        await self._drained.wait()
            # Shielded: a close() cancelled here must not cancel a close or a terminate that has
            # not started yet (its coroutine would never run, and its connection stay open).
            await asyncio.shield(asyncio.gather(*self._own_tasks(), return_exceptions=True))
            for creds in self._take_credentials():
                try:
                    await creds.close()
                except Exception:
                    logger.exception("pool %r: closing the credentials provider failed", self.name)
        except BaseException:
            self.terminate()
            raise
        self._finish(close_credentials=False)

    def _retire_the_callers_own(self) -> None:
        """Close now the connections that the task calling close() holds: they cannot come back
        while it waits in close() (it waited for them forever with ``timeout=None``, else for
        all of `timeout`). Their holder gets `PoolClosedError` at its next use, as for any
        connection still held when the time is up; the server rolls back what they left open.
        Only close() awaited in the holding task itself is seen: one run in a task of its own
        (``asyncio.gather``, ``asyncio.wait_for`` on Python 3.11) waits as for any holder."""
        task = asyncio.current_task()
        own = [record for record in self.leased() if (lease := record.lease) is not None
               and lease.state is ACTIVE and lease.task is task]
        if not own:
            return
        logger.warning(
            "pool %r: close() was called by the task holding %d of its connections (%s): closed "
            "now, as they cannot be given back while it waits; release them (or leave their "
            "block) before closing the pool", self.name, len(own),
            task.get_name() if task is not None else "no task")
        for record in own:
            self.retire(record, "pool closed by the task holding it")

    def terminate(self) -> None:
        """Close every connection now, without waiting; waiters get `PoolClosedError`."""
        if self.state is CLOSED_STATE:
            return
        if self.state is NEW:
            self._set_state(CLOSED_STATE)
            return
        if self.inherited():
            self._forget_inherited()
            return
        self._set_state(CLOSING)
        self._stop("pool terminated", graceful=False)
        self._retire_all("pool terminated")
        for conn in list(self.closing.values()):
            # Graceful closes under way end now, unless a cancel request is still in flight
            # (they wait for it, bounded, then close).
            if not driver.pending_cancellations(conn):
                conn.terminate()
        self._finish(close_credentials=True)

    def _forget_inherited(self) -> None:
        """Closed in a forked child: forget the parent's connections without touching them."""
        self.idle.clear()
        for record in self.records:
            lease = record.lease
            if lease is not None and lease.state is ACTIVE:
                lease.state = CLOSED  # a holder's next use is refused, its release does nothing
            record.lease = None
            record.spare = None
            record.place = RETIRED
        self.records.clear()
        self.checking.clear()
        self.waiters.clear()
        self.attempts.clear()
        self.handed.clear()
        self.connecting = self.filling = 0
        self._set_state(CLOSED_STATE)

    def _stop(self, reason: str, graceful: bool) -> None:
        """The first, synchronous part of closing: nobody waits, logs in or reaps any more."""
        waiters = list(self.waiters)
        self.waiters.clear()
        self.retrying = 0
        for waiter in waiters:
            if not waiter.fut.done():
                waiter.fut.set_exception(PoolClosedError(f"pool {self.name!r} was closed while waiting"))
        for attempt, cut_short in list(self.attempts.items()):
            cut_short.caller_error = PoolClosedError
            attempt.cancel()
        if self.housekeeper is not None:
            self.housekeeper.cancel()
        for record in list(self.idle):
            self.retire(record, reason, graceful=graceful)

    def _retire_all(self, reason: str) -> None:
        for record in list(self.idle):
            self.retire(record, reason)
        try:
            running = asyncio.get_running_loop() is self.loop
        except RuntimeError:  # terminate() outside the loop: no request can be sent
            running = False
        for record in self.leased():
            if running:
                # What the holder may be running is cancelled on the server first (as at a
                # leak reclaim), where a cancel can arrive: closing the socket alone leaves it
                # running there until it next writes.
                driver.request_cancel(record.conn)
            self.retire(record, reason)  # (its lease, if still active, says CLOSED)
        for record in list(self.checking):
            self.retire(record, reason)

    def _own_tasks(self) -> list[asyncio.Task[Any]]:
        tasks = list(self.background)
        if self.housekeeper is not None:
            tasks.append(self.housekeeper)
        return tasks

    def _finish(self, close_credentials: bool) -> None:
        _LIVE.discard(self)
        self.handed.clear()  # (a waiter's task the loop never resumes would keep them)
        self.leaks.close()
        loop = self.loop
        if close_credentials and loop is not None and not loop.is_closed():
            for creds in self._take_credentials():
                self._spawn(_close_credentials(creds, self.name))
        self._set_state(CLOSED_STATE)
        try:
            self.observer.detach()
        except Exception:
            logger.exception("pool %r: an observer failed to detach", self.name)
        if self._closed is not None:
            self._closed.set()

    def _take_credentials(self) -> list[Any]:
        """The credentials providers to close with the pool (each once)."""
        providers = self.replaced_credentials
        self.replaced_credentials = []
        creds = self.connector.credentials if self.connector is not None else None
        return [*providers, creds] if creds is not None else providers

    def use_connector(self, connector: Connector) -> None:
        """Logins from now on go through `connector` (`Pool.set_connect_args`): the connections
        open now stay until they expire, and logins under way finish as they began."""
        old = self.connector
        self.config = connector.config
        self.connector = connector
        if (old is not None and old.credentials is not None
                and old.credentials is not connector.credentials):
            self.replaced_credentials.append(old.credentials)

    def _set_state(self, state: PoolState) -> None:
        self.state = state
        self._refresh_fast()

    def _refresh_fast(self) -> None:
        """Recompute `fast` from what it sums up: called whenever the state or the line of
        waiters changes (and a fork clears it: `_after_fork_in_child`)."""
        fast = self.state is OPEN and not self.waiters and self.forks == _FORKS[0]
        self.fast = fast
        self.fast_statements = fast and self.setup is None and self.max_queries is None

    def leased(self) -> list[ConnectionRecord]:
        """The connections in use: held, or being reset after their return."""
        return [record for record in self.records if record.place is LEASED]

    def _is_drained(self) -> bool:
        return not self.records and self.connecting == 0

    def _note_drained(self) -> None:
        if self._drained is not None and self._is_drained():
            self._drained.set()

    def _check_open(self) -> None:
        if self.state is not OPEN:
            raise self.closed_error()

    def inherited(self) -> bool:
        """This process is a fork of the one that opened the pool."""
        return self.forks != _FORKS[0] and self.state is not NEW

    def forked_error(self) -> PoolError:
        return PoolError(
            f"pool {self.name!r} was opened in process {self.pid} and this process "
            f"({os.getpid()}) is a fork of it: its connections belong to the parent, and using or "
            "closing them here would break the parent's. Create the pool in each process after "
            "the fork (Lambda managed instances import the handler in each worker)"
        )

    def refuse_other_loop(self) -> None:
        """Raise `other_loop_error` unless called from the pool's loop, in its thread (a held
        connection given back, or used, from elsewhere)."""
        loop = self.loop
        if loop is not None and not (
                loop._thread_id == get_ident() if self.loop_has_thread_id  # type: ignore[attr-defined]
                else asyncio._get_running_loop() is loop):
            raise self.other_loop_error(loop)

    def refuse_running_elsewhere(self, call: str) -> None:
        """For the synchronous calls that close connections (`terminate`, `expire_all`): raise
        a `PoolError` while the pool's loop runs in another thread (asyncio's transports are
        not thread-safe: done from there, a waiter woke only when something else woke the loop,
        and in debug mode the call failed half-way). With the loop stopped, any thread may."""
        loop = self.loop
        if loop is None or not loop.is_running() or (
                loop._thread_id == get_ident() if self.loop_has_thread_id  # type: ignore[attr-defined]
                else asyncio._get_running_loop() is loop):
            return
        raise PoolError(
            f"pool {self.name!r}: {call} was called from thread "
            f"{threading.current_thread().name!r} while the pool's loop runs in another thread; "
            f"call it on that loop: loop.call_soon_threadsafe(pool.{call.rstrip('()')})")

    def other_loop_error(self, loop: asyncio.AbstractEventLoop) -> PoolError:
        """Used on a loop it was not opened on: asyncpg connections belong to their loop. The
        advice depends on what happened to the pool's loop."""
        here = threading.current_thread().name
        if loop.is_closed():
            what = (
                "the loop that opened it has ended (an asyncio.run() that returned, a test's "
                "event loop torn down, a TestClient used without `with`)"
            )
            advice = (
                "open the pool on the loop that uses it: in FastAPI's lifespan (and test with "
                "`with TestClient(app):`), in a pytest fixture with the same loop scope as the "
                "tests that use it, or on Lambda with asyncpool.integrations.lambda_runner"
            )
        elif here != self.opened_in:
            what = f"its loop runs in thread {self.opened_in!r} and this call comes from thread {here!r}"
            advice = (
                "run the call on the pool's loop (asyncio.run_coroutine_threadsafe(coro, loop)) "
                "or give this thread a pool of its own"
            )
        else:
            what = "this thread now runs a different event loop than the one that opened it"
            advice = (
                "keep one loop for the pool's life: open and use it under the same asyncio.run(), "
                "or on Lambda use asyncpool.integrations.lambda_runner"
            )
        return PoolError(f"pool {self.name!r} was opened on another event loop: {what}; {advice}")

    def closed_error(self) -> PoolClosedError:
        if self.state is NEW:
            return PoolClosedError(f"the pool {self.name!r} is not open yet: await pool.open() first (or "
                                   "'pool = await asyncpool.create_pool(...)')")
        return PoolClosedError(f"the pool {self.name!r} is closed")

    # -- the one exit -------------------------------------------------------------------------

    def retire(self, record: ConnectionRecord, reason: str, *, graceful: bool = False) -> None:
        """Take `record` out of the pool for good, from wherever it is: close its connection
        (politely if `graceful`), count it, and give its slot to the first waiter.

        A record being validated keeps its slot: the caller validating it owns that slot and
        connects a replacement in it (or gives it back).
        """
        place = record.place
        if place is RETIRED:
            return
        if place is IDLE:
            self.idle.remove(record)
        elif place is LEASED:
            lease = record.lease
            record.lease = None
            if lease is not None and lease.state is ACTIVE:
                lease.state = CLOSED
                self._end_use(lease)
        elif place is CHECKING:
            self.checking.discard(record)
        record.place = RETIRED
        record.spare = None  # (the spare lease refers back to the record)
        self.records.remove(record)
        self.closed_total += 1
        self.observer.connection_closed(reason)
        self._close_connection(record.conn, graceful)
        if place is not CHECKING:
            self._grant_slot()
        if self.state is CLOSING:
            self._note_drained()

    def _close_connection(self, conn: Any, graceful: bool) -> None:
        if self.forks != _FORKS[0]:
            # Inherited: the socket and its event-loop registration are the parent's too. Leave
            # them alone: closing through the transport would take the socket out of the epoll
            # set the parent's loop shares, and a Terminate would end the parent's session.
            return
        loop = self.loop
        if loop is None or loop.is_closed():
            with contextlib.suppress(Exception):
                conn.terminate()
            return
        if graceful and not conn.is_closed():
            task = self._spawn(_close_gracefully(conn))
            self.closing[task] = conn
            task.add_done_callback(self._closed_gracefully)
            return
        if driver.pending_cancellations(conn):
            # Closing the connection would cancel asyncpg's cancel request mid-flight, and closing
            # that request's socket early crashes PgBouncer 1.18 (pgbouncer#801).
            self._spawn(_terminate_after(conn))
        else:
            conn.terminate()

    def _spawn(self, coro: Any) -> asyncio.Task[Any]:
        assert self.loop is not None
        task = self.loop.create_task(coro)
        self.background.add(task)
        task.add_done_callback(self.background.discard)
        return task

    def _closed_gracefully(self, task: asyncio.Task[Any]) -> None:
        self.closing.pop(task, None)

    # -- slots --------------------------------------------------------------------------------

    def size(self) -> int:
        return len(self.idle) + len(self.leased()) + self.connecting

    def _grant_slot(self) -> None:
        """A slot is free: the first waiter that wants a slot gets it (and will connect). With
        nobody waiting the pool just got smaller (its size is a sum, nothing to adjust)."""
        if not self.waiters or self.state is not OPEN:
            return
        for waiter in self.waiters:
            if not waiter.retrying and not waiter.fut.done():
                break
        else:
            return
        self.waiters.remove(waiter)
        self._refresh_fast()
        self.connecting += 1
        waiter.fut.set_result(GRANT)

    def _release_slot(self) -> None:
        """A caller gives back the slot it reserved (its login failed, it was cancelled...)."""
        self.connecting -= 1
        self._grant_slot()
        if self.state is CLOSING:
            self._note_drained()

    def _put(self, record: ConnectionRecord, now: float) -> None:
        """Put a clean connection (`MOVING`, carrying its slot) back in service: to the first
        waiter, else idle; or retire it if the pool is closing or it must go."""
        if self.state is not OPEN:
            self.retire(record, "pool closed", graceful=True)
            return
        retired = record.conn.retire_reason if self._may_retire else None
        if retired or record.expired(now):
            self.retire(record, retired or "expired", graceful=True)
            return
        if self.max_queries is not None and driver.queries_count(record.conn) >= self.max_queries:
            self.retire(record, "max_queries reached", graceful=True)
            return
        waiters = self.waiters
        while waiters:
            waiter = waiters.popleft()
            if waiter.retrying:
                self.retrying -= 1
            if waiter.fut.done():
                continue  # cancelled; its task has not run yet to leave the queue
            lease = Lease(record, now, waiter.frame, waiter.task, waiter.context)
            self._hold(record, lease)
            self.handed.add(lease)
            waiter.fut.set_result(lease)
            self._refresh_fast()
            if waiter.retrying:
                # It was between login attempts in a slot of its own, which it no longer needs.
                self._release_slot()
            return
        self._refresh_fast()  # (the line may have emptied: waiters that gave up)
        record.place = IDLE
        self.idle.append(record)

    def _new_lease(self, record: ConnectionRecord, now: float, frame: FrameType | None) -> Lease:
        """A lease for the running task (`checkout_nowait` builds its own, inline)."""
        return Lease(record, now, frame, asyncio.current_task(),
                     copy_context() if self.track_leaks else None)

    def _hold(self, record: ConnectionRecord, lease: Lease) -> None:
        record.place = LEASED
        record.lease = lease
        if self.leak_timer_unarmed:
            self.leaks.arm(lease.acquired_at)

    # -- checkout (the `Checkouts` interface) -------------------------------------------------

    @property
    def transaction_sql(self) -> str | None:
        """What `pool.transaction()` runs after BEGIN: server_settings a pooler would not keep."""
        connector = self.connector
        return connector.startup.transaction_sql if connector is not None else None

    @property
    def statement_mode(self) -> str:
        return self.config.prepared_statements

    @property
    def target(self) -> str:
        return str(self.connector.target) if self.connector is not None else "<not open>"

    def checkout_nowait(self, frame: FrameType | None) -> Lease | None:
        """The fast path, without a coroutine: the most recently used idle connection when
        nobody is queued and no check is due. None sends the caller to `checkout`.

        Every query goes through here: one clock read, no system call (the loop is checked by
        thread: `loop_has_thread_id`), no context copy unless leaks are tracked, the observer
        called only if it listens."""
        idle = self.idle
        if not self.fast or not idle:
            return None
        record = idle[-1]
        clock = self.clock  # (a local: see `statement_runner`)
        now = clock()
        loop = self.loop
        if (now >= record.check_at or not record.probe.is_connected()
                or not (loop._thread_id == get_ident() if self.loop_has_thread_id  # type: ignore[union-attr]
                        else get_running_loop() is loop)):
            return None
        idle.pop()
        # The record's spare lease if it has one (left by a clean return: `spare_lease`), else
        # Lease(record, now, frame, task, context) without the call to its __init__, as the
        # statement runner does: no allocation (with the block's clean return written out,
        # 2,156 instructions less per acquire + `conn.fetchval`, benchmarks/README.md);
        # tests/unit/test_lease.py checks that every slot is set either way.
        lease = record.spare
        if lease is None:
            lease = spare_lease(record)
        else:
            record.spare = None  # held now: only a clean end of a block gives it back
        lease.acquired_at = now
        lease.task = task_of(loop)
        lease.context = copy_context() if self.track_leaks else None
        lease.frame = frame
        lease.lasti = frame.f_lasti if frame is not None else 0
        lease.state = ACTIVE
        lease.scoped = False
        record.place = LEASED
        record.lease = lease
        if self.leak_timer_unarmed:
            self.leaks.arm(now)
        self.acquired_total += 1
        if self.on_acquired is not None:
            self.on_acquired(0.0)
        return lease

    async def _warm(self, connector: Connector) -> None:
        """The credentials provider's set-up (a first read of the secret...), within
        `acquire_timeout` as any login: an AWS endpoint that does not answer made open() wait
        for every retry of the AWS client (11 s, past a Lambda INIT's 10)."""
        assert connector.credentials is not None
        limit = self.config.acquire_timeout
        deadline = asyncio.timeout(limit)
        try:
            async with deadline:
                await connector.credentials.warm(connector.target)
        except TimeoutError:
            if not deadline.expired():
                raise
            raise CredentialsError(
                f"pool {self.name!r}: {type(connector.credentials).__name__} gave no credential "
                f"within acquire_timeout={limit:g}s (its first read, at open()); check that the "
                "service it reads (AWS: a VPC endpoint or a NAT route) answers from here"
            ) from None

    async def checkout(self, timeout: float | None, frame: FrameType | None) -> Lease:
        """The slow path: check an idle connection, open one, or wait in line."""
        loop = self.loop
        if self.forks != _FORKS[0] and self.state is not NEW:
            raise self.forked_error()
        if self.state is not OPEN or loop is None:
            raise self.closed_error()
        if asyncio.get_running_loop() is not loop:
            raise self.other_loop_error(loop)
        if timeout is UNSET:
            timeout = self.config.acquire_timeout
        started = loop.time()
        progress = _Progress(None if timeout is None else started + timeout)
        try:
            async with asyncio.timeout(timeout):
                lease = await self._obtain(started, frame, progress)
        except TimeoutError:
            self.timeouts_total += 1
            self.observer.timed_out()
            raise self._timeout_error(timeout, progress) from None
        self.acquired_total += 1
        if self.on_acquired is not None:
            self.on_acquired(loop.time() - started)
        return lease

    async def _obtain(self, started: float, frame: FrameType | None, progress: _Progress) -> Lease:
        loop = self.loop
        assert loop is not None
        while True:
            self._check_open()
            if self.idle and not self.waiters:
                record = self.idle.pop()
                record.place = MOVING
                now = loop.time()
                if now < record.check_at and not record.conn.is_closed():
                    lease = self._new_lease(record, now, frame)
                    self._hold(record, lease)
                    return lease
                lease_or_none = await self._check(record, now, frame, progress)
                if lease_or_none is not None:
                    return lease_or_none
                continue
            if self.size() < self.config.max_size:
                self.connecting += 1
                progress.holding = True
                lease_or_none = await self._connect_for(frame, progress)
                if lease_or_none is not None:
                    return lease_or_none
                continue
            return await self._wait(started, frame, progress)

    async def _check(self, record: ConnectionRecord, now: float, frame: FrameType | None,
                     progress: _Progress) -> Lease | None:
        """An idle connection due a look (`MOVING`): hand it out if it passes, else retire it
        and open one in its slot. None: the slot went back to the pool, start over."""
        if record.conn.is_closed():
            # Closed while idle (server restart, pooler timeout seen by the driver).
            self._count_failed_check()
            self.retire(record, "broken")
            return None
        if record.expired(now):
            self.retire(record, "expired", graceful=True)
            return None
        record.place = CHECKING
        self.checking.add(record)
        self.connecting += 1
        progress.holding = True
        progress.phase = "validating"
        try:
            # Marked stale (a freeze, a snapshot restore: the path may have vanished without a
            # word), the check leaves time for a replacement; otherwise a slow answer is a queue
            # (a busy pooler) and the connection is waited for, as healthy.
            failure = await self._validate(record, progress.deadline if record.stale else None)
        except BaseException:
            self.retire(record, "cancelled during validation")
            progress.holding = False
            self._release_slot()
            raise
        if record.place is not CHECKING:  # retired meanwhile (close, terminate)
            progress.holding = False
            self._release_slot()
            raise self.closed_error()
        if failure is not None:
            progress.last_error = failure
            self._count_failed_check()
            self.retire(record, "failed validation")  # its slot stays with this caller
            return await self._connect_for(frame, progress)
        self.checking.discard(record)
        self.connecting -= 1
        progress.holding = False
        record.place = MOVING
        record.stale = False
        if self.state is not OPEN:
            self.retire(record, "pool closed", graceful=True)
            raise self.closed_error()
        lease = self._new_lease(record, self.loop.time() if self.loop else now, frame)
        self._hold(record, lease)
        return lease

    async def _validate(self, record: ConnectionRecord,
                        deadline: float | None) -> ConnectError | None:
        """One round trip on a connection that sat idle: None if it answered, else what it did.

        Within `connect_timeout`, and with a `deadline` (the acquire's, for a connection marked
        stale) within half of what is left of it: a connection that vanished without a word
        answers nothing, and the time to open its replacement must be left (with Lambda's
        defaults both are 5 s, and the check used to take all of it, failing the acquire)."""
        timeout = self.config.connect_timeout
        if deadline is not None and self.loop is not None:
            timeout = min(timeout, max((deadline - self.loop.time()) / 2, _CLOCK_SLACK))
        try:
            with self.observer.pool_statement("validate"):
                await record.conn.execute(_VALIDATION_QUERY, timeout=timeout)
        # InternalClientError: the server's FATAL (pg_terminate_backend, pooler shutdown) arrived
        # but the driver has not yet seen the socket close.
        except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError,
                asyncpg.InternalClientError) as exc:
            logger.info("pool %r: idle connection failed its check (%s); replacing it", self.name,
                        type(exc).__name__)
            what = (f"no answer within {timeout:g}s" if isinstance(exc, TimeoutError)
                    else type(exc).__name__)
            return ConnectError(f"an idle connection failed its check ({what}) and was replaced")
        return None

    def _count_failed_check(self) -> None:
        self.validation_failures_total += 1
        self.observer.validation_failed()

    async def _wait(self, started: float, frame: FrameType | None, progress: _Progress) -> Lease:
        """Queue until a connection is handed over or a slot is granted."""
        assert self.loop is not None
        waiter = Waiter(self.loop.create_future(), frame, started, retrying=False)
        self.waiters.append(waiter)
        self.fast = self.fast_statements = False
        progress.phase = "waiting"
        try:
            got = await waiter.fut
        except BaseException:
            got = self._leave(waiter)
            if got is GRANT:
                self._release_slot()
            elif got is not None:
                self._undo_handoff(got)
            raise
        if got is GRANT:
            progress.holding = True
            progress.queued = self.loop.time() - started
            connected = await self._connect_for(frame, progress)
            if connected is None:
                return await self._obtain(started, frame, progress)
            return connected
        lease: Lease = got
        self.handed.discard(lease)
        if lease.state is not ACTIVE or self.state is not OPEN:
            # close() began after the connection was handed over.
            self._undo_handoff(lease)
            raise self.closed_error()
        checked = await self._check_handed(lease, frame, progress)
        return checked if checked is not None else await self._obtain(started, frame, progress)

    def _leave(self, waiter: Waiter) -> Any:
        """Step out of the queue: what was handed to `waiter` before it left (a lease or a
        slot), or None."""
        fut = waiter.fut
        if fut.done() and not fut.cancelled() and fut.exception() is None:
            got = fut.result()
            self.handed.discard(got)
            return got
        fut.cancel()
        try:
            self.waiters.remove(waiter)
        except ValueError:
            return None  # already taken out (by close(), or skipped as cancelled)
        self._refresh_fast()
        if waiter.retrying:
            self.retrying -= 1
        return None

    def _undo_handoff(self, lease: Lease) -> None:
        """A lease handed to a waiter that gave up in the same instant goes to the next one."""
        if lease.state is not ACTIVE:
            return
        self._put(_taken_back(lease), self.loop.time() if self.loop else 0.0)

    async def _connect_for(self, frame: FrameType | None, progress: _Progress) -> Lease | None:
        """Open a connection in the slot this caller holds (`progress.holding`), retrying
        transient failures with backoff. Between attempts the caller queues for a returned
        connection. None: the slot went back to the pool, start over."""
        loop = self.loop
        assert loop is not None
        backoff = Backoff()
        try:
            while True:
                self._check_open()
                progress.phase = "connecting"
                generation = self.generation
                try:
                    conn = await self._attempt(progress.deadline)
                except ConnectError as exc:
                    progress.last_error = exc
                    delay = backoff.next_delay()
                    deadline = progress.deadline
                    if not exc.transient or (deadline is not None and loop.time() + delay >= deadline):
                        # No time left for another try: the caller sees what went wrong.
                        logger.warning("%s", _named(self.name, exc))
                        raise
                    logger.info("%s; retrying in %.2fs", _named(self.name, exc), delay)
                    self._check_open()
                    if self.idle:
                        # Returned while this caller was logging in: take it instead.
                        progress.holding = False
                        self._release_slot()
                        return None
                    lease = await self._wait_between_attempts(delay, progress)
                    if lease is not None:
                        # Its slot went back to the pool (`_put`): None starts over.
                        return await self._check_handed(lease, frame, progress)
                    continue
                record = self._new_record(conn)
                self.connecting -= 1
                progress.holding = False
                if self.state is not OPEN:
                    self.retire(record, "pool closed")
                    raise self.closed_error()
                if generation != self.generation:
                    self.retire(record, "expired by expire_all", graceful=True)
                    return None
                lease = self._new_lease(record, loop.time(), frame)
                self._hold(record, lease)
                return lease
        finally:
            if progress.holding:
                progress.holding = False
                self._release_slot()

    def _new_record(self, conn: Any) -> ConnectionRecord:
        assert self.loop is not None
        self.created_total += 1
        cfg = self.config
        now = self.loop.time()
        record = ConnectionRecord(conn, now, cfg.max_lifetime, cfg.lifetime_jitter)
        record.touch(now, self.validate_after)
        self.records.append(record)
        return record

    async def _wait_between_attempts(self, delay: float, progress: _Progress) -> Lease | None:
        """Wait `delay` in line with the waiters; a connection handed over ends the wait (and
        frees this caller's slot, see `_put`)."""
        assert self.loop is not None
        waiter = Waiter(self.loop.create_future(), None, self.loop.time(), retrying=True)
        self.waiters.append(waiter)
        self.fast = self.fast_statements = False
        self.retrying += 1
        try:
            async with asyncio.timeout(delay):
                got = await waiter.fut
        except TimeoutError:
            got = self._leave(waiter)  # handed over in the instant the delay ran out?
            if got is None:
                return None
        except BaseException:
            got = self._leave(waiter)
            if got is not None:
                progress.holding = False
                self._undo_handoff(got)
            raise
        progress.holding = False
        lease: Lease = got
        self.handed.discard(lease)
        if lease.state is not ACTIVE or self.state is not OPEN:
            self._undo_handoff(lease)
            raise self.closed_error()
        return lease

    async def _check_handed(self, lease: Lease, frame: FrameType | None,
                            progress: _Progress) -> Lease | None:
        """A connection handed over in line, as it was returned: `lease` as it is, or, if it was
        marked stale while held (`mark_stale`), a lease on it once it passed its check, or on
        the connection opened in its place. None: the slot went back to the pool, start over."""
        if not lease.record.stale:
            return lease
        assert self.loop is not None
        return await self._check(_taken_back(lease), self.loop.time(), frame, progress)

    async def _attempt(self, deadline: float | None = None) -> Any:
        """One login, within `connect_timeout`, in a task of its own that close() can stop.

        `deadline`: when the caller's acquire_timeout ends, if it has one. A login stopped
        part-way is reported (to telemetry) with the error its caller is given instead."""
        loop = self.loop
        assert loop is not None
        assert self.connector is not None
        cut_short = CutShort()
        attempt = loop.create_task(self.connector.connect(cut_short))
        self.attempts[attempt] = cut_short
        limit = asyncio.timeout(self.config.connect_timeout)
        task = asyncio.current_task()
        # The caller's cancel requests so far (one may be left over from earlier code): only
        # a new one means the caller itself was cancelled, as asyncio.timeout counts.
        requests = task.cancelling() if task is not None else 0
        try:
            async with limit:
                # Shielded so the login is stopped only after `cut_short` says why.
                conn = await asyncio.shield(attempt)
        except BaseException as exc:
            del self.attempts[attempt]
            closed = (isinstance(exc, asyncio.CancelledError) and attempt.cancelled()
                      and task is not None and task.cancelling() <= requests)
            error: BaseException | None = None
            if isinstance(exc, TimeoutError):
                if not cut_short.in_init:
                    error = translate(exc, self.connector.target, self.name,
                                      self.config.connect_timeout)
                elif limit.expired():
                    error = self._slow_init_error()
                else:
                    # The hook's own time limit (a statement's timeout=): said so, and kept as
                    # the cause, rather than read by the caller as acquire_timeout running out.
                    error = ConnectError(
                        f"pool {self.name!r}: the init hook raised TimeoutError on a new "
                        f"connection to {self.connector.target} (a time limit of its own, not "
                        f"connect_timeout); the connection was closed")
                    error.__cause__ = exc
                cut_short.caller_error = type(error)
            elif isinstance(exc, asyncio.CancelledError) and not closed and deadline is not None \
                    and loop.time() >= deadline - _CLOCK_SLACK:
                cut_short.caller_error = PoolTimeoutError
            self._abandon(attempt)
            if isinstance(exc, ConnectError):
                self.connect_errors_total += 1
                raise
            if error is not None:
                self.connect_errors_total += 1
                raise error from error.__cause__
            if closed:
                raise self.closed_error() from None  # close() stopped the login
            raise
        del self.attempts[attempt]
        return conn

    def _slow_init_error(self) -> ConnectError:
        assert self.connector is not None
        return ConnectError(
            f"pool {self.name!r}: logged in to {self.connector.target}, but the init hook was "
            f"still running on the new connection when connect_timeout="
            f"{self.config.connect_timeout:g}s ran out (the connection was closed); make init "
            "faster or raise connect_timeout, which covers the login and init together"
        )

    def _abandon(self, attempt: asyncio.Task[Any]) -> None:
        """A login nobody waits for any more: a connection it still opens is closed and counted."""
        if attempt.done():
            self._discard_attempt(attempt)
        else:
            attempt.cancel()
            attempt.add_done_callback(self._discard_attempt)

    def _discard_attempt(self, attempt: asyncio.Task[Any]) -> None:
        if attempt.cancelled() or attempt.exception() is not None:
            return
        self.created_total += 1
        self.closed_total += 1
        self.observer.connection_closed("abandoned login")
        self._close_connection(attempt.result(), graceful=False)

    def _timeout_error(self, timeout: float | None, progress: _Progress) -> PoolTimeoutError:
        s = self.stats()
        sizes = (f"size={s.size}, in_use={s.in_use}, idle={s.idle}, waiting={s.waiting}, "
                 f"max_size={s.max_size}")
        if progress.phase == "waiting":
            return PoolTimeoutError(
                f"pool {self.name!r}: no connection within {timeout:g}s ({sizes}); release "
                "connections sooner, raise max_size or acquire_timeout"
            )
        last = f"; last error: {progress.last_error}" if progress.last_error else ""
        doing = "still connecting to" if progress.phase == "connecting" else "checking a connection to"
        if timeout is not None and progress.queued > timeout / 2:
            # Most of the time went in line (a slot freed late: a long hold, a leak reclaimed),
            # not to the server: say so, or the advice points at the network.
            return PoolTimeoutError(
                f"pool {self.name!r}: no connection within {timeout:g}s: waited "
                f"{progress.queued:.2f}s in line while every connection was held, then was "
                f"{doing} {self.target} when the time ran out ({sizes}){last}; release "
                "connections sooner, raise max_size or acquire_timeout"
            )
        return PoolTimeoutError(
            f"pool {self.name!r}: no connection within {timeout:g}s: {doing} {self.target} "
            f"({sizes}){last}; check that the server or pooler is reachable and accepts logins, "
            "or raise acquire_timeout"
        )

    # -- return -------------------------------------------------------------------------------

    def checkin_nowait(self, lease: Lease) -> bool:  # noqa: PLR0911
        """Take a connection back without a coroutine when no round trip is needed. True: it
        needs a reset first, and the caller must await `checkin`."""
        if lease.state is not ACTIVE:
            return False
        lease.state = RELEASED
        lease.frame = None
        record = lease.record
        clock = self.clock  # (a local: see `statement_runner`)
        now = clock()
        if self.on_released is not None:
            self.on_released(now - lease.acquired_at)
        if lease.reported:
            log_returned(self.name, lease, now - lease.acquired_at)
        conn = record.conn
        state = returned(conn)
        if state == CLEAN and record.sync_after:
            if record.parse_unsynced():
                state = NEEDS_RESET  # `driver.reset` ends it
            else:
                record.sync_after = 0
        if state == BROKEN:
            self.retire(record, "broken")
            return False
        if state == BUSY or lease.running:
            self._retire_busy(record)
            return False
        if state == NEEDS_RESET:  # whenever a cancel is under way: checked inside only
            if driver.is_cancelling(conn) and not driver.cancel_deliverable(conn):
                # No cancel request was sent (none could arrive): the statement would run on and
                # the wait last as long. The connection goes; the server's statement_timeout or
                # idle_in_transaction_session_timeout ends what it was doing (docs/poolers.md).
                self.retire(record, "cancel undeliverable")
                return False
            return True  # still in use (`record.lease`) until reset
        record.lease = None
        # record.touch(now, self.validate_after), inline: this runs on every query.
        record.last_used = now
        check_at = now + self.validate_after
        expires_at = record.expires_at
        record.check_at = (-math.inf if record.stale  # marked while held (`mark_stale`)
                           else check_at if check_at < expires_at else expires_at)
        if (not self.fast or (self._may_retire and conn.retire_reason)
                or self.max_queries is not None or now >= expires_at):
            record.place = MOVING
            self._put(record, now)  # a waiter takes it, or it goes
            return False
        record.place = IDLE
        self.idle.append(record)
        return False

    def _retire_busy(self, record: ConnectionRecord) -> None:
        """A connection returned while one of its statements still runs: whatever that
        statement leaves (an open transaction, its result) would reach the next holder, whose
        own statements would also fail ("another operation is in progress"). Its statement is
        cancelled where a cancel can arrive, and the connection closed (asyncpg's pool closes it
        too, when its reset fails)."""
        logger.warning(
            "pool %r: a connection was returned while one of its statements was still running "
            "(two statements at once on one connection, such as asyncio.gather over it); the "
            "statement was cancelled and the connection closed. Run one statement at a time on a "
            "connection, or take one connection per concurrent statement", self.name)
        driver.request_cancel(record.conn)
        self.retire(record, "returned busy")

    async def checkin(self, lease: Lease, timeout: float | None = None) -> None:
        """Finish returning a connection `checkin_nowait` found in need of a reset, within
        `timeout` (None: `RELEASE_TIMEOUT`; in any case by `RESETS_END`; a reset that takes
        longer closes the connection); the slot is never lost, even if cancelled part-way.

        The reset runs in a task of the pool's own, which the caller's cancellation does not
        reach: a holder cancelled again at every await (an anyio cancel scope: a Starlette
        streaming response whose client went away) would otherwise cancel each ROLLBACK, and
        every such return would cost a connection. The connection goes back in the caller's
        task when the caller is still there (before anyone else can take it, as before)."""
        record = lease.record
        if timeout is None:
            timeout = RELEASE_TIMEOUT
        end = RESETS_END.get()
        if end is not None and end.at is not None:
            assert self.loop is not None
            timeout = max(0.0, min(timeout, end.at - self.loop.time()))
        reset = self._spawn(self._reset(record, timeout))
        self.resets[reset] = record
        reset.add_done_callback(self._reset_done)
        try:
            await asyncio.shield(reset)
        except asyncio.CancelledError:
            if reset.done():
                self._put_reset(record, reset)
            else:
                reset.add_done_callback(functools.partial(self._put_reset, record))
            raise
        self._put_reset(record, reset)

    def _reset_done(self, task: asyncio.Task[bool]) -> None:
        self.resets.pop(task, None)

    async def _reset(self, record: ConnectionRecord, timeout: float) -> bool:
        """Reset a returned connection; False if it failed (the connection is closed)."""
        try:
            with self.observer.pool_statement("reset"):
                await driver.reset(record.conn, timeout, unsynced=record.parse_unsynced())
            record.sync_after = 0
        except Exception as exc:
            # Dropping the connection rolls its transaction back and the slot is restored: the
            # caller's own error (a query timeout, say) must not be replaced by this one.
            logger.info("pool %r: could not reset a returned connection (%s); closed it",
                        self.name, type(exc).__name__)
            self.retire(record, "reset failed")
            return False
        except BaseException:
            self.retire(record, "reset failed")  # (the pool's tasks end: it is being closed)
            raise
        return True

    def _put_reset(self, record: ConnectionRecord, reset: asyncio.Task[bool]) -> None:
        if reset.cancelled() or reset.exception() is not None or not reset.result():
            return  # closed by `_reset`
        if record.place is not LEASED:
            return  # retired while it was being reset (close, terminate)
        record.lease = None
        record.place = MOVING
        assert self.loop is not None
        now = self.loop.time()
        record.touch(now, self.validate_after)
        self._put(record, now)

    async def set_up(self, conn: PooledConnection, timeout: float | None,
                     started: float) -> None:
        """Run the `setup` hook on a connection just checked out, within what is left of the
        acquire's `timeout` (`UNSET`: ``acquire_timeout``; `started`: ``time.monotonic()`` when
        the acquire began), which counts it as asyncpg's does. If it fails or runs out of time,
        the connection is closed (what the hook left is unknown) and the error raised: out of
        time, `PoolTimeoutError`."""
        assert self.setup is not None
        if timeout is UNSET:
            timeout = self.config.acquire_timeout
        deadline = asyncio.timeout(None if timeout is None
                                   else timeout - (time.monotonic() - started))
        try:
            async with deadline:
                await hook_awaitable(self.name, "setup", self.setup(conn))
            return
        except BaseException as exc:
            self.discard(conn._lease, "setup failed")
            if not (isinstance(exc, TimeoutError) and deadline.expired()):
                raise
            error = exc
        self.timeouts_total += 1
        self.observer.timed_out()
        raise PoolTimeoutError(
            f"pool {self.name!r}: no connection within {timeout:g}s: the setup hook was still "
            "running on it when the time ran out (the connection was closed); make setup "
            "faster or raise acquire_timeout"
        ) from error

    def discard(self, lease: Lease, reason: str, *, state: LeaseState = RELEASED) -> None:
        """Take back a checkout whose connection must not be used again (its `setup` hook
        failed; `TERMINATED`: its holder terminated it, or held it past its invocation): the
        connection is closed and its slot freed; the lease is left in `state`."""
        if lease.state is not ACTIVE:
            return
        lease.state = state
        lease.frame = None
        self._end_use(lease)
        self.retire(lease.record, reason)

    def _end_use(self, lease: Lease) -> None:
        """`on_released` for a checkout the pool ends itself (leak reclaim, close(), terminate(),
        SQLAlchemy's invalidation): its holder's later return does nothing, and the longest
        holds must not be missing from use_time. A lease still on its way to a waiter was no
        checkout (the waiter gets `PoolClosedError`, and no wait time either)."""
        if self.on_released is not None and lease not in self.handed:
            self.on_released(self.clock() - lease.acquired_at)

    # -- leaks --------------------------------------------------------------------------------

    def on_leak(self, lease: Lease) -> None:
        """Called by the leak tracker when a lease outlives `leak_timeout`."""
        if lease.state is not ACTIVE or self.loop is None or self.connector is None:
            return
        held = self.loop.time() - lease.acquired_at
        reclaim = self.config.leak_action == "reclaim"
        task = lease.holder() if reclaim else lease.task
        # The task that last ran a statement on it, when the block is in an async generator
        # another task drives: the one reported and cancelled, and the one `_raise_leaked`
        # withdraws the request from (a reclaimed lease is no one's: nothing else reads it).
        lease.task = task
        site = lease.acquire_site()
        report = LeakReport(self.name, held, lease.task_name(), site, reclaim, self.connector.target)
        # A holder inside `async with` is cancelled, and its block ends in ConnectionLeakedError.
        # One that took `conn = await pool.acquire()` has no block to turn the cancellation into
        # that error: only its connection is reclaimed, and its next use raises it.
        cancel_holder = (reclaim and lease.scoped and task is not None and not task.done()
                         and task is not asyncio.current_task())
        log_leak(self.name, lease, held, reclaim, site, holder_cancelled=cancel_holder)
        self.leaked_total += 1
        if not reclaim:
            lease.reported = True
            self.observer.leaked(report)
            return
        lease.state = LEAKED
        self._end_use(lease)
        lease.forget_site()
        if cancel_holder:
            assert task is not None
            lease.holder_cancelled = task.cancelling()
            task.cancel(_LEAK_CANCEL_MESSAGE)
        self.observer.leaked(report)
        # The statement it may be running is cancelled on the server first, where a cancel can
        # arrive (closing the connection waits for the request); elsewhere it is just closed.
        driver.request_cancel(lease.record.conn)
        self.retire(lease.record, "leaked")

    # -- maintenance --------------------------------------------------------------------------

    def expire_all(self) -> None:
        """Retire every connection: idle ones now, held ones when returned, logins under way
        when they succeed."""
        self.generation += 1
        for record in list(self.idle):
            self.retire(record, "expired by expire_all", graceful=True)
        for record in [*self.leased(), *self.checking]:
            record.expires_at = -math.inf

    def mark_stale(self) -> None:
        """Validate every connection before its next checkout, whatever the clock says: a held
        one keeps the mark through its return (`record.stale`), a statement of a query helper
        under way included."""
        for record in list(self.records):
            record.stale = True
            record.check_at = -math.inf

    async def _fill_in_background(self, count: int) -> None:
        """`fill` for ``open(wait=False)``: a failure is logged, and housekeeping tries again."""
        try:
            await self.fill(count)
        except Exception as exc:
            logger.warning("pool %r: could not open min_size=%d connections in the background "
                           "(%s); housekeeping tries again", self.name, count, exc)

    async def fill(self, count: int) -> None:
        """Open connections until `count` exist (raising the first failure)."""
        loop = self.loop
        assert loop is not None
        while self.state is OPEN and self.size() < count:
            self.connecting += 1
            self.filling += 1
            holding = True
            try:
                conn = await self._attempt()
                record = self._new_record(conn)
                self.connecting -= 1
                self.filling -= 1
                holding = False
                record.place = MOVING
                self._put(record, loop.time())
            finally:
                if holding:
                    self.filling -= 1
                    self._release_slot()

    def reap(self) -> None:
        """Retire idle connections that are broken, expired, or idle past max_idle beyond
        min_size (the least recently used first)."""
        assert self.loop is not None
        now = self.loop.time()
        cfg = self.config
        surplus = self.size() - cfg.min_size
        for record in list(self.idle):  # oldest-used first
            if not record.usable():
                self.retire(record, "broken")
            elif record.expired(now):
                self.retire(record, "expired", graceful=True)
            elif cfg.max_idle is not None and now - record.last_used > cfg.max_idle and surplus > 0:
                self.retire(record, "idle", graceful=True)
            else:
                continue
            surplus -= 1

    async def housekeep(self) -> None:
        self.on_acquired, self.on_released = self.observer.checkout_hooks()
        self.reap()
        if self.state is OPEN and self.size() < self.config.min_size:
            try:
                await self.fill(self.config.min_size)
            except (ConnectError, PoolClosedError) as exc:
                logger.warning("%s; could not keep min_size connections", _named(self.name, exc))

    # -- introspection ------------------------------------------------------------------------

    def stats(self) -> PoolStats:
        """Current sizes and totals. Safe from any thread: it reads lengths and counters and
        counts the records in use (no lock on the checkout path); read from another thread,
        fields may come from instants a few instructions apart, and `in_use` may count a
        connection returned and another taken during the count both."""
        idle = len(self.idle)
        in_use = len(self.leased())
        connecting = self.connecting
        # Callers in acquire(): queued (less those between login attempts, counted by the slot
        # they hold), or holding a slot (logging in, checking a connection, granted one and not
        # yet run), or handed a connection and not yet run. Computed here, not counted on the
        # checkout path.
        waiting = max(0, len(self.waiters) - self.retrying)
        pending = waiting + max(0, connecting - self.filling) + len(self.handed)
        return PoolStats(
            name=self.name,
            size=idle + in_use + connecting,
            idle=idle,
            in_use=in_use,
            connecting=connecting,
            waiting=waiting,
            min_size=self.config.min_size,
            max_size=self.config.max_size,
            created_total=self.created_total,
            closed_total=self.closed_total,
            timeouts_total=self.timeouts_total,
            leaked_total=self.leaked_total,
            validation_failures_total=self.validation_failures_total,
            acquired_total=self.acquired_total,
            connect_errors_total=self.connect_errors_total,
            statement_cache=self._statement_cache_stats(),
            validating=len(self.checking),
            pending=pending,
        )

    def _statement_cache_stats(self) -> StatementCacheStats | None:
        totals = self.connector.statement_cache if self.connector is not None else None
        return totals.snapshot() if totals is not None else None


def _taken_back(lease: Lease) -> ConnectionRecord:
    """The connection of a lease handed over in line and not used: the lease ends, the record
    moves (`MOVING`, carrying its slot) for the caller to pass on or check."""
    lease.state = RELEASED
    record = lease.record
    record.lease = None
    record.place = MOVING
    return record


def _weak_stats(slots: Slots) -> Callable[[], PoolStats]:
    """`slots.stats` without keeping the pool alive: observers (a global metrics registry) hold
    it, and a pool dropped without close() must still be collected."""
    ref = weakref.ref(slots)
    name, cfg = slots.name, slots.config

    def stats() -> PoolStats:
        owner = ref()
        if owner is not None:
            return owner.stats()
        return PoolStats(name, 0, 0, 0, 0, 0, cfg.min_size, cfg.max_size, 0, 0, 0, 0, 0, 0, 0)

    return stats


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


def _housekeeping_period(cfg: PoolConfig) -> float:
    limits = [v for v in (cfg.max_idle, cfg.max_lifetime) if v is not None]
    return min([5.0] + [v / 2 for v in limits])


async def housekeeping(ref: weakref.ref[Slots], period: float) -> None:
    """Reap idle and expired connections and keep min_size open, every `period`, until the pool
    closes or is collected. Any error is logged and the next round runs as planned: the schedule
    comes first, so no failure can stop it (psycopg's ShrinkPool, HikariCP's HouseKeeper)."""
    # The first round a whole period after opening, then on the period's multiples.
    wait: Callable[[float], Coroutine[Any, Any, None]] = alarms.sleep
    while True:
        await wait(period)
        wait = alarms.tick
        slots = ref()
        if slots is None or slots.state is not OPEN:
            return
        try:
            await slots.housekeep()
        except Exception:
            logger.exception("pool %r: housekeeping failed; it runs again in %gs", slots.name, period)
        del slots  # only a weak reference between rounds: a dropped pool can be collected


async def _cancel_requests_done(conn: Any) -> None:
    """Wait (up to RELEASE_TIMEOUT) until no cancel request is in flight on `conn`: closing it
    would cut one short, and closing a cancel request's socket early crashes PgBouncer 1.18
    (pgbouncer#801). Asked again after each wait: a holder cancelled just before (a leak
    reclaim) makes asyncpg send a request of its own once it runs, beside the pool's."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + RELEASE_TIMEOUT
    while True:
        await asyncio.sleep(0)  # let a holder cancelled just now reach asyncpg's cancel
        pending = driver.pending_cancellations(conn)
        remaining = deadline - loop.time()
        if not pending or remaining <= 0:
            return
        await asyncio.wait(pending, timeout=remaining)


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


async def _close_credentials(creds: Any, name: str) -> None:
    try:
        await creds.close()
    except Exception:
        logger.exception("pool %r: closing the credentials provider failed", name)


def _named(name: str, exc: BaseException) -> str:
    """`exc`'s message for a log line: it names the pool itself (connect errors do), or is
    prefixed with the pool's name."""
    text = str(exc)
    return text if text.startswith(f"pool {name!r}") else f"pool {name!r}: {text}"
