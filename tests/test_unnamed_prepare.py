"""``conn.prepare()`` in "unnamed" mode, and statements of no rows, against PostgreSQL and through
both PgBouncers.

A prepared statement's executions are checked reuses: after a migration changed its result,
they return the right values (asyncpg, without a statement cache, decodes the new column with
the old codec). A statement of no argument sets sends nothing, so the next statement's reply is
the one the protocol promises.
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from decimal import Decimal
from typing import Any

import pytest

from asyncpool import Pool, StaleStatementError
from asyncpool.testing import PgBouncerServer, PostgresServer, ServerStack
from tests.migrations import migrate
from tests.test_unnamed_wire import CountingRelay

Target = PostgresServer | PgBouncerServer


@pytest.fixture(params=["postgres", "legacy", "current"],
                ids=["postgres", "pgbouncer-1.18", "pgbouncer-current"])
def target(request: pytest.FixtureRequest, stack: ServerStack) -> Target:
    """PostgreSQL itself, then each PgBouncer."""
    server: Target = getattr(stack, request.param)
    return server


@pytest.fixture
async def relay(target: Target) -> AsyncIterator[CountingRelay]:
    async with CountingRelay(target.host, target.port) as r:
        yield r


@pytest.fixture
async def pool(relay: CountingRelay, target: Target) -> AsyncIterator[Pool]:
    async with Pool(relay.dsn(target.dsn()), name="prepare", prepared_statements="unnamed",
                    min_size=1, max_size=1, telemetry=False) as p:
        yield p


@pytest.fixture
async def table(pool: Pool, request: pytest.FixtureRequest) -> str:
    name = "dc_prep_" + re.sub(r"\W", "_", request.node.callspec.id)[:40]
    await pool.execute(f"DROP TABLE IF EXISTS {name}; CREATE TABLE {name} (a int, b int)")
    return name


async def _row(stmt: Any, *args: Any) -> tuple[Any, ...]:
    row = await stmt.fetchrow(*args)
    assert row is not None
    return tuple(row)


# -- a prepared statement after a migration ---------------------------------------------------


@pytest.mark.parametrize("value", [2, 1234])
async def test_prepared_statement_after_a_result_column_retyped(
        pool: Pool, table: str, postgres: PostgresServer, value: int) -> None:
    """asyncpg's test_prepare_statement_invalid: text '1234' must not come back as 825373492
    (its bytes read as an int4), nor '2' as "insufficient data in buffer"."""
    await pool.execute(f"INSERT INTO {table} VALUES (1, $1)", value)
    async with pool.acquire() as conn:
        stmt = await conn.prepare(f"SELECT * FROM {table}")
        assert tuple(await _row(stmt)) == (1, value)
        await migrate(postgres, f"ALTER TABLE {table} ALTER COLUMN b TYPE text")

        assert tuple(await _row(stmt)) == (1, str(value))
        # The statement took the new description: the next calls reuse it.
        assert [a.type.name for a in stmt.get_attributes()] == ["int4", "text"]
        stale = conn.describe_cache_stats().stale
        assert [tuple(r) for r in await stmt.fetch()] == [(1, str(value))]
        assert await stmt.fetchval(column=1) == str(value)
        assert conn.describe_cache_stats().stale == stale
    assert pool.stats().closed_total == 0


async def test_prepared_insert_returning_runs_once_after_a_column_added(
        pool: Pool, table: str, postgres: PostgresServer) -> None:
    async with pool.acquire() as conn:
        stmt = await conn.prepare(f"INSERT INTO {table} VALUES ($1, $2) RETURNING *")
        assert tuple(await _row(stmt, 1, 10)) == (1, 10)
        await migrate(postgres, f"ALTER TABLE {table} ADD COLUMN c text DEFAULT 'new'")
        assert tuple(await _row(stmt, 2, 20)) == (2, 20, "new")
        assert await conn.fetchval(f"SELECT count(*) FROM {table} WHERE a = 2") == 1
        # executemany discards its rows: a changed description does not matter to it.
        await stmt.executemany([(3, 30), (4, 40)])
        assert await conn.fetchval(f"SELECT count(*) FROM {table}") == 4


async def test_prepared_fetchmany_after_a_change_says_it_ran_then_returns_the_new_columns(
        pool: Pool, table: str, postgres: PostgresServer) -> None:
    """fetchmany's rows are not decoded again: an error saying it ran, never wrong values."""
    async with pool.acquire() as conn:
        stmt = await conn.prepare(f"INSERT INTO {table} VALUES ($1, $2) RETURNING b")
        assert [tuple(r) for r in await stmt.fetchmany([(1, 1234)])] == [(1234,)]
        await migrate(postgres, f"ALTER TABLE {table} ALTER COLUMN b TYPE text")
        with pytest.raises(StaleStatementError, match="the statement ran") as caught:
            await stmt.fetchmany([(2, 1234)])
        assert caught.value.may_have_run
        assert await conn.fetchval(f"SELECT count(*) FROM {table} WHERE a = 2") == 1
        # The statement has the new description now (its parameter too: text).
        assert [tuple(r) for r in await stmt.fetchmany([(3, "x"), (4, "y")])] == [("x",),
                                                                                 ("y",)]
    assert pool.stats().closed_total == 0


async def test_prepared_statement_whose_parameter_no_longer_fits_is_described_afresh(
        pool: Pool, table: str, postgres: PostgresServer) -> None:
    """A parameter's column retyped to a type its prepared one has no operator with: the
    server refuses the reuse (nothing ran) and the statement is prepared again, as `off` would
    prepare it now; the arguments must then fit the new type."""
    await pool.execute(f"INSERT INTO {table} VALUES (1, 5)")
    async with pool.acquire() as conn:
        stmt = await conn.prepare(f"SELECT a FROM {table} WHERE b = $1")
        assert await stmt.fetchval(5) == 1
        await migrate(postgres, f"ALTER TABLE {table} ALTER COLUMN b TYPE text")
        assert await stmt.fetchval("5") == 1
        assert [t.name for t in stmt.get_parameters()] == ["text"]
    assert pool.stats().closed_total == 0


# -- on the wire --------------------------------------------------------------------------------


async def test_a_prepared_statements_execution_is_one_checked_round_trip(
        pool: Pool, relay: CountingRelay) -> None:
    query = "SELECT $1::int + 1 AS n"
    async with pool.acquire() as conn:
        assert await conn.fetchval(query, 1) == 2
        stmt = await conn.prepare(query)
        trips = relay.round_trips()
        assert await stmt.fetchval(2) == 3
        assert relay.round_trips() - trips == 1
        assert relay.sent["D"] >= 1  # each execution describes its portal: the checked reply
    assert relay.statement_names == {b""}


async def test_a_cursor_of_a_statement_prepared_after_a_migration_decodes_the_new_columns(
        pool: Pool, postgres: PostgresServer, table: str) -> None:
    """prepare() describes afresh even when the connection described the query before the
    migration (a cursor of a statement prepared before it: tests/test_unnamed_vs_off.py)."""
    query = f"SELECT a, b FROM {table}"
    async with pool.acquire() as conn:
        await conn.execute(f"INSERT INTO {table} VALUES (1, 1234)")
        assert await conn.fetch(query) == [(1, 1234)]
        await migrate(postgres, f"ALTER TABLE {table} ALTER COLUMN b TYPE text")
        stmt = await conn.prepare(query)
        async with conn.transaction():
            rows = [tuple(r) async for r in stmt.cursor()]
    assert rows == [(1, "1234")]


async def test_a_prepared_statement_does_not_convert_an_argument_with_a_loss(
        pool: Pool, postgres: PostgresServer, table: str) -> None:
    """A column widened (int4 -> numeric) after prepare(): a Decimal is not bound as the old
    integer parameter (9.99 stored as 9), but described afresh, as on the connection's path."""
    async with pool.acquire() as conn:
        stmt = await conn.prepare(f"INSERT INTO {table} (a, b) VALUES (1, $1) RETURNING b")
        assert await stmt.fetchval(6) == 6
        await migrate(postgres, f"ALTER TABLE {table} ALTER COLUMN b TYPE numeric")
        assert await stmt.fetchval(Decimal("9.99")) == Decimal("9.99")


@pytest.mark.parametrize("way", ["prepared-executemany", "fetchmany"])
async def test_no_argument_sets_send_nothing_and_break_nothing(
        pool: Pool, table: str, relay: CountingRelay, way: str,
        caplog: pytest.LogCaptureFixture) -> None:
    """asyncpg's test_executemany_prepare: an executemany of no rows wrote a Parse with no Sync
    after it, whose ParseComplete came at the head of the next reused statement's reply; the
    pool read it as a broken reply and closed the connection under the next query."""
    insert = f"INSERT INTO {table} VALUES ($1, $2) RETURNING a"
    select = f"SELECT * FROM {table} WHERE a > $1"
    async with pool.acquire() as conn:
        stmt = await conn.prepare(insert)
        await stmt.executemany([(1, 10)])
        assert [tuple(r) for r in await conn.fetch(select, 0)] == [(1, 10)]
        parses, trips = relay.sent["P"], relay.round_trips()
        if way == "fetchmany":  # asyncpg's own path: described first (Parse, Describe, Flush)
            assert await conn.fetchmany(insert, []) == []
        else:
            await stmt.executemany(())
        # No Parse without a Sync or Flush after it (an unsynced one would also keep a
        # PgBouncer server connection assigned to this client).
        assert relay.sent["P"] - parses <= relay.round_trips() - trips, "a Parse left unsynced"
        with caplog.at_level("WARNING", "asyncpool.unnamed"):
            assert [tuple(r) for r in await conn.fetch(select, 0)] == [(1, 10)]
        assert "not the one the protocol promises" not in caplog.text
        await stmt.executemany([(2, 20)])
        assert await conn.fetchval(f"SELECT count(*) FROM {table}") == 2
    assert pool.stats().closed_total == 0
