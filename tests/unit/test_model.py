"""A stateful model test of the pool core: random schedules of users and faults, invariants
checked after every step.

Each example is a fresh pool (random sizes, timeouts, validation and leak settings) on the fake
driver and a virtual clock, driven by hypothesis through a random sequence of: users that acquire
(``async with``, ``await``, transactions that commit or fail, the query helpers (one that
leaves a transaction open, one slow enough to be leaked), leaks), connections kept past
their checkouts and used by every way to the connection (statements, prepare, transaction,
cursor, listeners, query loggers, one made in the block included, COPY, attributes, terminate),
connections given to another pool's release() both ways, time
passing, users cancelled at whatever await they are at, connections dying loudly or silently,
logins that succeed, are refused, fail authentication or hang, ``expire_all``, ``mark_stale``,
``close()`` (also cancelled half way) and ``terminate()``; a second thread reads ``stats()`` all
along. After every step (with the loop run until nothing is ready):

- size = idle + in use + connecting, and never above max_size; no count is negative;
- every record is in exactly the place it says (idle, held, being checked); no connection is both
  idle and held, or held twice, or handed to two users at once;
- nothing is lost: created = closed + present, and every connection open on the server is in the
  pool (or is waiting for its cancel request before it is terminated);
- no waiter waits while a connection is idle or a slot is free;
- while the pool is open its housekeeping task is alive;
- users end with a result or an error a user may see (never a bare CancelledError they did not
  ask for, never a driver "another operation is in progress");
- after close() or terminate(): no waiter, nothing in use or connecting, no background task, every
  connection closed and counted;
- nothing reached the event loop's exception handler, and stats() never failed in the other thread.

CI runs ASYNCPOOL_MODEL_EXAMPLES (default 1,000) examples. The long run:

    ASYNCPOOL_MODEL_EXAMPLES=100000 .venv/bin/pytest tests/unit/test_model.py -q -s --timeout 0
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import math
import os
import threading
import time
from collections.abc import Callable
from typing import Any

import asyncpg
import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

from asyncpool import (
    ConnectError,
    ConnectionLeakedError,
    ConnectionLostError,
    Pool,
    PoolClosedError,
    PoolError,
    PoolTimeoutError,
)
from asyncpool.connect import driver
from asyncpool.pool import forks
from asyncpool.pool.lease import RELEASED
from asyncpool.pool.record import CHECKING, IDLE, LEASED
from asyncpool.pool.state import CLOSED_STATE, OPEN
from tests.unit.fakes import FakeConnection, FakeServer, VirtualClockLoop, fake_pool

EXAMPLES = int(os.environ.get("ASYNCPOOL_MODEL_EXAMPLES", "1000"))
MAX_USERS = 8
# The proxies kept past their checkouts for `use_a_kept_connection` (the most recent), of the
# users whose checkout is a block (it has ended when their task has).
_KEPT = 8
_BLOCKS = frozenset({"with", "listen", "tx", "tx_fail"})
BATCH = 2000


def _in_logger(conn: Any) -> None:
    with conn.query_logger(print):
        pass


def _enter(logger: Any) -> None:
    with logger:
        pass


#: The ways a user reaches its connection, tried on one kept past its checkout.
_KEPT_USES: dict[str, Callable[[Any], Any]] = {
    "fetchval": lambda conn: conn.fetchval("SELECT 1"),
    "execute": lambda conn: conn.execute("SELECT 1"),
    "execute_args": lambda conn: conn.execute("SELECT $1", 1),
    "prepare": lambda conn: conn.prepare("SELECT 1"),
    "transaction": lambda conn: conn.transaction(),
    "cursor": lambda conn: conn.cursor("SELECT 1"),
    "add_listener": lambda conn: conn.add_listener("chan", print),
    "add_log_listener": lambda conn: conn.add_log_listener(print),
    "add_query_logger": lambda conn: conn.add_query_logger(print),
    "query_logger": _in_logger,
    "logger_made_in_block": _enter,  # (the user's logger, made while it held the connection)
    "copy": lambda conn: conn.copy_from_query("SELECT 1", output=print),
    "raw": lambda conn: conn.raw,
    "attribute": lambda conn: conn._protocol,
    "terminate": lambda conn: conn.terminate(),
}

# What a user may see from the pool. Driver errors only as a connection dies under a query.
ALLOWED = (PoolTimeoutError, PoolClosedError, ConnectError, ConnectionLeakedError,
           ConnectionLostError)


class Boom(Exception):
    """A user's own error inside a block."""


class _StatsReader:
    """A second thread that reads the current example's pool's stats() all along."""

    def __init__(self) -> None:
        self.pool: Pool | None = None
        self.errors: list[BaseException] = []
        self.reads = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            pool = self.pool
            if pool is None:
                time.sleep(0.001)
                continue
            try:
                for _ in range(50):
                    pool.stats()
                self.reads += 50
            except BaseException as exc:
                self.errors.append(exc)
            # Bursts, then a pause: reading all the time would take the GIL from the model.
            time.sleep(0.0005)

    def __enter__(self) -> _StatsReader:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


# The reader of the running test, seen by every example (hypothesis makes the machines).
_CURRENT: dict[str, _StatsReader] = {}


class _User:
    def __init__(self, kind: str, task: asyncio.Task[Any]) -> None:
        self.kind = kind
        self.task = task
        self.cancelled_by_model = False
        self.conn: FakeConnection | None = None
        # A query logger made in the user's block, not entered (`use_a_kept_connection`).
        self.logger: Any = None


class PoolModel(RuleBasedStateMachine):
    examples = 0

    def __init__(self) -> None:
        super().__init__()
        type(self).examples += 1
        self.loop = VirtualClockLoop()
        self.server = FakeServer()
        self.users: list[_User] = []
        self.holders: dict[FakeConnection, _User] = {}
        self._user_of: dict[asyncio.Task[Any], _User] = {}
        # The proxies users were handed (the last few), kept past their checkouts.
        self.kept: list[tuple[_User, Any]] = []
        self.pool: Pool | None = None
        self.closer: asyncio.Task[None] | None = None
        self.max_size = 1

    # -- set-up -------------------------------------------------------------------------------

    @initialize(
        min_size=st.integers(0, 2),
        extra=st.integers(0, 3),
        acquire_timeout=st.sampled_from([None, 0.05, 0.5, 5.0]),
        validate_after=st.sampled_from([None, 0.0, 0.02, 1.0]),
        leak_timeout=st.sampled_from([None, 0.1, 1.0]),
        leak_action=st.sampled_from(["reclaim", "reclaim", "log"]),
        max_lifetime=st.sampled_from([None, 0.3, 10.0]),
        max_idle=st.sampled_from([None, 0.2, 10.0]),
        wait=st.booleans(),
    )
    def open_pool(  # noqa: PLR0917 - hypothesis passes each drawn option by name
        self, min_size: int, extra: int, acquire_timeout: float | None,
                  validate_after: float | None, leak_timeout: float | None, leak_action: str,
                  max_lifetime: float | None, max_idle: float | None, wait: bool) -> None:
        self.max_size = max(1, min_size + extra)
        self.pool = fake_pool(
            self.server, min_size=min_size, max_size=self.max_size, acquire_timeout=acquire_timeout,
            connect_timeout=0.05, validate_after=validate_after, leak_timeout=leak_timeout,
            leak_action=leak_action, max_lifetime=max_lifetime, max_idle=max_idle,
        )
        self.loop.run_until_complete(self.pool.open(wait=wait))
        reader = _CURRENT.get("reader")
        if reader is not None:
            reader.pool = self.pool

    # -- users --------------------------------------------------------------------------------

    @precondition(lambda self: len([u for u in self.users if not u.task.done()]) < MAX_USERS)
    @rule(kind=st.sampled_from(["with", "await", "tx", "tx_fail", "helper", "helper_begin",
                                "helper_slow", "leak", "listen"]),
          hold=st.sampled_from([0.0, 0.001, 0.01, 0.2, 2.0]),
          timeout=st.sampled_from(["default", None, 0.0, 0.02]))
    def start_user(self, kind: str, hold: float, timeout: Any) -> None:
        assert self.pool is not None
        coro = self._user(kind, hold, timeout)
        task = self.loop.create_task(coro)
        user = _User(kind, task)
        self.users.append(user)
        self._user_of[task] = user
        self._settle()

    def _took(self, conn: Any) -> None:
        raw: FakeConnection = conn.raw
        task = asyncio.current_task()
        assert task is not None
        user = self._user_of[task]
        other = self.holders.get(raw)
        assert other is None or other is user, f"{raw} held by two users at once"
        # Marked stale before this user got it (`mark_stale`): checked first, which clears the
        # mark, even when it was handed over in line (`slow_checkout.check_handed`). Not for a
        # transaction's user: its BEGIN is awaited after the checkout, and a mark then is one
        # for the next checkout.
        assert self.pool is not None
        [record] = [r for r in self.pool._slots.records if r.conn is raw]
        assert user.kind.startswith("tx") or not record.stale, (
            f"{raw} handed out unchecked after mark_stale()")
        self.holders[raw] = user
        user.conn = raw
        if user.kind in _BLOCKS:  # (a checkout without a block may outlive its user's task)
            self.kept = [*self.kept[-(_KEPT - 1):], (user, conn)]
            user.logger = conn.query_logger(print)

    def _gave_back(self) -> None:
        task = asyncio.current_task()
        assert task is not None
        user = self._user_of[task]
        if user.conn is not None and self.holders.get(user.conn) is user:
            del self.holders[user.conn]
        user.conn = None

    async def _user(self, kind: str, hold: float, timeout: Any) -> None:
        pool = self.pool
        assert pool is not None
        args = () if timeout == "default" else (timeout,)
        try:
            if kind in ("with", "listen"):
                async with pool.acquire(*args) as conn:
                    self._took(conn)
                    if kind == "listen":
                        await conn.add_listener("chan", lambda *a: None)
                    await conn.fetchval("SELECT 1")
                    await asyncio.sleep(hold)
                    await conn.fetchval("SELECT 2")
                    self._gave_back()
            elif kind == "await":
                conn = await pool.acquire(*args)
                self._took(conn)
                try:
                    await conn.fetchval("SELECT 1")
                    await asyncio.sleep(hold)
                finally:
                    self._gave_back()
                    await pool.release(conn)
            elif kind in ("tx", "tx_fail"):
                async with pool.transaction(*args) as conn:
                    self._took(conn)
                    await conn.execute("UPDATE t SET n = n + 1")
                    await asyncio.sleep(hold)
                    self._gave_back()
                    if kind == "tx_fail":
                        raise Boom()
            elif kind == "helper":
                await pool.fetchval("SELECT 1")
            elif kind == "helper_begin":  # leaves a transaction open: the return must reset it
                await pool.execute("BEGIN")
            elif kind == "helper_slow":  # may outlive leak_timeout: reclaimed under the helper
                await pool.execute(f"SELECT pg_sleep({hold})")
            elif kind == "leak":
                conn = await pool.acquire(*args)
                self._took(conn)
                await asyncio.sleep(1000)  # never released: reclaimed, or closed with the pool
        finally:
            self._gave_back()

    @precondition(lambda self: len([u for u in self.users if not u.task.done()]) < MAX_USERS)
    @rule(count=st.integers(2, MAX_USERS), hold=st.sampled_from([0.0, 0.01, 0.2]))
    def crowd(self, count: int, hold: float) -> None:
        """Several users at once, so that some queue."""
        live = len([u for u in self.users if not u.task.done()])
        for _ in range(min(count, MAX_USERS - live)):
            task = self.loop.create_task(self._user("with", hold, "default"))
            user = _User("with", task)
            self.users.append(user)
            self._user_of[task] = user
        self._settle()

    @precondition(lambda self: any(user.task.done() for user, _ in self.kept))
    @rule(index=st.integers(0, _KEPT - 1), hold_first=st.booleans(),
          how=st.sampled_from(sorted(_KEPT_USES)))
    def use_a_kept_connection(self, index: int, hold_first: bool, how: str) -> None:
        """A connection used after its user's block ended (its lease may be another user's
        now: the spare a clean return leaves), by any of its ways to the connection, is
        refused before anything is sent. With `hold_first`, a new user takes a connection and
        holds it first: the most recently returned one, whose lease a kept connection is
        likely to have had."""
        if hold_first and len([u for u in self.users if not u.task.done()]) < MAX_USERS:
            self.start_user("with", 2.0, "default")
        ended = [(user, conn) for user, conn in self.kept if user.task.done()]
        user, conn = ended[index % len(ended)]
        if how == "logger_made_in_block":
            if user.logger is None:  # (entered once already: a context manager is used once)
                how = "fetchval"
            else:
                conn, user.logger = user.logger, None
        outcome: list[BaseException | None] = []

        async def use() -> None:
            try:
                result = _KEPT_USES[how](conn)
                if inspect.isawaitable(result):
                    await result
            except PoolError as exc:
                outcome.append(exc)
            else:
                outcome.append(None)

        self.loop.create_task(use())
        self._settle()
        assert outcome, "a kept connection's statement did not end"
        assert outcome[0] is not None, "a connection kept past its checkout ran a statement"

    @precondition(lambda self: bool(self.kept))
    @rule(index=st.integers(0, _KEPT - 1))
    def release_to_another_pool(self, index: int) -> None:
        """A connection given to another pool's release() (one of this pool's, held now or
        kept past its checkout; and one of the other pool's given to this one) is refused,
        and neither pool changes: the invariants check this one after the step."""
        assert self.pool is not None
        pool = self.pool
        _, conn = self.kept[index % len(self.kept)]
        other = fake_pool(FakeServer(latency=0.0, login_latency=0.0), name="other", min_size=0,
                          max_size=1)  # (no latency: nothing here moves the clock)
        outcome: list[BaseException | None] = []

        async def give(to: Pool, given: Any) -> None:
            try:
                await to.release(given)
            except PoolError as exc:
                outcome.append(exc)
            else:
                outcome.append(None)

        async def both_ways() -> None:
            await other.open()
            await give(other, conn)
            theirs = await other.acquire()
            await give(pool, theirs)
            assert other.stats().in_use == 1
            await other.release(theirs)
            await other.close()

        task = self.loop.create_task(both_ways())
        self._settle()
        assert task.done()
        task.result()
        assert outcome, "a release to the wrong pool did not end"
        assert all(exc is not None and "release it to the pool it came from" in str(exc)
                   for exc in outcome), outcome

    @precondition(lambda self: any(not u.task.done() for u in self.users))
    @rule(index=st.integers(0, MAX_USERS - 1))
    def cancel_user(self, index: int) -> None:
        live = [u for u in self.users if not u.task.done()]
        user = live[index % len(live)]
        user.cancelled_by_model = True
        user.task.cancel()
        self._settle()

    # -- time and faults ----------------------------------------------------------------------

    @rule(seconds=st.sampled_from([0.0, 0.0005, 0.001, 0.002, 0.005, 0.03, 0.3, 3.0]))
    def advance(self, seconds: float) -> None:
        self.loop.advance(seconds)
        self._settle()

    @precondition(lambda self: bool(self.server.open_connections()))
    @rule(index=st.integers(0, 20), silently=st.booleans())
    def kill_connection(self, index: int, silently: bool) -> None:
        conns = self.server.open_connections()
        conn = conns[index % len(conns)]
        if silently:
            conn.die_silently()
        else:
            conn.die()
        self._settle()

    @rule(mode=st.sampled_from(["ok", "ok", "refuse", "auth", "hang"]))
    def logins(self, mode: str) -> None:
        self.server.login_mode = mode

    @rule(seconds=st.sampled_from([0.003, 0.003, 0.05, 0.2]))
    def login_time(self, seconds: float) -> None:
        """0.05 is connect_timeout: a login and its timeout end in the same instant."""
        self.server.login_latency = seconds

    @rule(limit=st.sampled_from([None, None, 1, 2, 3]))
    def pooler_capacity(self, limit: int | None) -> None:
        """Logins refused while `limit` connections are open (a full pooler)."""
        self.server.max_connections = limit

    @rule()
    def expire_all(self) -> None:
        assert self.pool is not None
        self.pool.expire_all()
        self._settle()

    @rule()
    def mark_stale(self) -> None:
        assert self.pool is not None
        self.pool.mark_stale()
        self._settle()

    # -- the end ------------------------------------------------------------------------------

    @precondition(lambda self: self.closer is None)
    @rule(timeout=st.sampled_from([0.0, 0.01, 1.0]),
          cancel_after=st.sampled_from([None, None, 0.0, 0.0005, 0.005]))
    def close(self, timeout: float, cancel_after: float | None) -> None:
        assert self.pool is not None
        self.closer = self.loop.create_task(self.pool.close(timeout=timeout))
        if cancel_after is not None:
            self.loop.advance(cancel_after)
            self.closer.cancel()
        self._finish_closing()

    @precondition(lambda self: self.closer is None)
    @rule()
    def terminate(self) -> None:
        assert self.pool is not None
        self.pool.terminate()
        self._finish_closing()

    def _finish_closing(self) -> None:
        self.loop.advance(30)  # close()'s timeouts, cancel requests, graceful closes
        self._settle()
        assert self.pool is not None
        if self.closer is not None:
            assert self.closer.done()
            if not self.closer.cancelled():
                assert self.closer.exception() is None, repr(self.closer.exception())
        else:
            self.closer = self.loop.create_task(asyncio.sleep(0))  # marks the pool as ended
            self._settle()
        self._check_closed()

    def _check_closed(self) -> None:
        pool = self.pool
        assert pool is not None
        slots = pool._slots
        assert slots.state is CLOSED_STATE
        s = pool.stats()
        assert (s.size, s.idle, s.in_use, s.connecting, s.waiting) == (0, 0, 0, 0, 0), s
        assert not slots.waiters
        assert not slots.attempts
        assert not slots.background, slots.background
        assert slots.housekeeper is None or slots.housekeeper.done()
        users = {u.task for u in self.users}
        others = [t for t in asyncio.all_tasks(self.loop) if t not in users and t is not self.closer]
        assert others == [], others
        assert self.server.open_connections() == [], self.server.open_connections()
        assert s.created_total == s.closed_total, s
        for user in self.users:
            if user.task.done():
                continue
            # Still running only if it holds a connection the pool closed under it (a leak).
            assert user.conn is not None, user.kind
            assert user.conn.is_closed(), user.kind

    def teardown(self) -> None:
        try:
            pool = self.pool
            if pool is not None and self.closer is None:
                self.loop.run_until_complete(pool.close(timeout=0))
                self._finish_closing()
            for user in self.users:
                if not user.task.done():
                    user.cancelled_by_model = True
                    user.task.cancel()
            self.loop.advance(1)
            self._check_users()
            self._check_loop()
        finally:
            reader = _CURRENT.get("reader")
            if reader is not None:
                reader.pool = None
            self.loop.close()

    # -- invariants ---------------------------------------------------------------------------

    def _settle(self) -> None:
        self.loop.settle()

    @invariant()
    def sizes_add_up(self) -> None:
        if self.pool is None:
            return
        slots = self.pool._slots
        s = self.pool.stats()
        assert s.size == len(slots.idle) + len(slots.leased()) + slots.connecting
        assert 0 <= s.size <= self.max_size, s
        assert min(s.idle, s.in_use, s.connecting, s.waiting) >= 0, s
        assert slots.retrying >= 0

    @invariant()
    def every_record_is_where_it_says(self) -> None:
        if self.pool is None:
            return
        slots = self.pool._slots
        idle = list(slots.idle)
        assert len(set(idle)) == len(idle), "a record is idle twice"
        assert all(r.place is IDLE for r in idle)
        leased = slots.leased()
        assert all(r.lease is not None and r.lease.record is r for r in leased)
        assert all(r.place is CHECKING for r in slots.checking)
        places = [*idle, *leased, *slots.checking]
        assert len(set(places)) == len(places), "a record is in two places"
        # Between two steps no record is on its way between places: the pool's list of
        # records is exactly these, and only the ones in use carry a lease.
        assert sorted(map(id, places)) == sorted(map(id, slots.records)), "records list is off"
        assert all((r.lease is not None) == (r.place is LEASED) for r in slots.records), (
            "a lease left behind, or one missing")
        raws = [r.conn for r in places]
        assert len(set(map(id, raws))) == len(raws), "a connection is in two records"
        for r in slots.records:
            # A query helper's spare lease: the one in use now, or one that ended cleanly and
            # keeps nothing of its holder.
            spare = r.spare
            assert spare is None or spare.record is r, "a spare lease of another connection"
            assert spare is None or spare is r.lease or (
                spare.state is RELEASED and not spare.reported and spare.task is None
                and spare.context is None), "a spare lease that did not end cleanly"

    @invariant()
    def idle_connections_are_clean(self) -> None:
        """What a holder left (a transaction, a listener) is gone before anyone else gets it."""
        if self.pool is None:
            return
        for record in self.pool._slots.idle:
            conn = record.conn
            assert not conn.is_in_transaction(), f"{conn} is idle inside a transaction"
            assert not conn._listeners, f"{conn} is idle with a holder's listener"  # type: ignore[attr-defined]

    @invariant()
    def nothing_is_lost(self) -> None:
        if self.pool is None:
            return
        slots = self.pool._slots
        present = {id(r.conn) for r in [*slots.idle, *slots.leased(), *slots.checking]}
        s = self.pool.stats()
        assert s.created_total == s.closed_total + len(present), s
        for conn in self.server.open_connections():
            if id(conn) in present or conn.closing:
                continue
            # Retired, and terminated once asyncpg's cancel request is through.
            assert driver.pending_cancellations(conn), f"{conn} is open but not in the pool"

    @invariant()
    def nobody_waits_for_what_is_free(self) -> None:
        if self.pool is None:
            return
        slots = self.pool._slots
        s = self.pool.stats()
        if s.waiting:
            assert s.idle == 0, s
            assert s.size == s.max_size, s
        if slots.retrying:  # callers between two login attempts
            assert s.idle == 0, f"a caller retries its login while a connection is idle: {s}"

    @invariant()
    def the_fast_flag_says_what_it_sums_up(self) -> None:
        """`fast` lets checkouts and returns skip the queue and state checks: wrong one way, a
        returned connection would go idle past a waiter (who then waits until timed out)."""
        if self.pool is None:
            return
        slots = self.pool._slots
        assert slots.fast == (slots.state is OPEN and not slots.waiters
                              and slots.forks == forks.FORKS[0]), (
            slots.fast, slots.state, len(slots.waiters))
        # The statement runners' flag: wrong one way, a helper would skip the setup hook or
        # the max_queries count.
        assert slots.fast_statements == (slots.fast and slots.setup is None
                                          and slots.max_queries is None), (
            slots.fast_statements, slots.fast, slots.setup, slots.max_queries)

    @invariant()
    def a_stale_mark_holds_until_checked(self) -> None:
        """A connection marked stale (`mark_stale`) is validated before its next use: idle, it
        is due a look at once, whether it was idle or in use when marked."""
        if self.pool is None:
            return
        for record in self.pool._slots.idle:
            assert not record.stale or record.check_at == -math.inf, record

    @invariant()
    def every_reserved_slot_has_a_caller(self) -> None:
        """`connecting` counts callers logging in, validating, or waiting between attempts."""
        if self.pool is None:
            return
        slots = self.pool._slots
        assert slots.connecting == len(slots.attempts) + len(slots.checking) + slots.retrying, (
            slots.connecting, len(slots.attempts), len(slots.checking), slots.retrying)

    @invariant()
    def housekeeping_runs_while_open(self) -> None:
        if self.pool is None:
            return
        slots = self.pool._slots
        if slots.state is OPEN and slots.housekeeper is not None:
            assert not slots.housekeeper.done(), "housekeeping stopped"

    @invariant()
    def users_see_only_what_they_may(self) -> None:
        self._check_users()

    @invariant()
    def nothing_reaches_the_loop_exception_handler(self) -> None:
        self._check_loop()

    def _check_users(self) -> None:
        for user in self.users:
            task = user.task
            if not task.done():
                continue
            if task.cancelled():
                assert user.cancelled_by_model, f"a {user.kind} user was cancelled by the pool"
                continue
            exc = task.exception()
            if exc is None or isinstance(exc, (*ALLOWED, Boom)):
                continue
            if isinstance(exc, asyncpg.ConnectionDoesNotExistError | asyncpg.InterfaceError) and (
                "closed" in str(exc)
            ):
                continue  # its connection died (or was reclaimed) under a query
            raise AssertionError(f"a {user.kind} user ended with {exc!r}") from exc

    def _check_loop(self) -> None:
        assert self.loop.errors == [], self.loop.errors
        reader = _CURRENT.get("reader")
        if reader is not None:
            assert reader.errors == [], reader.errors


def test_pool_model() -> None:
    PoolModel.examples = 0
    started = time.perf_counter()
    # Hundreds of thousands of expected warnings (refused logins...) would pile up in pytest's
    # log capture; the model asserts outcomes, not log lines.
    quiet = logging.getLogger("asyncpool")
    level = quiet.level
    quiet.setLevel(logging.CRITICAL)
    try:
        _run_model()
    finally:
        quiet.setLevel(level)
    elapsed = time.perf_counter() - started
    print(f"\npool model: {PoolModel.examples} examples in {elapsed:.1f}s")
    assert PoolModel.examples >= min(EXAMPLES, 1000)


def _run_model() -> None:
    with _StatsReader() as reader:
        _CURRENT["reader"] = reader
        try:
            # In batches: hypothesis keeps per-example data for the whole of a run, so one run of
            # 100,000 examples would grow by gigabytes. Each batch draws afresh.
            for start in range(0, EXAMPLES, BATCH):
                run_state_machine_as_test(
                    PoolModel,
                    settings=settings(
                        max_examples=min(BATCH, EXAMPLES - start),
                        stateful_step_count=40,
                        deadline=None,
                        database=None,
                        suppress_health_check=list(HealthCheck),
                    ),
                )
        finally:
            del _CURRENT["reader"]
    print(f"\nstats() read {reader.reads} times from another thread", end="")


if __name__ == "__main__":
    pytest.main([__file__, "-q", "-s"])
