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

Other seeds or longer, by hand:

    ASYNCPOOL_TEST_HUNT_SEEDS=1,2,3 ASYNCPOOL_TEST_HUNT_SECONDS=8 \
        .venv/bin/pytest tests/faults/test_cancel_hunt.py -p no:randomly
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
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import asyncpg
import pytest

from asyncpool import ConnectionLeakedError, Pool, PoolTimeoutError
from asyncpool.testing import PostgresServer
from asyncpool.testing.invariants import full_width, settled
from tests.conftest import Pooler

SEEDS = [int(s) for s in os.environ.get("ASYNCPOOL_TEST_HUNT_SEEDS", "7").split(",") if s.strip()]
ROUND_SECONDS = float(os.environ.get("ASYNCPOOL_TEST_HUNT_SECONDS", "3"))
ROUNDS = int(os.environ.get("ASYNCPOOL_TEST_HUNT_ROUNDS", "3"))
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


class Hunt:
    def __init__(self, pool: Pool, table: str, marker: str, rng: random.Random, *,
                 findings: Findings, book: Book) -> None:
        self.pool = pool
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
        reached_commit = False
        try:
            async with self.pool.transaction() as conn:
                await conn.execute(self.sql(f"INSERT INTO {self.table} (tag, v) VALUES ($1, 1)"),
                                   tag, timeout=limit)
                got = await conn.fetchval(
                    self.sql(f"SELECT count(*) FROM {self.table}, pg_sleep($2) WHERE tag = $1"),
                    tag, self.pause(), timeout=limit)
                self.expect("count in transaction", got, 1)
                reached_commit = True
        except BaseException:
            if not reached_commit:
                self.book.abandoned.add(tag)
            raise
        self.book.committed.add(tag)

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
        reached_commit = False
        try:
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
                reached_commit = True
        except BaseException:
            if not reached_commit:
                self.book.abandoned.add(tag)
            raise
        self.book.committed.add(tag)

    def operations(self) -> list[tuple[str, float, Callable[[float | None], Awaitable[None]]]]:
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
        while not stop.is_set():
            name = self.rng.choices(names, weights)[0]
            how = self.rng.choice(["none", "cancel", "cancel", "timeout", "timeout", "arg",
                                   "wait_for", "twice"])
            op = table[name]
            limit = self.rng.uniform(0.001, 0.03) if how == "arg" else None
            when = self.rng.uniform(0, 0.03)

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
            allowed = (
                # PoolTimeoutError: acquire(timeout=...) in block/manual. ConnectionLeakedError:
                # held past leak_timeout, as a statement queued in PgBouncer behind the leakers'
                # transactions can be (after a caller's interruption: `interrupted`, above).
                isinstance(error, PoolTimeoutError | ConnectionLeakedError)
                or (isinstance(error, TimeoutError) and how in ("timeout", "arg", "wait_for"))
            )
            if not allowed:
                text = "".join(traceback.format_exception(error))
                self.findings.add(f"{name} ({how}): {type(error).__name__}: {error}\n{text}")
        self.findings.outcomes[f"{name}/{how}/{outcome}"] += 1

    async def leaker(self, stop: asyncio.Event) -> None:
        """Now and then a block held past leak_timeout: reclaimed, its holder told so."""
        while not stop.is_set():
            await asyncio.sleep(self.rng.uniform(0.5, 3))

            async def hold() -> None:
                async with self.pool.acquire() as conn:
                    v = self.token()
                    self.expect("leaker", await conn.fetchval(self.sql("SELECT $1::int"), v), v)
                    if self.rng.random() < 0.5:
                        async with conn.transaction():
                            await conn.execute(self.sql("SELECT pg_sleep(5)"))
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
            if not isinstance(error, ConnectionLeakedError | PoolTimeoutError):
                self.findings.add(f"leaker ended with {error!r}, not ConnectionLeakedError")
            self.findings.outcomes[f"leak/{type(error).__name__}"] += 1

    async def expirer(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            await asyncio.sleep(self.rng.uniform(0.2, 1.5))
            self.pool.expire_all()
            self.findings.outcomes["expire_all"] += 1


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


async def check_round(pool: Pool, pooler: Pooler, postgres: PostgresServer, hunt: Hunt, *,
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
    if left := await until_empty(lambda: pooler_busy(pooler), SETTLE):
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


async def run_hunt(pool_dsn: str, mode: Literal["off", "on", "unnamed"],  # noqa: PLR0912
                   pooler: Pooler, postgres: PostgresServer, seed: int) -> Findings:
    findings = Findings(seed)
    rng = random.Random(f"{seed}-{mode}-{pooler.label}")
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
    try:
        async with contextlib.AsyncExitStack() as pools_open:
            # More pools than one: together they want more server connections than PgBouncer
            # has (POOLS x MAX_SIZE > its pool of 10), so statements also wait in its queue,
            # where a cancel request finds no server to go to.
            pools = [await pools_open.enter_async_context(Pool(
                pool_dsn, name=f"hunt-{mode}-{k}", prepared_statements=mode, min_size=1,
                max_size=MAX_SIZE, acquire_timeout=3, leak_timeout=LEAK_TIMEOUT,
                validate_after=rng.choice([0.0, 0.05, None]), telemetry=False))
                for k in range(POOLS)]
            for n in range(ROUNDS):
                stop = asyncio.Event()
                hunts = [Hunt(pools[i % POOLS], table, marker,
                              random.Random(f"{seed}-{mode}-{n}-{i}"), findings=findings, book=book)
                         for i in range(WORKERS * POOLS + 2 * POOLS)]
                tasks = [asyncio.create_task(h.worker(stop)) for h in hunts[:WORKERS * POOLS]]
                for h in hunts[WORKERS * POOLS:WORKERS * POOLS + POOLS]:
                    tasks.append(asyncio.create_task(h.leaker(stop)))
                for h in hunts[WORKERS * POOLS + POOLS:]:
                    tasks.append(asyncio.create_task(h.expirer(stop)))
                await asyncio.sleep(ROUND_SECONDS)
                stop.set()
                _, hung = await asyncio.wait(tasks, timeout=OP_BOUND + 10)
                for task in hung:
                    findings.add(f"round {n}: a worker did not stop")
                    task.cancel()
                for task in tasks:
                    if task.done() and not task.cancelled() and task.exception():
                        findings.add(f"round {n}: a worker died: {task.exception()!r}")
                for k, pool in enumerate(pools):
                    await check_round(pool, pooler, postgres, hunts[k], findings=findings, n=n)
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


@pytest.mark.timeout(120)
@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize(("which", "mode"), CASES, ids=[f"{p}-{m}" for p, m in CASES])
async def test_cancellation_hunt(which: str, mode: Literal["off", "on", "unnamed"], seed: int, stack: Any,
                                 postgres: PostgresServer) -> None:
    pooler: Pooler = getattr(stack, which)
    findings = await run_hunt(pooler.dsn(), mode, pooler, postgres, seed)
    outcomes = ", ".join(f"{k}={v}" for k, v in sorted(findings.outcomes.items()))
    print(f"seed {seed} {pooler.label} {mode}: {outcomes}")
    kinds = collections.Counter(p.split("\n", 1)[0][:200] for p in findings.problems)
    shown: dict[str, str] = {}
    for p in findings.problems:
        shown.setdefault(p.split("\n", 1)[0][:200], p)
    assert not findings.problems, (
        f"hunt seed {seed} ({pooler.label}, {mode}) found {len(findings.problems)} problems "
        f"(rerun: ASYNCPOOL_TEST_HUNT_SEEDS={seed}):\n"
        + "\n".join(f"[x{kinds[k]}] {p[:4000]}" for k, p in shown.items()) + f"\n{outcomes}")
