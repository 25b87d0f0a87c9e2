"""A stateful model test of the pool core: random schedules of users and faults, invariants
checked after every step.

Each example is a fresh pool (random sizes, timeouts, validation and leak settings) on the fake
driver and a virtual clock (its connections, at random, as the real Connector's: cancel requests
sent from tasks of their own that a close does not cut short, the pool's own requests delivered;
or as asyncpg's plain class; from a front that sends no BackendKeyData (RDS Proxy) or with
``cancel_requests="off"``, where a statement cut short closes its connection instead; with
``max_queries``, a ``setup`` hook, ``loop=`` given at random),
driven by hypothesis through a random sequence of: users that acquire
(``async with``, ``await``, transactions that commit or fail, or whose COMMIT is answered
ROLLBACK, statements cut off by their ``timeout=`` (one whose user goes on with its next
statement at once, while the cancel is under way), the query helpers (one that
leaves a transaction open, one slow enough to be leaked, one timed out), leaks), connections kept past
their checkouts and used by every way to the connection (statements, prepare, transaction,
cursor, listeners, query loggers, one made in the block included, COPY, attributes, terminate),
connections given to another pool's release() both ways, time
passing, users cancelled at whatever await they are at, connections dying loudly or silently,
logins that succeed, are refused, fail authentication or hang, servers that say goodbye, cancel
requests slow or never taken, a held connection used from another event loop, a SnapStart
snapshot and restore, ``expire_all``, ``mark_stale``, ``close()`` (also cancelled half way) and
``terminate()`` (with ``cancel_within=`` too); a second thread reads ``stats()`` all
along. After every step (with the loop run until nothing is ready):

- size = idle + in use + connecting, and never above max_size; no count is negative;
- every record is in exactly the place it says (idle, held, being checked); no connection is both
  idle and held, or held twice, or handed to two users at once;
- nothing is lost: created = closed + present, and every connection open on the server is in the
  pool (or is waiting for its cancel request before it is terminated);
- no waiter waits while a connection is idle or a slot is free;
- while the pool is open its housekeeping task is alive;
- where no cancel request can arrive (no BackendKeyData, ``cancel_requests="off"``), none is
  sent, and no connection stays open waiting for a statement cut short;
- idle connections are all checked before their next checkout (whatever ``validate_after``
  says) only after ``mark_stale()`` or a connection lost, not one the pool closed itself;
- users end with a result or an error a user may see (never a bare CancelledError they did not
  ask for, never a driver "another operation is in progress"); a COMMIT answered ROLLBACK is
  never a success;
- a connection handed out has no statement running, no cancel pending, no transaction (but the
  one ``pool.transaction()`` began); none that ran ``max_queries`` waits idle;
- a snapshot keeps no socket (every one closed or closing);
- after close() or terminate(): no waiter, nothing in use or connecting, no background task or
  cancel request of the pool's, no lease still active, every connection closed and counted;
  close(timeout=T) ended within T + ``CLOSE_GRACE``'s upper bound (virtual time);
- nothing reached the event loop's exception handler (after a garbage collection: no future
  left failed and unretrieved), and stats() never failed in the other thread.

CI runs ASYNCPOOL_MODEL_EXAMPLES (default 1,000) examples. The long run:

    ASYNCPOOL_MODEL_EXAMPLES=100000 .venv/bin/pytest tests/unit/test_model.py -q -s --timeout 0
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
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
from hypothesis import HealthCheck, Phase, settings
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
    TransactionRolledBackError,
)
from asyncpool.connect import driver
from asyncpool.pool import forks, snapshot
from asyncpool.pool.lease import ACTIVE, RELEASED
from asyncpool.pool.lifecycle import CLOSE_GRACE
from asyncpool.pool.record import CHECKING, IDLE, LEASED
from asyncpool.pool.state import CLOSED_STATE, OPEN
from tests.unit.fakes import (
    FAILING_QUERY,
    FakeConnection,
    FakeServer,
    VirtualClockLoop,
    fake_pool,
    patched_cancel_requests,
)

EXAMPLES = int(os.environ.get("ASYNCPOOL_MODEL_EXAMPLES", "1000"))
MAX_USERS = 8
# The proxies kept past their checkouts for `use_a_kept_connection` (the most recent), of the
# users whose checkout is a block (it has ended when their task has).
_KEPT = 8
_BLOCKS = frozenset({"with", "listen", "tx", "tx_fail", "tx_caught", "timed", "timed_on"})
#: The users whose statement has a `timeout=` shorter than it takes: TimeoutError is theirs.
_TIMED = frozenset({"timed", "timed_on", "helper_timed"})
#: What close(timeout=T) may take on top of T (`CLOSE_GRACE`, the module's docstring and the
#: CHANGELOG: "at most T + 1 s"), and a margin for the loop's own steps under a virtual clock.
_CLOSE_SLACK = CLOSE_GRACE[1] + 0.01
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
        #: the leases of the checkouts this user was handed (none may outlive close())
        self.leases: list[Any] = []
        #: tx_caught: its failing statement raised (and was caught) inside the block
        self.caught = False
        #: it held a connection when a SnapStart snapshot was taken
        self.snapshotted = False
        # A query logger made in the user's block, not entered (`use_a_kept_connection`).
        self.logger: Any = None


class PoolModel(RuleBasedStateMachine):
    examples = 0

    def __init__(self) -> None:
        super().__init__()
        type(self).examples += 1
        # The collection at the teardown then scans only what this example made: a full one
        # (hypothesis keeps every example's data) took most of an example's time.
        gc.freeze()
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
        self.max_queries: int | None = None
        #: the virtual time close() was called at, and how long it may take (None: unbounded)
        self.close_called = 0.0
        self.close_bound: float | None = None
        self.close_ended: float | None = None
        #: A connection was lost (killed, or the server said goodbye): from then on the pool
        #: may check every idle one (`Slots.retire_lost`).
        self.lost_any = False

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
        outlive=st.booleans(),
        max_queries=st.sampled_from([None, None, 2, 5]),
        setup=st.booleans(),
        given_loop=st.booleans(),
        cancel_key=st.sampled_from(["sent", "sent", "absent", "off"]),
    )
    def open_pool(  # noqa: PLR0917 - hypothesis passes each drawn option by name
        self, min_size: int, extra: int, acquire_timeout: float | None,
                  validate_after: float | None, leak_timeout: float | None, leak_action: str,
                  max_lifetime: float | None, max_idle: float | None, wait: bool,
                  outlive: bool, max_queries: int | None, setup: bool, given_loop: bool,
                  cancel_key: str) -> None:
        self.max_size = max(1, min_size + extra)
        self.max_queries = max_queries
        # As the real Connector's connections (cancel requests from tasks of their own that a
        # close does not cut short, the pool's own requests delivered), or asyncpg's own.
        self.server.requests_outlive = outlive
        # A front that sends no BackendKeyData (RDS Proxy), or cancel_requests="off": a statement
        # cut short closes its connection instead of being cancelled (`FakeServer.cancel_key`).
        self.server.cancel_key = cancel_key
        options: dict[str, Any] = {}
        if cancel_key == "off":
            options["cancel_requests"] = "off"
        if setup:
            options["setup"] = _setup
        if given_loop:
            options["loop"] = self.loop
        self.pool = fake_pool(
            self.server, min_size=min_size, max_size=self.max_size, acquire_timeout=acquire_timeout,
            connect_timeout=0.05, validate_after=validate_after, leak_timeout=leak_timeout,
            leak_action=leak_action, max_lifetime=max_lifetime, max_idle=max_idle,
            max_queries=max_queries, **options,
        )
        self.loop.run_until_complete(self.pool.open(wait=wait))
        reader = _CURRENT.get("reader")
        if reader is not None:
            reader.pool = self.pool

    # -- users --------------------------------------------------------------------------------

    @precondition(lambda self: len([u for u in self.users if not u.task.done()]) < MAX_USERS)
    @rule(kind=st.sampled_from(["with", "await", "tx", "tx_fail", "tx_caught", "helper",
                                "helper_begin", "helper_slow", "helper_timed", "timed",
                                "timed_on", "leak",
                                "listen"]),
          hold=st.sampled_from([0.0, 0.001, 0.01, 0.2, 2.0]),
          timeout=st.sampled_from(["default", None, 0.0, 0.02]))
    def start_user(self, kind: str, hold: float, timeout: Any) -> None:
        assert self.pool is not None
        user = _User(kind, None)  # type: ignore[arg-type]
        task = self.loop.create_task(self._user(kind, hold, timeout, user))
        user.task = task
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
        # transaction's user, nor with a `setup` hook: its BEGIN or the hook is awaited after
        # the checkout, and a mark then is one for the next checkout.
        assert self.pool is not None
        [record] = [r for r in self.pool._slots.records if r.conn is raw]
        awaited = user.kind.startswith("tx") or self.pool._slots.setup is not None
        assert awaited or not record.stale, (
            f"{raw} handed out unchecked after mark_stale()")
        # Handed out in step: nothing running or being cancelled on it, and no transaction
        # but the one pool.transaction() began for this user.
        assert raw._op is None, f"{raw} handed out with a statement running"
        assert raw._cancel_waiter is None, f"{raw} handed out while its cancel is pending"
        assert not raw.is_closed() or raw.closed_how in ("died", "goodbye"), raw.closed_how
        if not user.kind.startswith("tx"):
            assert not raw.is_in_transaction(), f"{raw} handed out inside a transaction"
            assert raw._top_xact is None, f"{raw} handed out with a transaction object open"
        self.holders[raw] = user
        user.conn = raw
        user.leases.append(conn._lease)
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

    async def _user(self, kind: str, hold: float, timeout: Any, user: _User) -> None:
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
            elif kind in ("tx_caught", "timed", "timed_on", "helper_timed"):
                await self._cut_short(pool, kind, hold, args, user)
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

    async def _cut_short(self, pool: Pool, kind: str, hold: float, args: tuple[Any, ...],
                         user: _User) -> None:
        """The users whose statement does not end well: one that fails inside a transaction
        (caught: the COMMIT is answered ROLLBACK, TransactionRolledBackError), and ones cut
        off by their `timeout=` (returned with their cancel request in flight)."""
        if kind == "tx_caught":
            async with pool.transaction(*args) as conn:
                self._took(conn)
                try:
                    await conn.execute(FAILING_QUERY)
                except asyncpg.DivisionByZeroError:
                    user.caught = True
                await asyncio.sleep(hold)
                self._gave_back()
        elif kind in ("timed", "timed_on"):
            async with pool.acquire(*args) as conn:
                self._took(conn)
                with contextlib.suppress(TimeoutError):
                    await conn.fetchval("SELECT pg_sleep(1)", timeout=0.002)
                if kind == "timed_on":  # goes on at once: while the cancel is under way
                    await conn.fetchval("SELECT 3")
                await asyncio.sleep(hold)
                self._gave_back()
        else:
            await pool.execute("SELECT pg_sleep(1)", timeout=0.002)

    @precondition(lambda self: len([u for u in self.users if not u.task.done()]) < MAX_USERS)
    @rule(kind=st.sampled_from(["timed", "timed_on", "helper_timed", "with", "tx", "leak"]),
          hold=st.sampled_from([0.0, 0.001, 0.2]),
          then=st.sampled_from([0.003, 0.004, 0.005, 0.006, 0.01]), cancel=st.booleans())
    def cut_short(self, kind: str, hold: float, then: float, cancel: bool) -> None:
        """A user whose statement is cut short (by its timeout, or cancelled at `then`), in one
        step: as separate steps (a user, time, a cancel) they line up seldom, in about one
        example in fifty, while that is where a front without cancel keys differs."""
        self.start_user(kind, hold, "default")
        user = self.users[-1]
        self.loop.advance(then)
        self._settle()
        if cancel and not user.task.done():
            user.cancelled_by_model = True
            user.task.cancel()
            self._settle()

    @precondition(lambda self: len([u for u in self.users if not u.task.done()]) < MAX_USERS)
    @rule(count=st.integers(2, MAX_USERS), hold=st.sampled_from([0.0, 0.01, 0.2]))
    def crowd(self, count: int, hold: float) -> None:
        """Several users at once, so that some queue."""
        live = len([u for u in self.users if not u.task.done()])
        for _ in range(min(count, MAX_USERS - live)):
            user = _User("with", None)  # type: ignore[arg-type]
            task = self.loop.create_task(self._user("with", hold, "default", user))
            user.task = task
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
        self.lost_any = True
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

    @precondition(lambda self: bool(self.server.open_connections()))
    @rule(index=st.integers(0, 20))
    def server_goodbye(self, index: int) -> None:
        """The server ends a connection with a FATAL (an administrator's command, a restart)."""
        self.lost_any = True
        conns = self.server.open_connections()
        conns[index % len(conns)].goodbye()
        self._settle()

    @rule(seconds=st.sampled_from([None, None, 0.0005, 0.05, 2.0, math.inf]))
    def cancel_time(self, seconds: float | None) -> None:
        """How long a cancel request takes to be taken (inf: never; it ends by its bound)."""
        self.server.cancel_latency = seconds

    @precondition(lambda self: self.closer is None and any(
        not u.task.done() and u.conn is not None for u in self.users))
    @rule(index=st.integers(0, MAX_USERS - 1))
    def use_from_another_loop(self, index: int) -> None:
        """A held connection used from another event loop is refused before anything is sent
        (its holder's statements go on)."""
        holders = [u for u in self.users if not u.task.done() and u.conn is not None]
        user = holders[index % len(holders)]
        raw = user.conn
        assert raw is not None
        proxies = [conn for kept_user, conn in self.kept if kept_user is user]
        if not proxies:
            return  # (a checkout without a block: its proxy is not kept)
        sent = len(raw.queries)
        other = asyncio.new_event_loop()
        try:
            with pytest.raises(PoolError):
                other.run_until_complete(proxies[-1].fetchval("SELECT 1"))
        finally:
            other.close()
        assert len(raw.queries) == sent, "a statement from another loop reached the server"
        self._settle()

    @precondition(lambda self: self.closer is None)
    @rule(budget=st.sampled_from([0.0, 0.01, 1.0]), frozen=st.sampled_from([0.0, 5.0, 600.0]))
    def snapshot_and_restore(self, budget: float, frozen: float) -> None:
        """A SnapStart snapshot (no connection left open), a freeze, then the restore."""
        pool = self.pool
        assert pool is not None
        slots = pool._slots
        for user in self.users:
            if not user.task.done():
                user.snapshotted = True  # (a connection it holds is closed under it: PoolError)
        self.loop.run_until_complete(snapshot.empty_for_snapshot(slots, budget))
        # Nothing else runs until the restore: every socket is closed, or closing (a goodbye
        # `budget` did not wait for, a cancel request's connection waiting for it).
        kept = [c for c in self.server.open_connections()
                if not c.closing and not driver.pending_cancellations(c)]
        assert kept == [], f"{kept} kept in the snapshot"
        self.loop.now += frozen  # (no timer fires while frozen)
        if not pool.closed:
            pool.mark_stale()
        self.loop.call_soon(snapshot.resume_after_restore, slots)
        self._settle()

    # -- the end ------------------------------------------------------------------------------

    @precondition(lambda self: self.closer is None)
    @rule(timeout=st.sampled_from([0.0, 0.01, 1.0]),
          cancel_after=st.sampled_from([None, None, 0.0, 0.0005, 0.005]))
    def close(self, timeout: float, cancel_after: float | None) -> None:
        assert self.pool is not None
        self.close_called = self.loop.time()
        self.close_bound = timeout + _CLOSE_SLACK if cancel_after is None else None
        self.closer = self.loop.create_task(self.pool.close(timeout=timeout))
        self.closer.add_done_callback(lambda _: setattr(self, "close_ended", self.loop.time()))
        if cancel_after is not None:
            self.loop.advance(cancel_after)
            self.closer.cancel()
        self._finish_closing()

    @precondition(lambda self: self.closer is None)
    @rule(cancel_within=st.sampled_from([0.0, 0.0, 0.01]))
    def terminate_cancelling(self, cancel_within: float) -> None:
        """terminate(cancel_within=): the held connections' statements cancelled first, from
        this thread (the fake server's socket does not exist: none is sent, a warning says)."""
        assert self.pool is not None
        self.pool.terminate(cancel_within=cancel_within)
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
            if self.close_bound is not None:
                assert self.close_ended is not None
                took = self.close_ended - self.close_called
                assert took <= self.close_bound, (
                    f"close(timeout={self.close_bound - _CLOSE_SLACK}) took {took:.3f}s")
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
        leases = [lease for user in self.users for lease in user.leases]
        assert all(lease.state is not ACTIVE for lease in leases), "a lease outlived close()"
        # No cancel request of this loop's left running (each ends by its own bound).
        assert not [t for t in driver._REQUESTS_IN_FLIGHT if t.get_loop() is self.loop]
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
            # A future or task that failed and was never awaited says so when collected: here,
            # in this example, not in whichever one a collection happens to come in.
            gc.collect()
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
    def no_cancel_without_a_key(self) -> None:
        """Where no cancel request can arrive (no BackendKeyData, ``cancel_requests="off"``),
        the real Connector's connections send none, and one whose statement was cut short is
        closed at once: none stays open waiting for a statement nobody can stop."""
        server = self.server
        if server.cancel_key == "sent" or not server.requests_outlive:
            return
        assert server.cancels_taken == 0, f"{server.cancels_taken} cancel requests sent"
        waiting = [c for c in server.open_connections() if c._protocol._is_cancelling()]
        assert waiting == [], f"{waiting} left open with a statement nobody can cancel"

    @invariant()
    def idle_checks_forced_only_after_a_loss(self) -> None:
        """Every idle connection is checked before its next checkout, whatever the clock says,
        only after `mark_stale` or once a connection was found lost (`Slots.retire_lost`): not
        for one the pool closed itself, such as one whose statement was cut short where no
        cancel request can arrive."""
        if self.pool is None or self.lost_any:
            return
        for record in self.pool._slots.idle:
            assert record.check_at != -math.inf or record.stale, (
                f"{record.conn} is due a check though no connection was lost")

    @invariant()
    def max_queries_holds(self) -> None:
        """No connection that has run `max_queries` queries waits idle for another checkout."""
        if self.pool is None or self.max_queries is None:
            return
        for record in self.pool._slots.idle:
            count = driver.queries_count(record.conn)
            assert count < self.max_queries, f"{record.conn} idle after {count} queries"

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
            if user.kind == "tx_caught" and user.caught and exc is None:
                raise AssertionError("a transaction whose COMMIT was answered ROLLBACK ended "
                                     "as if it had committed")
            if exc is None or isinstance(exc, (*ALLOWED, Boom)):
                continue
            if isinstance(exc, TransactionRolledBackError) and user.kind == "tx_caught":
                continue
            if isinstance(exc, TimeoutError) and user.kind in _TIMED:
                continue
            if type(exc) is PoolError and user.snapshotted and "terminated" in str(exc):
                continue  # its connection was closed for a SnapStart snapshot
            if isinstance(exc, asyncpg.AdminShutdownError):
                continue  # the server said goodbye under its statement
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


async def _setup(conn: Any) -> None:
    """A ``setup`` hook: a statement at every checkout."""
    await conn.execute("SELECT 'setup'")


def test_pool_model() -> None:
    PoolModel.examples = 0
    started = time.perf_counter()
    # Hundreds of thousands of expected warnings (refused logins...) would pile up in pytest's
    # log capture; the model asserts outcomes, not log lines.
    quiet = logging.getLogger("asyncpool")
    level = quiet.level
    quiet.setLevel(logging.CRITICAL)
    try:
        with patched_cancel_requests():
            _run_model()
    finally:
        gc.unfreeze()
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
                        # Without the explain phase: its tracer over every line of the pool
                        # and asyncio made a failure's shrinking run past pytest's timeout
                        # (a timeout, no example); without it, shrunk in about 35 s.
                        phases=tuple(p for p in Phase if p is not Phase.explain),
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
