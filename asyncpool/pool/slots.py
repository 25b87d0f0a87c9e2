"""The one owner of a pool's slots.

`Slots` alone holds the idle connections, the callers waiting, the connections held, and the slots
reserved for connections being opened or checked; a pool's size is their sum, computed, never
kept. Every way a connection leaves (error, idle reaping, lifetime, `expire_all`, leak reclaim,
`close`, `terminate`) goes through `retire`, and whatever frees a slot or returns a connection
hands it straight to the first waiter. Each record's `place` says where it is.

The pool's lifecycle is an explicit `PoolState`; code that awaits re-checks it afterwards, so
nothing is handed out once `close()` has begun. Bookkeeping is synchronous: between two awaits no
other task can see a half-moved connection.

This module holds the state and what every checkout and return runs (`checkout_nowait`,
`checkin_nowait`, `_put`); the rest works on a `Slots` from modules of its own: `lifecycle`
(open, close, terminate), `forks`, `slow_checkout` (checks, the line of waiters, `setup`),
`logins`, `resets` (returns that need a round trip), `closing` (closing a retired connection),
`leaks`, `housekeeping`, `pool_stats` and `misuse` (the errors of a pool used where it cannot be).
"""

from __future__ import annotations

import asyncio
import collections
import math
import os
import time
from asyncio import get_running_loop
from collections.abc import Callable
from contextvars import Context, copy_context
from threading import get_ident
from types import FrameType
from typing import TYPE_CHECKING, Any

from asyncpool.connect import copy_end, driver
from asyncpool.connect.copy_waiter import retrieve_copy_waiters, retrieve_protocol_waiters
from asyncpool.connect.driver import BROKEN, BUSY, CLEAN, NEEDS_RESET, returned
from asyncpool.observer import PoolObserver
from asyncpool.pool import closing, misuse, resets, slow_checkout
from asyncpool.pool.backoff import Backoff
from asyncpool.pool.forks import FORKS
from asyncpool.pool.leaks import LeakTracker, NoLeakTracker, log_returned
from asyncpool.pool.lease import (
    ACTIVE,
    CLOSED,
    RELEASED,
    Lease,
    LeaseState,
    spare_lease,
    task_of,
)
from asyncpool.pool.record import CHECKING, IDLE, LEASED, MOVING, RETIRED, ConnectionRecord
from asyncpool.pool.resets import RELEASE_TIMEOUT
from asyncpool.pool.slow_checkout import GRANT, UNSET
from asyncpool.pool.state import CLOSING, NEW, OPEN, PoolState

if TYPE_CHECKING:
    from asyncpool.config import PoolConfig, SetupHook
    from asyncpool.connect.connector import Connector, CutShort
    from asyncpool.pool.connection import PooledConnection
    from asyncpool.pool.slow_checkout import Waiter

# RELEASE_TIMEOUT and UNSET live in `resets` and `slow_checkout`; runner.py and connection.py
# still import them from here.
__all__ = ["RELEASE_TIMEOUT", "UNSET", "Slots"]

#: Why a connection whose statement was cut short where no cancel request can arrive is closed.
UNDELIVERABLE = "cancel undeliverable"
#: Why a connection whose COPY ended with rows its front had not taken is closed.
COPY_OUT_OF_STEP = "copy out of step"


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
        "__weakref__", "_closed", "_drained", "attempts", "background", "checking", "checkouts",
        "closed_total",
        "closing", "config", "connect_errors_total", "connecting", "connector", "created_total",
        "filling", "fills", "forks", "generation", "getting", "handed", "housekeeper", "leaked_total",
        "lost_backoff", "lost_refill", "name",
        "observer", "opened_in", "opening", "pid", "provider_users",
        "records", "replaced_credentials", "resets", "restored", "restored_at", "retrying",
        "since_restore", "state",
        "timeouts_total",
        "undoing_open", "validation_failures_total", "waiters",
    )

    replaced_credentials: list[Any]
    provider_users: dict[object, Any]

    def __init__(self, name: str, config: PoolConfig) -> None:  # noqa: PLR0915 - one per attribute
        # Idle connections, the most recently used last (taken from and put back at the end).
        # A deque, not a list: CPython gives a list's items back when it empties and allocates
        # them again at the next append (through libc: 880 instructions per query on a pool of
        # one, benchmarks/README.md); a deque keeps its block.
        self.idle: collections.deque[ConnectionRecord] = collections.deque()
        self.waiters: collections.deque[Waiter] = collections.deque()
        self.state: PoolState = NEW
        self.forks: int = FORKS[0]
        # Every connection of the pool (idle, in use, being checked or moved), retired ones not.
        self.records: list[ConnectionRecord] = []
        # A checkout may take an idle connection without asking more of the pool: it is open, in
        # the process that opened it, and nobody is in line (`_refresh_fast` keeps it so). One
        # read instead of four on every checkout and return.
        self.fast: bool = False
        # `fast`, and no hook or limit asks for more on each checkout (no `setup`, no
        # `max_queries`): the statement runners' one test, where they would make three.
        self.fast_statements: bool = False
        # The loop's clock: time.monotonic itself under asyncio's loops (their time() is only a
        # Python call around it), the loop's own method otherwise (uvloop's is its cached clock).
        self.clock: Callable[[], float] = time.monotonic
        self.loop: asyncio.AbstractEventLoop | None = None
        # An asyncio loop says which thread runs it (``_thread_id``, None when stopped), and a
        # thread runs one loop at a time: the fast paths ask that instead of get_running_loop(),
        # which on Python 3.11 makes a getpid() system call each time (to notice a fork; the pool
        # has its own fork check): about 0.6 µs per query here (benchmarks/README.md). Other
        # loops (uvloop) are asked with get_running_loop().
        self.loop_has_thread_id: bool = False
        # Leases carry the holder's context only for a leak report to be made in it.
        self.track_leaks: bool = False
        self.leaks: LeakTracker | NoLeakTracker = NoLeakTracker()
        # The leak tracker's timer is not armed: the next checkout arms it (`leaks.arm`).
        self.leak_timer_unarmed = False
        self.acquired_total = 0
        # The observer's per-checkout hooks, None when they would do nothing (not called then).
        self.on_acquired: Callable[[float], None] | None = None
        self.on_released: Callable[[float], None] | None = None
        # Infinite for never (`None`): the return adds it to the time without a test.
        self.validate_after: float = math.inf if config.validate_after is None else config.validate_after
        # The connections can ask to be retired: they have a `retire_reason` ("unnamed" mode's
        # connection class; set from the connector at open), read as an attribute per return.
        self._may_retire = False
        self.max_queries: int | None = config.max_queries
        #: asyncpg's ``setup`` hook, awaited by the acquire contexts at each checkout.
        self.setup: SetupHook | None = config.setup
        self.name: str = name
        self.config: PoolConfig = config
        self.opened_in: str = ""  # the name of the thread whose loop opened the pool
        self.connector: Connector | None = None
        # Providers of connectors replaced by new connection arguments that a login still uses:
        # each closed once the last ends (`asyncpool.pool.replaced_credentials`), or with the pool.
        # And what uses a provider now (a login's task, open()'s first read): the provider.
        self.replaced_credentials, self.provider_users = [], {}
        self.observer: PoolObserver = PoolObserver()
        self.connecting: int = 0
        # Of `connecting`: slots `housekeeping.fill` reserved (min_size, at open or housekeeping),
        # no caller's.
        self.filling: int = 0
        self.checking: set[ConnectionRecord] = set()
        # Leases handed to a waiter whose task has not resumed to take them (`_put`): not yet a
        # checkout, so one retired meanwhile has no use time (`_end_use`), and the waiter still
        # counts as pending (`pool_stats.stats`).
        self.handed: set[Lease] = set()
        self.retrying: int = 0  # waiters in `waiters` that are between login attempts
        # Tasks in the slow checkout (checking an idle connection, logging in, in line) for a
        # Lambda invocation (`stragglers`): kept only where leaks are tracked, as leases' contexts.
        self.getting: set[asyncio.Task[Any]] = set()
        # Every slow checkout under way, with its time limit (`snapshot` stops them all).
        self.checkouts: set[slow_checkout.Progress] = set()
        # From a SnapStart snapshot to its restore (`snapshot`): set at the restore, and logins
        # wait for it (one begun in between would be in the snapshot).
        self.restored: asyncio.Event | None = None
        # `clock()` at the last restore (0.0: none): a `setup` hook's time counts from
        # there for an acquire under way at the snapshot (`slow_checkout.set_up`).
        self.restored_at: float = 0.0
        # The loop has not paused since the last restore (set there; `logins.give_up_fills`
        # clears it): a refill under way began after the restore, not before a pause.
        self.since_restore: bool = False
        # Logins in progress, each with what its caller is told if it is stopped part-way.
        self.attempts: dict[asyncio.Task[Any], CutShort] = {}
        # Those of them the pool makes on its own (min_size refills nobody waits on).
        self.fills: set[asyncio.Task[Any]] = set()
        self.background: set[asyncio.Task[Any]] = set()
        # Resets of returned connections (among `background`) and their records, for `settle`.
        self.resets: dict[asyncio.Task[bool], ConnectionRecord] = {}
        # Connections being closed politely, by the task doing it (terminate() cuts them short).
        self.closing: dict[asyncio.Task[Any], Any] = {}
        self.housekeeper: asyncio.Task[None] | None = None
        # The refill after an idle connection was found closed (`lost_idle`), and the delays
        # between such refills (a server closing each connection as it is made gets no tight
        # loop of logins).
        self.lost_refill: asyncio.Task[None] | None = None
        self.lost_backoff: Backoff = Backoff()
        # The outcome of the open() under way (or done): a concurrent open() waits for it. True
        # once open, False if that open() was cancelled, its error if it failed.
        self.opening: asyncio.Future[bool] | None = None
        # A failed open() is being undone (the pool then goes back to NEW); a close() or
        # terminate() called meanwhile clears it, and the pool stays closed.
        self.undoing_open: bool = False
        # Bumped by expire_all(): a login that began before it does not join the pool.
        self.generation: int = 0
        self.pid: int = os.getpid()
        self._drained: asyncio.Event | None = None
        self._closed: asyncio.Event | None = None
        self.created_total: int = 0
        self.closed_total: int = 0
        self.timeouts_total: int = 0
        self.leaked_total: int = 0
        self.validation_failures_total: int = 0
        self.connect_errors_total: int = 0

    def __repr__(self) -> str:
        # What ``repr(pool.fetchval)`` shows: the helpers are statement runners bound to this.
        return f"pool {self.name!r}"

    # -- state --------------------------------------------------------------------------------

    def _set_state(self, state: PoolState) -> None:
        self.state = state
        self._refresh_fast()

    def _refresh_fast(self) -> None:
        """Recompute `fast` from what it sums up: called whenever the state or the line of
        waiters changes (and a fork clears it: `forks._after_fork_in_child`)."""
        fast = self.state is OPEN and not self.waiters and self.forks == FORKS[0]
        self.fast = fast
        self.fast_statements = fast and self.setup is None and self.max_queries is None

    def leased(self) -> list[ConnectionRecord]:
        """The connections in use: held, or being reset after their return."""
        return [record for record in self.records if record.place is LEASED]

    def held_by_current_task(self) -> list[ConnectionRecord]:
        """The connections the running task holds (a checkout still active)."""
        task = asyncio.current_task()
        return [record for record in self.leased() if (lease := record.lease) is not None
                and lease.state is ACTIVE and lease.task is task]

    def _is_drained(self) -> bool:
        return not self.records and self.connecting == 0

    def _note_drained(self) -> None:
        if self._drained is not None and self._is_drained():
            self._drained.set()

    def _check_open(self) -> None:
        if self.state is not OPEN:
            raise misuse.closed_error(self)

    def refuse_other_loop(self) -> None:
        """Raise `misuse.other_loop_error` unless called from the pool's loop, in its thread (a held
        connection given back, or used, from elsewhere)."""
        loop = self.loop
        if loop is not None and not (
                loop._thread_id == get_ident() if self.loop_has_thread_id  # type: ignore[attr-defined]
                else asyncio._get_running_loop() is loop):
            raise misuse.other_loop_error(self, loop)

    # -- the one exit -------------------------------------------------------------------------

    def retire(self, record: ConnectionRecord, reason: str, *, graceful: bool = False,
               keep_slot: bool = False) -> None:
        """Take `record` out of the pool for good, from wherever it is: close its connection
        (politely if `graceful`), count it, and give its slot to the first waiter.

        A record being validated keeps its slot: the caller validating it owns that slot and
        connects a replacement in it (or gives it back). So does one retired with `keep_slot`:
        the caller has counted the slot in `connecting` (`snapshot._withdraw`).
        """
        place = record.place
        if place is RETIRED:
            return
        if place is IDLE:
            self.idle.remove(record)
        elif place is LEASED:
            lease = record.lease
            record.lease = None
            if lease is not None:
                # A COPY of the holder's cut off, or refused, leaves asyncpg's reply future
                # unretrieved.
                retrieve_copy_waiters([lease.user, lease.task])
                retrieve_protocol_waiters(record.conn)
            if lease is not None and lease.state is ACTIVE:
                lease.state = CLOSED
                self._end_use(lease)
            if lease is not None:
                record.ended = lease.state
        elif place is CHECKING:
            self.checking.discard(record)
        record.place = RETIRED
        record.spare = None  # (the spare lease refers back to the record)
        self.records.remove(record)
        self.closed_total += 1
        self.observer.connection_closed(reason)
        closing.close_connection(self, record.conn, graceful)
        if place is not CHECKING and not keep_slot:
            self._grant_slot()
        if self.state is CLOSING:
            self._note_drained()

    def retire_lost(self, record: ConnectionRecord, reason: str = "broken") -> None:
        """`retire` a connection found lost, and check each idle one before its next checkout,
        whatever the clock says. What closed one (a server restart, a failover, a pooler
        restarted) likely closed the others, and one that died within `validate_after` would be
        lent as it is: to the caller that retries, or to SQLAlchemy's ``pool_pre_ping``, whose
        reconnect takes the next connection unpinged. Not with ``validate_after=None`` (never
        check), which the user chose; nor for one its own class closed for a statement cut
        short where no cancel request can arrive (RDS Proxy, ``cancel_requests="off"``): the
        pool closed that one, nothing was lost."""
        if driver.closed_uncancelled(record.conn):
            self.retire(record, UNDELIVERABLE if reason == "broken" else reason)
            return
        if copy_end.closed_out_of_step(record.conn):
            self.retire(record, COPY_OUT_OF_STEP if reason == "broken" else reason)
            return
        self.retire(record, reason)
        if self.validate_after == math.inf:
            return
        for idle in self.idle:
            idle.check_at = -math.inf

    def own_tasks(self) -> list[asyncio.Task[Any]]:
        """The pool's tasks: its housekeeping, its refill after a lost idle connection
        (`lost_idle`) and what `_spawn` started (resets, closes...); not its logins (`attempts`,
        `fills`)."""
        tasks = list(self.background)
        if self.housekeeper is not None:
            tasks.append(self.housekeeper)
        if self.lost_refill is not None:
            tasks.append(self.lost_refill)
        return tasks

    def _spawn(self, coro: Any, context: Context | None = None) -> asyncio.Task[Any]:
        assert self.loop is not None
        task = self.loop.create_task(coro, context=context)
        self.background.add(task)
        task.add_done_callback(self.background.discard)
        return task

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

    def refused_setting(self, exc: BaseException,
                        within: str = "pool.transaction()") -> Exception | None:
        """The error to raise instead of `exc` when the server refused a setting of
        `transaction_sql` in `within` (None: `exc` is not that)."""
        connector = self.connector
        return connector.refused_setting(exc, within) if connector is not None else None

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

    # The slow path and the `setup` hook live in `slow_checkout`: `Checkouts` callers hold
    # only this object. Their functions are the methods (no call in between); type checkers
    # read the signatures.
    if TYPE_CHECKING:
        async def checkout(self, timeout: float | None, frame: FrameType | None) -> Lease: ...

        async def set_up(self, conn: PooledConnection, timeout: float | None,
                         started: float) -> None: ...
    else:
        checkout = slow_checkout.checkout
        set_up = slow_checkout.set_up

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
            self.retire_lost(record)
            return False
        if state == BUSY or lease.running:
            self._retire_busy(record)
            return False
        if state == NEEDS_RESET:  # whenever a cancel is under way: checked inside only
            if driver.is_cancelling(conn) and not driver.cancel_deliverable(conn):
                # No cancel request was sent (none could arrive): the statement would run on and
                # the wait last as long. The connection goes; the server's statement_timeout or
                # idle_in_transaction_session_timeout ends what it was doing (docs/poolers.md).
                self.retire(record, UNDELIVERABLE)
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

    if TYPE_CHECKING:  # (as `checkout`)
        def _retire_busy(self, record: ConnectionRecord) -> None: ...

        async def checkin(self, lease: Lease, timeout: float | None = None) -> None: ...
    else:
        _retire_busy = resets.retire_busy
        checkin = resets.checkin

    def discard(self, lease: Lease, reason: str, *, state: LeaseState = RELEASED,
                lost: bool = False) -> None:
        """Take back a checkout whose connection must not be used again (its `setup` hook
        failed; `TERMINATED`: its holder terminated it, or held it past its invocation;
        `lost`: found broken, as `retire_lost`): the connection is closed and its slot freed;
        the lease is left in `state`."""
        if lease.state is not ACTIVE:
            return
        lease.state = state
        lease.frame = None
        self._end_use(lease)
        if lost:
            self.retire_lost(lease.record, reason)
        else:
            self.retire(lease.record, reason)

    def _end_use(self, lease: Lease) -> None:
        """`on_released` for a checkout the pool ends itself (leak reclaim, close(), terminate(),
        SQLAlchemy's invalidation): its holder's later return does nothing, and the longest
        holds must not be missing from use_time. A lease still on its way to a waiter was no
        checkout (the waiter gets `PoolClosedError`, and no wait time either)."""
        if self.on_released is not None and lease not in self.handed:
            self.on_released(self.clock() - lease.acquired_at)
