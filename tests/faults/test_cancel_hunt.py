"""A seeded hunt for what cancellation and time limits at random moments leave behind, against the
real PostgreSQL and both PgBouncers, in each prepared_statements mode.

The fault soak (test_soak.py) mixes interruptions with network and server faults and checks that
callers meet only documented errors; this one has no fault but the interruptions, and checks what
that soak cannot tell apart from a fault's damage: every statement's result is its own (a value
only that call could get back), the pooler and the server are left with nothing running or in a
transaction, every transaction the caller was told committed is there and every one it left
before COMMIT is not, and nothing reached the loop's exception handler or asyncpool's warnings.

Workers run the query helpers, ``async with pool.acquire()`` with several statements,
``pool.transaction()``, a cursor, ``executemany`` and ``copy_records_to_table``, each cancelled
(``task.cancel()``), bounded by ``asyncio.timeout`` or by a ``timeout=`` argument at a random
moment, or left alone; beside them ``expire_all()`` now and then and a holder kept past a short
leak_timeout (reclaimed). Each case runs ROUNDS rounds; after each, the invariants.

`test_cancellation_hunt_fronts` runs the same driver where the first cases do not reach: direct
to PostgreSQL; with ``cancel_requests="off"`` and through a proxy that strips BackendKeyData (as
RDS Proxy gives none), where an interruption closes the connection instead; with each pool closed
(``close(timeout=...)``) or terminated at a random moment while its workers run (their callers
may also get PoolClosedError; afterwards no session of the pool is left open or running on the
server); and with SQLAlchemy AsyncSession work on an engine over each pool.

Other seeds or longer, by hand:

    ASYNCPOOL_TEST_HUNT_SEEDS=1,2,3 ASYNCPOOL_TEST_HUNT_SECONDS=8 \
        .venv/bin/pytest tests/faults/test_cancel_hunt.py -p no:randomly

ASYNCPOOL_TEST_HUNT_COMBINED=1 adds the fronts' combinations (SQLAlchemy or closers with no
BackendKeyData or cancel_requests="off").
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import gc
import itertools
import logging
import os
import random
import traceback
import uuid
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Literal

import asyncpg
import pytest

from asyncpool import ConnectionLeakedError, Pool, PoolClosedError, PoolTimeoutError
from asyncpool.config import CancelRequests
from asyncpool.testing import PostgresServer
from asyncpool.testing.faultproxy import FaultProxy
from asyncpool.testing.invariants import full_width, settled
from tests.conftest import Pooler

SEEDS = [int(s) for s in os.environ.get("ASYNCPOOL_TEST_HUNT_SEEDS", "7").split(",") if s.strip()]
ROUND_SECONDS = float(os.environ.get("ASYNCPOOL_TEST_HUNT_SECONDS", "3"))
ROUNDS = int(os.environ.get("ASYNCPOOL_TEST_HUNT_ROUNDS", "3"))
# test_cancellation_hunt_fronts: fewer, to stay under 20 s where interrupted statements run on
# (closed, not cancelled) and each round waits for them to end.
FRONT_ROUNDS = int(os.environ.get("ASYNCPOOL_TEST_HUNT_ROUNDS", "2"))
POOLS = 4
WORKERS = 3  # per pool
MAX_SIZE = 3
LEAK_TIMEOUT = 1.0
# Any one operation ends within this (statements of at most 30 ms, acquire_timeout 3 s).
OP_BOUND = 20.0
# How long the pooler and the server may take to show an interrupted statement gone (a cancel
# request in flight, a reset under way).
SETTLE = 5.0

CASES: list[tuple[str, Literal["off", "on", "unnamed"]]] = [
    ("legacy", "unnamed"), ("legacy", "off"), ("current", "unnamed"), ("current", "off"),
    ("current", "on"),
]


TAGS = itertools.count(1)


class WrongResult(AssertionError):
    """A statement returned something that was not its own result."""


@dataclass
class Findings:
    seed: int
    problems: list[str] = field(default_factory=list)
    outcomes: collections.Counter[str] = field(default_factory=collections.Counter)

    def add(self, text: str) -> None:
        if len(self.problems) < 50:
            self.problems.append(text)


@dataclass
class Book:
    """Rows each transaction wrote (by tag) and what its caller was told."""

    committed: set[str] = field(default_factory=set)
    # Left before COMMIT was sent: the rows must be absent.
    abandoned: set[str] = field(default_factory=set)


Closer = Literal["close", "terminate"]


@dataclass
class Front:
    """How the pools reach PostgreSQL, and what else a round does to them."""

    label: str
    dsn: str
    #: The PgBouncer in the path (its admin console is checked after each round); None: direct.
    pooler: Pooler | None
    cancel_requests: CancelRequests = "auto"
    #: Each pool is closed (``close(timeout=...)``) or terminated at a random moment of each
    #: round, while its workers run; the next round opens new pools.
    closers: tuple[Closer, ...] = ()
    #: Workers also run SQLAlchemy AsyncSession work on an engine over each pool.
    sqlalchemy: bool = False


def unwrapped(error: BaseException) -> BaseException:
    """The DB-API error SQLAlchemy wrapped (its ``.orig``), else `error`."""
    orig = getattr(error, "orig", None)
    return orig if isinstance(orig, BaseException) else error


async def stopped(stop: asyncio.Event, pause: float) -> bool:
    """Wait `pause` seconds, or less if the round ends meanwhile: whether it ended. (A plain
    sleep kept each round waiting seconds for leakers and expirers after it had ended.)"""
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(pause):
            await stop.wait()
    return stop.is_set()


class Hunt:
    def __init__(self, pool: Pool, table: str, marker: str, rng: random.Random, *,
                 findings: Findings, book: Book, sessions: Any = None) -> None:
        self.pool = pool
        self.sessions = sessions
        self.table = table
        self.marker = marker
        self.rng = rng
        self.findings = findings
        self.book = book
        self.counter = rng.randrange(1_000_000)

    def token(self) -> int:
        self.counter += 1
        return self.counter

    def tag(self, kind: str) -> str:
        """A name for rows no other operation writes (tokens of two workers may meet)."""
        return f"{kind}{next(TAGS)}"

    def sql(self, text: str) -> str:
        return f"{text} /* {self.marker} */"

    def pause(self) -> float:
        return self.rng.choice([0.0, 0.0, 0.002, 0.01, 0.03])

    @contextlib.contextmanager
    def booked(self, tag: str) -> Iterator[Callable[[], None]]:
        """Book the transaction writing `tag`: committed if the block ends well, abandoned if
        it ends before the block calls the function it gets (just before its commit)."""
        reached_commit = False

        def at_commit() -> None:
            nonlocal reached_commit
            reached_commit = True

        try:
            yield at_commit
        except BaseException:
            if not reached_commit:
                self.book.abandoned.add(tag)
            raise
        self.book.committed.add(tag)

    @staticmethod
    def expect(what: str, got: object, want: object) -> None:
        if got != want:
            raise WrongResult(f"{what}: got {got!r}, expected {want!r}")

    # -- operations (each raises WrongResult on a result that is not its own) ---------------

    async def helper(self, limit: float | None) -> None:
        v = self.token()
        kind = self.rng.randrange(3)
        if kind == 0:
            got = await self.pool.fetchval(self.sql("SELECT $1::int FROM pg_sleep($2)"), v,
                                           self.pause(), timeout=limit)
            self.expect("pool.fetchval", got, v)
        elif kind == 1:
            rows = await self.pool.fetch(
                self.sql("SELECT $1::int + g AS x FROM generate_series(1, 5) g, pg_sleep($2)"),
                v, self.pause(), timeout=limit)
            self.expect("pool.fetch", [r["x"] for r in rows], [v + i for i in range(1, 6)])
        else:
            status = await self.pool.execute(
                self.sql(f"SELECT {v} FROM pg_sleep({self.pause()})"), timeout=limit)
            self.expect("pool.execute", status, "SELECT 1")

    async def block(self, limit: float | None) -> None:
        acquire_limit = self.rng.choice([None, 0.001, 0.05]) if limit is not None else None
        async with self.pool.acquire(timeout=acquire_limit) as conn:
            for _ in range(self.rng.randrange(2, 5)):
                v = self.token()
                kind = self.rng.randrange(3)
                if kind == 0:
                    got = await conn.fetchval(self.sql("SELECT $1::int FROM pg_sleep($2)"), v,
                                              self.pause(), timeout=limit)
                    self.expect("conn.fetchval", got, v)
                elif kind == 1:
                    row = await conn.fetchrow(self.sql("SELECT $1::text AS t, $2::int AS n"),
                                              str(v), v, timeout=limit)
                    self.expect("conn.fetchrow", (row["t"], row["n"]) if row else None, (str(v), v))
                else:
                    status = await conn.execute(
                        self.sql(f"SELECT {v} FROM pg_sleep({self.pause()})"), timeout=limit)
                    self.expect("conn.execute", status, "SELECT 1")

    async def transaction(self, limit: float | None) -> None:
        tag = self.tag("tx")
        with self.booked(tag) as at_commit:
            async with self.pool.transaction() as conn:
                await conn.execute(self.sql(f"INSERT INTO {self.table} (tag, v) VALUES ($1, 1)"),
                                   tag, timeout=limit)
                got = await conn.fetchval(
                    self.sql(f"SELECT count(*) FROM {self.table}, pg_sleep($2) WHERE tag = $1"),
                    tag, self.pause(), timeout=limit)
                self.expect("count in transaction", got, 1)
                at_commit()

    async def cursor(self, limit: float | None) -> None:
        v = self.token()
        async with self.pool.transaction() as conn:
            got = [r["x"] async for r in conn.cursor(
                self.sql("SELECT $1::int + g AS x FROM generate_series(1, 30) g, pg_sleep($2)"), v,
                self.pause(), prefetch=7,
                timeout=limit)]
            self.expect("cursor", got, [v + i for i in range(1, 31)])

    async def executemany(self, limit: float | None) -> None:
        tag = self.tag("em")
        rows = [(tag, i) for i in range(self.rng.randrange(1, 6))]
        try:
            await self.pool.executemany(
                self.sql(f"INSERT INTO {self.table} (tag, v) VALUES ($1, $2)"), rows, timeout=limit)
        except BaseException:
            raise  # (where it was cut short is unknown: ambiguous)
        self.book.committed.add(tag)

    async def copy(self, limit: float | None) -> None:
        tag = self.tag("cp")
        status = await self.pool.copy_records_to_table(
            self.table, records=[(tag, i) for i in range(20)], columns=["tag", "v"],
            timeout=limit)
        self.expect("copy status", status, "COPY 20")
        self.book.committed.add(tag)

    async def manual(self, limit: float | None) -> None:
        v = self.token()
        conn = await self.pool.acquire(timeout=self.rng.choice([None, 0.001, 0.05]))
        try:
            got = await conn.fetchval(self.sql("SELECT $1::int FROM pg_sleep($2)"), v,
                                      self.pause(), timeout=limit)
            self.expect("manual fetchval", got, v)
        finally:
            await self.pool.release(conn)

    async def prepared(self, limit: float | None) -> None:
        async with self.pool.acquire() as conn:
            stmt = await conn.prepare(self.sql("SELECT $1::int * 2 AS d FROM pg_sleep($2)"),
                                      timeout=limit)
            for _ in range(self.rng.randrange(1, 4)):
                v = self.token()
                self.expect("prepared fetchval", await stmt.fetchval(v, self.pause(),
                                                                     timeout=limit), v * 2)

    async def fetchmany(self, limit: float | None) -> None:
        vs = [self.token() for _ in range(self.rng.randrange(1, 5))]
        rows = await self.pool.fetchmany(self.sql("SELECT $1::int + 1 AS x FROM pg_sleep($2)"),
                                         [(v, self.pause()) for v in vs], timeout=limit)
        self.expect("pool.fetchmany", [r["x"] for r in rows], [v + 1 for v in vs])

    async def savepoint(self, limit: float | None) -> None:
        tag = self.tag("sp")
        with self.booked(tag) as at_commit:
            async with self.pool.acquire() as conn, conn.transaction():
                await conn.execute(self.sql(f"INSERT INTO {self.table} (tag, v) VALUES ($1, 1)"),
                                   tag, timeout=limit)
                with contextlib.suppress(asyncpg.DivisionByZeroError):
                    async with conn.transaction():
                        await conn.fetchval(self.sql("SELECT 1 / $1::int FROM pg_sleep($2)"), 0,
                                            self.pause(), timeout=limit)
                v = self.token()
                self.expect("after a savepoint", await conn.fetchval(
                    self.sql("SELECT $1::int"), v, timeout=limit), v)
                at_commit()

    async def orm(self, limit: float | None) -> None:
        """SQLAlchemy: a session's transaction (write, read back its own value), or a query
        outside one; `limit` as ``asyncio.timeout`` (SQLAlchemy has no per-call timeout)."""
        import sqlalchemy as sa

        v = self.token()
        async with asyncio.timeout(limit):
            if self.rng.random() < 0.3:  # autobegun, closed without commit: rolled back
                async with self.sessions() as session:
                    got = (await session.execute(sa.text(self.sql(
                        "SELECT CAST(:v AS int) FROM pg_sleep(:p)")),
                        {"v": v, "p": self.pause()})).scalar_one()
                    self.expect("session.execute", got, v)
                return
            tag = self.tag("sa")
            with self.booked(tag) as at_commit:
                async with self.sessions() as session, session.begin():
                    await session.execute(sa.text(self.sql(
                        f"INSERT INTO {self.table} (tag, v) VALUES (:t, 1)")), {"t": tag})
                    got = (await session.execute(sa.text(self.sql(
                        "SELECT CAST(:v AS int) + count(*) FROM "
                        f"{self.table}, pg_sleep(:p) WHERE tag = :t")),
                        {"v": v, "p": self.pause(), "t": tag})).scalar_one()
                    self.expect("session in a transaction", got, v + 1)
                    at_commit()

    def operations(self) -> list[tuple[str, float, Callable[[float | None], Awaitable[None]]]]:
        if self.sessions is not None:
            return [("orm", 6, self.orm), ("helper", 2, self.helper),
                    ("transaction", 1, self.transaction)]
        return [("helper", 4, self.helper), ("block", 3, self.block),
                ("transaction", 3, self.transaction), ("cursor", 1, self.cursor),
                ("executemany", 1, self.executemany), ("copy", 1, self.copy),
                ("manual", 1, self.manual), ("prepared", 1, self.prepared),
                ("fetchmany", 1, self.fetchmany), ("savepoint", 1, self.savepoint)]

    # -- the workers ----------------------------------------------------------------------------

    async def worker(self, stop: asyncio.Event) -> None:
        ops = self.operations()
        names = [n for n, _, _ in ops]
        weights = [w for _, w, _ in ops]
        table = {n: op for n, _, op in ops}
        while not stop.is_set() and not self.pool.closed:
            name = self.rng.choices(names, weights)[0]
            how = self.rng.choice(["none", "cancel", "cancel", "timeout", "timeout", "arg",
                                   "wait_for", "twice"])
            op = table[name]
            # A session's work takes several round trips: interrupted anywhere in it, not only
            # near its start.
            span = 0.06 if name == "orm" else 0.03
            limit = self.rng.uniform(0.001, span) if how == "arg" else None
            when = self.rng.uniform(0, span)

            expired: list[asyncio.Timeout] = []

            async def run(op: Callable[[float | None], Awaitable[None]] = op,
                          how: str = how, limit: float | None = limit,
                          when: float = when, expired: list[asyncio.Timeout] = expired) -> None:
                if how == "timeout":
                    async with asyncio.timeout(when) as cm:
                        expired.append(cm)
                        await op(None)
                elif how == "wait_for":
                    await asyncio.wait_for(op(None), when)
                else:
                    await op(limit)

            task = asyncio.create_task(run())
            accepted = False
            if how in ("cancel", "twice"):
                await asyncio.sleep(when)
                # True: the task was suspended at an await, where it now meets CancelledError.
                accepted = task.cancel()
                if how == "twice":  # again, while its cleanup (rollback, reset) runs
                    await asyncio.sleep(self.rng.choice([0, 0, 0.001, 0.005]))
                    task.cancel()
            done, _ = await asyncio.wait({task}, timeout=OP_BOUND)
            if not done:
                stack = "".join(traceback.format_stack(task.get_stack()[-1]))
                self.findings.add(f"{name} ({how}) still running after {OP_BOUND} s:\n{stack}")
                task.cancel()
                await asyncio.wait({task}, timeout=5)
                continue
            timed_out = bool(expired) and expired[0].expired()
            self.judge(name, how, task, accepted or timed_out)

    def judge(self, name: str, how: str, task: asyncio.Task[None], interrupted: bool) -> None:
        """`interrupted`: the task accepted a cancel (it was at an await) or its asyncio.timeout
        expired; it must then end with exactly that (CancelledError, TimeoutError): anything
        else swallowed or replaced the interruption."""
        if interrupted:
            error = None if task.cancelled() else task.exception()
            want = asyncio.CancelledError if how in ("cancel", "twice") else TimeoutError
            got_it = task.cancelled() if want is asyncio.CancelledError else (
                type(error) is TimeoutError)
            if not got_it:
                text = "".join(traceback.format_exception(error)) if error else ""
                self.findings.add(f"{name} ({how}): interrupted, but ended with "
                                  f"{'no error' if error is None and not task.cancelled() else repr(error)}"
                                  f" instead of {want.__name__}\n{text}")
        if task.cancelled():
            outcome = "CancelledError"
            if how not in ("cancel", "twice"):
                self.findings.add(f"{name} ({how}): cancelled, but nobody cancelled it")
        elif (error := task.exception()) is None:
            outcome = "ok"
        else:
            outcome = type(error).__name__
            cause = unwrapped(error)
            allowed = (
                # PoolTimeoutError: acquire(timeout=...) in block/manual. ConnectionLeakedError:
                # held past leak_timeout, as a statement queued in PgBouncer behind the leakers'
                # transactions can be (after a caller's interruption: `interrupted`, above).
                isinstance(cause, PoolTimeoutError | ConnectionLeakedError)
                or (isinstance(error, TimeoutError) and how in ("timeout", "arg", "wait_for"))
                # The pool was closed or terminated under the caller.
                or (isinstance(cause, PoolClosedError) and self.pool.closed)
            )
            if not allowed:
                text = "".join(traceback.format_exception(error))
                self.findings.add(f"{name} ({how}): {type(error).__name__}: {error}\n{text}")
        self.findings.outcomes[f"{name}/{how}/{outcome}"] += 1

    async def leaker(self, stop: asyncio.Event) -> None:
        """Now and then a block held past leak_timeout: reclaimed, its holder told so."""
        while not await stopped(stop, self.rng.uniform(0.5, 3)):

            async def hold() -> None:
                async with self.pool.acquire() as conn:
                    v = self.token()
                    self.expect("leaker", await conn.fetchval(self.sql("SELECT $1::int"), v), v)
                    if self.rng.random() < 0.5:
                        async with conn.transaction():
                            await conn.execute(self.sql(f"SELECT pg_sleep({LEAK_TIMEOUT * 2})"))
                    else:
                        await asyncio.sleep(LEAK_TIMEOUT * 4)

            task = asyncio.create_task(hold())
            done, _ = await asyncio.wait({task}, timeout=OP_BOUND)
            if not done:
                self.findings.add("a leaked holder was not reclaimed within the bound")
                task.cancel()
                continue
            error = None if task.cancelled() else task.exception()
            # (Or no connection came within acquire_timeout: the pools are busy.)
            # Closed under it: PoolClosedError, or nothing if it did not use the connection again.
            if not isinstance(error, ConnectionLeakedError | PoolTimeoutError) and not (
                    isinstance(error, PoolClosedError | None) and self.pool.closed):
                self.findings.add(f"leaker ended with {error!r}, not ConnectionLeakedError")
            self.findings.outcomes[f"leak/{type(error).__name__}"] += 1

    async def expirer(self, stop: asyncio.Event) -> None:
        while not await stopped(stop, self.rng.uniform(0.2, 1.5)):
            if self.pool.closed:
                return
            self.pool.expire_all()
            self.findings.outcomes["expire_all"] += 1

    async def closer(self, how: Closer) -> None:
        """Close or terminate the pool at a random moment of the round, its workers running."""
        await asyncio.sleep(self.rng.uniform(0.2, ROUND_SECONDS * 0.8))
        if how == "terminate":
            self.pool.terminate()
        else:
            limit = self.rng.choice([0.0, 0.005, 0.05, 0.5])
            try:
                async with asyncio.timeout(OP_BOUND):
                    await self.pool.close(timeout=limit)
            except TimeoutError:
                self.findings.add(f"pool.close(timeout={limit}) still running after {OP_BOUND} s")
                return
        self.findings.outcomes[f"pool.{how}"] += 1


# -- after each round ---------------------------------------------------------------------------


async def busy_backends(postgres: PostgresServer, marker: str) -> list[dict[str, Any]]:
    """Server sessions whose last statement is ours and that are not idle."""
    conn = await asyncpg.connect(postgres.admin_dsn)
    try:
        rows = await conn.fetch(
            "SELECT pid, state, left(query, 120) AS query, now() - state_change AS for "
            "FROM pg_stat_activity WHERE pid <> pg_backend_pid() AND state <> 'idle' "
            "AND query LIKE '%' || $1 || '%'", marker)
    finally:
        await conn.close()
    return [dict(r) for r in rows]


async def pooler_busy(pooler: Pooler) -> list[dict[str, Any]]:
    """PgBouncer's server connections of app still linked to a client (in a transaction, or
    running a statement), and clients linked to one or waiting for one. (A client logged in
    and idle is "active" too, with no link.)"""
    servers = [{"server": r["state"], "link": r["link"]} for r in await pooler.admin("SHOW SERVERS")
               if r["database"] == "app" and (r["state"] not in ("idle", "used", "tested")
                                               or r["link"])]
    clients = [{"client": r["state"], "link": r["link"]} for r in await pooler.admin("SHOW CLIENTS")
               if r["database"] == "app" and (r["state"] != "active" or r["link"])]
    return servers + clients


async def until_empty(check: Callable[[], Awaitable[list[dict[str, Any]]]], within: float
                      ) -> list[dict[str, Any]]:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    while (left := await check()) and loop.time() < deadline:
        await asyncio.sleep(0.1)
    return left


async def sessions_of(postgres: PostgresServer, name: str) -> list[dict[str, Any]]:
    """Server sessions still open for the pool `name` (its application_name)."""
    conn = await asyncpg.connect(postgres.admin_dsn)
    try:
        rows = await conn.fetch(
            "SELECT pid, state, left(query, 120) AS query FROM pg_stat_activity "
            "WHERE pid <> pg_backend_pid() AND application_name = $1", name)
    finally:
        await conn.close()
    return [dict(r) for r in rows]


async def check_closed(pool: Pool, front: Front, postgres: PostgresServer, hunt: Hunt, *,
                       findings: Findings, n: int) -> None:
    """After close() or terminate() under load: no slot counted, nothing left on the server."""
    s = pool.stats()
    if s.in_use or s.waiting or s.connecting:
        findings.add(f"round {n}: {pool.name} closed, yet {s}")
    if left := await until_empty(lambda: busy_backends(postgres, hunt.marker), SETTLE):
        findings.add(f"round {n}: server sessions left running or in a transaction after "
                     f"{pool.name} closed: {left}")
    if front.pooler is None and (
            left := await until_empty(lambda: sessions_of(postgres, pool.name), SETTLE)):
        findings.add(f"round {n}: server sessions of {pool.name} open after it closed: {left}")


async def check_round(pool: Pool, pooler: Pooler | None, postgres: PostgresServer, hunt: Hunt, *,
                      findings: Findings, n: int) -> None:
    s = pool.stats()
    if s.size > s.max_size or s.in_use > s.max_size or min(s.size, s.idle, s.in_use) < 0:
        findings.add(f"round {n}: stats out of bounds {s}")
    try:
        await settled(pool, pooler, within=SETTLE)
    except AssertionError as exc:
        findings.add(f"round {n}: {exc}")
    if left := await until_empty(lambda: busy_backends(postgres, hunt.marker), SETTLE):
        findings.add(f"round {n}: server sessions left running or in a transaction: {left}")
    if pooler is not None and (left := await until_empty(lambda: pooler_busy(pooler), SETTLE)):
        findings.add(f"round {n}: PgBouncer still busy for us: {left}")
    # Every connection answers its own statement (none has an answer of a cut-short one queued).
    try:
        conns = [await pool.acquire(timeout=5) for _ in range(pool.config.max_size)]
        try:
            for conn in conns:
                v = hunt.token()
                hunt.expect("after the round", await conn.fetchval(hunt.sql("SELECT $1::int"), v), v)
                hunt.expect("after the round, in a transaction",
                            conn.is_in_transaction(), False)
        finally:
            for conn in conns:
                await pool.release(conn)
        await full_width(pool)
    except Exception as exc:
        findings.add(f"round {n}: the pool's connections after the round: {exc!r}\n"
                     + "".join(traceback.format_exception(exc)))


async def check_book(postgres: PostgresServer, table: str, book: Book, findings: Findings) -> None:
    conn = await asyncpg.connect(postgres.dsn())
    try:
        present = {r["tag"] for r in await conn.fetch(f"SELECT DISTINCT tag FROM {table}")}
        dupes = await conn.fetch(
            f"SELECT tag, count(*) FROM {table} WHERE tag LIKE 'tx%' GROUP BY tag HAVING count(*) > 1")
    finally:
        await conn.close()
    if missing := book.committed - present:
        findings.add(f"told committed, not in the table: {sorted(missing)[:10]}")
    if ghosts := book.abandoned & present:
        findings.add(f"left before COMMIT, yet in the table: {sorted(ghosts)[:10]}")
    if dupes:
        findings.add(f"written twice: {[dict(r) for r in dupes][:10]}")


class Warnings(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


async def run_hunt(front: Front, mode: Literal["off", "on", "unnamed"],  # noqa: PLR0912
                   postgres: PostgresServer, seed: int, rounds: int = ROUNDS) -> Findings:
    findings = Findings(seed)
    rng = random.Random(f"{seed}-{mode}-{front.label}")
    table = f"hunt_{uuid.uuid4().hex[:12]}"
    marker = f"hunt_{uuid.uuid4().hex[:12]}"
    setup = await asyncpg.connect(postgres.dsn())
    try:
        await setup.execute(f"CREATE TABLE {table} (tag text, v int)")
    finally:
        await setup.close()
    loop = asyncio.get_running_loop()
    loop_errors: list[dict[str, Any]] = []
    old_handler = loop.get_exception_handler()
    loop.set_exception_handler(lambda _, context: loop_errors.append(context))
    handler = Warnings()
    asyncpool_log = logging.getLogger("asyncpool")
    asyncpool_log.addHandler(handler)
    book = Book()
    validate_after = rng.choice([0.0, 0.05, None])

    def new_pool(k: int, n: int) -> Pool:
        # A name of its own per round where pools are closed: its server sessions are told apart.
        return Pool(front.dsn, name=f"hunt-{mode}-{k}" + (f"-r{n}" if front.closers else ""),
                    prepared_statements=mode, min_size=1, max_size=MAX_SIZE, acquire_timeout=3,
                    leak_timeout=LEAK_TIMEOUT, validate_after=validate_after,
                    cancel_requests=front.cancel_requests, telemetry=False)

    try:
        async with contextlib.AsyncExitStack() as pools_open:
            # More pools than one: together they want more server connections than PgBouncer
            # has (POOLS x MAX_SIZE > its pool of 10), so statements also wait in its queue,
            # where a cancel request finds no server to go to.
            pools = [await pools_open.enter_async_context(new_pool(k, 0)) for k in range(POOLS)]
            for n in range(rounds):
                if front.closers and n:
                    pools = [await pools_open.enter_async_context(new_pool(k, n))
                             for k in range(POOLS)]
                engines = []
                if front.sqlalchemy:
                    from sqlalchemy.ext.asyncio import async_sessionmaker

                    from asyncpool.integrations.sqlalchemy import create_async_engine
                    engines = [create_async_engine(pool) for pool in pools]
                stop = asyncio.Event()
                hunts = [Hunt(pools[i % POOLS], table, marker,
                              random.Random(f"{seed}-{mode}-{n}-{i}"), findings=findings, book=book,
                              sessions=(async_sessionmaker(engines[i % POOLS],
                                                           expire_on_commit=False)
                                        if engines else None))
                         for i in range(WORKERS * POOLS + 2 * POOLS)]
                tasks = [asyncio.create_task(h.worker(stop)) for h in hunts[:WORKERS * POOLS]]
                for h in hunts[WORKERS * POOLS:WORKERS * POOLS + POOLS]:
                    tasks.append(asyncio.create_task(h.leaker(stop)))
                for h in hunts[WORKERS * POOLS + POOLS:]:
                    tasks.append(asyncio.create_task(h.expirer(stop)))
                if front.closers:
                    tasks.extend(asyncio.create_task(h.closer(rng.choice(front.closers)))
                                 for h in hunts[:POOLS])
                await asyncio.sleep(ROUND_SECONDS)
                stop.set()
                _, hung = await asyncio.wait(tasks, timeout=OP_BOUND + 10)
                for task in hung:
                    findings.add(f"round {n}: a worker did not stop")
                    task.cancel()
                for task in tasks:
                    if task.done() and not task.cancelled() and task.exception():
                        findings.add(f"round {n}: a worker died: {task.exception()!r}")
                for engine in engines:
                    await engine.dispose()
                for k, pool in enumerate(pools):
                    if pool.closed:
                        await check_closed(pool, front, postgres, hunts[k], findings=findings, n=n)
                    else:
                        await check_round(pool, front.pooler, postgres, hunts[k],
                                          findings=findings, n=n)
                if (pooler := front.pooler) is not None and front.closers and (
                        left := await until_empty(lambda: pooler_busy(pooler), SETTLE)):
                    findings.add(f"round {n}: PgBouncer still busy after the pools closed: {left}")
        gc.collect()
        await asyncio.sleep(0.05)
        await check_book(postgres, table, book, findings)
    finally:
        loop.set_exception_handler(old_handler)
        asyncpool_log.removeHandler(handler)
        cleanup = await asyncpg.connect(postgres.dsn())
        try:
            await cleanup.execute(f"DROP TABLE IF EXISTS {table}")
        finally:
            await cleanup.close()
    for context in loop_errors[:5]:
        exc = context.get("exception")
        findings.add(f"loop exception handler: {context.get('message')}: {exc!r}")
    expected_warning = ("past leak_timeout",)
    for record in handler.records:
        message = record.getMessage()
        if not any(e in message for e in expected_warning):
            findings.add(f"asyncpool logged {record.levelname}: {message[:500]}")
    return findings


def assert_clean(findings: Findings, label: str, mode: str) -> None:
    outcomes = ", ".join(f"{k}={v}" for k, v in sorted(findings.outcomes.items()))
    print(f"seed {findings.seed} {label} {mode}: {outcomes}")
    kinds = collections.Counter(p.split("\n", 1)[0][:200] for p in findings.problems)
    shown: dict[str, str] = {}
    for p in findings.problems:
        shown.setdefault(p.split("\n", 1)[0][:200], p)
    assert not findings.problems, (
        f"hunt seed {findings.seed} ({label}, {mode}) found {len(findings.problems)} problems "
        f"(rerun: ASYNCPOOL_TEST_HUNT_SEEDS={findings.seed}):\n"
        + "\n".join(f"[x{kinds[k]}] {p[:4000]}" for k, p in shown.items()) + f"\n{outcomes}")


@pytest.mark.timeout(120)
@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize(("which", "mode"), CASES, ids=[f"{p}-{m}" for p, m in CASES])
async def test_cancellation_hunt(which: str, mode: Literal["off", "on", "unnamed"], seed: int, stack: Any,
                                 postgres: PostgresServer) -> None:
    pooler: Pooler = getattr(stack, which)
    front = Front(pooler.label, pooler.dsn(), pooler)
    assert_clean(await run_hunt(front, mode, postgres, seed), pooler.label, mode)


@dataclass(frozen=True)
class FrontCase:
    name: str
    #: "direct", "legacy", "current", or "current-no-key": current PgBouncer through a proxy
    #: that strips BackendKeyData (RDS Proxy gives none).
    where: str
    mode: Literal["off", "on", "unnamed"]
    cancels: CancelRequests = "auto"
    closers: tuple[Closer, ...] = ()
    sqlalchemy: bool = False


BOTH: tuple[Closer, ...] = ("close", "terminate")
FRONT_CASES = [
    FrontCase("direct", "direct", "unnamed"),
    FrontCase("direct-cancels-off", "direct", "on", "off"),
    FrontCase("current-cancels-off", "current", "unnamed", "off"),
    FrontCase("current-no-key", "current-no-key", "unnamed"),
    FrontCase("close-current", "current", "unnamed", closers=BOTH),
    FrontCase("close-legacy", "legacy", "off", closers=BOTH),
    FrontCase("close-direct", "direct", "unnamed", closers=BOTH),
    FrontCase("sqlalchemy-current", "current", "unnamed", sqlalchemy=True),
    FrontCase("sqlalchemy-legacy", "legacy", "off", sqlalchemy=True),
]
# The combinations, by hand (ASYNCPOOL_TEST_HUNT_COMBINED=1): each part runs by default above.
if os.environ.get("ASYNCPOOL_TEST_HUNT_COMBINED"):
    FRONT_CASES += [
        FrontCase("sqlalchemy-no-key", "current-no-key", "unnamed", sqlalchemy=True),
        FrontCase("sqlalchemy-direct-cancels-off", "direct", "on", "off", sqlalchemy=True),
        FrontCase("sqlalchemy-close-current", "current", "unnamed", closers=BOTH,
                  sqlalchemy=True),
        FrontCase("close-no-key", "current-no-key", "unnamed", closers=BOTH),
        FrontCase("close-direct-cancels-off", "direct", "unnamed", "off", closers=BOTH),
    ]


@pytest.mark.timeout(120)
@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("spec", FRONT_CASES, ids=[c.name for c in FRONT_CASES])
async def test_cancellation_hunt_fronts(spec: FrontCase, seed: int, stack: Any,
                                        postgres: PostgresServer) -> None:
    """The hunt direct to PostgreSQL, without cancel requests, under close()/terminate(), and
    through SQLAlchemy's AsyncSession."""
    if spec.sqlalchemy:
        pytest.importorskip("sqlalchemy")
    options = (spec.cancels, spec.closers, spec.sqlalchemy)
    async with contextlib.AsyncExitStack() as fronts:
        if spec.where == "direct":
            front = Front(spec.name, postgres.dsn(), None, *options)
        elif spec.where == "current-no-key":
            pooler: Pooler = stack.current
            proxy = FaultProxy.to_dsn(pooler.dsn())
            proxy.strip_backend_key = True
            await fronts.enter_async_context(proxy)
            front = Front(spec.name, proxy.dsn(pooler.dsn()), pooler, *options)
        else:
            pooler = getattr(stack, spec.where)
            front = Front(spec.name, pooler.dsn(), pooler, *options)
        assert_clean(await run_hunt(front, spec.mode, postgres, seed, FRONT_ROUNDS), spec.name,
                     spec.mode)
