"""Statements of no rows in "unnamed" mode, against PostgreSQL and through both PgBouncers: they
send nothing, so the next statement's reply is the one the protocol promises.
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator

import pytest

from asyncpool import Pool
from asyncpool.testing import PgBouncerServer, PostgresServer, ServerStack
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
