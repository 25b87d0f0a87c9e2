""""unnamed" beside "off" on the same steps, against PostgreSQL and through both PgBouncers:
cursors after a retype, float4 values, and result columns retyped to types asyncpg reads as text.

Each test runs in both modes; where they differ, the test says how and why.
"""

from __future__ import annotations

import array
import asyncio
import json
import math
import re
import struct
from collections.abc import AsyncIterator, Sequence
from decimal import Decimal
from typing import Any

import asyncpg
import pytest

from asyncpool import Pool, StaleStatementError
from asyncpool.config import PreparedStatements
from asyncpool.testing import PostgresServer
from tests.migrations import migrate
from tests.test_unnamed_prepare import Target, target  # noqa: F401 (a fixture)


async def _jsonb_as_text(conn: Any) -> None:
    # The usual json codec: a text-format codec, so asyncpg asks for jsonb rows in text.
    await conn.set_type_codec("jsonb", encoder=json.dumps, decoder=json.loads,
                              schema="pg_catalog", format="text")


@pytest.fixture(params=["unnamed", "off"])
async def pool(request: pytest.FixtureRequest,
               target: Target) -> AsyncIterator[Pool]:  # noqa: F811 (the fixture imported)
    async with Pool(target.dsn(), name=request.param, prepared_statements=request.param,
                    min_size=1, max_size=1, telemetry=False, init=_jsonb_as_text) as p:
        yield p


@pytest.fixture
async def table(pool: Pool, request: pytest.FixtureRequest) -> str:
    name = "dc_vs_" + re.sub(r"\W", "_", request.node.callspec.id)[:40]
    await pool.execute(f"DROP TABLE IF EXISTS {name}; DROP TYPE IF EXISTS {name}_t;"
                       f"CREATE TABLE {name} (id int, a int, r real)")
    return name


def _float4(value: float) -> float:
    return float(struct.unpack("!f", struct.pack("!f", value))[0])


PI_BITS = struct.unpack("!i", struct.pack("!f", 3.1415927))[0]  # 1078530011


async def _cursor_rows(conn: Any, make: Any) -> list[tuple[Any, ...]]:
    async with conn.transaction():
        rows = [tuple(r) async for r in make()]
        assert [tuple(r) for r in await (await make()).fetch(5)] == rows
    return rows


async def test_cursors_after_a_column_was_retyped(
        pool: Pool, table: str, target: Target,  # noqa: F811 (the fixture imported)
        postgres: PostgresServer) -> None:
    """"unnamed": a cursor describes its (unnamed) statement afresh in its transaction, one
    made from ``prepare()`` too: the right values everywhere. "off" (asyncpg): a cursor of a
    statement prepared before the migration decodes float4 bits as an int4; ``conn.cursor()``
    names its statement, which PgBouncer >= 1.21 maps to the one of that text already prepared
    on its server connection: InvalidCachedStatementError there (when it lands on that one)."""
    select = f"SELECT id, a FROM {table} WHERE id >= $1 ORDER BY id"
    async with pool.acquire() as conn:
        await conn.execute(f"INSERT INTO {table} (id, a) VALUES (1, {PI_BITS})")
        async with conn.transaction():
            assert [tuple(r) async for r in conn.cursor(select, 1)] == [(1, PI_BITS)]
        stmt = await conn.prepare(select)
        assert [tuple(r) for r in await stmt.fetch(1)] == [(1, PI_BITS)]
        await migrate(postgres, f"ALTER TABLE {table} ALTER COLUMN a TYPE float4 "
                                "USING 3.1415927")
        now = [(1, _float4(3.1415927))]
        tracked = bool(getattr(target, "supports_prepared_statements", False))
        try:
            assert await _cursor_rows(conn, lambda: conn.cursor(select, 1)) == now
        except asyncpg.InvalidCachedStatementError:
            assert pool.name == "off"
            assert tracked
        expected = now if pool.name == "unnamed" else [(1, PI_BITS)]  # asyncpg's own
        assert await _cursor_rows(conn, lambda: stmt.cursor(1)) == expected
    assert pool.stats().closed_total == 0


FLOATS = [0.1, 1 / 3, 0.5, math.inf, -math.inf, 1e-45, 3.4e38, 1 + 2**-24]


async def test_float4_values_are_the_same_in_both_modes(pool: Pool, table: str,
                                                        postgres: PostgresServer) -> None:
    """A real column and float4 parameters: what is stored, read and compared is float4's, in
    both modes. After the column is widened to float8, "unnamed" keeps the cached float4
    parameter type, and rounds 0.1 to 0.10000000149011612 as asyncpg's own statement cache does
    (documented: refusing floats would make every float4 call two round trips), until
    ``invalidate_statement_cache()``; "off" describes every call and stores 0.1."""
    insert = f"INSERT INTO {table} (id, r) VALUES ($1, $2)"
    count = f"SELECT count(*) FROM {table} WHERE r = $1"
    async with pool.acquire() as conn:
        for i, value in enumerate([*FLOATS, math.nan]):
            await conn.execute(insert, i, value)  # a miss, then hits
        rows = await conn.fetch(f"SELECT r FROM {table} WHERE id < $1 ORDER BY id", len(FLOATS))
        assert [r["r"] for r in rows] == [_float4(v) for v in FLOATS]
        assert math.isnan(await conn.fetchval(f"SELECT r FROM {table} WHERE id = $1",
                                              len(FLOATS)))
        assert [await conn.fetchval(count, v) for v in (0.1, 0.1, 1 / 3, math.nan)] == [1, 1, 1, 1]
        for _ in range(2):
            got = await conn.fetchval("SELECT $1::float4[]", [0.1, math.nan, 2.0])
            assert got[0] == _float4(0.1)
            assert math.isnan(got[1])
            assert got[2] == 2.0
        await migrate(postgres, f"ALTER TABLE {table} ALTER COLUMN r TYPE float8")
        await conn.execute(insert, 100, 0.1)
        stored = await conn.fetchval(f"SELECT r FROM {table} WHERE id = $1", 100)
        assert stored == (_float4(0.1) if pool.name == "unnamed" else 0.1)
        pool.invalidate_statement_cache()
        await conn.execute(insert, 101, 0.1)
        await conn.execute(insert, 102, 2**24 + 1)
        assert await conn.fetchval(f"SELECT r FROM {table} WHERE id = $1", 101) == 0.1
        assert await conn.fetchval(f"SELECT r FROM {table} WHERE id = $1", 102) == 2**24 + 1
        matched = await conn.fetch(f"SELECT id FROM {table} WHERE r = $1 ORDER BY id", 0.1)
        assert matched == ([(101,)] if pool.name == "unnamed" else [(100,), (101,)])
        assert await conn.fetchval(count, 0.5) == 1


async def _row(conn: Any, query: str, *args: Any) -> tuple[Any, ...]:
    row = await conn.fetchrow(query, *args)
    assert row is not None
    return tuple(row)


async def test_array_elements_are_checked_as_scalars_are(pool: Pool, table: str,
                                                          postgres: PostgresServer) -> None:
    """``float4[]`` and ``int4[]`` columns widened to ``numeric[]``: a Decimal element (or an
    integer past 2**53 for float4) is one the cached element codec would round, so "unnamed"
    describes the call afresh, as for a scalar, and stores what "off" stores. A float element
    keeps float4 precision before the migration in both modes (documented, as for scalars)."""
    insert = f"INSERT INTO {table} (id, fa, ia) VALUES ($1, $2, $3)"
    read = f"SELECT fa, ia FROM {table} WHERE id = $1"
    await pool.execute(f"ALTER TABLE {table} ADD COLUMN fa float4[], ADD COLUMN ia int4[]")
    async with pool.acquire() as conn:
        for i in range(2):
            await conn.execute(insert, i, [0.1, None], [[1], [2]])  # a miss, then a hit
        assert await _row(conn, read, 1) == ([_float4(0.1), None], [[1], [2]])
        await migrate(postgres, f"ALTER TABLE {table} ALTER COLUMN fa TYPE numeric[], "
                                "ALTER COLUMN ia TYPE numeric[]")
        await conn.execute(insert, 10, [Decimal("0.1"), 2**53 + 1], [[Decimal("9.99")], [3]])
        await conn.execute(insert, 11, (Decimal("0.25"),), [Decimal("1.5")])
        assert await _row(conn, read, 10) == (
            [Decimal("0.1"), Decimal(2**53 + 1)], [[Decimal("9.99")], [Decimal(3)]])
        assert await _row(conn, read, 11) == ([Decimal("0.25")], [Decimal("1.5")])



class _Values(Sequence[Any]):
    """A sequence of the caller's own: asyncpg's array codec takes any sized iterable."""

    def __init__(self, *items: Any) -> None:
        self._items = list(items)

    def __len__(self) -> int:
        return len(self._items)

    def __getitem__(self, index: Any) -> Any:
        return self._items[index]


async def test_arrays_other_than_lists_are_checked_too(pool: Pool, table: str,
                                                       postgres: PostgresServer) -> None:
    """As above with an ``array.array`` and a sequence of the caller's own, which asyncpg
    encodes as arrays like lists: after ``int4[]`` became ``numeric[]``, "unnamed" stored
    ``array.array("d", [1.5])`` as ``{1}`` (the cached int4 codec truncates) where "off"
    stores ``{1.5}``; now both store what was given."""
    insert = f"INSERT INTO {table} (id, ia) VALUES ($1, $2)"
    read = f"SELECT ia FROM {table} WHERE id = $1"
    await pool.execute(f"ALTER TABLE {table} ADD COLUMN ia int4[]")
    async with pool.acquire() as conn:
        for i in range(2):
            await conn.execute(insert, i, array.array("i", [1, 2]))  # a miss, then a hit
        assert await conn.fetchval(read, 1) == [1, 2]
        await migrate(postgres, f"ALTER TABLE {table} ALTER COLUMN ia TYPE numeric[]")
        await conn.execute(insert, 10, array.array("d", [1.5, 2.0]))
        await conn.execute(insert, 11, _Values(Decimal("9.99"), None))
        assert await conn.fetchval(read, 10) == [Decimal("1.5"), Decimal("2.0")]
        assert await conn.fetchval(read, 11) == [Decimal("9.99"), None]

async def _locks_on(postgres: PostgresServer, table: str) -> list[str]:
    """The locks other sessions hold on `table`, seen from a direct connection."""
    conn = await asyncpg.connect(postgres.dsn())
    try:
        rows = await conn.fetch("SELECT mode FROM pg_locks WHERE relation = $1::regclass "
                                "AND pid <> pg_backend_pid()", table)
    finally:
        await conn.close()
    return [r["mode"] for r in rows]


async def test_an_argument_the_codec_refuses_leaves_no_lock(pool: Pool, table: str,
                                                            postgres: PostgresServer) -> None:
    """asyncpg describes the statement (Parse, Describe, Flush), then its codec refuses the
    argument before anything else is sent: no Sync follows, so the Parse's lock on the table
    stays (and a pooler's server connection stays assigned) until the next statement. "unnamed"
    sends the Sync, described afresh (a miss) and from the cache (a hit) alike; "off" is
    asyncpg's own path and keeps the lock until the connection's next statement."""
    select = f"SELECT a FROM {table} WHERE id = $1"
    expected = [] if pool.name == "unnamed" else ["AccessShareLock"]
    async with pool.acquire() as conn:
        for _ in range(2):
            with pytest.raises(asyncpg.DataError):
                await conn.fetchval(select, "not an int")
            assert await _locks_on(postgres, table) == expected
            assert await conn.fetchval(select, 1) is None  # the connection is sound
            assert await _locks_on(postgres, table) == []
        stmt = await conn.prepare(select)  # a prepared statement's execution alike
        with pytest.raises(asyncpg.DataError):
            await stmt.fetchval("not an int")
        assert await _locks_on(postgres, table) == expected
        assert await stmt.fetchval(1) is None
        # A new statement straight after the error: "unnamed" waits for its Sync's reply first
        # (PgBouncer 1.18 lost the reply to a describe written before that reply came back).
        async with asyncio.timeout(20):
            for i in range(200):  # (fire-and-forget Syncs: a hang within 200 here)
                with pytest.raises(asyncpg.DataError):
                    await conn.fetchval(select, "not an int")
                assert await conn.fetchval(f"SELECT $1::int * {i}", 2) == 2 * i
        async with conn.transaction():  # inside a block the lock is the transaction's
            with pytest.raises(asyncpg.DataError):
                await conn.fetchval(select, "not an int")
            assert await _locks_on(postgres, table) == ["AccessShareLock"]
            assert await conn.fetchval(select, 1) is None
        assert await _locks_on(postgres, table) == []
    assert pool.stats().closed_total == 0


# One implicit transaction (a simple query): the lock keeps parallel workers' CREATE EXTENSION
# from colliding.
_EXTENSION = "SELECT pg_advisory_xact_lock(7311); CREATE EXTENSION IF NOT EXISTS {}"

RETYPES = [
    pytest.param("CREATE TYPE {t}_t AS ENUM ('1', '2')", "{t}_t USING a::text::{t}_t", "1",
                 id="enum"),
    pytest.param("SELECT", "jsonb USING to_jsonb(a)", 1, id="jsonb-text-codec"),
    pytest.param("SELECT", "xml USING xmlparse(content a::text)", "1", id="xml"),
    # Types asyncpg has no binary codec for: it reads them as text.
    pytest.param("SELECT", "money USING a::numeric::money", "$1.00", id="money"),
    pytest.param("SELECT", "tsvector USING a::text::tsvector", "'1'", id="tsvector"),
    pytest.param(_EXTENSION.format("citext"), "citext USING a::text", "1",
                 id="citext"),
    pytest.param(_EXTENSION.format("hstore"),
                 "hstore USING hstore('k', a::text)", '"k"=>"1"', id="hstore"),
]


@pytest.mark.parametrize(("before", "retype", "value"), RETYPES)
async def test_a_result_column_retyped_to_a_type_read_as_text(
        pool: Pool, table: str, postgres: PostgresServer, *,
        before: str, retype: str, value: Any) -> None:
    """"off" describes each call afresh and returns the value. "unnamed" learns of the retype
    from rows the server already sent in binary (the old statement asked for it): a type whose
    binary form is its text (json, text; jsonb after a version byte) is decoded as it is;
    money, tsvector, citext, hstore (types asyncpg reads only as text) are turned into text by
    the server, and decoded: the same value, no error, the connection kept."""
    select = f"SELECT a FROM {table} WHERE id = $1"
    await pool.execute(f"INSERT INTO {table} (id, a) VALUES (1, 1)")
    async with pool.acquire() as conn:
        assert await conn.fetchval(select, 1) == 1
        assert await conn.fetchval(select, 1) == 1
        await migrate(postgres, before.format(t=table) + "; ALTER TABLE "
                      f"{table} ALTER COLUMN a TYPE {retype.format(t=table)}")
        assert await conn.fetchval(select, 1) == value
        assert await conn.fetchval(select, 1) == value
    assert await pool.fetchval(select, 1) == value
    assert pool.stats().closed_total == 0


async def test_values_the_server_turns_among_others(pool: Pool, table: str,
                                                    postgres: PostgresServer) -> None:
    """Several rows, repeated values and NULLs, a column asyncpg reads as text beside binary
    ones, in a transaction block; then the other way: a column asyncpg read as text (the old
    Bind asked for text) retyped to one it reads in binary."""
    select = f"SELECT id, a, r FROM {table} WHERE id > $1 ORDER BY id"
    await pool.execute(f"INSERT INTO {table} VALUES (1, 1, 0.5), (2, NULL, 1), (3, 1, NULL), "
                       "(4, 30, 2)")
    async with pool.acquire() as conn:
        for _ in range(2):
            await conn.fetch(select, 0)
        await migrate(postgres, f"ALTER TABLE {table} ALTER COLUMN a TYPE money "
                                "USING a::numeric::money, ALTER COLUMN r TYPE tsvector "
                                "USING r::text::tsvector")
        async with conn.transaction():
            rows = await conn.fetch(select, 0)
            assert [tuple(r) for r in rows] == [(1, "$1.00", "'0.5'"), (2, None, "'1'"),
                                                (3, "$1.00", None), (4, "$30.00", "'2'")]
        assert [tuple(r) for r in await conn.fetch(select, 0)] == [tuple(r) for r in rows]
        await migrate(postgres, f"ALTER TABLE {table} ALTER COLUMN a TYPE int "
                                "USING a::numeric::int")
        assert [r["a"] for r in await conn.fetch(select, 0)] == [1, None, 1, 30]
    assert pool.stats().closed_total == 0


async def test_a_text_codec_column_among_others_is_decoded(pool: Pool, table: str,
                                                           postgres: PostgresServer) -> None:
    """Several columns, NULLs and rows: only the jsonb values are turned into text."""
    select = f"SELECT id, a, r FROM {table} WHERE id > $1 ORDER BY id"
    await pool.execute(f"INSERT INTO {table} VALUES (1, 1, 0.5), (2, NULL, 1), (3, 30, NULL)")
    async with pool.acquire() as conn:
        for _ in range(2):
            await conn.fetch(select, 0)
        await migrate(postgres, f"ALTER TABLE {table} ALTER COLUMN a TYPE jsonb "
                                "USING jsonb_build_object('k', a), ALTER COLUMN r TYPE text")
        rows = await conn.fetch(select, 0)
    assert [tuple(r) for r in rows] == [(1, {"k": 1}, "0.5"), (2, {"k": None}, "1"),
                                        (3, {"k": 30}, None)]


# A migration that lands while asyncpg looks up a type it has not seen (the enum's): between the
# statement's describe and its run, on asyncpg's own path.
SHAPE_CHANGES = {
    "widened": ("d4", "ALTER TABLE {t} ALTER COLUMN d TYPE {t}_d8", (1, "a", 5)),
    "narrowed": ("d8", "ALTER TABLE {t} ALTER COLUMN d TYPE {t}_d4", (1, "a", 5)),
    "column added": ("d4", "ALTER TABLE {t} ADD COLUMN extra int DEFAULT 7", (1, "a", 5, 7)),
}


@pytest.mark.parametrize("via", ["pool.fetchrow", "conn.fetchrow"])
@pytest.mark.parametrize("change", list(SHAPE_CHANGES))
@pytest.mark.parametrize("mode", ["unnamed", "off"])
async def test_a_migration_between_describe_and_run(
        target: Target, postgres: PostgresServer,  # noqa: F811 (the fixture imported)
        mode: PreparedStatements, change: str, via: str) -> None:
    """"unnamed" checks the reply against the description and returns the new columns. "off"
    (asyncpg's own path) decodes the rows with the description from before the migration; when
    they do not fit, asyncpg's BufferError, AssertionError or ProtocolError becomes the pool's
    StaleStatementError, which names the cause and the fix, with asyncpg's error as its cause;
    the connection stays in step and the next call gets the new columns."""
    t = f"mig_{mode}_{list(SHAPE_CHANGES).index(change)}_{via[0]}_{target.port}"
    domain, ddl, expected = SHAPE_CHANGES[change]
    await migrate(postgres, f"""
        DROP TABLE IF EXISTS {t}; DROP TYPE IF EXISTS {t}_e; DROP DOMAIN IF EXISTS {t}_d4;
        DROP DOMAIN IF EXISTS {t}_d8; CREATE TYPE {t}_e AS ENUM ('a');
        CREATE DOMAIN {t}_d4 AS int4; CREATE DOMAIN {t}_d8 AS int8;
        CREATE TABLE {t} (id int, m {t}_e, d {t}_{domain}); INSERT INTO {t} VALUES (1, 'a', 5)
    """)
    migrations: list[str] = [ddl.format(t=t)]

    class MigratedWhileLookingUp(asyncpg.Connection):
        async def _introspect_types(self, *args: Any, **kwargs: Any) -> Any:
            found = await super()._introspect_types(*args, **kwargs)  # type: ignore[misc]
            if migrations:
                await migrate(postgres, migrations.pop())
            return found

    select = f"SELECT * FROM {t}"
    async with Pool(target.dsn(), name=mode, prepared_statements=mode, min_size=1, max_size=1,
                    connection_class=MigratedWhileLookingUp, telemetry=False) as pool:

        async def fetchrow() -> Any:
            if via == "pool.fetchrow":
                return await pool.fetchrow(select)
            async with pool.acquire() as conn:
                return await conn.fetchrow(select)

        if mode == "off":
            with pytest.raises(StaleStatementError, match="could not be decoded") as raised:
                await fetchrow()
            assert raised.value.may_have_run
            assert raised.value.query == select
            assert isinstance(raised.value.__cause__, BufferError | AssertionError
                              | asyncpg.ProtocolError)
        row = await fetchrow()  # ("unnamed": the call that met the migration)
        assert row is not None
        assert tuple(row) == expected
        assert not migrations, "the migration did not run between describe and run"
        assert pool.stats().closed_total == 0
    await migrate(postgres, f"DROP TABLE {t}; DROP TYPE {t}_e; DROP DOMAIN {t}_d4; "
                            f"DROP DOMAIN {t}_d8")
