"""The public API of the pool, through both PgBouncers."""

from __future__ import annotations

import asyncio
import inspect
import io
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from types import MethodType
from typing import Any, ClassVar
from unittest import mock
from urllib.parse import quote

import asyncpg
import pytest

import asyncpool
from asyncpool import Pool, PoolConfig
from asyncpool.config import PreparedStatements
from asyncpool.testing import PostgresServer
from asyncpool.testing.pki import TestPki
from tests.conftest import Pooler


@pytest.fixture
async def pool(pooler: Pooler) -> AsyncIterator[Pool]:
    async with Pool(pooler.dsn(), name=f"api-{pooler.label}", max_size=4, telemetry=False) as p:
        yield p


async def test_create_pool_returns_an_open_pool(pooler: Pooler) -> None:
    pool = await asyncpool.create_pool(pooler.dsn(), name="created", min_size=2, telemetry=False)
    try:
        stats = pool.stats()
        assert (stats.name, stats.size, stats.idle, stats.in_use) == ("created", 2, 2, 0)
        assert await pool.fetchval("SELECT $1::int + 1", 41) == 42
    finally:
        await pool.close()
    assert pool.closed
    with pytest.raises(asyncpool.PoolClosedError, match="'created' is closed"):
        await pool.fetchval("SELECT 1")


async def test_open_then_use(pooler: Pooler) -> None:
    pool = Pool(pooler.dsn(), telemetry=False)
    with pytest.raises(asyncpool.PoolClosedError, match="not open yet"):
        await pool.fetchval("SELECT 1")
    await pool.open()
    try:
        assert await pool.fetchval("SELECT 2") == 2
    finally:
        await pool.close()


async def test_query_helpers(pool: Pool) -> None:
    rows = await pool.fetch("SELECT g FROM generate_series(1, $1::int) g", 3)
    assert [r["g"] for r in rows] == [1, 2, 3]
    row = await pool.fetchrow("SELECT $1::text AS a, $2::int AS b", "x", 7)
    assert row is not None
    assert (row["a"], row["b"]) == ("x", 7)
    assert await pool.fetchval("SELECT NULL::int") is None
    assert await pool.execute("SELECT 1") == "SELECT 1"


READS = [
    ("SELECT g, -g AS n FROM generate_series(1, $1::int) g", (3,)),
    ("SELECT g, -g AS n FROM generate_series(1, $1::int) g", (1,)),
    ("SELECT g, -g AS n FROM generate_series(1, $1::int) g", (0,)),
    ("SELECT NULL::int AS g", ()),
]


@pytest.mark.parametrize(("query", "args"), READS)
async def test_query_helpers_return_what_the_connection_returns(
        pool: Pool, query: str, args: tuple[Any, ...]) -> None:
    """The helpers run asyncpg's fetch, fetchrow and fetchval bodies themselves
    (`driver.own_body`) unless given keyword arguments: both ways give what the connection
    gives, for no row, one row and several."""
    async with pool.acquire() as conn:
        # The proxy runs the same bodies itself (`connection._statement`): as asyncpg's own.
        raw = conn.raw
        expected = (await raw.fetch(query, *args), await raw.fetchrow(query, *args),
                    await raw.fetchval(query, *args), await raw.fetchval(query, *args, column=-1),
                    await raw.fetchrow(query, *args, record_class=Row))
        assert (await conn.fetch(query, *args), await conn.fetchrow(query, *args),
                await conn.fetchval(query, *args), await conn.fetchval(query, *args, column=-1),
                await conn.fetchrow(query, *args, record_class=Row)) == expected
        if not args:  # by name, as asyncpg's methods allow
            assert await conn.fetchval(query=query) == expected[2]
        with pytest.raises(asyncpg.PostgresSyntaxError):
            await conn.fetchval("SELEC 1")
    assert (await pool.fetch(query, *args), await pool.fetchrow(query, *args),
            await pool.fetchval(query, *args), await pool.fetchval(query, *args, column=-1),
            await pool.fetchrow(query, *args, record_class=Row)) == expected
    assert type(await pool.fetch(query, *args)) is list
    assert type(await pool.fetchrow(query, *args, record_class=Row)) is (
        Row if expected[1] is not None else type(None))
    with pytest.raises(asyncpg.PostgresSyntaxError):
        await pool.fetchval("SELEC 1")
    with pytest.raises(asyncpg.DataError):
        await pool.fetchrow("SELECT $1::int", "not a number")
    assert pool.stats().in_use == 0


async def test_execute_returns_what_the_connection_returns(pool: Pool) -> None:
    """``execute`` with arguments runs asyncpg's body itself (`driver.own_body`), on the pool and
    on a held connection: the same status as the connection's own, and its errors."""
    statements = [
        ("CREATE TEMP TABLE IF NOT EXISTS own_execute (n int)", ()),
        ("INSERT INTO own_execute SELECT g FROM generate_series(1, $1::int) g", (3,)),
        ("UPDATE own_execute SET n = n + $1::int WHERE n > $2::int", (10, 1)),
        ("DELETE FROM own_execute WHERE n = $1::int", (99,)),
        ("SELECT $1::int", (1,)),
    ]
    # In a transaction: one server connection through the poolers too.
    async with pool.acquire() as conn, conn.transaction():
        raw = conn.raw
        savepoint = raw.transaction()
        await savepoint.start()
        expected = [await raw.execute(query, *args) for query, args in statements]
        await savepoint.rollback()  # the same statements again below, the same statuses
        assert expected[1:] == ["INSERT 0 3", "UPDATE 2", "DELETE 0", "SELECT 1"]
        assert [await conn.execute(query, *args) for query, args in statements] == expected
        assert await conn.execute("SELECT $1::int", 2, timeout=5) == "SELECT 1"  # called
        with pytest.raises(asyncpg.DataError):
            await conn.execute("SELECT $1::int", "not a number")
    assert await pool.execute("SELECT $1::int", 1) == "SELECT 1"
    assert await pool.execute("SELECT 1") == "SELECT 1"  # no arguments: asyncpg's own, called
    with pytest.raises(asyncpg.DataError):
        await pool.execute("SELECT $1::int", "not a number")
    assert pool.stats().in_use == 0


class Row(asyncpg.Record):
    pass


class CountingConnection(asyncpg.Connection):
    calls: ClassVar[list[str]] = []

    async def fetchval(self, query: str, *args: Any, column: int = 0,
                       timeout: float | None = None) -> Any:
        self.calls.append(query)
        return await super().fetchval(query, *args, column=column, timeout=timeout)

    async def execute(self, query: str, *args: Any, timeout: float | None = None) -> str:
        self.calls.append(query)
        status: str = await super().execute(query, *args, timeout=timeout)
        return status


async def test_a_connection_class_that_overrides_a_read_is_called(pooler: Pooler) -> None:
    """A ``connection_class`` whose fetchval or execute differs from asyncpg's is what the pool's
    helpers and the proxy run."""
    CountingConnection.calls = []
    async with Pool(pooler.dsn(), max_size=1, telemetry=False,
                    connect_kwargs={"connection_class": CountingConnection}) as pool:
        assert await pool.fetchval("SELECT 1 + $1::int", 1) == 2
        assert await pool.fetch("SELECT 3 AS x") == [(3,)]  # asyncpg's own: not counted
        assert await pool.execute("SELECT 7 + $1::int", 1) == "SELECT 1"
        async with pool.acquire() as conn:  # the proxy's reads and execute too
            assert await conn.fetchval("SELECT 4 + $1::int", 1) == 5
            assert await conn.fetchrow("SELECT 6 AS x") == (6,)
            assert await conn.execute("SELECT 8 + $1::int", 1) == "SELECT 1"
    assert CountingConnection.calls == ["SELECT 1 + $1::int", "SELECT 7 + $1::int",
                                        "SELECT 4 + $1::int", "SELECT 8 + $1::int"]


LATE_CALLS: dict[str, Callable[[Any], Any]] = {
    "fetchval": lambda conn: conn.fetchval("SELECT 1"),
    "fetchval with a keyword": lambda conn: conn.fetchval("SELECT 1", timeout=5),
    "fetch": lambda conn: conn.fetch("SELECT 1"),
    "execute": lambda conn: conn.execute("SELECT 1"),
    "execute with arguments": lambda conn: conn.execute("SELECT $1::int", 1),
    "executemany": lambda conn: conn.executemany("SELECT $1::int", [(1,), (2,)]),
    "fetchmany": lambda conn: conn.fetchmany("SELECT $1::int", [(1,)]),
    "prepare": lambda conn: conn.prepare("SELECT 1"),
    "copy_from_query": lambda conn: conn.copy_from_query("SELECT 1", output=io.BytesIO()),
    "reload_schema_state": lambda conn: conn.reload_schema_state(),  # through __getattr__
}


@pytest.mark.parametrize("call", LATE_CALLS.values(), ids=LATE_CALLS.keys())
async def test_any_statement_made_before_release_and_awaited_after_is_refused(
        pooler: Pooler, call: Callable[[Any], Any]) -> None:
    """``coro = conn.fetchval(...)`` (or any coroutine method of the proxy) made inside the
    block and awaited after it: refused, nothing is sent on the connection (another holder may
    have it by then)."""
    async with Pool(pooler.dsn(), max_size=1, telemetry=False) as pool:
        async with pool.acquire() as conn:
            raw = conn.raw
            late = call(conn)
        queries: list[str] = []

        def log(record: Any) -> None:
            queries.append(record.query)

        raw.add_query_logger(log)
        with pytest.raises(asyncpool.PoolError, match="released back to the pool"):
            await late
        raw.remove_query_logger(log)
        assert queries == []
        assert await pool.fetchval("SELECT 2") == 2


async def test_a_connection_lost_as_it_is_handed_to_a_helper_is_reported_as_lost(
        pooler: Pooler) -> None:
    """A helper that waited in line gets a connection terminated after it was handed over and
    before the helper's task ran: ConnectionLostError from asyncpg's own "connection is closed"
    (what a call on the connection gives), and the pool replaces the connection."""
    async with Pool(pooler.dsn(), max_size=1, telemetry=False) as pool:
        async with pool.acquire() as conn:
            raw = conn.raw
            waiter = asyncio.create_task(pool.fetchval("SELECT 1"))
            await asyncio.sleep(0.05)
            assert pool.stats().waiting == 1
        # Handed over at the block's exit; the waiter's task has not run since.
        assert pool.stats().in_use == 1
        raw.terminate()
        with pytest.raises(asyncpool.ConnectionLostError, match="lost while in use") as caught:
            await waiter
        assert type(caught.value.__cause__) is asyncpg.InterfaceError
        assert str(caught.value.__cause__) == "connection is closed"
        assert pool.stats().closed_total == 1
        assert await pool.fetchval("SELECT 2") == 2


async def test_transaction_commits_and_rolls_back(pool: Pool, pooler: Pooler) -> None:
    table = f"tx_{pooler.label.replace('.', '_').replace('-', '_')}"
    await pool.execute(f"DROP TABLE IF EXISTS {table}")
    await pool.execute(f"CREATE TABLE {table} (id int PRIMARY KEY)")
    async with pool.transaction() as conn:
        await conn.execute(f"INSERT INTO {table} VALUES (1)")
    with pytest.raises(RuntimeError, match="boom"):
        async with pool.transaction() as conn:
            await conn.execute(f"INSERT INTO {table} VALUES (2)")
            raise RuntimeError("boom")
    assert [r["id"] for r in await pool.fetch(f"SELECT id FROM {table} ORDER BY id")] == [1]
    assert pool.stats().in_use == 0
    await pool.execute(f"DROP TABLE {table}")


@pytest.mark.parametrize(("options", "named"), [
    ({"isolation": "serialisable"}, "isolation='serialisable'"),
    ({"isolation": "SERIALIZABLE"}, "isolation='SERIALIZABLE'"),
    ({"readonly": "no"}, "readonly='no'): must be True or False (a string"),
    ({"readonly": "false"}, "readonly='false'"),
    ({"deferrable": b"yes"}, "deferrable=b'yes'): must be True or False"),
])
async def test_transaction_options_asyncpg_would_misread_are_refused_before_a_checkout(
        pool: Pool, options: dict[str, Any], named: str) -> None:
    # asyncpg tests readonly= for truth: "no" would have begun a READ ONLY transaction.
    before = pool.stats()
    with pytest.raises(asyncpool.PoolConfigError) as caught:
        pool.transaction(**options)
    assert named in str(caught.value)
    after = pool.stats()
    assert (after.in_use, after.acquired_total) == (0, before.acquired_total)


async def test_transaction_options_reach_the_server(pool: Pool) -> None:
    async with pool.transaction(isolation="serializable", readonly=True) as conn:
        assert await conn.fetchval("SHOW transaction_read_only") == "on"
        assert await conn.fetchval("SHOW transaction_isolation") == "serializable"
    async with pool.transaction(readonly=False) as conn:
        assert await conn.fetchval("SHOW transaction_read_only") == "off"
    # What asyncpg reads as meant stays accepted, as in asyncpg.
    async with pool.transaction(readonly=1, isolation="") as conn:  # type: ignore[arg-type]
        assert await conn.fetchval("SHOW transaction_read_only") == "on"


async def test_a_transaction_ended_inside_its_block_is_reported(
        pool: Pool, pooler: Pooler, caplog: pytest.LogCaptureFixture) -> None:
    """A ROLLBACK (or COMMIT) sent as a statement ends the block's transaction: what follows
    runs outside it, committed statement by statement. asyncpg's COMMIT at the end then only
    draws the server's warning; the pool says what happened."""
    table = f"ended_{pooler.label.replace('.', '_').replace('-', '_')}"
    await pool.execute(f"DROP TABLE IF EXISTS {table}")
    await pool.execute(f"CREATE TABLE {table} (id int)")
    with caplog.at_level("WARNING", logger="asyncpool.pool"):
        async with pool.transaction() as conn:
            await conn.execute(f"INSERT INTO {table} VALUES (1)")
            await conn.execute("ROLLBACK")
            await conn.execute(f"INSERT INTO {table} VALUES (2)")
        ended = [r for r in caplog.records if "was ended inside it" in r.getMessage()]
        caplog.clear()
        async with pool.transaction() as conn:
            await conn.execute(f"INSERT INTO {table} VALUES (3)")
    assert len(ended) == 1
    assert f"pool {pool.name!r}" in ended[0].getMessage()
    assert not [r for r in caplog.records if "was ended inside it" in r.getMessage()]
    assert [r["id"] for r in await pool.fetch(f"SELECT id FROM {table} ORDER BY id")] == [2, 3]
    assert pool.stats().in_use == 0
    await pool.execute(f"DROP TABLE {table}")


async def test_a_transaction_whose_commit_the_server_rolled_back_raises(
        pool: Pool, pooler: Pooler) -> None:
    """A statement error caught inside the block leaves the transaction failed: the server
    answers the COMMIT with ROLLBACK. The block must not end as if it had committed (asyncpg's
    own commit() drops that answer); the connection goes back clean, and a savepoint (a nested
    ``conn.transaction()``) is the way to go on past an error."""
    table = f"failed_{pooler.label.replace('.', '_').replace('-', '_')}"
    await pool.execute(f"DROP TABLE IF EXISTS {table}")
    await pool.execute(f"CREATE TABLE {table} (id int PRIMARY KEY)")
    with pytest.raises(asyncpool.TransactionRolledBackError,
                       match=f"pool {pool.name!r}: the transaction was rolled back, not committed"):
        async with pool.transaction() as conn:
            await conn.execute(f"INSERT INTO {table} VALUES (1)")
            with pytest.raises(asyncpg.UniqueViolationError):
                await conn.execute(f"INSERT INTO {table} VALUES (1)")
    assert await pool.fetchval(f"SELECT count(*) FROM {table}") == 0
    assert pool.stats().in_use == 0
    async with pool.transaction() as conn:
        await conn.execute(f"INSERT INTO {table} VALUES (1)")
        with pytest.raises(asyncpg.UniqueViolationError):
            async with conn.transaction():
                await conn.execute(f"INSERT INTO {table} VALUES (1)")
        await conn.execute(f"INSERT INTO {table} VALUES (2)")
    assert [r["id"] for r in await pool.fetch(f"SELECT id FROM {table} ORDER BY id")] == [1, 2]
    # Every connection the pool has is clean and usable after both.
    for _ in range(4):
        async with pool.transaction() as conn:
            assert await conn.fetchval("SELECT 1") == 1
    assert pool.stats().in_use == 0
    await pool.execute(f"DROP TABLE {table}")


async def test_executemany(pool: Pool, pooler: Pooler) -> None:
    table = f"many_{pooler.label.replace('.', '_').replace('-', '_')}"
    await pool.execute(f"DROP TABLE IF EXISTS {table}")
    await pool.execute(f"CREATE TABLE {table} (id int, name text)")
    await pool.executemany(f"INSERT INTO {table} VALUES ($1, $2)", [(i, str(i)) for i in range(50)])
    assert await pool.fetchval(f"SELECT count(*) FROM {table}") == 50
    await pool.execute(f"DROP TABLE {table}")


async def test_acquire_await_and_release(pool: Pool) -> None:
    conn = await pool.acquire()
    assert pool.stats().in_use == 1
    assert await conn.fetchval("SELECT 3") == 3
    await pool.release(conn)
    assert pool.stats().in_use == 0
    with pytest.raises(asyncpool.PoolError, match="released back to the pool"):
        await conn.fetchval("SELECT 1")


async def test_released_connection_cannot_be_used(pool: Pool) -> None:
    async with pool.acquire() as conn:
        pass
    with pytest.raises(asyncpool.PoolError, match="released"):
        conn.is_in_transaction()


async def test_a_method_kept_past_release_cannot_touch_the_next_holders_connection(
    pooler: Pooler,
) -> None:
    """``run = conn.fetchval`` kept past release is refused when called, as asyncpg's proxy
    refuses it, while the same server connection is in another holder's transaction: the
    statement does not run in it, and the connection is not terminated under it."""
    async with Pool(pooler.dsn(), max_size=1, telemetry=False) as pool:
        async with pool.acquire() as conn:
            run, kill, codec = conn.fetchval, conn.terminate, conn.set_type_codec
            first = conn.raw
        async with pool.transaction() as other:
            assert other.raw is first  # the same connection, now another holder's
            await other.execute("CREATE TEMP TABLE kept_ref (n int) ON COMMIT DROP")
            with pytest.raises(asyncpool.PoolError, match="released back to the pool"):
                await run("INSERT INTO kept_ref VALUES (1)")
            with pytest.raises(asyncpool.PoolError, match="released back to the pool"):
                kill()
            with pytest.raises(asyncpool.PoolError, match="released back to the pool"):
                await codec("json", encoder=str, decoder=str)
            assert not other.is_closed()
            assert await other.fetchval("SELECT count(*) FROM kept_ref") == 0
        async with pool.acquire() as conn:
            assert conn.fetchval.__name__ == "fetchval"
            assert await conn.fetchval("SELECT 14") == 14


async def test_the_connections_methods_look_like_asyncpgs(pool: Pool) -> None:
    """Checked at each call, and still asyncpg's to inspect, asyncio and mock: signature,
    docstring, coroutine function or not (mock.create_autospec makes AsyncMocks of them)."""
    async with pool.acquire() as conn:
        for name in ("fetchval", "execute", "copy_to_table", "reset", "add_listener",
                     "is_closed", "transaction"):
            method, original = getattr(conn, name), getattr(asyncpg.Connection, name)
            ours, theirs = (inspect.signature(f).parameters.values()
                            for f in (method, original.__get__(conn.raw)))
            assert [(p.name, p.kind, p.default) for p in ours] == [
                (p.name, p.kind, p.default) for p in theirs]
            assert method.__doc__ == original.__doc__
            assert asyncio.iscoroutinefunction(method) == inspect.iscoroutinefunction(original)
        first, again = conn.is_closed, conn.is_closed
        assert isinstance(first, MethodType)
        assert isinstance(again, MethodType)
        assert first.__func__ is again.__func__  # made once per name, not at each access
        assert type(mock.create_autospec(conn).fetchval).__name__ == "AsyncMock"


async def test_listener_callbacks_are_given_the_pooled_connection(
        postgres: PostgresServer) -> None:
    """As asyncpg's pool gives its proxy: a callback that keeps the connection cannot reach
    the next holder's after release. Sync and async callbacks, removal, log listeners (direct
    to PostgreSQL: a transaction pooler does not keep LISTEN)."""
    got: list[tuple[object, str]] = []

    async def on_async(conn: object, pid: int, channel: str, payload: str) -> None:
        got.append((conn, payload))

    def on_sync(conn: object, pid: int, channel: str, payload: str) -> None:
        got.append((conn, "sync " + payload))

    def on_log(conn: object, message: Any) -> None:
        got.append((conn, "log " + message.message))

    async def arrived(count: int) -> None:
        for _ in range(100):
            if len(got) >= count:
                return
            await asyncio.sleep(0.01)

    async with Pool(postgres.dsn(), max_size=1, telemetry=False) as pool:
        async with pool.acquire() as conn:
            await conn.add_listener("relayed", on_async)
            await conn.add_listener("relayed", on_sync)
            conn.add_log_listener(on_log)
            await conn.execute("NOTIFY relayed, 'one'")
            await conn.execute("DO $$ BEGIN RAISE NOTICE 'hello'; END $$")
            await arrived(3)
            assert sorted(text for _, text in got) == ["log hello", "one", "sync one"]
            assert all(holder is conn for holder, _ in got)
            await conn.remove_listener("relayed", on_sync)
            conn.remove_log_listener(on_log)
            got.clear()
            await conn.execute("NOTIFY relayed, 'two'")
            await conn.execute("DO $$ BEGIN RAISE NOTICE 'again'; END $$")
            await arrived(1)
            await asyncio.sleep(0.05)  # what was removed would have arrived by now
            assert [text for _, text in got] == ["two"]
        kept = got[0][0]
        assert isinstance(kept, asyncpool.PooledConnection)
        with pytest.raises(asyncpool.PoolError, match="released back to the pool"):
            await kept.fetchval("SELECT 1")
        async with pool.acquire() as again:  # no callback of the last holder's is left
            got.clear()
            await again.execute("NOTIFY relayed, 'three'")
            await asyncio.sleep(0.05)
            assert got == []


async def test_off_mode_has_no_statement_cache(pool: Pool) -> None:
    async with pool.acquire() as conn:
        assert conn.raw._stmt_cache.get_max_size() == 0  # type: ignore[attr-defined]


async def test_many_distinct_statements_never_hit_a_missing_prepared_statement(pool: Pool) -> None:
    """Through PgBouncer 1.18 named statements would fail with InvalidSQLStatementNameError."""

    async def one(i: int) -> int:
        value: int = await pool.fetchval(f"SELECT $1::int + {i % 17}", i)
        return value

    results = await asyncio.gather(*[one(i) for i in range(300)])
    assert results == [i + i % 17 for i in range(300)]


async def test_on_mode_through_current_pgbouncer_uses_named_statements(current: Pooler) -> None:
    async with Pool(current.dsn(), prepared_statements="on", max_size=4, telemetry=False) as pool:

        async def one(i: int) -> int:
            value: int = await pool.fetchval(f"SELECT $1::int * {i % 5}", i)
            return value

        results = await asyncio.gather(*[one(i) for i in range(300)])
        assert results == [i * (i % 5) for i in range(300)]
        async with pool.acquire() as conn:
            assert conn.raw._stmt_cache.get_max_size() == 100  # type: ignore[attr-defined]
            assert len(conn.raw._stmt_cache) > 0  # type: ignore[attr-defined]


async def test_stats_fields(pool: Pool) -> None:
    stats = pool.stats()
    for field in ("name", "size", "idle", "in_use", "waiting", "min_size", "max_size",
                  "created_total", "closed_total", "timeouts_total", "leaked_total"):
        assert hasattr(stats, field)
    assert stats.max_size == 4


async def test_timeout_error_names_pool_and_sizes(pooler: Pooler) -> None:
    async with Pool(pooler.dsn(), name="tiny", max_size=1, telemetry=False) as pool:
        async with pool.acquire():
            with pytest.raises(asyncpool.PoolTimeoutError) as info:
                async with pool.acquire(timeout=0.2):
                    pass
        message = str(info.value)
        assert "'tiny'" in message
        assert "size=1" in message
        assert "in_use=1" in message
        assert "waiting=" in message
        assert pool.stats().timeouts_total == 1
        assert pool.stats().waiting == 0


async def test_close_waits_for_held_connections(pool: Pool) -> None:
    async def hold() -> int:
        async with pool.acquire() as conn:
            await asyncio.sleep(0.3)
            value: int = await conn.fetchval("SELECT 5")
            return value

    holder = asyncio.create_task(hold())
    await asyncio.sleep(0.05)
    await pool.close(timeout=5)
    assert await holder == 5
    assert pool.stats().size == 0


async def test_close_terminates_after_timeout(pooler: Pooler) -> None:
    pool = await asyncpool.create_pool(pooler.dsn(), name="slowclose", telemetry=False)
    conn = await pool.acquire()
    await pool.close(timeout=0.1)
    assert pool.stats().size == 0
    with pytest.raises(asyncpool.PoolClosedError):
        await conn.fetchval("SELECT 1")


_RUNNING_WHEN_CLOSED = {
    "a block": "block",
    "a held connection, no block": "unscoped",
    "pool.execute()": "helper",
    "pool.transaction()": "transaction",
}


@pytest.mark.parametrize("how", ["close past its timeout", "terminate"])
@pytest.mark.parametrize("holder", list(_RUNNING_WHEN_CLOSED))
async def test_a_statement_the_pool_closes_under_ends_in_pool_closed_error(
        pooler: Pooler, postgres: PostgresServer, holder: str, how: str) -> None:
    """A statement still running when close() runs out of time, or at terminate(), ends in
    PoolClosedError, as documented (it was asyncpg's ConnectionDoesNotExistError), and the pool
    asks the server to cancel it: it does not run on there."""
    name = f"closed-under-{abs(hash((holder, how, pooler.dsn())))}"
    pool = await asyncpool.create_pool(pooler.dsn(), max_size=2, telemetry=False,
                                       server_settings={"application_name": name})
    statement = f"SELECT pg_sleep(30) -- {name}"

    async def hold() -> None:
        kind = _RUNNING_WHEN_CLOSED[holder]
        if kind == "block":
            async with pool.acquire() as conn:
                await conn.execute(statement)
        elif kind == "unscoped":
            conn = await pool.acquire()
            await conn.execute(statement)
        elif kind == "helper":
            await pool.execute(statement)
        else:
            async with pool.transaction() as conn:
                await conn.execute(statement)

    task = asyncio.create_task(hold())
    await asyncio.sleep(0.3)
    if how == "terminate":
        pool.terminate()
    else:
        await pool.close(timeout=0.2)
    with pytest.raises(asyncpool.PoolClosedError, match="closed while"):
        async with asyncio.timeout(5):
            await task
    direct = await asyncpg.connect(postgres.dsn(postgres.superuser, "postgres"))
    try:
        async with asyncio.timeout(3):  # (not the 30 s it would run on)
            while await direct.fetchval(
                    "SELECT count(*) FROM pg_stat_activity WHERE query = $1 AND state = 'active'",
                    statement):
                await asyncio.sleep(0.05)
    finally:
        await direct.close()


def _active_now(dsn: str, statement: str) -> int:
    """Sessions running `statement`, asked from a thread of its own: the caller's loop does not
    run meanwhile, so no task of it can have sent anything."""
    async def count() -> int:
        direct = await asyncpg.connect(dsn)
        try:
            n: int = await direct.fetchval(
                "SELECT count(*) FROM pg_stat_activity WHERE query = $1 AND state = 'active'",
                statement)
            return n
        finally:
            await direct.close()

    with ThreadPoolExecutor(1) as executor:
        return executor.submit(asyncio.run, count()).result(10)


async def _cancelled_before_terminate_returns(pool: Pool, admin_dsn: str, statement: str) -> None:
    """Run `statement` on `pool`, then ``terminate(cancel_within=...)`` as a SIGTERM handler on
    top of the running loop calls it: the statement must be gone from the server before the
    loop turns again (a process that ends next gives it no turn)."""
    task = asyncio.create_task(pool.execute(statement))
    async with asyncio.timeout(5):
        while not _active_now(admin_dsn, statement):
            await asyncio.sleep(0.05)
    pool.terminate(cancel_within=1.0)
    deadline = time.monotonic() + 1.0
    while (left := _active_now(admin_dsn, statement)) and time.monotonic() < deadline:
        time.sleep(0.02)  # noqa: ASYNC251 - the loop must not run meanwhile
    assert left == 0
    with pytest.raises(asyncpool.PoolClosedError):
        await task


async def test_terminate_with_cancel_within_cancels_before_it_returns(
        pooler: Pooler, postgres: PostgresServer) -> None:
    """Through each PgBouncer, which survives the request (1.18 crashes when a cancel request's
    socket is closed early, pgbouncer#801)."""
    name = f"cancel-within-{abs(hash(pooler.dsn()))}"
    pool = await asyncpool.create_pool(pooler.dsn(), max_size=1, telemetry=False,
                                       server_settings={"application_name": name})
    await _cancelled_before_terminate_returns(
        pool, postgres.dsn(postgres.superuser, "postgres"), f"SELECT pg_sleep(30) -- {name}")
    async with Pool(pooler.dsn(), telemetry=False) as again:
        assert await again.fetchval("SELECT 1") == 1  # the pooler is still up


async def test_terminate_with_cancel_within_over_tls(
        tls_postgres: PostgresServer, pki: TestPki) -> None:
    """The request negotiates TLS first, as asyncpg's own do (verified: the CA, the host name)."""
    dsn = tls_postgres.app.dsn("localhost", tls_postgres.port, tls_postgres.database)
    pool = await asyncpool.create_pool(dsn, ssl="verify-full", ssl_root_cert=str(pki.ca_cert),
                                       max_size=1, telemetry=False)
    admin = tls_postgres.superuser.dsn("localhost", tls_postgres.port, "postgres",
                                       sslmode="require")
    await _cancelled_before_terminate_returns(pool, admin, "SELECT pg_sleep(30) -- over tls")


async def test_terminate_with_cancel_within_over_a_unix_socket_with_sslmode_require(
        postgres: PostgresServer) -> None:
    """Plain on a Unix socket, as asyncpg's own requests and the connection itself: the
    request negotiated TLS there, the server answered "N" and require took it as a refusal."""
    assert postgres.workdir is not None
    role = postgres.app
    dsn = (f"postgresql://{role.name}:{quote(role.password, safe='')}@/{postgres.database}"
           f"?host={postgres.workdir}&port={postgres.port}&sslmode=require")
    pool = await asyncpool.create_pool(dsn, max_size=1, telemetry=False)
    await _cancelled_before_terminate_returns(
        pool, postgres.dsn(postgres.superuser, "postgres"), "SELECT pg_sleep(30) -- unix")


@pytest.mark.parametrize("bad", [-1, float("nan")])
def test_terminate_refuses_a_negative_cancel_within(bad: float) -> None:
    with pytest.raises(ValueError, match=f"cancel_within={bad!r}"):
        Pool("postgresql://u@127.0.0.1/db").terminate(cancel_within=bad)


async def test_waiters_fail_when_pool_closes(pooler: Pooler) -> None:
    pool = await asyncpool.create_pool(pooler.dsn(), max_size=1, telemetry=False)
    held = await pool.acquire()
    waiter = asyncio.create_task(pool.fetchval("SELECT 1"))
    await asyncio.sleep(0.05)
    assert pool.stats().waiting == 1
    closing = asyncio.create_task(pool.close(timeout=1))
    with pytest.raises(asyncpool.PoolClosedError, match="closed while waiting"):
        await waiter
    await pool.release(held)
    await closing


async def test_release_does_not_reset_the_session(pooler: Pooler) -> None:
    """No RESET ALL / UNLISTEN on release: PgBouncer sees no query for acquire+release cycles."""

    async with Pool(pooler.dsn(), max_size=1, validate_after=None, telemetry=False) as pool:
        await pool.fetchval("SELECT 1")
        before = await pooler.total_queries()
        for _ in range(50):
            async with pool.acquire():
                pass
        assert await pooler.total_queries() == before

    # Control: asyncpg.Pool's default reset does send queries, and the counter sees them.
    control = await asyncpg.create_pool(pooler.dsn(), min_size=1, max_size=1, statement_cache_size=0)
    try:
        before = await pooler.total_queries()
        for _ in range(20):
            async with control.acquire():
                pass
        assert await pooler.total_queries() - before >= 20
    finally:
        await control.close()


async def test_open_transaction_is_rolled_back_on_release(pool: Pool, pooler: Pooler) -> None:
    table = f"left_open_{pooler.label.replace('.', '_').replace('-', '_')}"
    await pool.execute(f"DROP TABLE IF EXISTS {table}")
    await pool.execute(f"CREATE TABLE {table} (id int)")
    async with pool.acquire() as conn:
        await conn.execute("BEGIN")
        await conn.execute(f"INSERT INTO {table} VALUES (1)")
        raw = conn.raw
    assert not raw.is_in_transaction()
    assert pool.stats().idle >= 1
    assert await pool.fetchval(f"SELECT count(*) FROM {table}") == 0
    row = await pooler.pool_row()
    assert row["sv_active"] == 0
    await pool.execute(f"DROP TABLE {table}")


async def test_broken_connection_is_discarded(pool: Pool) -> None:
    async with pool.acquire() as conn:
        conn.raw.terminate()
    stats = pool.stats()
    assert stats.in_use == 0
    assert stats.closed_total == 1
    assert await pool.fetchval("SELECT 9") == 9


def test_config_from_env() -> None:
    env = {
        "ASYNCPOOL_DSN": "postgresql://u:pw@h:6432/db",
        "ASYNCPOOL_MAX_SIZE": "3",
        "ASYNCPOOL_MIN_SIZE": "0",
        "ASYNCPOOL_ACQUIRE_TIMEOUT": "2.5",
        "ASYNCPOOL_MAX_LIFETIME": "none",
        "ASYNCPOOL_PREPARED_STATEMENTS": "on",
        "ASYNCPOOL_LEAK_TIMEOUT": "10",
        "ASYNCPOOL_NAME": "envpool",
    }
    cfg = PoolConfig.from_env(env)
    assert (cfg.max_size, cfg.min_size, cfg.acquire_timeout, cfg.max_lifetime) == (3, 0, 2.5, None)
    assert (cfg.prepared_statements, cfg.leak_timeout, cfg.name) == ("on", 10.0, "envpool")
    assert "pw" not in repr(cfg)
    assert "u:***@h:6432" in repr(cfg)


@pytest.mark.parametrize(
    ("env", "match"),
    [
        ({"ASYNCPOOL_MAX_SIZE": "lots"}, "ASYNCPOOL_MAX_SIZE='lots': write a whole number"),
        ({"ASYNCPOOL_MIN_SIZE": "5", "ASYNCPOOL_MAX_SIZE": "2"},
         r"min_size=5 is larger than max_size=2: lower min_size \(set by ASYNCPOOL_MAX_SIZE, "
         r"ASYNCPOOL_MIN_SIZE\)"),
        ({"ASYNCPOOL_PREPARED_STATEMENTS": "always"},
         r"choose one of 'off', 'on', 'unnamed' \(set by ASYNCPOOL_PREPARED_STATEMENTS\)"),
        ({"ASYNCPOOL_ACQUIRE_TIMEOUT": "-1"}, "acquire_timeout=-1.0: must be a number of seconds > 0"),
    ],
)
def test_config_errors_say_what_to_fix(env: dict[str, str], match: str) -> None:
    with pytest.raises(asyncpool.PoolConfigError, match=match):
        PoolConfig.from_env(env)


@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({"max_size": 0}, "max_size=0"),
        ({"min_size": -1}, "min_size=-1"),
        ({"leak_action": "kill"}, "leak_action='kill'"),
        ({"validate_after": -1}, "validate_after=-1"),
        ({"lifetime_jitter": 1.5}, "lifetime_jitter=1.5"),
        # A string is a true value in Python: "false" must not let credentials travel in clear.
        ({"allow_unprotected_credentials": "false"},
         r"allow_unprotected_credentials='false': must be True or False \(a string is not read "
         r"as one: write True or False, not 'false'; the "
         r"ASYNCPOOL_ALLOW_UNPROTECTED_CREDENTIALS variable takes true/false text\)"),
        ({"allow_iam_without_tls": 1}, r"allow_iam_without_tls=1: must be True or False$"),
        ({"telemetry": "no"}, "telemetry='no': must be True or False"),
        ({"max_size": True}, "max_size=True: must be a whole number"),
        ({"acquire_timeout": True}, "acquire_timeout=True: must be a number of seconds"),
        ({"name": ""}, "name='': must be a non-empty string"),
        ({"server_settings": {"application_name": 5}},
         r"server_settings: 'application_name': 5: names and values must be strings \(write "
         r"\{'application_name': '5'\}\)"),
        ({"record_class": None}, "record_class=None: must be a subclass of asyncpg"),
        ({"server_settings": [("application_name", "x")]},
         "server_settings: must be a mapping of setting names to values, not a list"),
    ],
)
def test_option_errors(options: dict[str, Any], match: str) -> None:
    with pytest.raises(asyncpool.PoolConfigError, match=match):
        Pool("postgresql://u@h/db", **options)


@pytest.mark.parametrize(("connect_kwargs", "match"), [
    ({"comand_timeout": 5},
     r"connect_kwargs: 'comand_timeout' is not an option of asyncpg\.connect; did you mean "
     r"'command_timeout'"),
    ({"record_class": None}, r"connect_kwargs: record_class=None: must be a subclass of asyncpg"),
    ({"dsn": "postgresql://u@h/db"}, r"connect_kwargs: give the DSN as the pool's dsn"),
])
async def test_a_bad_connect_kwargs_option_is_refused_at_open_before_any_login(
        connect_kwargs: dict[str, Any], match: str) -> None:
    """asyncpg.connect would fail at each login (retried as if transient, with min_size=0);
    the pool says it once, first (the port is closed: a login would be a ConnectError)."""
    pool = Pool("postgresql://u@127.0.0.1:1/db", connect_kwargs=connect_kwargs, telemetry=False)
    with pytest.raises(asyncpool.PoolConfigError, match=match):
        await pool.open()
    assert pool.get_size() == 0


async def test_wrong_loop_is_refused(pooler: Pooler) -> None:
    async with Pool(pooler.dsn(), telemetry=False) as pool:

        def other_loop() -> None:
            async def use() -> None:
                await pool.fetchval("SELECT 1")

            with pytest.raises(asyncpool.PoolError, match="another event loop"):
                asyncio.run(use())

        await asyncio.to_thread(other_loop)
        assert await pool.fetchval("SELECT 1") == 1


async def test_driver_errors_pass_through_and_keep_the_connection(pool: Pool) -> None:
    with pytest.raises(asyncpg.UndefinedTableError):
        await pool.fetch("SELECT * FROM no_such_table_here")
    stats = pool.stats()
    assert stats.in_use == 0
    assert stats.closed_total == 0


async def test_what_a_holder_obtained_ends_with_its_lease(postgres: Any) -> None:
    """Statements, cursors and transactions stop working on release, as with asyncpg's pool;
    listeners are removed (UNLISTEN *); conn.close() gives the connection back, still open."""
    seen: list[str] = []
    async with Pool(postgres.dsn(), name="lease-end", min_size=1, max_size=1, telemetry=False,
                    prepared_statements="on") as pool:
        async with pool.acquire() as conn:
            pid = await conn.fetchval("SELECT pg_backend_pid()")
            stmt = await conn.prepare("SELECT 1")
            tx = conn.transaction()
            cursor = conn.cursor("SELECT 1")
            await conn.add_listener("lease_end", lambda *args: seen.append(args[-1]))
        async with pool.acquire() as other:
            assert await other.fetchval("SELECT pg_backend_pid()") == pid
            async def iterate() -> None:
                async for _ in cursor:
                    pass

            for call in (stmt.fetchval, tx.start, iterate):
                with pytest.raises(asyncpg.InterfaceError, match="released back to the pool"):
                    await call()
            assert await other.fetchval("SELECT count(*) FROM pg_listening_channels()") == 0
            await other.execute("NOTIFY lease_end, 'not for the previous holder'")
            await asyncio.sleep(0.1)
            assert seen == []
            await other.close()
            assert pool.stats().idle == 1
        async with pool.acquire() as again:
            assert await again.fetchval("SELECT pg_backend_pid()") == pid


@pytest.mark.parametrize("mode", ["off", "unnamed", "on"])
async def test_terminate_frees_the_place_at_once(postgres: Any,
                                                 mode: PreparedStatements) -> None:
    """``conn.terminate()``, as error handlers written for asyncpg's pool call it without a
    release: the connection is closed and the next acquire gets a new one at once; the
    terminated one is refused, and its block's end or release does nothing."""
    async with Pool(postgres.dsn(), max_size=1, telemetry=False, acquire_timeout=2.0,
                    prepared_statements=mode) as pool:
        async with pool.acquire() as conn:
            pid = await conn.fetchval("SELECT pg_backend_pid()")
            conn.terminate()
            assert pool.stats().in_use == 0
            async with pool.acquire() as other:
                assert await other.fetchval("SELECT pg_backend_pid()") != pid
            with pytest.raises(asyncpool.PoolError, match="was terminated"):
                await conn.fetchval("SELECT 1")
            with pytest.raises(asyncpool.PoolError, match="was terminated"):
                conn.terminate()  # (again)
        held = await pool.acquire()
        held.terminate()
        await pool.release(held)
        stats = pool.stats()
        assert (stats.in_use, stats.closed_total) == (0, 2)
        assert await pool.fetchval("SELECT 1") == 1


async def test_an_acquire_object_gives_one_connection_only(pooler: Pooler) -> None:
    """The object `pool.acquire()` (or `pool.transaction()`) returns is used once, as
    asyncpg's: entered again, nested or after its block, or awaited again, it raises PoolError
    and loses nothing (the first connection is returned at its block's end as usual)."""
    async with Pool(pooler.dsn(), max_size=2, telemetry=False, leak_timeout=1.0) as pool:
        for make in (pool.acquire, pool.transaction):
            ctx = make()
            async with ctx as conn:
                with pytest.raises(asyncpool.PoolError, match="already used"):
                    async with ctx:
                        pass
                assert await conn.fetchval("SELECT 1") == 1
            assert pool.stats().in_use == 0
            with pytest.raises(asyncpool.PoolError, match="already used"):
                async with ctx:
                    pass
            assert pool.stats().in_use == 0
        awaited = pool.acquire()
        held = await awaited
        with pytest.raises(asyncpool.PoolError, match="already used"):
            await awaited
        assert pool.stats().in_use == 1
        await pool.release(held)
        await asyncio.sleep(1.2)  # past leak_timeout: nothing was left held to reclaim
        assert pool.stats().leaked_total == 0
        assert pool.stats().in_use == 0


async def test_open_called_twice_at_once_ends_the_same_way_for_both(
        pooler: Pooler, postgres: PostgresServer) -> None:
    """Two tasks open one pool at the same time: the second waits for the first's outcome
    (a refused login fails both), instead of returning at once on a pool not yet usable."""
    wrong = pooler.dsn().replace(f":{quote(postgres.app.password, safe='')}@", ":wrong@")
    assert wrong != pooler.dsn()
    pool = Pool(wrong, min_size=1, max_size=2, telemetry=False, acquire_timeout=5)
    results = await asyncio.gather(pool.open(), pool.open(), return_exceptions=True)
    assert [type(r).__name__ for r in results] == ["AuthenticationError"] * 2, results
    async with Pool(pooler.dsn(), min_size=2, max_size=2, telemetry=False) as good:
        await asyncio.gather(good.open(), good.open())  # already open: returns at once
        both = Pool(pooler.dsn(), min_size=2, max_size=2, telemetry=False)
        await asyncio.gather(both.open(), both.open())
        assert both.stats().idle == 2  # the second returned once min_size was open
        await both.close()


async def test_open_without_waiting_opens_min_size_in_the_background(pooler: Pooler) -> None:
    """``open(wait=False)`` returns at once and the min_size connections open right after, not
    at the first housekeeping round (5 s later)."""
    pool = Pool(pooler.dsn(), min_size=2, max_size=3, telemetry=False)
    await pool.open(wait=False)
    try:
        assert pool.stats().idle == 0
        async with asyncio.timeout(2):
            while pool.stats().idle < 2:
                await asyncio.sleep(0.02)
        assert pool.stats().size == 2
    finally:
        await pool.close()


async def _awaited(awaitable: Awaitable[object]) -> object:
    return await awaitable


@pytest.mark.parametrize("pool_loop", ["asyncio", "uvloop"])
def test_a_held_connection_refuses_use_from_another_thread_and_stays_held(
        postgres: PostgresServer, pool_loop: str) -> None:
    """asyncpg sends a statement before it finds that its reply would come to another loop: a
    held connection used from another thread's loop ran the INSERT, then raised. The proxy
    refuses first (its coroutine methods, ``transaction()``, ``cursor()``), as do
    ``pool.release()`` and ``conn.close()``: nothing reaches the server, and the connection is
    still held and usable from its own loop."""
    async def main() -> None:
        async with Pool(postgres.dsn(), max_size=1, telemetry=False) as pool:
            async with pool.acquire() as conn:
                await conn.execute("CREATE TEMP TABLE elsewhere (n int)")
                # Made here, on the pool's loop; used from the other thread below.
                stmt = await conn.prepare("INSERT INTO elsewhere VALUES (5) RETURNING 1")
                made_here = conn.transaction()
                cursor_here = conn.cursor("SELECT 1")
                stmt_cursor = stmt.cursor()

                def from_another_thread() -> list[str]:
                    async def attempts() -> list[str]:
                        calls: list[Callable[[], Awaitable[object]]] = [
                            lambda: conn.execute("INSERT INTO elsewhere VALUES (1)"),
                                 lambda: conn.execute("INSERT INTO elsewhere VALUES ($1)", 2),
                                 lambda: conn.fetchval("INSERT INTO elsewhere VALUES (3) RETURNING 1"),
                                 lambda: conn.executemany("INSERT INTO elsewhere VALUES ($1)", [(4,)]),
                                 lambda: conn.transaction().start(),
                                 lambda: conn.cursor("SELECT 1").fetch(1),  # type: ignore[attr-defined]
                                 lambda: conn.add_listener("elsewhere", print),
                                 lambda: conn.remove_listener("elsewhere", print),
                                 stmt.fetchval, made_here.start,
                                 lambda: _awaited(cursor_here),
                                 lambda: _awaited(stmt_cursor),
                                 lambda: pool.release(conn),
                                 conn.close]
                        errors = []
                        for call in calls:
                            with pytest.raises(asyncpool.PoolError,
                                               match=r"another event loop|another thread or "
                                                     r"event loop") as info:
                                await call()
                            errors.append(str(info.value))
                        return errors

                    return asyncio.run(attempts())

                errors = await asyncio.to_thread(from_another_thread)
                assert len(errors) == 14
                assert all("comes from thread" in error or "its pool connection belongs to"
                           in error for error in errors), errors
                # And on its own loop they all still work.
                assert await stmt.fetchval() == 1
                await conn.execute("DELETE FROM elsewhere")
                async with made_here:
                    assert await (await cursor_here).fetchrow() == (1,)
                assert not conn.is_in_transaction()
                assert await conn.fetchval("SELECT count(*) FROM elsewhere") == 0
                assert await conn.fetchval("SELECT count(*) FROM pg_listening_channels()") == 0
                assert pool.stats().in_use == 1
            assert pool.stats().in_use == 0
            assert await pool.fetchval("SELECT 1") == 1

    if pool_loop == "uvloop":
        pytest.importorskip("uvloop").run(main())
    else:
        asyncio.run(main())


@pytest.mark.parametrize("pool_loop", ["asyncio", "uvloop"])
def test_cursors_opened_on_the_pools_loop_refuse_another_thread(postgres: PostgresServer,
                                                                pool_loop: str) -> None:
    """A cursor (``await conn.cursor(...)``, also from a prepared statement) or a cursor
    iterator opened on the pool's loop and then used from another thread's loop is refused
    before its FETCH or MOVE is sent, and goes on from where it was on its own loop."""
    async def main() -> None:
        async with Pool(postgres.dsn(), max_size=1, telemetry=False) as pool:
            async with pool.acquire() as conn, conn.transaction():
                query = "SELECT n FROM generate_series(1, 10) AS n"
                cursor = await conn.cursor(query)
                from_statement = await (await conn.prepare(query)).cursor()
                iterator = conn.cursor(query, prefetch=2).__aiter__()
                assert await iterator.__anext__() == (1,)  # open, with a page fetched

                def from_another_thread() -> list[str]:
                    async def attempts() -> list[str]:
                        calls: list[Callable[[], Awaitable[object]]] = [
                            lambda: cursor.fetch(2), cursor.fetchrow, lambda: cursor.forward(1),
                            lambda: from_statement.fetch(1), iterator.__anext__]
                        errors = []
                        for call in calls:
                            with pytest.raises(asyncpool.PoolError,
                                               match=r"another thread or event loop") as info:
                                await call()
                            errors.append(str(info.value))
                        return errors

                    return asyncio.run(attempts())

                errors = await asyncio.to_thread(from_another_thread)
                assert [e.split("(")[0] for e in errors] == [
                    "Cursor.fetch", "Cursor.fetchrow", "Cursor.forward", "Cursor.fetch",
                    "CursorIterator.__anext__"]
                # Nothing moved: each goes on from where it was.
                assert await cursor.fetchrow() == (1,)
                assert await from_statement.fetch(2) == [(1,), (2,)]
                assert [row async for row in iterator] == [(n,) for n in range(2, 11)]
            assert pool.stats().in_use == 0

    if pool_loop == "uvloop":
        pytest.importorskip("uvloop").run(main())
    else:
        asyncio.run(main())


def test_a_connection_held_into_another_loop_of_its_thread_is_refused(
        postgres: PostgresServer) -> None:
    """Held while its loop stopped, a connection is refused on the next loop the thread runs
    (a second ``asyncio.run()``), with that advice, before anything is sent; its own loop can
    still give it back."""
    pool_loop = asyncio.new_event_loop()
    pool = Pool(postgres.dsn(), max_size=1, telemetry=False)

    async def first() -> asyncpool.PooledConnection:
        await pool.open()
        await pool.execute("DROP TABLE IF EXISTS held_into_another_loop; "
                           "CREATE TABLE held_into_another_loop (n int)")
        return await pool.acquire()

    async def second(conn: asyncpool.PooledConnection) -> None:
        with pytest.raises(asyncpool.PoolError, match="now runs a different event loop"):
            await conn.execute("INSERT INTO held_into_another_loop VALUES (1)")
        with pytest.raises(asyncpool.PoolError, match="now runs a different event loop"):
            await pool.release(conn)

    async def last(conn: asyncpool.PooledConnection) -> int:
        await pool.release(conn)
        count: int = await pool.fetchval("SELECT count(*) FROM held_into_another_loop")
        await pool.execute("DROP TABLE held_into_another_loop")
        await pool.close()
        return count

    try:
        conn = pool_loop.run_until_complete(first())
        asyncio.run(second(conn))
        assert pool_loop.run_until_complete(last(conn)) == 0
    finally:
        pool_loop.close()


async def test_acquire_used_without_async_says_what_to_write(postgres: PostgresServer) -> None:
    """``with pool.acquire()`` (reported by type checkers) raises an error that shows the right
    form, and checks nothing out."""
    async with Pool(postgres.dsn(), name="no-await", max_size=1, telemetry=False) as pool:
        synchronous = r"pool 'no-await': pool.acquire\(\) is asynchronous: write `async with"
        with pytest.raises(TypeError, match=synchronous), pool.acquire():  # type: ignore[attr-defined]
            pass
        with pytest.raises(TypeError, match=synchronous), pool.transaction():  # type: ignore[attr-defined]
            pass
        assert (pool.stats().in_use, pool.stats().acquired_total) == (0, 0)
