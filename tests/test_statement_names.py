"""Named statements (cursors, ``conn.prepare()``) through a pooler that does not track them
(PgBouncer 1.18, transaction mode): a statement asyncpg leaves prepared on a server connection
must not collide with one another process prepares there later. asyncpg numbers its statement
names from 1 in every process; the pool's connections name them with a per-process token."""

from __future__ import annotations

import asyncio
import contextlib
import io
import random
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import asyncpg
import pytest

from asyncpool import Pool
from asyncpool.config import PreparedStatements
from asyncpool.testing import PgBouncerServer, ServerStack
from tests.conftest import Pooler

ROOT = Path(__file__).resolve().parents[1]

# One process: cursors, each in its own transaction, as docs/troubleshooting.md advises.
_CURSORS = textwrap.dedent("""
    import asyncio, sys
    from asyncpool import Pool

    async def main(dsn: str, mode: str) -> None:
        async with Pool(dsn, max_size=1, prepared_statements=mode, telemetry=False) as pool:
            for _ in range(5):
                async with pool.transaction() as conn:
                    rows = [r async for r in conn.cursor(
                        "SELECT g FROM generate_series(1, $1) g", 50, prefetch=10)]
                    assert len(rows) == 50

    asyncio.run(main(sys.argv[1], sys.argv[2]))
""")


@pytest.mark.parametrize("mode", ["unnamed", "off"])
def test_processes_one_after_another_share_a_server_connection_without_collisions(
        stack: ServerStack, tmp_path: Path, mode: str) -> None:
    bouncer = PgBouncerServer(stack.legacy.binary, stack.postgres,
                              {"default_pool_size": 4}).start()
    try:
        script = tmp_path / "cursors.py"
        script.write_text(_CURSORS)
        for run in range(3):
            done = subprocess.run(
                [sys.executable, str(script), bouncer.dsn(), mode], cwd=ROOT,
                capture_output=True, text=True, timeout=60, check=False)
            assert done.returncode == 0, f"process {run + 1}: {done.stderr[-2000:]}"
    finally:
        bouncer.stop()


# A parent that names a statement, forks, and prints its name and the child's. In a process of
# its own: a pytest worker has threads, and forking one may deadlock the child (Python 3.12+
# warns of it).
_FORK = textwrap.dedent("""
    import os
    from asyncpool.connect import driver
    connection_class = driver.cancel_aware_class(None, cancels=True)
    parents = connection_class._get_unique_id(None, "stmt")
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: write its name, leave at once
        os.write(write, connection_class._get_unique_id(None, "stmt").encode())
        os._exit(0)
    os.close(write)
    childs = os.read(read, 200).decode()
    os.waitpid(pid, 0)
    print(parents, childs)
""")


def test_a_forked_child_names_its_statements_apart_from_its_parent() -> None:
    """Workers forked from one parent (uvicorn/gunicorn --workers, a managed instance's
    processes) would otherwise count from the same point with the same token."""
    done = subprocess.run([sys.executable, "-c", _FORK],
                          cwd=ROOT, capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    parents, childs = done.stdout.split()
    assert parents.startswith("__asyncpg_stmt_")
    assert childs.startswith("__asyncpg_stmt_")
    assert parents.split("_")[4] != childs.split("_")[4]  # the token


@pytest.mark.parametrize("how", ["pool.fetchval", "conn.fetchval"])
async def test_a_lost_prepared_statement_says_what_to_do_with_asyncpool(stack: ServerStack,
                                                                        how: str) -> None:
    """Behind PgBouncer 1.18 a named statement stays on the server connection that prepared it;
    the next transaction may get another one. asyncpg's hint then says to drop PgBouncer for
    asyncpg's own pool or to set statement_cache_size: asyncpool's says which of its modes to use
    (``"on"`` needs PgBouncer 1.21+)."""
    import asyncpg

    from asyncpool import Pool

    bouncer = PgBouncerServer(stack.legacy.binary, stack.postgres, {"default_pool_size": 2}).start()
    try:
        async with Pool(bouncer.dsn(), max_size=1, prepared_statements="on",
                        telemetry=False) as pool, \
                Pool(bouncer.dsn(), max_size=1, telemetry=False) as other:
            with pytest.raises(asyncpg.InvalidSQLStatementNameError) as info:
                if how == "pool.fetchval":
                    await pool.fetchval("SELECT $1::int", 1)
                    # The server connection just used is the one PgBouncer hands out next
                    # (LIFO): kept busy by another client, the next statement gets a new one.
                    async with other.transaction() as busy:
                        await busy.fetchval("SELECT 1")
                        await pool.fetchval("SELECT $1::int", 2)
                else:
                    async with pool.acquire() as conn:
                        await conn.fetchval("SELECT $1::int", 1)
                        async with other.transaction() as busy:
                            await busy.fetchval("SELECT 1")
                            await conn.fetchval("SELECT $1::int", 2)
            hint = info.value.hint
            assert hint is not None
            assert hint.startswith("asyncpool:"), hint
            assert "statement_cache_size" not in str(info.value)
            assert "PgBouncer 1.21" in hint
            assert 'prepared_statements="unnamed"' in hint
            assert await pool.fetchval("SELECT 3") == 3
    finally:
        bouncer.stop()


def test_the_advice_on_a_lost_prepared_statement_follows_the_mode() -> None:
    """In the other modes the pool prepares nothing that outlives a statement: a lost one was
    the holder's own prepare(); the advice is given once, whatever path the error takes."""
    import asyncpg

    from asyncpool.connect.failures import advise_on_prepared_statements

    error = asyncpg.InvalidSQLStatementNameError(
        'prepared statement "__asyncpg_stmt_1__" does not exist')
    advise_on_prepared_statements(error, "off")
    assert error.hint is not None
    assert error.hint.startswith("asyncpool: a statement made with prepare()")
    assert 'prepared_statements="off"' in error.hint
    advise_on_prepared_statements(error, "on")  # already advised: kept
    assert error.hint.startswith("asyncpool: a statement made with prepare()")
    # The server's own hint stays; only asyncpg's note about PgBouncer is replaced.
    hinted = asyncpg.InvalidSQLStatementNameError("does not exist")
    hinted.hint = "SERVER HINT: re-run the migration\n\nNOTE: pgbouncer with pool_mode set to..."
    advise_on_prepared_statements(hinted, "on")
    assert hinted.hint.startswith("SERVER HINT: re-run the migration\nasyncpool: ")
    assert "NOTE: pgbouncer" not in hinted.hint
    other = asyncpg.UndefinedTableError("relation does not exist")
    advise_on_prepared_statements(other, "on")
    assert other.hint is None


async def _server_held(pooler: Pooler) -> int:
    """Server connections PgBouncer keeps assigned to a client (SHOW POOLS sv_active)."""
    return int((await pooler.pool_row())["sv_active"])


@pytest.mark.parametrize("mode", ["unnamed", "off", "on"])
async def test_a_prepare_given_back_unrun_frees_the_server_connection(
        pooler: Pooler, mode: PreparedStatements) -> None:
    """asyncpg's prepare() sends Parse/Describe/Flush, no Sync: a transaction-mode PgBouncer
    keeps the server connection assigned to the client until one comes. Given back without a
    statement after it (reading a statement's columns only), the return sends one, and the
    server connection is free for other clients while this one sits idle (a frozen Lambda
    environment). A prepare followed by its execution still runs on one server connection."""
    if mode == "on" and not pooler.supports_prepared_statements:
        pytest.skip("PgBouncer 1.18 does not keep prepared statements")
    async with Pool(pooler.dsn(), max_size=2, prepared_statements=mode,
                    telemetry=False) as pool:
        async with pool.acquire() as conn:
            statement = await conn.prepare("SELECT $1::int AS n")
            assert [a.name for a in statement.get_attributes()] == ["n"]
        assert await _server_held(pooler) == 0
        conn = await pool.acquire()
        await conn.prepare("SELECT 1")
        await pool.release(conn)
        assert await _server_held(pooler) == 0
        async with pool.acquire() as conn:
            statement = await conn.prepare("SELECT $1::int + 1")
            assert await statement.fetchval(41) == 42  # on the server that prepared it
            await conn.prepare("SELECT 2")  # then one more, unrun
        assert await _server_held(pooler) == 0
        async with pool.transaction() as conn:
            await conn.prepare("SELECT 3")  # inside a transaction: its COMMIT ends it
        assert await _server_held(pooler) == 0
        counts = []
        for prepared in (False, True):
            queries = await pooler.total_queries()
            async with pool.acquire() as conn:
                if prepared:
                    await conn.prepare("SELECT 5")
                await conn.copy_from_query("SELECT 1", output=io.BytesIO())  # (ends with a Sync)
            assert await _server_held(pooler) == 0
            counts.append(await pooler.total_queries() - queries)
        if mode != "on":  # (PgBouncer's own replays of tracked statements count there too)
            assert counts[1] == counts[0]  # no SELECT 1 after the COPY
        async with pool.acquire() as conn:
            # Outside a transaction asyncpg refuses a cursor after sending its Parse.
            with pytest.raises(asyncpg.NoActiveSQLTransactionError):
                await conn.cursor("SELECT 4")
        assert await _server_held(pooler) == 0
        assert pool.stats().closed_total == 0


@pytest.mark.parametrize("how", ["conn.fetchval", "pool.fetchval", "statement.explain"])
@pytest.mark.parametrize("mode", ["unnamed", "off", "on"])
async def test_a_statement_cancelled_while_described_frees_the_server_connection(
        pooler: Pooler, mode: PreparedStatements, how: str) -> None:
    """A new statement cancelled during asyncpg's first round trip (Parse/Describe/Flush: a
    cancel that arrives after the server answered it ends nothing) left the server connection
    assigned to this client after the return. Cancelled at seeded random moments within one
    round trip: none is left held."""
    if mode == "on" and not pooler.supports_prepared_statements:
        pytest.skip("PgBouncer 1.18 does not keep prepared statements")
    rng = random.Random(46)
    held = 0
    async with Pool(pooler.dsn(), min_size=1, max_size=1, prepared_statements=mode,
                    telemetry=False) as pool:
        started = time.perf_counter()
        for n in range(10):
            await pool.fetchval(f"SELECT {n}::int AS warm")
        round_trip = (time.perf_counter() - started) / 10
        for n in range(40):
            query = f"SELECT $1::int + {n} AS new_{n}"
            with contextlib.suppress(TimeoutError):
                if how == "pool.fetchval":  # the query helpers' own path (asyncpool.pool.runner)
                    async with asyncio.timeout(rng.uniform(0, round_trip)):
                        await pool.fetchval(query, 1)
                elif how == "statement.explain":  # asyncpg's own call, which the proxy does not see
                    async with pool.acquire() as conn:
                        statement = await conn.prepare(query)
                        assert await statement.fetchval(1) == n + 1
                        async with asyncio.timeout(rng.uniform(0, round_trip)):
                            await statement.explain(1)
                else:
                    async with pool.acquire() as conn, asyncio.timeout(rng.uniform(0, round_trip)):
                        await conn.fetchval(query, 1)
            await asyncio.sleep(0.02)
            if await _server_held(pooler):
                held += 1
                await pool.fetchval("SELECT 1")  # (frees it for the next try)
    assert held == 0



# Calls that make asyncpg describe a statement (Parse, Describe, Flush) and then send no Bind,
# so no Sync: argument sets that turn out empty, and arguments its encoders refuse. Each takes
# the pool and a table (a int) and leaves the table as it was.
async def _conn_executemany(pool: Pool, table: str) -> None:
    async with pool.acquire() as conn:
        await conn.executemany(f"INSERT INTO {table} VALUES ($1)", [])


async def _conn_executemany_iterator(pool: Pool, table: str) -> None:
    async with pool.acquire() as conn:
        await conn.executemany(f"INSERT INTO {table} VALUES ($1)", iter(()))


async def _conn_fetchmany(pool: Pool, table: str) -> None:
    async with pool.acquire() as conn:
        assert await conn.fetchmany(f"INSERT INTO {table} VALUES ($1) RETURNING a", []) == []


async def _pool_executemany(pool: Pool, table: str) -> None:
    await pool.executemany(f"INSERT INTO {table} VALUES ($1)", [])


async def _pool_fetchmany(pool: Pool, table: str) -> None:
    assert await pool.fetchmany(f"INSERT INTO {table} VALUES ($1) RETURNING a", args=[]) == []


async def _statement_executemany(pool: Pool, table: str) -> None:
    async with pool.acquire() as conn:
        statement = await conn.prepare(f"INSERT INTO {table} VALUES ($1)")
        await statement.executemany([])


async def _statement_fetchmany(pool: Pool, table: str) -> None:
    async with pool.acquire() as conn:
        statement = await conn.prepare(f"INSERT INTO {table} VALUES ($1) RETURNING a")
        assert await conn.fetchval("SELECT 1") == 1  # (a Sync after the prepare)
        assert await statement.fetchmany(args=iter(())) == []


async def _conn_fetchval_refused(pool: Pool, table: str) -> None:
    async with pool.acquire() as conn:
        with pytest.raises(asyncpg.DataError):
            await conn.fetchval(f"SELECT count(*) FROM {table} WHERE a = $1", "one")


async def _pool_fetchval_refused(pool: Pool, table: str) -> None:
    with pytest.raises(asyncpg.DataError):
        await pool.fetchval(f"SELECT count(*) FROM {table} WHERE a = $1", "one")


async def _statement_fetchval_refused(pool: Pool, table: str) -> None:
    async with pool.acquire() as conn:
        statement = await conn.prepare(f"SELECT count(*) FROM {table} WHERE a = $1")
        assert await conn.fetchval("SELECT 1") == 1
        with pytest.raises(asyncpg.DataError):
            await statement.fetchval("one")


async def _statement_retyped(pool: Pool, table: str) -> None:
    async with pool.acquire() as conn:
        statement = await conn.prepare(f"SELECT count(*) FROM {table} WHERE a = $1")
        assert await statement.fetchval(1) == 0
        await conn.execute(f"ALTER TABLE {table} ALTER a TYPE text")
        # Described afresh in "unnamed" mode: the integer no longer fits; the server's own
        # error in the others.
        with pytest.raises((asyncpg.DataError, asyncpg.PostgresError)):
            await statement.fetchval(1)


_DESCRIBED_ONLY = {f.__name__.lstrip("_"): f for f in (
    _conn_executemany, _conn_executemany_iterator, _conn_fetchmany, _pool_executemany,
    _pool_fetchmany, _statement_executemany, _statement_fetchmany, _conn_fetchval_refused,
    _pool_fetchval_refused, _statement_fetchval_refused, _statement_retyped)}


@pytest.mark.parametrize("call", list(_DESCRIBED_ONLY))
@pytest.mark.parametrize("mode", ["unnamed", "off", "on"])
async def test_a_describe_with_no_execution_after_it_frees_the_server_connection(
        pooler: Pooler, mode: PreparedStatements, call: str) -> None:
    """A statement asyncpg described and then did not run (no argument sets, or an argument its
    codec refused) left its Parse without a Sync: PgBouncer kept the server connection assigned
    to this client after the return, and PostgreSQL the table's lock, until the client's next
    statement (in a frozen Lambda environment: never). The return now ends it."""
    if mode == "on" and not pooler.supports_prepared_statements:
        pytest.skip("PgBouncer 1.18 does not keep prepared statements")
    table = f"described_{mode}_{call}"
    async with Pool(pooler.dsn(), max_size=1, prepared_statements=mode,
                    telemetry=False) as pool:
        await pool.execute(f"DROP TABLE IF EXISTS {table}; CREATE TABLE {table} (a int)")
        try:
            await _DESCRIBED_ONLY[call](pool, table)
            assert await _server_held(pooler) == 0, "the server connection is still assigned"
            assert await pool.fetchval(f"SELECT count(*) FROM {table}") == 0
            assert pool.stats().closed_total == 0
        finally:
            await pool.execute(f"DROP TABLE IF EXISTS {table}")
