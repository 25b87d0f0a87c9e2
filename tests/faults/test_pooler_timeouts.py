"""PgBouncer ends a statement's client connection with its own FATAL error (``query_timeout``,
``query_wait_timeout``): in every statement mode the caller learns which limit fired.

With ``prepared_statements="unnamed"`` a reused statement's reply is read by the one-round-trip
path: PgBouncer's FATAL error (SQLSTATE 08P01) came first, where the server's refusal of a
stale description would, and was taken for one: logged as a schema change, counted stale, and
"described afresh" on the closed connection, so the caller was told only "connection is closed".
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterator
from typing import Any, Literal

import asyncpg
import pytest

from asyncpool import ConnectionLostError, Pool, PooledConnection
from asyncpool.testing import PgBouncerServer, ServerStack
from asyncpool.testing.invariants import serves_again, settled
from tests.faults.poolers import both_pgbouncers

QUERY_TIMEOUT = 2
QUERY_WAIT_TIMEOUT = 1
# Longer than the query_wait_timeout test's blocker sits in its transaction.
IDLE_TRANSACTION_TIMEOUT = 3
Mode = Literal["off", "on", "unnamed"]
CASES: list[tuple[str, Mode]] = [("legacy", "off"), ("legacy", "unnamed"),
         ("current", "off"), ("current", "unnamed"), ("current", "on")]


@pytest.fixture(scope="module")
def timing_poolers(fault_stack: ServerStack) -> Iterator[dict[str, PgBouncerServer]]:
    """Both PgBouncer versions with one server connection, a query_timeout, a short
    query_wait_timeout and an idle_transaction_timeout."""
    settings: dict[str, str | int] = {
        "default_pool_size": 1, "max_db_connections": 1,
        "query_timeout": QUERY_TIMEOUT, "query_wait_timeout": QUERY_WAIT_TIMEOUT,
        "idle_transaction_timeout": IDLE_TRANSACTION_TIMEOUT,
    }
    with both_pgbouncers(fault_stack, settings) as servers:
        yield servers


def _pool(pooler: PgBouncerServer, mode: Mode) -> Pool:
    return Pool(pooler.dsn(), name="limited", min_size=1, max_size=1, acquire_timeout=5,
                validate_after=None, prepared_statements=mode, telemetry=False)


def _no_stale_description(pool: Pool, logs: pytest.LogCaptureFixture) -> None:
    """Nothing was taken for a schema change: no stale count, no log saying so."""
    cache: Any = pool.stats().statement_cache
    assert cache is None or cache.stale == 0, cache
    assert not [r for r in logs.records if "refused a cached statement" in r.getMessage()]


@pytest.mark.parametrize(("which", "mode"), CASES, ids=[f"{w}-{m}" for w, m in CASES])
async def test_query_timeout_is_named(timing_poolers: dict[str, PgBouncerServer],
                                      fault_stack: ServerStack, which: str, mode: Mode,
                                      caplog: pytest.LogCaptureFixture) -> None:
    """An INSERT past PgBouncer's query_timeout, run a second time (a reuse): the caller gets
    ConnectionLostError naming the limit and what it means. The server still completes the
    INSERT (it notices the closed connection only when it writes the reply), once."""
    pooler = timing_poolers[which]
    direct = await asyncpg.connect(fault_stack.postgres.dsn())
    table = f"timed_{which}_{mode}"
    await direct.execute(f"DROP TABLE IF EXISTS {table}; CREATE TABLE {table} (id int PRIMARY KEY)")
    insert = f"INSERT INTO {table} SELECT $1::int FROM pg_sleep($2)"
    try:
        with caplog.at_level(logging.INFO):
            async with _pool(pooler, mode) as pool:
                await pool.execute(insert, 1, 0.0)  # described and kept
                with pytest.raises(ConnectionLostError) as info:
                    await pool.execute(insert, 2, QUERY_TIMEOUT + 0.5)
                message = str(info.value)
                assert "query timeout" in message, message
                assert "PgBouncer's query_timeout" in message, message
                _no_stale_description(pool, caplog)
                await serves_again(pool, within=10)
                await settled(pool, pooler)
        async with asyncio.timeout(10):
            while await direct.fetchval(f"SELECT count(*) FROM {table} WHERE id = 2") == 0:
                await asyncio.sleep(0.05)  # the server's sleep ends 0.5 s after PgBouncer's limit
    finally:
        await direct.close()


@pytest.mark.parametrize(("which", "mode"), CASES, ids=[f"{w}-{m}" for w, m in CASES])
async def test_query_wait_timeout_is_named(timing_poolers: dict[str, PgBouncerServer],
                                           which: str, mode: Mode,
                                           caplog: pytest.LogCaptureFixture) -> None:
    """PgBouncer's only server connection is held by another client's open transaction: a
    statement run before (a reuse) waits in PgBouncer until query_wait_timeout; the caller is
    told so, and what to change."""
    pooler = timing_poolers[which]
    query = "SELECT $1::int + 1"
    with caplog.at_level(logging.INFO):
        async with _pool(pooler, mode) as pool:
            assert await pool.fetchval(query, 1) == 2  # described and kept
            blocker = await asyncpg.connect(pooler.dsn(), statement_cache_size=0)
            try:
                await blocker.execute("BEGIN; SELECT 1")  # holds the only server connection
                with pytest.raises(ConnectionLostError) as info:
                    await pool.fetchval(query, 2)
                await blocker.execute("COMMIT")
            finally:
                await blocker.close()
            message = str(info.value)
            assert "query_wait_timeout" in message, message
            assert "default_pool_size" in message, message  # what to change
            _no_stale_description(pool, caplog)
            assert await pool.fetchval(query, 3) == 4
            await settled(pool, pooler)


async def _closed_by_the_pooler(conn: PooledConnection) -> None:
    """Wait (bounded) until PgBouncer has closed `conn`'s idle transaction and asyncpg saw it."""
    async with asyncio.timeout(IDLE_TRANSACTION_TIMEOUT + 10):
        while not conn.is_closed():
            await asyncio.sleep(0.05)


@pytest.mark.parametrize("which", ["legacy", "current"])
async def test_idle_transaction_timeout_is_suggested(
    timing_poolers: dict[str, PgBouncerServer], which: str
) -> None:
    """PgBouncer closes a transaction left idle past idle_transaction_timeout. asyncpg drops the
    reason PgBouncer sends an idle connection, so the caller is told the likely cause: when the
    block ends (before COMMIT), and when its next statement finds the connection closed (that
    statement did not run)."""
    pooler = timing_poolers[which]
    async with Pool(pooler.dsn(), name="limited", min_size=1, max_size=1, acquire_timeout=5,
                    validate_after=None, telemetry=False) as pool:
        with pytest.raises(ConnectionLostError) as at_commit:
            async with pool.transaction() as conn:
                await conn.execute("SELECT 1")
                await _closed_by_the_pooler(conn)
        with pytest.raises(ConnectionLostError) as at_statement:
            async with pool.transaction() as conn:
                await conn.execute("SELECT 1")
                await _closed_by_the_pooler(conn)
                await conn.execute("SELECT 2")
        for info in (at_commit, at_statement):
            message = str(info.value)
            assert "not committed" in message, message
            assert "idle_transaction_timeout" in message, message
        assert "did not run" in str(at_statement.value)
        assert await pool.fetchval("SELECT 3") == 3
        await settled(pool, pooler)
