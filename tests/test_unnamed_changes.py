"""After DDL a cached description is stale: the call still returns the right values, or the error
asyncpg gives without any cache.

Each test describes statements on a pool's only connection, changes the schema from another
connection (as a migration would), and runs the statements again through the same PgBouncer.
"""

from __future__ import annotations

import asyncio
import decimal
import re
from collections.abc import AsyncIterator

import asyncpg
import pytest

from asyncpool import Pool
from asyncpool.testing import PostgresServer
from tests.conftest import Pooler
from tests.migrations import migrate


@pytest.fixture
async def pool(pooler: Pooler) -> AsyncIterator[Pool]:
    async with Pool(pooler.dsn(), name="stale", prepared_statements="unnamed",
                    min_size=1, max_size=1, telemetry=False) as p:
        yield p


@pytest.fixture
async def table(pool: Pool, pooler: Pooler) -> str:
    name = "dc_stale_" + re.sub(r"\W", "_", pooler.label)
    await pool.execute(f"""
        DROP TABLE IF EXISTS {name};
        CREATE TABLE {name} (id serial PRIMARY KEY, v int, note varchar(10) DEFAULT 'n')
    """)
    return name


DDL_CASES = [
    pytest.param("ADD COLUMN extra int DEFAULT 7", "column 'extra' added", id="add-column"),
    pytest.param("DROP COLUMN note", "column 'note' dropped", id="drop-column"),
    # Same binary width: decoded with the old codec, float4 bytes would read as a wrong int.
    pytest.param("ALTER COLUMN v TYPE float4", "column 'v' retyped from int4 to float4",
                 id="retype-int-to-float4"),
    pytest.param("ALTER COLUMN v TYPE text", "column 'v' retyped from int4 to text",
                 id="retype-int-to-text"),
]


@pytest.mark.parametrize(("ddl", "cause"), DDL_CASES)
async def test_result_columns_changed(pool: Pool, table: str, postgres: PostgresServer, *,
                                      ddl: str, cause: str,
                                      caplog: pytest.LogCaptureFixture) -> None:
    """The reply's own description decodes the rows: the right values, no error, run once."""
    insert = f"INSERT INTO {table} (v) VALUES ($1) RETURNING *"
    select = f"SELECT * FROM {table} WHERE v::text = $1"
    async with pool.acquire() as conn:
        first = conn.raw
        for v in (1, 2):  # a miss, then a hit: the description is cached
            await conn.fetchrow(insert, v)
            await conn.fetch(select, str(v))
        assert conn.describe_cache_stats().hits == 2

        await migrate(postgres, f"ALTER TABLE {table} {ddl}")

        with caplog.at_level("INFO", "asyncpool.unnamed"):
            row = await conn.fetchrow(insert, 3)
        assert row is not None
        assert cause in caplog.text
        assert str(row["v"]) in ("3", "3.0")
        if "float4" in cause:
            assert row["v"] == 3.0
            assert isinstance(row["v"], float)
        if "extra" in cause:
            assert row["extra"] == 7
        if "note" in cause:
            assert "note" not in row
        # It ran exactly once.
        assert await conn.fetchval(f"SELECT count(*) FROM {table} WHERE v::text = $1", "3") == 1
        assert len(await conn.fetch(select, "3")) == 1
        stats = conn.describe_cache_stats()
        assert stats.stale == 2  # each statement found changed once, then described anew
        for v in (4, 5):  # the new description is cached: hits again
            await conn.fetchrow(insert, v)
        assert conn.describe_cache_stats().hits == stats.hits + 2
    assert pool.stats().closed_total == 0
    async with pool.acquire() as conn:
        assert conn.raw is first


async def test_changed_inside_a_transaction_is_decoded_and_committed(
    pool: Pool, table: str, postgres: PostgresServer
) -> None:
    insert = f"INSERT INTO {table} (v) VALUES ($1) RETURNING *"
    await pool.fetchrow(insert, 1)
    await pool.fetchrow(insert, 2)
    await migrate(postgres, f"ALTER TABLE {table} ADD COLUMN extra int DEFAULT 9")
    async with pool.transaction() as conn:
        row = await conn.fetchrow(insert, 3)
        assert row is not None
        assert (row["v"], row["extra"]) == (3, 9)
    assert await pool.fetchval(f"SELECT count(*) FROM {table}") == 3
    assert pool.stats().closed_total == 0


async def test_parameter_retyped_is_described_afresh(pool: Pool, table: str,
                                                     postgres: PostgresServer) -> None:
    """The cached parameter types travel with every Parse, so a retyped column makes the server
    refuse the statement (it cannot compare text with int4 bytes): nothing ran, and outside a
    transaction block the call is described afresh and behaves exactly as with "off"."""
    await pool.execute(f"INSERT INTO {table} (v) VALUES (10), (20)")
    select = f"SELECT id FROM {table} WHERE v = $1"
    async with pool.acquire() as conn:
        assert len(await conn.fetch(select, 10)) == 1
        assert len(await conn.fetch(select, 10)) == 1
        await migrate(postgres, f"ALTER TABLE {table} ALTER COLUMN v TYPE text")
        # Described afresh, $1 is text now: the error asyncpg gives without any cache.
        with pytest.raises(asyncpg.DataError):
            await conn.fetch(select, 10)
        assert len(await conn.fetch(select, "10")) == 1
        assert len(await conn.fetch(select, "10")) == 1
        await migrate(postgres, f"ALTER TABLE {table} ALTER COLUMN v TYPE int USING v::int")
        # Inside a transaction block the refusal aborted the transaction: the server's error.
        with pytest.raises(asyncpg.UndefinedFunctionError):
            async with conn.transaction():
                await conn.fetch(select, "10")
        assert len(await conn.fetch(select, 10)) == 1
    assert pool.stats().closed_total == 0


async def test_a_value_the_cached_codec_cannot_encode_is_described_afresh(
    pool: Pool, table: str, postgres: PostgresServer
) -> None:
    """Widened int4 -> int8: a value past int4 fails in the cached encoder before anything is
    sent, so the call is described afresh and stored, as without a cache."""
    insert = f"INSERT INTO {table} (v) VALUES ($1) RETURNING v"
    async with pool.acquire() as conn:
        await conn.fetchval(insert, 1)
        await conn.fetchval(insert, 2)
        await migrate(postgres, f"ALTER TABLE {table} ALTER COLUMN v TYPE int8")
        async with conn.transaction():
            assert await conn.fetchval(insert, 2**40) == 2**40


async def test_parameter_widened_is_cast_not_misread(pool: Pool, table: str,
                                                     postgres: PostgresServer) -> None:
    """int4 bytes sent for a column now numeric are cast by the server, as if the caller had
    written the literal: the stored value is right."""
    insert = f"INSERT INTO {table} (v) VALUES ($1)"
    async with pool.acquire() as conn:
        await conn.execute(insert, 1)
        await conn.execute(insert, 2)
        await migrate(postgres, f"ALTER TABLE {table} ALTER COLUMN v TYPE numeric(10, 2)")
        await conn.execute(insert, 7)
        assert conn.describe_cache_stats().stale == 0
        stored = await conn.fetchval(f"SELECT v FROM {table} ORDER BY id DESC LIMIT 1")
        assert stored == decimal.Decimal("7.00")


async def test_an_argument_the_cached_type_would_cut_is_described_afresh(
        pool: Pool, table: str, postgres: PostgresServer) -> None:
    """int4 -> numeric(10, 2): the cached int4 codec would turn Decimal("9.99") into 9 (the
    server then casts 9 to 9.00). An argument of a kind the cached type does not hold is
    described afresh instead, so it is stored, and compared in a WHERE, whole; so are
    executemany's rows. Integers keep the one round trip."""
    insert = f"INSERT INTO {table} (v) VALUES ($1)"
    select = f"SELECT count(*) FROM {table} WHERE v = $1"
    async with pool.acquire() as conn:
        for _ in range(2):
            await conn.execute(insert, 1)
            await conn.fetchval(select, 1)
        await conn.executemany(insert, [(1,), (2,)])
        await conn.executemany(insert, [(1,), (2,)])
        await migrate(postgres, f"ALTER TABLE {table} ALTER COLUMN v TYPE numeric(10, 2)")
        await conn.execute(insert, decimal.Decimal("9.99"))
        await conn.executemany(insert, [(decimal.Decimal("4.5"),), (2.25,)])
        assert await conn.fetchval(select, decimal.Decimal("9.99")) == 1
        assert await conn.fetchval(select, 4.5) == 1
        stored = [r["v"] for r in await conn.fetch(f"SELECT v FROM {table} WHERE v <> trunc(v)")]
        assert sorted(stored) == [decimal.Decimal("2.25"), decimal.Decimal("4.50"),
                                  decimal.Decimal("9.99")]
        # Described afresh, the statements now hold numeric: an integer is a hit again.
        hits = conn.describe_cache_stats().hits
        await conn.execute(insert, 3)
        assert conn.describe_cache_stats().hits == hits + 1


async def test_a_datetime_the_cached_type_would_cut_is_described_afresh(
        pool: Pool, postgres: PostgresServer, pooler: Pooler) -> None:
    """date -> timestamp: the cached date codec would drop a datetime's time (asyncpg's date
    codec takes a datetime and keeps its date); the call is described afresh instead. (The
    cached timestamp codec refuses an aware datetime by itself: described afresh too.)"""
    import datetime as dt

    table = "dc_times_" + re.sub(r"\W", "_", pooler.label)
    await pool.execute(f"DROP TABLE IF EXISTS {table}; CREATE TABLE {table} (d date, t timestamp)")
    day = f"INSERT INTO {table} (d) VALUES ($1)"
    moment = f"INSERT INTO {table} (t) VALUES ($1)"
    async with pool.acquire() as conn:
        for _ in range(2):
            await conn.execute(day, dt.date(2024, 6, 1))
            await conn.execute(moment, dt.datetime(2024, 6, 1, 12))
        await migrate(postgres, f"ALTER TABLE {table} ALTER COLUMN d TYPE timestamp, "
                                "ALTER COLUMN t TYPE timestamptz")
        aware = dt.datetime(2024, 6, 1, 12, tzinfo=dt.timezone(dt.timedelta(hours=-4)))
        await conn.execute(day, dt.datetime(2024, 6, 2, 13, 30))
        await conn.execute(moment, aware)
        assert await conn.fetchval(f"SELECT max(d) FROM {table}") == dt.datetime(2024, 6, 2, 13, 30)
        assert await conn.fetchval(f"SELECT max(t) FROM {table}") == aware
    await pool.execute(f"DROP TABLE {table}")


async def test_a_statement_timed_out_at_parse_is_not_run_again(postgres: PostgresServer) -> None:
    """A migration's lock holds a cached statement's Parse until lock_timeout: the server's
    timeout is the caller's error, once; it is not taken for a refusal of the cached
    description and run again (which waited the whole time a second time). Direct: the
    setting holds at login there."""
    table = "dc_locked"
    async with Pool(postgres.dsn(), prepared_statements="unnamed", max_size=1, telemetry=False,
                    server_settings={"lock_timeout": "300"}) as pool:
        await pool.execute(f"DROP TABLE IF EXISTS {table}; CREATE TABLE {table} (v int)")
        select = f"SELECT v FROM {table} WHERE v = $1"
        async with pool.acquire() as conn:
            await conn.fetch(select, 1)
            await conn.fetch(select, 1)
            migration = await asyncpg.connect(postgres.dsn())
            try:
                async with migration.transaction():
                    await migration.execute(f"LOCK TABLE {table} IN ACCESS EXCLUSIVE MODE")
                    started = asyncio.get_running_loop().time()
                    with pytest.raises(asyncpg.LockNotAvailableError):
                        await conn.fetch(select, 1)
                    waited = asyncio.get_running_loop().time() - started
            finally:
                await migration.close()
            assert waited < 0.55, f"waited {waited:.2f} s: the lock timeout ran out twice"
            assert await conn.fetch(select, 1) == []
        await pool.execute(f"DROP TABLE {table}")


async def test_dropped_table(pool: Pool, table: str, postgres: PostgresServer) -> None:
    select = f"SELECT v FROM {table} WHERE id = $1"
    await pool.fetch(select, 1)
    await pool.fetch(select, 1)
    await migrate(postgres, f"DROP TABLE {table}")
    with pytest.raises(asyncpg.UndefinedTableError):  # the plain error, as without a cache
        await pool.fetch(select, 1)


async def test_changes_that_do_not_affect_decoding_are_not_errors(
    pool: Pool, table: str, postgres: PostgresServer
) -> None:
    """A wider varchar or a rebuilt table with the same columns decodes the same: no error."""
    select = f"SELECT id, v, note FROM {table} WHERE id > $1 ORDER BY id"
    await pool.execute(f"INSERT INTO {table} (v) VALUES (1)")
    assert len(await pool.fetch(select, 0)) == 1
    assert len(await pool.fetch(select, 0)) == 1
    await migrate(postgres, f"ALTER TABLE {table} ALTER COLUMN note TYPE varchar(20)")
    assert [tuple(r) for r in await pool.fetch(select, 0)] == [(1, 1, "n")]
    await migrate(postgres, f"""
        DROP TABLE {table};
        CREATE TABLE {table} (id serial PRIMARY KEY, v int, note varchar(10) DEFAULT 'm');
        INSERT INTO {table} (v) VALUES (2);
    """)
    assert [tuple(r) for r in await pool.fetch(select, 0)] == [(1, 2, "m")]
    async with pool.acquire() as conn:
        assert conn.describe_cache_stats().stale == 0
    assert pool.stats().closed_total == 0


async def test_composite_type_changed(pool: Pool, pooler: Pooler, postgres: PostgresServer) -> None:
    """The column keeps its type OID but the composite gains a field: asyncpg's own check
    catches it, as without the cache, and the next call decodes the new shape."""
    suffix = re.sub(r"\W", "_", pooler.label)
    pair, table = f"dc_stale_pair_{suffix}", f"dc_stale_pairs_{suffix}"
    await pool.execute(f"""
        DROP TABLE IF EXISTS {table}; DROP TYPE IF EXISTS {pair};
        CREATE TYPE {pair} AS (a int, b text);
        CREATE TABLE {table} (id int, p {pair});
        INSERT INTO {table} VALUES (1, (1, 'x'));
    """)
    select = f"SELECT p FROM {table} WHERE id = $1"
    async with pool.acquire() as conn:
        assert tuple(await conn.fetchval(select, 1)) == (1, "x")
        assert tuple(await conn.fetchval(select, 1)) == (1, "x")
        await migrate(postgres, f"ALTER TYPE {pair} ADD ATTRIBUTE c int")
        with pytest.raises(asyncpg.OutdatedSchemaCacheError):
            await conn.fetchval(select, 1)
        assert tuple(await conn.fetchval(select, 1)) == (1, "x", None)


async def test_cancelled_at_any_await_of_a_changed_reply(pool: Pool, table: str,
                                                         postgres: PostgresServer) -> None:
    """Each round changes the table (a column of a new enum type: decoding again needs type
    introspection, one more await) and cancels the call after a growing delay, so cancellation
    lands before the reply, while it is held, during introspection or after. The connection
    must stay usable and the next call must return the right row."""
    await pool.execute(f"INSERT INTO {table} (v) VALUES (42)")
    select = f"SELECT * FROM {table} WHERE v = $1"
    cancelled = 0
    async with pool.acquire() as conn:
        for step in range(12):
            assert await conn.fetchval(select, 42, column="v") == 42
            kind = f"{table}_e{step}"
            await migrate(postgres, f"CREATE TYPE {kind} AS ENUM ('a', 'b');"
                                    f"ALTER TABLE {table} ADD COLUMN c{step} {kind} DEFAULT 'b'")
            try:
                await asyncio.wait_for(conn.fetchrow(select, 42), timeout=step * 0.0015)
            except TimeoutError:
                cancelled += 1
            row = await conn.fetchrow(select, 42)
            assert row is not None
            assert row["v"] == 42
            assert row[f"c{step}"] == "b"
    assert cancelled > 0
    async with pool.acquire() as conn:
        assert await conn.fetchval(select, 42, column="c11") == "b"


def test_changes_under_uvloop(pooler: Pooler, postgres: PostgresServer) -> None:
    uvloop = pytest.importorskip("uvloop")

    async def scenario() -> None:
        name = "dc_uv_" + re.sub(r"\W", "_", pooler.label)
        async with Pool(pooler.dsn(), name="uv", min_size=1, max_size=1,
                        telemetry=False) as uv_pool:
            assert "uvloop" in type(asyncio.get_running_loop()).__module__
            await uv_pool.execute(f"DROP TABLE IF EXISTS {name}; CREATE TABLE {name} (v int4);"
                                  f"INSERT INTO {name} VALUES (7)")
            select = f"SELECT * FROM {name} WHERE v = $1"
            for _ in range(2):
                row = await uv_pool.fetchrow(select, 7)
                assert row is not None
                assert row["v"] == 7
            await migrate(postgres, f"ALTER TABLE {name} ALTER COLUMN v TYPE float4")
            row = await uv_pool.fetchrow(select, 7)
            assert row is not None
            assert row["v"] == 7.0
            assert isinstance(row["v"], float)
            assert uv_pool.stats().statement_cache.stale == 1  # type: ignore[union-attr]

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(scenario())


@pytest.mark.parametrize("way", ["acquire", "helper"])
async def test_a_connection_that_asks_to_go_is_retired_at_its_return(pool: Pool, way: str) -> None:
    # What the description cache does after a reply it could not read or decode
    # (`retire_reason`): the pool closes the connection at its return instead of reusing it.
    (record,) = pool._slots.idle
    first = record.conn
    if way == "acquire":
        async with pool.acquire() as conn:
            conn.raw.retire_reason = "told to go by the test"  # type: ignore[attr-defined]
    else:
        first.retire_reason = "told to go by the test"
        assert await pool.fetchval("SELECT 1") == 1
    assert (pool.stats().closed_total, pool.stats().size) == (1, 0)
    assert await pool.fetchval("SELECT 2") == 2
    (record,) = pool._slots.idle
    assert record.conn is not first
    assert pool.stats().created_total == 2
