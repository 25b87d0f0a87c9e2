"""A statement's ``timeout=`` is checked before anything is sent, on every statement path: the
pool's query helpers (the fast path and the general one), the held connection's methods (COPY
included), ``prepare()`` and ``cursor()``, and a prepared statement's methods. asyncpg would run
the statement with NaN or ``"5"``, answer a negative one with a TimeoutError (as if the
statement had run out of time), and refuse the rest late. Against PostgreSQL and PgBouncer 1.18.
"""

from __future__ import annotations

import io
import math
import re
from collections.abc import Awaitable, Callable
from decimal import Decimal
from fractions import Fraction
from typing import Any

import pytest

from asyncpool import Pool, PoolConfigError
from asyncpool.connect.driver import queries_count
from asyncpool.testing import PostgresServer
from tests.conftest import Pooler

BAD: list[Any] = [math.nan, -1, -0.5, -math.inf, "5", b"1", True, [1]]
INSERT = "INSERT INTO stmt_timeouts VALUES ($1) RETURNING x"

Call = Callable[[Any, Any], Awaitable[object]]

#: Each path, called with the pool's proxy (or the pool) and the timeout to give.
CONNECTION_CALLS: dict[str, Call] = {
    "execute": lambda c, t: c.execute("INSERT INTO stmt_timeouts VALUES (1)", timeout=t),
    "execute-args": lambda c, t: c.execute("INSERT INTO stmt_timeouts VALUES ($1)", 1, timeout=t),
    "fetch": lambda c, t: c.fetch(INSERT, 1, timeout=t),
    "fetchrow": lambda c, t: c.fetchrow(INSERT, 1, timeout=t),
    "fetchval": lambda c, t: c.fetchval(INSERT, 1, timeout=t),
    "executemany": lambda c, t: c.executemany(INSERT, [(1,)], timeout=t),
    "fetchmany": lambda c, t: c.fetchmany(INSERT, [(1,)], timeout=t),
    "copy_records_to_table": lambda c, t: c.copy_records_to_table(
        "stmt_timeouts", records=[(1,)], timeout=t),
    "copy_to_table": lambda c, t: c.copy_to_table(
        "stmt_timeouts", source=io.BytesIO(b"1\n"), timeout=t),
    "copy_from_query": lambda c, t: c.copy_from_query(INSERT, 1, output=io.BytesIO(), timeout=t),
    "copy_from_table": lambda c, t: c.copy_from_table(
        "stmt_timeouts", output=io.BytesIO(), timeout=t),
}


@pytest.fixture(params=["direct", "pgbouncer-1.18"])
def dsn(request: pytest.FixtureRequest, postgres: PostgresServer) -> str:
    if request.param == "direct":
        return postgres.dsn()
    pooler: Pooler = request.getfixturevalue("legacy")
    return pooler.dsn()


async def _rows(pool: Pool) -> int:
    count: int = await pool.fetchval("SELECT count(*) FROM stmt_timeouts")
    return count


async def _fresh_table(pool: Pool) -> None:
    await pool.execute("DROP TABLE IF EXISTS stmt_timeouts; CREATE TABLE stmt_timeouts (x int)")


def _refused(what: str, bad: object) -> Any:
    return pytest.raises(PoolConfigError, match=(
        rf"pool 'st': {re.escape(what)}\(timeout={re.escape(repr(bad))}\): must be a number of "
        r"seconds >= 0 \(or None for the pool's command_timeout\); nothing was sent"))


async def test_the_pool_helpers_refuse_a_bad_timeout_before_sending(dsn: str) -> None:
    async with Pool(dsn, name="st", min_size=1, max_size=1, telemetry=False) as pool:
        await _fresh_table(pool)
        raw = (pool._slots.idle[-1]).conn
        for name, call in CONNECTION_CALLS.items():
            for bad in BAD:
                what = name.removesuffix("-args")
                sent = queries_count(raw)
                with _refused(what, bad):
                    await call(pool, bad)
                # Taken back as it was: idle, the same connection, and no query on the way
                # back (a Sync for a Parse that was never sent would be one more round trip).
                record = pool._slots.idle[-1]
                assert (pool.stats().in_use, pool.stats().size, record.conn) == (0, 1, raw)
                assert queries_count(raw) == sent, name
        assert await _rows(pool) == 0  # none of them ran
        for call in CONNECTION_CALLS.values():
            await call(pool, math.inf)  # no limit, as for the pool's own time limits
        assert await _rows(pool) == 10  # each but copy_from_table inserts a row


async def test_the_general_path_refuses_before_taking_a_connection(dsn: str) -> None:
    """With a check due (validate_after=0) the helpers go the general way: nothing is logged in
    for a call that is refused."""
    async with Pool(dsn, name="st", min_size=0, max_size=1, validate_after=0,
                    telemetry=False) as pool:
        for bad in BAD:
            with _refused("fetchval", bad):
                await pool.fetchval("SELECT 1", timeout=bad)
        assert pool.stats().created_total == 0
        assert await pool.fetchval("SELECT 1", timeout=5) == 1


async def test_a_held_connection_refuses_a_bad_timeout_before_sending(dsn: str) -> None:
    async with Pool(dsn, name="st", min_size=1, max_size=1, telemetry=False) as pool:
        await _fresh_table(pool)
        async with pool.acquire() as conn:
            sent = queries_count(conn.raw)
            for name, call in CONNECTION_CALLS.items():
                for bad in BAD:
                    with _refused(name.removesuffix("-args"), bad):
                        await call(conn, bad)
            for bad in BAD:
                with _refused("prepare", bad):
                    await conn.prepare(INSERT, timeout=bad)
                with _refused("reset", bad):
                    await conn.reset(timeout=bad)
            assert queries_count(conn.raw) == sent
            assert await conn.fetchval("SELECT count(*) FROM stmt_timeouts") == 0
            assert not conn.is_in_transaction()
            async with conn.transaction():
                for bad in BAD:
                    with _refused("cursor", bad):
                        conn.cursor("SELECT 1", timeout=bad)
                assert [r[0] async for r in conn.cursor("SELECT 1", timeout=math.inf)] == [1]
        assert pool.stats().in_use == 0
        # asyncpg's meaning of 0 is kept: no time at all, nothing sent.
        with pytest.raises(TimeoutError):
            await pool.fetchval(INSERT, 1, timeout=0)
        assert await _rows(pool) == 0


async def test_a_prepared_statement_refuses_a_bad_timeout_before_sending(dsn: str) -> None:
    async with Pool(dsn, name="st", min_size=1, max_size=1, telemetry=False) as pool:
        await _fresh_table(pool)
        async with pool.acquire() as conn, conn.transaction():
            stmt = await conn.prepare(INSERT)
            calls: dict[str, Call] = {
                "fetch": lambda s, t: s.fetch(1, timeout=t),
                "fetchrow": lambda s, t: s.fetchrow(1, timeout=t),
                "fetchval": lambda s, t: s.fetchval(1, timeout=t),
                "executemany": lambda s, t: s.executemany([(1,)], timeout=t),
                "fetchmany": lambda s, t: s.fetchmany([(1,)], timeout=t),
            }
            for name, call in calls.items():
                for bad in BAD:
                    with pytest.raises(PoolConfigError, match=(
                            rf"^PreparedStatement\.{name}\(timeout={re.escape(repr(bad))}\): "
                            r"must be a number of seconds >= 0")):
                        await call(stmt, bad)
            for bad in BAD:
                with pytest.raises(PoolConfigError, match=r"PreparedStatement\.cursor\(timeout="):
                    stmt.cursor(1, timeout=bad)
            assert await conn.fetchval("SELECT count(*) FROM stmt_timeouts") == 0
            assert await stmt.fetchval(1, timeout=math.inf) == 1


def _numbers_asyncpg_reads() -> list[Any]:
    """Timeouts asyncpg reads with ``float()`` that are not an int or a float."""
    np = pytest.importorskip("numpy")
    return [np.int64(5), np.float32(5), np.float64(5), Decimal("5"), Fraction(5, 2)]


async def test_a_real_number_asyncpg_reads_is_taken_on_every_path(dsn: str) -> None:
    """A numpy integer or float32, a Decimal, a Fraction: asyncpg runs the statement with them
    (``float(timeout)``), so the check must not refuse them (it did: PoolConfigError). A bool,
    a signalling NaN and a negative Decimal stay refused."""
    good = _numbers_asyncpg_reads()
    async with Pool(dsn, name="st", min_size=1, max_size=1, telemetry=False) as pool:
        for t in good:
            assert await pool.fetchval("SELECT 1", timeout=t) == 1  # the fast path
            async with pool.acquire() as conn:
                assert await conn.fetchval("SELECT 1", timeout=t) == 1
                stmt = await conn.prepare("SELECT 1", timeout=t)
                assert await stmt.fetchval(timeout=t) == 1
                async with conn.transaction():
                    assert [r[0] async for r in conn.cursor("SELECT 1", timeout=t)] == [1]
        refused: list[Any] = [Decimal("sNaN"), Decimal("NaN"), Decimal("-1"), Fraction(-1, 2)]
        for bad in refused:
            with _refused("fetchval", bad):
                await pool.fetchval("SELECT 1", timeout=bad)
    async with Pool(dsn, name="st", min_size=0, max_size=1, validate_after=0,
                    telemetry=False) as pool:  # the general path
        for t in good:
            assert await pool.fetchval("SELECT 1", timeout=t) == 1
