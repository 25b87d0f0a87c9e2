"""asyncpg's pool options, taken with asyncpg's meaning (one test per option, against real
servers), those that do not fit refused with the asyncpool equivalent, unknown ones with the
closest name."""

from __future__ import annotations

import asyncio
import copy
import inspect
import json
import pickle
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import asyncpg
import pytest

import asyncpool
from asyncpool import Pool, PoolConfig, PoolConfigError, PooledConnection
from asyncpool.config import PreparedStatements
from asyncpool.integrations.aws_lambda import lambda_config
from asyncpool.options import translate
from asyncpool.testing import PgBouncerServer, PostgresServer
from tests.conftest import Pooler


async def _jsonb_codec(conn: Any) -> None:
    await conn.set_type_codec("jsonb", encoder=json.dumps, decoder=json.loads, schema="pg_catalog")


def _target(request: pytest.FixtureRequest, mode: str) -> str:
    """Where each statement mode is used: "on" through PgBouncer 1.24 (prepared statements),
    the others through PgBouncer 1.18 (no prepared statements)."""
    server: PgBouncerServer = request.getfixturevalue("current" if mode == "on" else "legacy")
    if mode == "on":
        assert server.supports_prepared_statements
    return server.dsn()


MODES: list[PreparedStatements] = ["off", "on", "unnamed"]


def _options(name: str, value: object) -> dict[str, Any]:
    return {name: value}


# -- init, setup ----------------------------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
async def test_init_registers_a_jsonb_codec_on_every_new_connection(
        request: pytest.FixtureRequest, mode: PreparedStatements) -> None:
    inits: list[int] = []

    async def init(conn: Any) -> None:
        await _jsonb_codec(conn)
        inits.append(id(conn))

    async with Pool(_target(request, mode), name=f"init-{mode}", prepared_statements=mode,
                    min_size=1, max_size=3, init=init, telemetry=False) as pool:
        assert len(inits) == 1
        # Three connections at once: two are opened by these checkouts.
        async with pool.acquire() as a, pool.acquire() as b, pool.acquire() as c:
            for conn in (a, b, c):
                for _ in range(3):  # described, then reused ("unnamed", "on")
                    assert await conn.fetchval("SELECT $1::jsonb", {"k": [1, 2]}) == {"k": [1, 2]}
                    assert await conn.fetchval("SELECT '{\"a\": 1}'::jsonb") == {"a": 1}
                    row = await conn.fetchrow("SELECT $1::int AS n, $2::jsonb AS j", 1, {"x": None})
                    assert row is not None
                    assert row["j"] == {"x": None}
        assert len(set(inits)) == 3
        # Connections opened later (after expire_all) run init too.
        pool.expire_all()
        assert await pool.fetchval("SELECT $1::jsonb", [1]) == [1]
        assert len(inits) == 4


@pytest.mark.parametrize("mode", MODES)
async def test_callbacks_init_registers_stay_for_the_connections_life(
        request: pytest.FixtureRequest, mode: PreparedStatements) -> None:
    """A query logger, log listener and termination listener added in `init=` see every
    checkout's statements and the close (asyncpg's pool keeps the first and last too); one a
    holder adds is still dropped when it gives the connection back."""
    queries: list[str] = []
    notices: list[str] = []
    closed: list[int] = []
    by_holder: list[str] = []

    async def init(conn: Any) -> None:
        conn.add_query_logger(lambda record: queries.append(record.query))
        conn.add_log_listener(lambda _conn, message: notices.append(message.message))
        conn.add_termination_listener(lambda _conn: closed.append(1))

    notice = "DO $$ BEGIN RAISE NOTICE 'n%s'; END $$"
    async with Pool(_target(request, mode), prepared_statements=mode, min_size=1, max_size=1,
                    init=init, telemetry=False) as pool:
        async with pool.acquire() as conn:
            conn.add_query_logger(lambda record: by_holder.append(record.query))
            await conn.execute(notice % 1)
        async with pool.acquire() as conn:
            await conn.execute(notice % 2)
        assert await pool.fetchval("SELECT 3") == 3
        await pool.expire_connections()
        assert await pool.fetchval("SELECT 4") == 4
        for _ in range(50):  # the expired connection's, closed gracefully in the background
            if closed:
                break
            await asyncio.sleep(0.02)
        assert closed == [1]
    assert closed == [1, 1]
    assert [q for q in queries if q != "SELECT 1"] == [
        notice % 1, notice % 2, "SELECT 3", "SELECT 4"]
    assert notices == ["n1", "n2"]
    assert by_holder == [notice % 1]


async def test_init_codec_holds_when_unnamed_decodes_a_changed_result(legacy: PgBouncerServer) -> None:
    """"unnamed" decodes a reused statement's rows with its own cached description, and again
    with the reply's one when the result changed: both use the codecs init set."""
    async with Pool(legacy.dsn(), name="init-unnamed-changed", prepared_statements="unnamed",
                    max_size=1, init=_jsonb_codec, telemetry=False) as pool:
        await pool.execute("DROP TABLE IF EXISTS dropin_codec")
        await pool.execute("CREATE TABLE dropin_codec (id int, doc jsonb, note text)")
        await pool.execute("""INSERT INTO dropin_codec VALUES (1, '{"v": 1}', '{"n": 2}')""")
        query = "SELECT id, doc FROM dropin_codec WHERE id = $1"
        try:
            for _ in range(2):  # described, then reused
                assert tuple(await pool.fetchrow(query, 1) or ()) == (1, {"v": 1})
            await pool.execute("ALTER TABLE dropin_codec ALTER id TYPE bigint")
            # Decoded again with the reply's description: the codec still decodes `doc`.
            assert tuple(await pool.fetchrow(query, 1) or ()) == (1, {"v": 1})
            assert tuple(await pool.fetchrow(query, 1) or ()) == (1, {"v": 1})
            stats = pool.stats().statement_cache
            assert stats is not None
            assert stats.stale == 1

            # A column retyped to jsonb: the codec reads jsonb as text, and the reused statement
            # asked for the old column in binary; jsonb's binary form is its text after a version
            # byte, so the rows are decoded with the codec at once (docs/describe-cache.md).
            text_query = "SELECT note FROM dropin_codec WHERE id = $1"
            assert await pool.fetchval(text_query, 1) == '{"n": 2}'
            await pool.execute("ALTER TABLE dropin_codec ALTER note TYPE jsonb USING note::jsonb")
            assert await pool.fetchval(text_query, 1) == {"n": 2}
            assert await pool.fetchval(text_query, 1) == {"n": 2}
        finally:
            await pool.execute("DROP TABLE dropin_codec")


async def test_init_failure_closes_the_connection_and_reaches_the_caller(pooler: Pooler) -> None:
    fail = True

    async def init(conn: Any) -> None:
        if fail:
            raise RuntimeError("init failed")

    async with Pool(pooler.dsn(), name="init-fails", min_size=0, max_size=2, init=init,
                    telemetry=False) as pool:
        with pytest.raises(RuntimeError, match="init failed"):
            await pool.fetchval("SELECT 1")
        stats = pool.stats()
        assert (stats.size, stats.in_use) == (0, 0)
        fail = False
        assert await pool.fetchval("SELECT 1") == 1

    with pytest.raises(RuntimeError, match="init failed"):
        fail = True
        await asyncpool.create_pool(pooler.dsn(), name="init-fails-open", min_size=1, init=init,
                                    telemetry=False)


async def test_a_plain_def_hook_is_named_and_one_returning_a_coroutine_works(pooler: Pooler) -> None:
    """A hook written without `async` ran, but returned nothing to await: a PoolConfigError
    naming the hook and the fix (it was Python's bare "object NoneType can't be used in 'await'
    expression"); the connection is closed and nothing stays counted. A plain function that
    returns a coroutine, as asyncpg users write (``init=lambda conn: conn.set_type_codec(...)``),
    is awaited as before."""
    seen: list[str] = []

    def plain_init(conn: Any) -> None:
        seen.append("init")

    def plain_setup(conn: Any) -> None:
        seen.append("setup")

    # (mypy refuses both hooks: this is what code without type checking gets.)
    async with Pool(pooler.dsn(), name="plain-init", min_size=0, max_size=1,
                    init=plain_init, telemetry=False) as pool:  # type: ignore[arg-type]
        with pytest.raises(asyncpool.PoolConfigError,
                           match=r"'plain-init': the init hook returned NoneType, not something to "
                                 r"await: write it as `async def init\(conn\): ...`"):
            await pool.fetchval("SELECT 1")
        stats = pool.stats()
        assert (stats.size, stats.in_use) == (0, 0)
    async with Pool(pooler.dsn(), name="plain-setup", max_size=1,
                    setup=plain_setup, telemetry=False) as pool:  # type: ignore[arg-type]
        with pytest.raises(asyncpool.PoolConfigError, match="the setup hook returned NoneType"):
            async with pool.acquire():
                pytest.fail("the block must not run")
        stats = pool.stats()
        assert (stats.in_use, stats.closed_total) == (0, 1)
    assert seen == ["init", "setup"]  # each ran once: the error comes after the call

    async def ran(what: str, statement: Awaitable[object]) -> None:
        # Appends only when awaited: proof that the lambda's coroutine was.
        assert await statement == 1
        seen.append(what)

    async with Pool(pooler.dsn(), name="lambda-hooks", max_size=1, telemetry=False,
                    init=lambda conn: ran("lambda init", conn.fetchval("SELECT 1")),
                    setup=lambda conn: ran("lambda setup", conn.fetchval("SELECT 1"))) as pool:
        assert await pool.fetchval("SELECT 2") == 2
    assert seen[2:] == ["lambda init", "lambda setup"]


async def test_an_init_hook_past_connect_timeout_is_named_not_the_network(pooler: Pooler) -> None:
    """`init` runs within connect_timeout; when the time runs out in the hook the error says
    so (it said "no answer ... check host, port and firewall"), and the connection is closed.
    (Retried as a failed login: the caller may get it as the last error of a PoolTimeoutError.)"""
    async def slow_init(conn: Any) -> None:
        await asyncio.sleep(5)

    async with Pool(pooler.dsn(), name="slow-init", min_size=0, max_size=1, init=slow_init,
                    connect_timeout=0.5, acquire_timeout=3, telemetry=False) as pool:
        with pytest.raises(asyncpool.PoolError) as info:
            await pool.open()
            await pool.fetchval("SELECT 1")
        message = str(info.value)
        assert isinstance(info.value, asyncpool.ConnectError | asyncpool.PoolTimeoutError)
        assert "the init hook was still running" in message, message
        assert "connect_timeout=0.5s" in message
        assert "firewall" not in message
        assert pool.stats().size == 0
        assert pool.stats().closed_total == pool.stats().created_total


async def test_an_init_hooks_own_timeout_is_not_read_as_connect_timeout(pooler: Pooler) -> None:
    """A TimeoutError the hook raises itself (a statement's ``timeout=``) is said to be the
    hook's, with it as the cause; not connect_timeout running out, nor the network."""
    async def init(conn: Any) -> None:
        await conn.execute("SELECT pg_sleep(1)", timeout=0.05)

    async with Pool(pooler.dsn(), name="init-own-timeout", min_size=0, max_size=1, init=init,
                    connect_timeout=20, acquire_timeout=2, telemetry=False) as pool:
        with pytest.raises(asyncpool.PoolError) as info:
            await pool.fetchval("SELECT 1")
        message = str(info.value)
        assert "the init hook raised TimeoutError" in message, message
        assert "connect_timeout=20s ran out" not in message
        assert "firewall" not in message


async def test_setup_runs_at_each_checkout_with_the_pooled_connection(pooler: Pooler) -> None:
    seen: list[tuple[PooledConnection, int]] = []

    async def setup(conn: PooledConnection) -> None:
        seen.append((conn, await conn.fetchval("SELECT pg_backend_pid()")))

    async with Pool(pooler.dsn(), name="setup", max_size=1, setup=setup, telemetry=False) as pool:
        for _ in range(3):
            async with pool.acquire() as conn:
                assert seen[-1][0] is conn
        conn = await pool.acquire()
        await pool.release(conn)
        async with pool.transaction() as conn:
            assert seen[-1][0] is conn
        await pool.fetchval("SELECT 1")
        assert len(seen) == 6
        assert all(isinstance(c, PooledConnection) for c, _ in seen)


async def test_setup_failure_closes_the_connection_and_reaches_the_caller(pooler: Pooler) -> None:
    fail = True

    async def setup(conn: PooledConnection) -> None:
        await conn.execute("SELECT 1")
        if fail:
            raise RuntimeError("setup failed")

    async with Pool(pooler.dsn(), name="setup-fails", max_size=1, setup=setup,
                    telemetry=False) as pool:
        with pytest.raises(RuntimeError, match="setup failed"):
            async with pool.acquire():
                pytest.fail("the block must not run")
        with pytest.raises(RuntimeError, match="setup failed"):
            await pool.acquire()
        stats = pool.stats()
        assert (stats.in_use, stats.closed_total) == (0, 2)
        fail = False
        assert await pool.fetchval("SELECT 2") == 2


async def test_setup_counts_in_the_acquire_timeout(pooler: Pooler) -> None:
    """As in asyncpg, the acquire's timeout covers the setup hook: one that runs past it (here
    a statement that takes 5 s) ends in PoolTimeoutError when the time is up, and the connection
    it was running on is closed; a timeout raised by the hook itself is the hook's error."""
    slow = True

    async def setup(conn: PooledConnection) -> None:
        if slow:
            await conn.execute("SELECT pg_sleep(5)")

    async with Pool(pooler.dsn(), name="setup-slow", max_size=1, setup=setup,
                    acquire_timeout=1.5, telemetry=False) as pool:
        async def block(timeout: float | None) -> None:
            async with pool.acquire(**({} if timeout is None else {"timeout": timeout})):
                pytest.fail("the block must not run")

        async def unscoped() -> None:
            await pool.release(await pool.acquire())

        attempts: list[Callable[[], Awaitable[Any]]] = [
            lambda: block(1.2), lambda: block(None), unscoped, lambda: pool.fetchval("SELECT 1")]
        for attempt in attempts:
            started = time.monotonic()
            with pytest.raises(asyncpool.PoolTimeoutError, match="setup hook was still running"):
                async with asyncio.timeout(4):
                    await attempt()
            # Each attempt logs in again (the last one's connection was closed) before its hook
            # runs: timeouts of a second or more leave that login room on a loaded machine (at
            # 0.3 s it timed out while still connecting under CI's load).
            assert time.monotonic() - started < 3.5
        stats = pool.stats()
        assert (stats.in_use, stats.closed_total, stats.timeouts_total) == (0, 4, 4)
        slow = False
        assert await pool.fetchval("SELECT 2") == 2


# -- the other options ----------------------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
async def test_command_timeout(request: pytest.FixtureRequest, mode: PreparedStatements) -> None:
    async with Pool(_target(request, mode), name=f"command-timeout-{mode}", prepared_statements=mode,
                    max_size=1, command_timeout=0.2, telemetry=False) as pool:
        assert pool.config.command_timeout == 0.2
        with pytest.raises(asyncio.TimeoutError):
            await pool.fetchval("SELECT pg_sleep($1::float)", 3.0)
        # A call's own timeout wins.
        assert await pool.fetchval("SELECT pg_sleep($1::float)::text", 0.4, timeout=5) == ""


async def test_max_inactive_connection_lifetime_is_max_idle(pooler: Pooler) -> None:
    async with Pool(pooler.dsn(), name="max-inactive", min_size=0, max_size=2,
                    max_inactive_connection_lifetime=0.3, telemetry=False) as pool:
        assert pool.config.max_idle == 0.3
        assert await pool.fetchval("SELECT 1") == 1
        assert pool.stats().size == 1
        for _ in range(50):
            if pool.stats().size == 0:
                break
            await asyncio.sleep(0.1)
        assert pool.stats().size == 0
    assert Pool("postgresql://a@h/d", max_inactive_connection_lifetime=0).config.max_idle is None


async def test_max_queries(pooler: Pooler) -> None:
    async with Pool(pooler.dsn(), name="max-queries", max_size=1, max_queries=3,
                    validate_after=None, telemetry=False) as pool:
        async with pool.acquire() as conn:
            first = conn.raw
            for _ in range(2):
                await conn.fetchval("SELECT 1")
        async with pool.acquire() as conn:
            assert conn.raw is first  # 2 queries so far
            await conn.fetchval("SELECT 1")
        assert pool.stats().closed_total == 1  # the third query reached max_queries
        async with pool.acquire() as conn:
            assert conn.raw is not first


async def test_max_queries_counts_the_query_helpers(pooler: Pooler) -> None:
    """The helpers' statements count toward ``max_queries`` and the one that reaches it retires
    the connection, as through acquire()."""
    async with Pool(pooler.dsn(), name="max-queries-helpers", max_size=1, max_queries=3,
                    validate_after=None, telemetry=False) as pool:
        for _ in range(2):
            assert await pool.fetchval("SELECT 1") == 1
        assert (pool.stats().created_total, pool.stats().closed_total) == (1, 0)
        await pool.execute("SELECT 1")
        assert pool.stats().closed_total == 1  # the third query reached max_queries
        assert await pool.fetchval("SELECT 1") == 1
        assert pool.stats().created_total == 2


class _Row(asyncpg.Record):
    def doubled(self) -> int:
        return int(self["n"]) * 2


@pytest.mark.parametrize("mode", MODES)
async def test_record_class(request: pytest.FixtureRequest, mode: PreparedStatements) -> None:
    async with Pool(_target(request, mode), name=f"record-class-{mode}", prepared_statements=mode,
                    max_size=1, record_class=_Row, telemetry=False) as pool:
        for _ in range(2):
            row = await pool.fetchrow("SELECT $1::int AS n", 21)
            assert isinstance(row, _Row)
            assert row.doubled() == 42
            rows = await pool.fetch("SELECT 4 AS n")
            assert isinstance(rows[0], _Row)


class _SubRow(_Row):
    pass


class _RowPool(Pool[_Row]):
    """A subclass that declares its rows (``Pool[_Row]``) and leaves record_class to callers."""


class _RowsGivenPool(Pool[_Row]):
    """A subclass that declares its rows and gives their class itself."""

    def __init__(self, dsn: str, **options: Any) -> None:
        super().__init__(dsn, record_class=_Row, **options)


_R = TypeVar("_R", bound=asyncpg.Record)


class _GenericPool(Pool[_R]):
    """A subclass generic in its rows: they are whatever it is made with."""


class _RowGenericPool(_GenericPool[_Row]):
    pass


async def test_a_subclass_declaring_its_rows_made_with_their_class_returns_them(
        postgres: PostgresServer) -> None:
    """``class RowPool(Pool[Row])`` made with ``record_class=Row`` (or a subclass, or in its
    `config`), or giving it itself, returns Rows; one generic in its rows takes any class."""
    dsn = postgres.dsn()
    pools: list[tuple[Pool[_Row], type[_Row]]] = [
        (_RowPool(dsn, record_class=_Row), _Row),
        (_RowPool(dsn, record_class=_SubRow), _SubRow),
        (_RowPool(config=PoolConfig(dsn=dsn, connect_kwargs={"record_class": _Row})), _Row),
        (_RowsGivenPool(dsn), _Row),
        (_RowGenericPool(dsn, record_class=_Row), _Row),
        (_GenericPool(dsn, record_class=_SubRow), _SubRow),
    ]
    for pool, record_class in pools:
        async with pool:
            row = await pool.fetchrow("SELECT $1::int AS n", 21)
            assert type(row) is record_class
            assert row.doubled() == 42
    records: _GenericPool[asyncpg.Record] = _GenericPool(dsn, max_size=1, telemetry=False)
    async with records:
        assert type(await records.fetchrow("SELECT 1")) is asyncpg.Record


@pytest.mark.parametrize("cls", [_RowPool, _RowGenericPool])
def test_a_subclass_declaring_its_rows_is_refused_without_their_class(cls: type[Pool[_Row]]) -> None:
    """Type checkers take ``RowPool(dsn)`` (a Pool[Row] is a Pool[Record]), whose rows would be
    asyncpg's Records: refused when made, naming the record class to give."""
    name = cls.__qualname__
    dsn = "postgresql://a@h/d"
    with pytest.raises(PoolConfigError, match=(
            rf"^{name} is a Pool\[_Row\] but was made without record_class=: its rows would be "
            rf"asyncpg.Record, not _Row. Give record_class=_Row \(or a subclass of it\) to "
            rf"{name}\(\), or have {name}.__init__ pass it to Pool.__init__$")):
        cls(dsn)
    with pytest.raises(PoolConfigError, match=rf"^{name} is a Pool\[_Row\] but was made without"):
        cls(config=PoolConfig(dsn=dsn))
    with pytest.raises(PoolConfigError, match=(
            rf"^{name} is a Pool\[_Row\] but was made with record_class=asyncpg.Record: its rows "
            "would be asyncpg.Record, not _Row")):
        cls(dsn, record_class=asyncpg.Record)  # type: ignore[arg-type]  # (refused by mypy too)


async def test_server_settings(postgres: PostgresServer, legacy: PgBouncerServer) -> None:
    settings = {"application_name": "dropin-app", "search_path": "pg_catalog"}
    async with Pool(postgres.dsn(), name="server-settings", max_size=1, server_settings=settings,
                    telemetry=False) as pool:
        assert await pool.fetchval("SHOW application_name") == "dropin-app"
        assert await pool.fetchval("SHOW search_path") == "pg_catalog"
    async with Pool(legacy.dsn(), name="server-settings-pgbouncer", max_size=1,
                    server_settings={"application_name": "dropin-pgb"}, telemetry=False) as pool:
        assert await pool.fetchval("SHOW application_name") == "dropin-pgb"


class _Connection(asyncpg.Connection):
    def marker(self) -> str:
        return "mine"


@pytest.mark.parametrize("mode", MODES)
async def test_connection_class(request: pytest.FixtureRequest, mode: PreparedStatements) -> None:
    async with Pool(_target(request, mode), name=f"connection-class-{mode}", prepared_statements=mode,
                    max_size=1, connection_class=_Connection, telemetry=False) as pool, \
            pool.acquire() as conn:
        assert isinstance(conn.raw, _Connection)
        assert conn.raw.marker() == "mine"
        assert await conn.fetchval("SELECT $1::int", 5) == 5


async def test_timeout_is_connect_timeout(silent_server: int) -> None:
    pool = Pool(f"postgresql://app@127.0.0.1:{silent_server}/app", name="timeout", min_size=1,
                timeout=0.3, telemetry=False)
    assert pool.config.connect_timeout == 0.3
    with pytest.raises(asyncpool.ConnectError, match=r"no answer within connect_timeout=0\.3s"):
        await pool.open()  # the first login's failure
    await pool.close()


async def test_statement_cache_size_0_is_off(legacy: PgBouncerServer) -> None:
    async with Pool(legacy.dsn(), name="cache-0", max_size=1, statement_cache_size=0,
                    telemetry=False) as pool:
        assert pool.config.prepared_statements == "off"
        for i in range(3):
            assert await pool.fetchval("SELECT $1::int + 1", i) == i + 1
        assert pool.stats().statement_cache is None


# -- mapping, refusals ----------------------------------------------------------------------


def test_asyncpg_names_map_to_asyncpool_options() -> None:
    assert translate({"timeout": 3, "max_inactive_connection_lifetime": 60,
                      "max_cached_statement_lifetime": 0}) == {
        "connect_timeout": 3, "max_idle": 60, "statement_cache_ttl": None}
    assert translate({"statement_cache_size": 0}) == {"prepared_statements": "off"}
    assert translate({"statement_cache_size": 0, "prepared_statements": "off"}) == {
        "prepared_statements": "off"}
    assert translate({"statement_cache_size": 50}) == {"statement_cache_size": 50}
    assert translate({"host": "db", "port": 6432, "user": "app", "connect_kwargs": {"x": 1}}) == {
        "connect_kwargs": {"x": 1, "host": "db", "port": 6432, "user": "app"}}


def test_connect_options_reach_connect_kwargs_over_a_config() -> None:
    base = PoolConfig(dsn="postgresql://a@h/d", connect_kwargs={"passfile": "/p"})
    pool = Pool(config=base, record_class=_Row, timeout=4)
    assert dict(pool.config.connect_kwargs) == {"passfile": "/p", "record_class": _Row}
    assert pool.config.connect_timeout == 4


def test_a_command_timeout_given_twice_must_agree() -> None:
    """The option and ``connect_kwargs['command_timeout']`` with two values: the option won
    without a word (a query ran past the limit the user wrote in connect_kwargs)."""
    with pytest.raises(PoolConfigError, match=r"command_timeout is given twice and the two "
                       r"disagree: command_timeout=2 and connect_kwargs\['command_timeout'\]=0.5"):
        Pool("postgresql://a@h/d", command_timeout=2, connect_kwargs={"command_timeout": 0.5})
    pool = Pool("postgresql://a@h/d", command_timeout=2, connect_kwargs={"command_timeout": 2})
    assert pool.config.command_timeout == 2


@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({"statement_cache_size": 0, "prepared_statements": "on"},
         "statement_cache_size=0 is asyncpg's way to say prepared_statements='off'"),
        ({"statement_cache_size": 0, "prepared_statements": "unnamed"}, "give one of them"),
        ({"statement_cache_size": -1}, "statement_cache_size=-1: must be a whole number >= 1 "
                                       r"\(asyncpg's statement_cache_size=0 is prepared_statements='off'"),
        ({"timeout": 1, "connect_timeout": 2}, "timeout= and connect_timeout= are the same option"),
        ({"record_class": dict}, "record_class=<class 'dict'>: must be a subclass of asyncpg"),
        ({"connection_class": object}, "connection_class=<class 'object'>: must be a subclass"),
        ({"max_queries": 0}, "max_queries=0: must be a whole number >= 1"),
        ({"command_timeout": -1}, "command_timeout=-1: must be a number of seconds > 0"),
        ({"init": "codecs"}, "init='codecs': must be an async function"),
        # asyncpg.connect's address and identity: refused here, not at each login.
        ({"user": 5}, "user=5: must be a string"),
        ({"database": b"app"}, "database=b'app': must be a string"),
        ({"password": 123}, r"password: must be a string, not int \(for a password or token "
                            "that changes, give credentials="),
        ({"host": 7}, "host=7: must be a host name"),
        ({"host": ["db", ""]}, r"host=\['db', ''\]: must be a host name"),
        ({"port": "abc"}, "port='abc': must be a port number from 1 to 65535"),
        ({"port": -1}, "port=-1: must be a port number"),
        ({"port": 99999}, "port=99999: must be a port number"),
        ({"port": True}, "port=True: must be a port number"),
        ({"connect_kwargs": {"port": [5432, "x"]}}, r"port=\[5432, 'x'\]: must be a port number"),
        # Refused here: it failed at the first login, as a ConnectError counted as one.
        ({"max_cacheable_statement_size": -1},
         r"max_cacheable_statement_size=-1: must be a number of bytes >= 0"),
        ({"max_cacheable_statement_size": "1k"}, "max_cacheable_statement_size='1k'"),
        # Set by the pool from its own options: another value here was overridden silently.
        ({"connect_kwargs": {"statement_cache_size": -5}},
         r"connect_kwargs\['statement_cache_size'\]=-5: the pool sets it to 0 "
         r"\(prepared_statements='unnamed'\); to change it, give statement_cache_size= to the "
         "pool, with prepared_statements='on'"),
        ({"connect_kwargs": {"max_cached_statement_lifetime": 30}, "prepared_statements": "on"},
         "give statement_cache_ttl= to the pool"),
    ],
)
def test_bad_asyncpg_values_say_what_to_do(options: dict[str, Any], match: str) -> None:
    with pytest.raises(PoolConfigError, match=match):
        Pool("postgresql://a@h/d", **options)
    pool = Pool("postgresql://a@h/d")
    if not {"user", "database", "password", "host", "port", "connect_kwargs"}.isdisjoint(options):
        # set_connect_args() takes asyncpg.connect's arguments: the same checks, nothing changed.
        connect = options.get("connect_kwargs", options)
        # (The pool's own options are not connection arguments there: refused as such.)
        own = {"statement_cache_size", "max_cached_statement_lifetime",
               "prepared_statements"} & set(connect)
        with pytest.raises(PoolConfigError, match="not a connection argument" if own else match):
            pool.set_connect_args("postgresql://a@h/d", **connect)
        assert pool.config.connect_kwargs == {}


def test_asyncpg_values_the_pool_sends_anyway_are_taken() -> None:
    """asyncpg's PgBouncer advice, ``statement_cache_size=0`` in the connect arguments, is what
    the pool sends outside the "on" mode; sizes as asyncpg takes them (a float, numpy's ints)."""
    for mode in ("unnamed", "off"):
        Pool("postgresql://a@h/d", prepared_statements=mode,
             connect_kwargs={"statement_cache_size": 0, "max_cached_statement_lifetime": 30})
    Pool("postgresql://a@h/d", prepared_statements="on", statement_cache_size=50,
         connect_kwargs={"statement_cache_size": 50})
    Pool("postgresql://a@h/d", max_cacheable_statement_size=2048.0)  # type: ignore[call-overload]


def test_good_connect_values_are_taken() -> None:
    pool = Pool("postgresql://a@h/d", user="app", host=["db1", "/run/postgresql"],
                port=[5432, 6432], database="app", password="pw")  # pragma: allowlist secret
    assert pool.config.connect_kwargs["port"] == [5432, 6432]
    # asyncpg reads a port given as digits too.
    assert Pool("postgresql://a@h/d", connect_kwargs={"port": "6432"}).config.connect_kwargs == {
        "port": "6432"}


@pytest.mark.parametrize(
    ("name", "equivalent"),
    [
        ("connect", "credentials="),
        ("reset", "resets a returned connection itself"),
    ],
)
def test_options_that_do_not_fit_name_the_equivalent(name: str, equivalent: str) -> None:
    with pytest.raises(PoolConfigError, match=f"{name}=: not an asyncpool option; .*{equivalent}"):
        Pool("postgresql://a@h/d", **_options(name, object()))


def test_loop_must_be_an_event_loop() -> None:
    """asyncpg's ``loop=`` is taken by Pool() and create_pool() (tests/test_asyncpg_dropin.py);
    something else than a loop is refused when the pool is made. lambda_config(), which makes
    a PoolConfig (no loop in it), refuses it, naming where it is taken."""
    with pytest.raises(PoolConfigError, match=(
            r"^loop=object: must be an asyncio event loop \(the one that opens the pool\) or "
            "None; a pool uses the event loop it is opened on$")):
        Pool("postgresql://a@h/d", **_options("loop", object()))
    with pytest.raises(PoolConfigError, match=(
            r"loop=: not an asyncpool option; a pool uses the event loop it is opened on: .* "
            r"or give loop= to Pool\(\) or create_pool\(\), which check it when the pool opens")):
        lambda_config(**_options("loop", object()))


def test_options_that_do_not_fit_take_asyncpgs_default() -> None:
    """Code that passes asyncpg's defaults on (``loop=None``...) asks for nothing: accepted."""
    defaults: dict[str, Any] = {"loop": None, "connect": None, "reset": None}
    pool = Pool("postgresql://a@h/d", **defaults)
    assert pool.get_min_size() == PoolConfig().min_size


@pytest.mark.parametrize(
    ("name", "closest"),
    [("max_sise", "max_size"), ("min_szie", "min_size"), ("comand_timeout", "command_timeout"),
     ("setupp", "setup"), ("max_inactive_connection_life", "max_inactive_connection_lifetime"),
     ("recordclass", "record_class")],
)
async def test_unknown_options_name_the_closest(name: str, closest: str) -> None:
    with pytest.raises(PoolConfigError,
                       match=f"{name}=: not an option of Pool\\(\\); did you mean {closest}="):
        Pool("postgresql://a@h/d", **_options(name, 1))
    with pytest.raises(PoolConfigError, match=f"did you mean {closest}="):
        await asyncpool.create_pool("postgresql://a@h/d", **_options(name, 1))


@pytest.mark.parametrize(
    ("name", "advice"),
    [("max_waiting", "waits at most acquire_timeout="), ("reconnect_timeout", "retried with backoff"),
     # conninfo is often libpq's key=value string, which the DSN takes too (it said "a URL").
     ("conninfo", "the first argument (dsn=): the same string, a postgresql:// URL or libpq's "
                  "key=value form"), ("open", "await pool.open()"), ("configure", "init="),
     ("check", "validate_after="), ("kwargs", "connect_kwargs="), ("num_workers", "no worker"),
     ("reconnect_failed", "ConnectError")],
)
def test_psycopg_pool_options_say_what_asyncpool_does_instead(name: str, advice: str) -> None:
    # The closest of asyncpool's names would mislead: max_waiting is not max_lifetime, nor
    # reconnect_timeout connect_timeout.
    with pytest.raises(PoolConfigError) as info:
        Pool("postgresql://a@h/d", **_options(name, 1))
    assert f"{name}=: not an option of Pool() (psycopg_pool's); " in str(info.value)
    assert advice in str(info.value)
    assert "did you mean" not in str(info.value)


def test_every_pool_config_field_is_a_typed_option() -> None:
    """PoolOptions (what type checkers see of Pool()'s keywords) names every PoolConfig option."""
    from dataclasses import fields

    from asyncpool.options import PoolOptions

    assert {f.name for f in fields(PoolConfig)} - {"dsn"} <= set(PoolOptions.__annotations__)


def test_replace_and_from_env_take_every_pool_config_field_with_its_type() -> None:
    """PoolConfigOptions (what type checkers see of ``PoolConfig.replace()``'s and
    ``from_env()``'s keywords) is PoolConfig's fields, each typed as the field is."""
    from dataclasses import fields

    from asyncpool.config_options import PoolConfigOptions

    typed = {name: getattr(hint, "__forward_arg__", hint)
             for name, hint in PoolConfigOptions.__annotations__.items()}
    assert typed == {f.name: f.type for f in fields(PoolConfig)}


def test_record_class_not_given_shows_its_meaning_and_survives_a_copy() -> None:
    """`Pool()`'s ``record_class`` default, as ``help(Pool)`` and IDEs show it: it was a bare
    ``object()`` (``= <object object at 0x...>``), and arguments bound from the signature and
    deep-copied (or pickled) before the call were refused: ``record_class=<object object at
    0x...>: must be a subclass of asyncpg...``."""
    for made in (Pool, asyncpool.create_pool):
        default = inspect.signature(made).parameters["record_class"].default
        assert repr(default) == "<not given: asyncpg.Record, or config's record_class>"
        assert "object at" not in str(inspect.signature(made))
        bound = inspect.signature(made).bind("postgresql://a@h/d", telemetry=False)
        bound.apply_defaults()
        for copied in (copy.deepcopy(bound.kwargs), pickle.loads(pickle.dumps(bound.kwargs))):  # noqa: S301 (our own bytes)
            assert copied["record_class"] is default
            pool = made(*bound.args, **copied)
            assert "record_class" not in pool.config.connect_kwargs
