"""The "unnamed" mode returns what asyncpg returns, for every query shape, through both PgBouncers."""

from __future__ import annotations

import asyncio
import datetime
import decimal
import json
import re
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

import asyncpg
import pytest

from asyncpool import Pool, PooledConnection, TransactionRolledBackError
from tests.conftest import Pooler


def _name(pooler: Pooler, stem: str) -> str:
    return f"dc_{stem}_" + re.sub(r"\W", "_", pooler.label)


@pytest.fixture
async def pool(pooler: Pooler) -> AsyncIterator[Pool]:
    async with Pool(pooler.dsn(), name=f"dc-{pooler.label}", prepared_statements="unnamed",
                    min_size=1, max_size=1, telemetry=False) as p:
        yield p


async def twice(conn: PooledConnection, method: str, query: str, *args: Any,
                **kwargs: Any) -> Any:
    """Run a call as a cache miss, then as a hit; both must give the same result."""
    call = getattr(conn, method)
    before = conn.describe_cache_stats()
    first = await call(query, *args, **kwargs)
    second = await call(query, *args, **kwargs)
    after = conn.describe_cache_stats()
    assert after.hits >= before.hits + 1, "the second call did not reuse the description"
    assert first == second
    return second


async def test_no_rows_many_rows_and_nulls(pool: Pool) -> None:
    async with pool.acquire() as conn:
        none = await twice(conn, "fetch", "SELECT g FROM generate_series(1, $1::int) g WHERE false", 5)
        assert none == []
        many = await twice(conn, "fetch", "SELECT g, g::text AS s FROM generate_series(1, $1::int) g",
                           3000)
        assert len(many) == 3000
        assert (many[0]["g"], many[-1]["g"], many[-1]["s"]) == (1, 3000, "3000")
        nulls = await twice(conn, "fetchrow", "SELECT $1::int AS a, $2::text AS b, NULL::uuid AS c",
                            None, None)
        assert tuple(nulls) == (None, None, None)
        assert await twice(conn, "fetchval", "SELECT $1::int IS NULL", None) is True


async def test_scalar_types(pool: Pool) -> None:
    values = (
        12345678901, decimal.Decimal("3.14159"), 2.5, "ünïcode", b"\x00\xff",
        datetime.datetime(2024, 2, 29, 12, 30, tzinfo=datetime.UTC), datetime.date(2024, 1, 1),
        uuid.UUID("12345678-1234-5678-1234-567812345678"), True,
    )
    query = ("SELECT $1::int8, $2::numeric, $3::float8, $4::text, $5::bytea, $6::timestamptz, "
             "$7::date, $8::uuid, $9::bool")
    async with pool.acquire() as conn:
        assert tuple(await twice(conn, "fetchrow", query, *values)) == values


async def test_arrays_json_and_jsonb(pool: Pool) -> None:
    async with pool.acquire() as conn:
        row = await twice(conn, "fetchrow", "SELECT $1::int[] AS i, $2::text[] AS t, "
                          "$3::json AS j, $4::jsonb AS jb, $4::jsonb -> 'k' AS k",
                          [1, None, 3], ["a", None], '{"x": [1, 2]}', '{"k": "v"}')
        assert row["i"] == [1, None, 3]
        assert row["t"] == ["a", None]
        assert json.loads(row["j"]) == {"x": [1, 2]}
        assert json.loads(row["jb"]) == {"k": "v"}
        assert json.loads(row["k"]) == "v"
        nested = await twice(conn, "fetchval", "SELECT ARRAY[[1, 2], [3, 4]]::int[] || $1::int[]",
                             [[5, 6]])
        assert nested == [[1, 2], [3, 4], [5, 6]]


async def test_custom_types_needing_introspection(pool: Pool, pooler: Pooler) -> None:
    mood, pair, posint, table = (_name(pooler, s) for s in ("mood", "pair", "posint", "custom"))
    async with pool.acquire() as conn:
        await conn.execute(f"""
            DROP TABLE IF EXISTS {table};
            DROP TYPE IF EXISTS {mood}, {pair};
            DROP DOMAIN IF EXISTS {posint};
            CREATE TYPE {mood} AS ENUM ('sad', 'ok', 'happy');
            CREATE TYPE {pair} AS (a int, b text);
            CREATE DOMAIN {posint} AS int CHECK (VALUE > 0);
            CREATE TABLE {table} (id serial PRIMARY KEY, m {mood}, p {pair}, n {posint},
                                  ms {mood}[]);
        """)
        insert = f"INSERT INTO {table} (m, p, n, ms) VALUES ($1, $2, $3, $4) RETURNING id"
        for i, m in enumerate(("sad", "ok", "happy"), start=1):
            assert await conn.fetchval(insert, m, (i, f"t{i}"), i, [m, "ok"]) == i
        rows = await twice(conn, "fetch", f"SELECT m, p, n, ms FROM {table} WHERE n >= $1 ORDER BY id",
                           2)
        assert [(r["m"], tuple(r["p"]), r["n"], r["ms"]) for r in rows] == [
            ("ok", (2, "t2"), 2, ["ok", "ok"]),
            ("happy", (3, "t3"), 3, ["happy", "ok"]),
        ]
        # The domain's CHECK still runs on a reused statement.
        with pytest.raises(asyncpg.CheckViolationError):
            await conn.fetchval(insert, "ok", (0, "x"), 0, [])
        new_id = await conn.fetchval(insert, "ok", (4, "y"), 4, [])
        assert await conn.fetchval(f"SELECT n FROM {table} WHERE id = $1", new_id) == 4


async def test_executemany_and_status_strings(pool: Pool, pooler: Pooler) -> None:
    table = _name(pooler, "many")
    async with pool.acquire() as conn:
        await conn.execute(f"DROP TABLE IF EXISTS {table}; CREATE TABLE {table} (k int, v text)")
        insert = f"INSERT INTO {table} VALUES ($1, $2)"
        await conn.executemany(insert, [(i, f"v{i}") for i in range(200)])
        await conn.executemany(insert, [(i, None) for i in range(200, 250)])
        await conn.executemany(insert, [])
        returned = await conn.fetchmany(f"{insert} RETURNING k", [(900, "a"), (901, "b")])
        assert [r["k"] for r in returned] == [900, 901]
        returned = await conn.fetchmany(f"{insert} RETURNING k", [(902, None)])
        assert [r["k"] for r in returned] == [902]
        await conn.execute(f"DELETE FROM {table} WHERE k >= $1", 900)
        assert conn.describe_cache_stats().hits >= 1
        assert await conn.fetchval(f"SELECT count(*) FROM {table}") == 250
        assert await conn.fetchval(f"SELECT count(v) FROM {table}") == 200
        status = await conn.execute(f"UPDATE {table} SET v = $1 WHERE k < $2", "z", 10)
        assert status == "UPDATE 10"
        assert await conn.execute(f"UPDATE {table} SET v = $1 WHERE k < $2", "y", 5) == "UPDATE 5"
        with pytest.raises(asyncpg.DataError):  # bad input: nothing is sent, the connection is fine
            await conn.executemany(insert, [(1, "a"), ("not an int", "b")])
        assert await conn.fetchval(f"SELECT count(*) FROM {table} WHERE k = $1", 1) == 1


async def test_transactions_commit_and_roll_back(pool: Pool, pooler: Pooler) -> None:
    table = _name(pooler, "tx")
    await pool.execute(f"DROP TABLE IF EXISTS {table}; CREATE TABLE {table} (k int PRIMARY KEY)")
    insert = f"INSERT INTO {table} VALUES ($1) RETURNING k"
    async with pool.transaction() as conn:
        assert await conn.fetchval(insert, 1) == 1
        assert await conn.fetchval(insert, 2) == 2
    with pytest.raises(RuntimeError):
        async with pool.transaction() as conn:
            assert await conn.fetchval(insert, 3) == 3
            raise RuntimeError("roll back")
    # A statement's error caught inside the block: the server rolls the transaction back.
    with pytest.raises(TransactionRolledBackError):
        async with pool.transaction() as conn:
            with pytest.raises(asyncpg.UniqueViolationError):
                await conn.fetchval(insert, 1)
    async with pool.acquire() as conn:
        async with conn.transaction():
            assert await conn.fetchval(insert, 4) == 4
            async with conn.transaction():  # a savepoint
                await conn.fetchval(insert, 5)
        keys = await conn.fetch(f"SELECT k FROM {table} WHERE k > $1 ORDER BY k", 0)
        assert [r["k"] for r in keys] == [1, 2, 4, 5]
        assert conn.describe_cache_stats().hits >= 4


async def test_record_class_and_many_parameters(pool: Pool) -> None:
    class Row(asyncpg.Record):
        pass

    async with pool.acquire() as conn:
        query = "SELECT $1::int AS a"
        plain = await conn.fetchrow(query, 1)
        custom = await twice(conn, "fetchrow", query, 1, record_class=Row)
        assert type(plain) is asyncpg.Record
        assert type(custom) is Row
        assert type(await conn.fetchrow(query, 1)) is asyncpg.Record
        sql = "SELECT " + " + ".join(f"${i}::int" for i in range(1, 101))
        assert await twice(conn, "fetchval", sql, *range(100)) == sum(range(100))
        with pytest.raises(asyncpg.InterfaceError, match="expects 100 arguments"):
            await conn.fetchval(sql, 1)
        assert await conn.fetchval("SELECT $1::int * 2", 21) == 42


async def test_errors_keep_the_description_and_the_connection(pool: Pool) -> None:
    async with pool.acquire() as conn:
        raw = conn.raw
        query = "SELECT 1 / $1::int"
        assert await conn.fetchval(query, 1) == 1
        with pytest.raises(asyncpg.DivisionByZeroError):
            await conn.fetchval(query, 0)
        assert conn.describe_cache_stats().misses == 1  # a server error keeps the description
        # An argument the cached codec cannot encode is described afresh before its error (it
        # may be a column widened since): the same DataError as without a cache.
        with pytest.raises(asyncpg.DataError):
            await conn.fetchval(query, "x")
        assert await conn.fetchval(query, 1) == 1
        stats = conn.describe_cache_stats()
        assert (stats.misses, stats.stale) == (2, 0)
    async with pool.acquire() as conn:
        assert conn.raw is raw


async def test_cancelled_and_timed_out_reuses_leave_the_connection_usable(pool: Pool) -> None:
    slow = "SELECT pg_sleep($1::float8)::text || 'done'"
    async with pool.acquire() as conn:
        assert await conn.fetchval(slow, 0.0) == "done"
        with pytest.raises(TimeoutError):
            await conn.fetchval(slow, 2.0, timeout=0.2)
        assert await conn.fetchval(slow, 0.0) == "done"
        task = asyncio.create_task(conn.fetchval(slow, 2.0))
        await asyncio.sleep(0.2)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert await conn.fetchval(slow, 0.0) == "done"
        assert await conn.fetchval("SELECT $1::int", 7) == 7
        assert conn.describe_cache_stats().stale == 0


async def test_concurrent_clients_share_few_server_connections(pooler: Pooler) -> None:
    """More clients than the PgBouncer has server connections: statements land on whichever
    server connection is free, and an unnamed statement is never missing there."""
    mood = _name(pooler, "concurrent_mood")
    queries: list[tuple[str, Callable[[int], tuple[Any, ...]], Callable[[int, Any], bool]]] = [
        ("SELECT $1::int + 1", lambda i: (i,), lambda i, r: r == i + 1),
        ("SELECT $1::text || 'x'", lambda i: (str(i),), lambda i, r: r == f"{i}x"),
        ("SELECT count(*) FROM generate_series(1, $1::int)", lambda i: (i % 50 + 1,),
         lambda i, r: r == i % 50 + 1),
        ("SELECT $1::int[]", lambda i: ([i, i],), lambda i, r: r == [i, i]),
        # A type each new connection must introspect (more statements, run concurrently).
        (f"SELECT $1::{mood}[]", lambda i: (["a", "b"][: i % 3],), lambda i, r: r == ["a", "b"][: i % 3]),
    ]
    async with Pool(pooler.dsn(), name="dc-concurrent", prepared_statements="unnamed",
                    min_size=0, max_size=30, telemetry=False) as pool:
        await pool.execute(f"DROP TYPE IF EXISTS {mood}; CREATE TYPE {mood} AS ENUM ('a', 'b')")

        async def client(n: int) -> int:
            wrong = 0
            for i in range(n * 7, n * 7 + 40):
                sql, args, ok = queries[i % len(queries)]
                if not ok(i, await pool.fetchval(sql, *args(i))):
                    wrong += 1
            return wrong

        results = await asyncio.gather(*(client(n) for n in range(60)))
        assert sum(results) == 0
        assert pool.stats().closed_total == 0
