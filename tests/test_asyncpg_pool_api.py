"""asyncpg.Pool's API on asyncpool's pool, through both PgBouncers: code written for asyncpg's pool
(``async with asyncpg.create_pool(...)``, the COPY helpers, ``get_size()``...) runs unchanged."""

from __future__ import annotations

import asyncio
import gc
import inspect
import io
import re
import secrets
import weakref
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import pytest

import asyncpool
from asyncpool import Pool
from asyncpool.pool.copy_options import (
    CopyFormatOptions,
    CopyFromTableOptions,
    CopyRecordsOptions,
    CopyToTableOptions,
)
from asyncpool.testing import PostgresServer
from asyncpool.testing.postgres import Role
from tests.conftest import Pooler


def _table(pooler: Pooler, what: str, mode: str = "") -> str:
    return re.sub(r"\W", "_", f"{what}_{pooler.label}_{mode}".lower()).rstrip("_")


#: The COPY helpers take asyncpg's keyword options through these (`**options`).
COPY_OPTIONS: dict[str, Any] = {
    "copy_from_query": CopyFormatOptions, "copy_from_table": CopyFromTableOptions,
    "copy_to_table": CopyToTableOptions, "copy_records_to_table": CopyRecordsOptions,
}


def test_every_public_method_of_asyncpg_pool_is_there() -> None:
    """What asyncpg's pool offers (the installed asyncpg's) is on asyncpool's, a coroutine
    function where asyncpg's is one, taking each parameter asyncpg's takes under its name: code
    written for it does not meet an AttributeError or a TypeError."""
    ours = {name: getattr(Pool, name) for name in dir(Pool) if not name.startswith("_")}
    for name in dir(asyncpg.Pool):
        if name.startswith("_"):
            continue
        assert name in ours, name
        theirs = getattr(asyncpg.Pool, name)
        assert inspect.iscoroutinefunction(ours[name]) == inspect.iscoroutinefunction(theirs), name
        accepted = inspect.signature(ours[name]).parameters
        options = COPY_OPTIONS.get(name)
        for param in inspect.signature(theirs).parameters.values():
            if options is not None and param.name in options.__optional_keys__:
                continue
            assert param.name in accepted, (name, param.name)
            assert accepted[param.name].kind in (param.kind, param.POSITIONAL_OR_KEYWORD), (
                name, param.name)
    for name, options in COPY_OPTIONS.items():  # no option asyncpg does not have
        assert set(options.__optional_keys__) <= set(
            inspect.signature(getattr(asyncpg.Connection, name)).parameters), name


async def test_the_helpers_take_every_argument_by_name_as_asyncpg_s(pooler: Pooler) -> None:
    """`pool.fetchval(query=...)`, `pool.executemany(command=..., args=...)`: what asyncpg's
    signatures (and `Pool`'s typed ones) allow runs, on each helper bound to the pool; a call
    without the statement fails before it takes a connection."""
    table = _table(pooler, "by_name")
    async with asyncpool.create_pool(pooler.dsn(), min_size=1, max_size=1,
                                     telemetry=False) as pool:
        await pool.execute(query=f"DROP TABLE IF EXISTS {table}")
        assert await pool.execute(query=f"CREATE TABLE {table} (id int, note text)") == (
            "CREATE TABLE")
        await pool.executemany(command=f"INSERT INTO {table} VALUES ($1, $2)",
                               args=[(1, "a"), (2, "b")])
        assert await pool.fetchval(query=f"SELECT count(*) FROM {table}") == 2
        assert await pool.fetchval(query=f"SELECT id, note FROM {table} WHERE id = 2",
                                   column="note") == "b"
        row = await pool.fetchrow(query=f"SELECT note FROM {table} WHERE id = 1")
        assert row is not None
        assert row["note"] == "a"
        rows = await pool.fetch(query=f"SELECT id FROM {table} ORDER BY id", timeout=5)
        assert [r["id"] for r in rows] == [1, 2]
        acquired = pool.stats().acquired_total
        for helper in (pool.execute, pool.fetch, pool.fetchrow, pool.fetchval):
            with pytest.raises(TypeError, match=r"missing its first argument, the statement "
                                                r"\(query=\)"):
                await helper()  # type: ignore[call-arg, call-overload]
            with pytest.raises(TypeError, match="missing its first argument"):
                await helper(timeout=1)  # type: ignore[call-arg, call-overload]
        with pytest.raises(TypeError, match=r"missing 1 required positional argument: 'command'"):
            await pool.executemany(args=[(1, "c")])  # type: ignore[call-arg]
        assert pool.stats().acquired_total == acquired  # refused before any checkout
        with pytest.raises(TypeError, match="multiple values for argument 'query'"):
            await pool.fetchval("SELECT 1", query="SELECT 2")  # type: ignore[misc]
        assert (pool.get_size(), pool.get_idle_size()) == (1, 1)
        assert await pool.fetchval("SELECT 3") == 3
        await pool.execute(f"DROP TABLE {table}")


async def test_a_subclass_s_acquire_is_where_the_helpers_take_their_connection(
        pooler: Pooler) -> None:
    """asyncpg's pool helpers do ``async with self.acquire() as conn``: a subclass that sets up
    or tags each checkout in ``acquire()`` sees every helper's. A subclass that leaves
    ``acquire()`` alone keeps the helpers bound straight to the pool (no call in between)."""
    table = _table(pooler, "acquire_override")

    class Counting(Pool):
        acquired = 0

        def acquire(self, timeout: Any = asyncpool.pool.slots.UNSET) -> Any:
            type(self).acquired += 1
            return super().acquire(timeout)

    async with Counting(pooler.dsn(), max_size=1, telemetry=False) as pool:
        assert await pool.execute(f"DROP TABLE IF EXISTS {table}") == "DROP TABLE"
        await pool.execute(f"CREATE TABLE {table} (a int)")
        await pool.executemany(f"INSERT INTO {table} VALUES ($1)", [(1,), (2,)])
        assert await pool.fetchval(f"SELECT count(*) FROM {table}") == 2
        assert [r["a"] for r in await pool.fetch(f"SELECT a FROM {table} ORDER BY a")] == [1, 2]
        assert (await pool.fetchrow(f"SELECT max(a) AS m FROM {table}"))["m"] == 2  # type: ignore[index]
        assert await pool.fetchmany("SELECT $1::int", [(5,)]) == [(5,)]
        out = io.BytesIO()
        await pool.copy_from_query(f"SELECT a FROM {table}", output=out)
        await pool.execute(f"DROP TABLE {table}")
        assert Counting.acquired == 9
        assert pool.fetchval.__name__ == "fetchval"
        assert (pool.stats().in_use, pool.stats().closed_total) == (0, 0)

    # Not bound to each instance (which would refer to itself): dropped unclosed, a pool goes
    # at once, without waiting for a garbage collection.
    gc.disable()
    try:
        unopened = weakref.ref(Counting(pooler.dsn(), telemetry=False))
        assert unopened() is None
    finally:
        gc.enable()

    class Plain(Pool):
        pass

    async with Plain(pooler.dsn(), max_size=1, telemetry=False) as plain:
        assert "fetchval" in vars(plain)  # bound to the pool's statement runner
        assert await plain.fetchval("SELECT 1") == 1


async def test_async_with_create_pool_opens_then_closes(pooler: Pooler) -> None:
    pool = asyncpool.create_pool(pooler.dsn(), name="with-created", min_size=2, telemetry=False)
    assert isinstance(pool, Pool)
    assert pool.get_size() == 0  # not open until awaited or entered
    async with pool as entered:
        assert entered is pool
        assert (pool.get_size(), pool.get_idle_size()) == (2, 2)
        assert await pool.fetchval("SELECT $1::int * 2", 21) == 42
    assert pool.closed
    assert pool.get_size() == 0


async def test_async_with_create_pool_closes_when_the_block_raises(pooler: Pooler) -> None:
    with pytest.raises(ZeroDivisionError):
        async with asyncpool.create_pool(pooler.dsn(), telemetry=False) as pool:
            assert await pool.fetchval("SELECT 1") == 1
            1 / 0  # noqa: B018
    assert pool.closed


async def test_a_failed_open_in_async_with_reaches_the_caller_and_leaves_nothing_open() -> None:
    pool = asyncpool.create_pool("postgresql://app@127.0.0.1:1/app", min_size=1, telemetry=False)
    with pytest.raises(asyncpool.ConnectError, match="connection refused"):
        async with pool:
            pytest.fail("the block ran although the pool did not open")
    assert not pool.closed  # as asyncpg's: it may be opened again once the server is up
    assert pool.get_size() == 0
    await pool.close()
    assert pool.closed


async def test_awaiting_create_pool_gives_the_open_pool(pooler: Pooler) -> None:
    pool = await asyncpool.create_pool(pooler.dsn(), min_size=1, telemetry=False)
    try:
        assert not pool.is_closing()
        assert await pool.fetchval("SELECT 7") == 7
    finally:
        await pool.close()
    assert pool.is_closing()


async def test_asyncpg_s_create_then_await_opens_that_pool(pooler: Pooler) -> None:
    """asyncpg's other way: the pool made at import, awaited at start-up, used as it is."""
    pool = asyncpool.create_pool(pooler.dsn(), min_size=1, telemetry=False)
    with pytest.raises(asyncpool.PoolClosedError,
                       match=r"not open yet: await pool.open\(\) first \(or 'pool = await "
                             r"asyncpool.create_pool"):
        await pool.fetchval("SELECT 1")  # used before start-up
    assert await pool is pool
    assert await pool is pool  # awaiting an open pool again changes nothing
    try:
        assert await pool.fetchval("SELECT 8") == 8
    finally:
        await pool.close()
    with pytest.raises(asyncpool.PoolClosedError, match="is closed; create a new pool"):
        await pool


def test_bad_options_fail_at_the_call_before_any_await() -> None:
    with pytest.raises(asyncpool.PoolConfigError, match="max_size"):
        asyncpool.create_pool("postgresql://app@127.0.0.1:1/app", max_size=0)


async def test_sizes_and_expire_connections_mean_what_they_mean_in_asyncpg(pooler: Pooler) -> None:
    async with asyncpool.create_pool(pooler.dsn(), min_size=1, max_size=3,
                                     telemetry=False) as pool:
        assert (pool.get_min_size(), pool.get_max_size()) == (1, 3)
        async with pool.acquire() as conn:
            assert (pool.get_size(), pool.get_idle_size()) == (1, 0)
            before = conn.raw
        assert (pool.get_size(), pool.get_idle_size()) == (1, 1)
        await pool.expire_connections()
        async with pool.acquire() as conn:
            assert conn.raw is not before  # replaced on the next checkout
        assert before.is_closed()


async def test_set_connect_args_rotates_a_password_as_in_asyncpg(postgres: PostgresServer) -> None:
    """asyncpg's way to rotate a password: ``set_connect_args()`` with the new one, then
    ``expire_connections()``. Logins from then on use the new arguments (the old password no
    longer logs in), the connection held meanwhile goes on until it is returned, and a bad
    call changes nothing and prints no password."""
    role = Role(f"rotating_{secrets.token_hex(4)}", secrets.token_urlsafe(18))
    rotated = Role(role.name, secrets.token_urlsafe(18))
    admin = await asyncpg.connect(postgres.admin_dsn)
    try:
        await admin.execute(f"CREATE ROLE {role.name} LOGIN PASSWORD '{role.password}'")
        async with asyncpool.create_pool(postgres.dsn(role), min_size=1, max_size=2,
                                         telemetry=False) as pool:
            held = await pool.acquire()
            await admin.execute(f"ALTER ROLE {role.name} PASSWORD '{rotated.password}'")
            cases: list[tuple[dict[str, Any], str]] = [
                ({"min_size": 3}, "not a connection argument"),
                ({"record_class": asyncpg.Record}, "not a connection argument"),
                ({"sslmode": "disable"}, "not a connection argument")]
            for bad, why in cases:
                with pytest.raises(asyncpool.PoolConfigError, match=why) as refused:
                    pool.set_connect_args(postgres.dsn(rotated), **bad)
                assert rotated.password not in str(refused.value)
            with pytest.raises(asyncpool.PoolConfigError) as refused:
                pool.set_connect_args(postgres.dsn(rotated).replace("postgresql://", "mysql://"))
            assert rotated.password not in str(refused.value)
            assert pool.config.dsn == postgres.dsn(role)  # nothing changed

            pool.set_connect_args(postgres.dsn(rotated))
            assert pool.config.dsn == postgres.dsn(rotated)
            assert rotated.password not in repr(pool) + repr(pool.config)
            await pool.expire_connections()
            # Opened with the new password (the old one no longer logs in).
            async with pool.acquire() as conn:
                assert await conn.fetchval("SELECT current_user") == role.name
                assert conn.raw is not held.raw
            assert await held.fetchval("SELECT 1") == 1  # the one held meanwhile goes on
            await pool.release(held)
            stats = pool.stats()
            assert (stats.created_total, stats.connect_errors_total) == (2, 0)
    finally:
        await admin.execute(f"DROP ROLE IF EXISTS {role.name}")
        await admin.close()


async def test_set_connect_args_replaces_the_connection_arguments(pooler: Pooler) -> None:
    """Through both PgBouncers: the arguments given before go (as in asyncpg), the new ones
    reach the server on the connections opened after the call; those open stay until they
    expire."""
    async with asyncpool.create_pool(
            pooler.dsn(), min_size=1, max_size=2, telemetry=False,
            server_settings={"application_name": "before"}, command_timeout=30) as pool:
        async with pool.acquire() as conn:
            old = conn.raw
        pool.set_connect_args(pooler.dsn(), server_settings={"application_name": "after"})
        assert pool.config.command_timeout is None  # replaced, as asyncpg's are
        async with pool.acquire() as conn:
            assert conn.raw is old  # not expired yet
            assert await conn.fetchval("SELECT current_setting('application_name')") == "before"
        await pool.expire_connections()
        async with pool.acquire() as conn:
            assert conn.raw is not old
            assert await conn.fetchval("SELECT current_setting('application_name')") == "after"


async def test_set_connect_args_before_open_is_what_open_uses(pooler: Pooler) -> None:
    pool = asyncpool.Pool("postgresql://nobody@127.0.0.1:1/nowhere", min_size=1,
                          telemetry=False)
    with pytest.raises(asyncpool.PoolConfigError):  # checked now, not at open()
        pool.set_connect_args(pooler.dsn().replace("postgresql://", "mysql://"))
    pool.set_connect_args(pooler.dsn())
    async with pool:
        assert await pool.fetchval("SELECT current_user") == "app"


async def _chunks(*parts: bytes) -> AsyncIterator[bytes]:
    for part in parts:
        yield part


MODES = ["off", "unnamed", "on"]


@pytest.mark.parametrize("mode", MODES)
async def test_copy_and_fetchmany_helpers(pooler: Pooler, mode: Any) -> None:
    if mode == "on" and pooler.label.endswith("1.18"):
        pytest.skip("prepared_statements='on' needs PgBouncer >= 1.21")
    table = _table(pooler, "copy", mode)
    async with asyncpool.create_pool(pooler.dsn(), max_size=2, prepared_statements=mode,
                                     telemetry=False) as pool:
        await pool.execute(f"DROP TABLE IF EXISTS {table}")
        await pool.execute(f"CREATE TABLE {table} (id int PRIMARY KEY, note text)")
        try:
            status = await pool.copy_records_to_table(table, records=[(1, "a"), (2, None)],
                                                      columns=["id", "note"])
            assert status == "COPY 2"
            status = await pool.copy_to_table(table_name=table, source=_chunks(b"3,c\n", b"4,\n"),
                                              format="csv", force_null=["note"])
            assert status == "COPY 2"
            out = io.BytesIO()
            assert await pool.copy_from_table(table, output=out, format="csv",
                                              columns=["id"]) == "COPY 4"
            assert sorted(out.getvalue().split()) == [b"1", b"2", b"3", b"4"]
            out = io.BytesIO()
            assert await pool.copy_from_query(f"SELECT note FROM {table} WHERE id > $1 ORDER BY id",
                                              2, output=out, format="csv") == "COPY 2"
            assert out.getvalue() == b"c\n\n"
            returned = await pool.fetchmany(
                f"INSERT INTO {table} VALUES ($1, $2) RETURNING id, note", [(5, "e"), (6, "f")])
            assert [tuple(r) for r in returned] == [(5, "e"), (6, "f")]
            assert await pool.fetch(f"SELECT id FROM {table} WHERE note IS NULL ORDER BY id") \
                == [(2,), (4,)]
            assert pool.stats().in_use == 0
        finally:
            await pool.execute(f"DROP TABLE IF EXISTS {table}")


async def test_a_copy_that_fails_midway_leaves_the_pool_whole(pooler: Pooler) -> None:
    """A source that raises part-way: asyncpg aborts the COPY, the caller gets the error, nothing
    is inserted, and the connection goes back to the pool usable (no transaction left open)."""
    table = _table(pooler, "copyfail")

    async def failing() -> AsyncIterator[bytes]:
        yield b"1\n"
        raise ValueError("the source broke")

    async with asyncpool.create_pool(pooler.dsn(), min_size=1, max_size=1,
                                     telemetry=False) as pool:
        await pool.execute(f"DROP TABLE IF EXISTS {table}")
        await pool.execute(f"CREATE TABLE {table} (id int)")
        try:
            with pytest.raises(ValueError, match="the source broke"):
                await pool.copy_to_table(table, source=failing())
            assert await pool.fetchval(f"SELECT count(*) FROM {table}") == 0
            assert pool.stats().in_use == 0
            assert pool.get_size() == 1
        finally:
            await pool.execute(f"DROP TABLE IF EXISTS {table}")


async def test_release_takes_asyncpg_s_timeout_for_the_reset(pooler: Pooler) -> None:
    async with asyncpool.create_pool(pooler.dsn(), min_size=1, max_size=1,
                                     telemetry=False) as pool:
        conn = await pool.acquire()
        raw = conn.raw
        await conn.execute("BEGIN")
        # A bad timeout loses nothing: the connection goes back (reset within the pool's 5 s),
        # then the error says what to fix. It was refused first, and stayed held until the leak
        # reclaim.
        for bad in ("soon", -1, float("nan")):
            with pytest.raises(asyncpool.PoolConfigError,
                               match=rf"release\(timeout=...\)={bad!r}.*None for the pool's 5 "
                                     r"s\); the connection was given back all the same"):
                await pool.release(conn, timeout=bad)  # type: ignore[arg-type]
            assert pool.stats().in_use == 0
            await pool.release(conn)  # already back: nothing to do
            conn = await pool.acquire()
            assert conn.raw is raw  # rolled back and reused
            assert not conn.is_in_transaction()
            await conn.execute("BEGIN")
        await pool.release(connection=conn, timeout=5)
        async with pool.acquire() as again:
            assert again.raw is raw  # rolled back within the time given, and reused
            assert not again.is_in_transaction()
            await again.execute("BEGIN")
        conn = await pool.acquire()
        await conn.execute("BEGIN")
        closed = pool.stats().closed_total
        await pool.release(conn, timeout=0)  # no time for the ROLLBACK: closed, not reused
        assert (pool.stats().in_use, pool.stats().closed_total) == (0, closed + 1)
        async with pool.acquire() as fresh:  # a new connection in the freed slot
            assert fresh.raw is not raw
            assert await fresh.fetchval("SELECT 1") == 1


async def test_a_held_connection_s_close_takes_the_same_timeout(pooler: Pooler) -> None:
    async with asyncpool.create_pool(pooler.dsn(), max_size=1, telemetry=False) as pool:
        conn = await pool.acquire()
        await conn.execute("BEGIN")
        with pytest.raises(asyncpool.PoolConfigError, match=r"conn.close\(timeout=...\)=-1.*; "
                                                            "the connection was given back"):
            await conn.close(timeout=-1)
        assert pool.stats().in_use == 0  # given back all the same
        await conn.close(timeout=5)  # already back: nothing to do
        conn = await pool.acquire()
        assert not conn.is_in_transaction()
        await conn.execute("BEGIN")
        await conn.close(timeout=5)
        assert pool.stats().in_use == 0
        async with pool.acquire() as again:
            assert not again.is_in_transaction()


async def test_a_pool_closed_with_a_bad_timeout_is_closed_all_the_same(pooler: Pooler) -> None:
    """close(timeout=-1) was refused before anything was done: the pool stayed open, its
    connections with it, on a shutdown path that would not come back to it."""
    pool = await asyncpool.create_pool(pooler.dsn(), min_size=2, max_size=2, telemetry=False)
    held = await pool.acquire()
    closing = asyncio.ensure_future(pool.close(timeout=-1))
    await asyncio.sleep(0.05)
    assert not closing.done()  # waiting for the held one, as close() does
    await pool.release(held)
    with pytest.raises(asyncpool.PoolConfigError,
                       match=r"close\(timeout=...\)=-1: .*; the pool was closed with the "
                             "default 10 s"):
        await closing
    assert (pool.is_closing(), pool.get_size()) == (True, 0)


async def test_a_copy_cancelled_midway_leaves_the_connection_usable(pooler: Pooler) -> None:
    """The holder's task cancelled while a COPY is under way, in and out: the caller sees the
    cancellation, nothing is inserted, and the pool's one connection serves the next query."""
    table = _table(pooler, "copycancel")
    sent, written = asyncio.Event(), asyncio.Event()

    async def stalling_source() -> AsyncIterator[bytes]:
        yield b"1\n"
        sent.set()  # asyncpg came back for more: the first row went out
        await asyncio.sleep(60)
        yield b"2\n"

    async def stalling_output(data: bytes) -> None:
        written.set()
        await asyncio.sleep(60)

    async with asyncpool.create_pool(pooler.dsn(), min_size=1, max_size=1,
                                     telemetry=False) as pool:
        await pool.execute(f"DROP TABLE IF EXISTS {table}")
        await pool.execute(f"CREATE TABLE {table} (id int)")
        try:
            copy_in = asyncio.create_task(pool.copy_to_table(table, source=stalling_source()))
            await asyncio.wait_for(sent.wait(), 10)
            copy_in.cancel()
            with pytest.raises(asyncio.CancelledError):
                await copy_in
            assert await pool.fetchval(f"SELECT count(*) FROM {table}") == 0
            await pool.execute(f"INSERT INTO {table} SELECT generate_series(1, 50000)")
            copy_out = asyncio.create_task(pool.copy_from_table(table, output=stalling_output))
            await asyncio.wait_for(written.wait(), 10)
            copy_out.cancel()
            with pytest.raises(asyncio.CancelledError):
                await copy_out
            assert await pool.fetchval(f"SELECT count(*) FROM {table}") == 50000
            assert (pool.stats().in_use, pool.get_size()) == (0, 1)
        finally:
            await pool.execute(f"DROP TABLE IF EXISTS {table}")


@pytest.mark.parametrize("mode", ["off", "unnamed"])
def test_copy_and_fetchmany_helpers_under_uvloop(pooler: Pooler, mode: Any) -> None:
    """What FastAPI under uvicorn runs: the same helpers on uvloop's transports."""
    uvloop = pytest.importorskip("uvloop")
    table = _table(pooler, "uvcopy", mode)

    async def main() -> tuple[str, str, bytes, list[tuple[Any, ...]]]:
        async with asyncpool.create_pool(pooler.dsn(), max_size=1, prepared_statements=mode,
                                         telemetry=False) as pool:
            await pool.execute(f"DROP TABLE IF EXISTS {table}")
            await pool.execute(f"CREATE TABLE {table} (id int, note text)")
            try:
                into = await pool.copy_records_to_table(table, records=[(1, "a"), (2, None)])
                more = await pool.copy_to_table(table, source=_chunks(b"3,c\n"), format="csv")
                out = io.BytesIO()
                await pool.copy_from_query(f"SELECT id FROM {table} WHERE id > $1 ORDER BY id", 1,
                                           output=out)
                rows = await pool.fetchmany(f"INSERT INTO {table} VALUES ($1, $2) RETURNING id",
                                            [(4, "d"), (5, "e")])
                assert pool.stats().in_use == 0
                return into, more, out.getvalue(), [tuple(r) for r in rows]
            finally:
                await pool.execute(f"DROP TABLE IF EXISTS {table}")

    assert uvloop.run(main()) == ("COPY 2", "COPY 1", b"2\n3\n", [(4,), (5,)])
