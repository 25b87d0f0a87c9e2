"""SQLAlchemy's async engine on asyncpool, through real PgBouncers: the ORM, the pool's statement
modes, connections given back and discarded, codecs, errors, leaks."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import gc
import logging
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any, cast

import asyncpg
import pytest

pytest.importorskip("sqlalchemy")

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import async_sessionmaker
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from asyncpool import (
    ConnectionLeakedError,
    ConnectionLostError,
    Pool,
    PoolConfigError,
    PoolTimeoutError,
)
from asyncpool.config import LeakAction, PreparedStatements
from asyncpool.integrations.sqlalchemy import LendingPool, create_async_engine
from asyncpool.testing import PgBouncerServer, PostgresServer
from tests.cancel_support import cancelled_once_running
from tests.conftest import Pooler
from tests.pool_watchers import PoolWork
from tests.test_unnamed_wire import CountingRelay

#: (PgBouncer, statement mode) pairs that must work: 1.18 has no prepared statements.
MODES: list[tuple[str, PreparedStatements]] = [
    ("legacy", "off"), ("legacy", "unnamed"), ("current", "on"), ("current", "unnamed")]


class Base(DeclarativeBase):
    pass


class Item(Base):
    __tablename__ = "sqla_items"

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(sa.String(50))
    data: Mapped[dict[str, Any] | None] = mapped_column(sa.JSON, nullable=True)
    tags: Mapped[dict[str, Any] | None] = mapped_column(sa.dialects.postgresql.JSONB,
                                                        nullable=True)


@pytest.fixture(scope="module")
async def schema(postgres: PostgresServer) -> None:
    async with Pool(postgres.dsn(), name="sqla-schema", max_size=1, telemetry=False) as pool:
        engine = create_async_engine(pool)
        async with engine.begin() as conn:
            await conn.run_sync(Base.metadata.drop_all)
            await conn.run_sync(Base.metadata.create_all)
        await engine.dispose()


def _pooler(request: pytest.FixtureRequest, name: str) -> PgBouncerServer:
    server: PgBouncerServer = getattr(request.getfixturevalue("stack"), name)
    return server


@pytest.fixture(params=MODES, ids=[f"{'1.18' if p == 'legacy' else 'current'}-{m}"
                                   for p, m in MODES])
async def pool(request: pytest.FixtureRequest, schema: None) -> AsyncIterator[Pool]:
    which, mode = request.param
    server = _pooler(request, which)
    async with Pool(server.dsn(), name=f"sqla-{which}-{mode}", prepared_statements=mode,
                    max_size=5, acquire_timeout=10, telemetry=False) as p:
        yield p


async def _settled(pool: Pool, timeout: float = 5.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while pool.stats().in_use or pool.stats().waiting:
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"the pool did not settle: {pool.stats()}")
        await asyncio.sleep(0.02)


async def test_orm_insert_query_commit_rollback(pool: Pool) -> None:
    engine = create_async_engine(pool)
    Session = async_sessionmaker(engine, expire_on_commit=False)
    prefix = f"crud-{pool.name}-"
    async with Session() as session, session.begin():
        session.add_all([Item(name=f"{prefix}{i}", data={"i": i}, tags={"t": [i]})
                         for i in range(5)])
    async with Session() as session:
        rows = (await session.scalars(
            sa.select(Item).where(Item.name.like(f"{prefix}%")).order_by(Item.id))).all()
        assert [r.data for r in rows] == [{"i": i} for i in range(5)]
        assert [r.tags for r in rows] == [{"t": [i]} for i in range(5)]
        rows[0].name = f"{prefix}renamed"
        await session.rollback()
        rows[1].name = f"{prefix}committed"
        await session.commit()
    async with Session() as session:
        names = set((await session.scalars(
            sa.select(Item.name).where(Item.name.like(f"{prefix}%")))).all())
        assert f"{prefix}committed" in names
        assert f"{prefix}renamed" not in names
        result = await session.execute(
            sa.update(Item).where(Item.name.like(f"{prefix}%")).values(data=None))
        assert result.rowcount == 5  # type: ignore[attr-defined]
        await session.commit()
    await _settled(pool)
    stats = pool.stats()
    assert stats.in_use == 0
    assert stats.closed_total == 0, "a connection SQLAlchemy gave back was closed"
    await engine.dispose()


def _current_pool(request: pytest.FixtureRequest) -> PgBouncerServer:
    return _pooler(request, "current")


async def test_json_codecs_do_not_bleed_to_plain_pool_users(
        request: pytest.FixtureRequest, schema: None) -> None:
    """One connection, used in turn by plain pool users and SQLAlchemy: pool users get asyncpg's
    own json/jsonb results (text) before and after, SQLAlchemy gets Python objects."""
    server = _pooler(request, "legacy")
    async with Pool(server.dsn(), name="sqla-json", max_size=1, telemetry=False) as pool:
        query = """SELECT '{"a": 1}'::json, '{"b": [2]}'::jsonb"""
        first = await pool.fetchrow(query)
        assert first is not None
        before = tuple(first)
        assert before == ('{"a": 1}', '{"b": [2]}')
        engine = create_async_engine(pool)
        async with engine.connect() as conn:
            row = (await conn.execute(sa.select(
                sa.cast(sa.literal('{"a": 1}'), sa.JSON),
                sa.cast(sa.literal('{"b": [2]}'), sa.dialects.postgresql.JSONB)))).one()
            assert tuple(row) == ({"a": 1}, {"b": [2]})
            # The raw connection SQLAlchemy holds is the pool's, with no codec added.
            raw = (await conn.get_raw_connection()).driver_connection
            assert raw is not None
            assert tuple(await raw.fetchrow(query)) == before
        Session = async_sessionmaker(engine)
        async with Session() as session, session.begin():
            session.add(Item(name="json-bleed", data={"x": [1, 2]}, tags={"y": True}))
        async with Session() as session:
            item = (await session.scalars(sa.select(Item).where(Item.name == "json-bleed"))).one()
            assert (item.data, item.tags) == ({"x": [1, 2]}, {"y": True})
        after = await pool.fetchrow("SELECT data, tags FROM sqla_items WHERE name = 'json-bleed'")
        assert after is not None
        assert tuple(after) == ('{"x": [1, 2]}', '{"y": true}')
        again = await pool.fetchrow(query)
        assert again is not None
        assert tuple(again) == before
        assert pool.stats().size == 1  # the same connection throughout
        await engine.dispose()


#: json/jsonb results with no SQLAlchemy type that SQLAlchemy decodes on asyncpool as on
#: postgresql+asyncpg: at the top level, in arrays, as a field taken out of a composite, as a
#: domain over jsonb (the server describes a domain column as its base type).
JSON_SAME = {
    "top level": """SELECT '{"a": 1}'::json, '["b"]'::jsonb, '"s"'::jsonb""",
    "arrays": """SELECT ARRAY['{"a": 1}'::jsonb], ARRAY[ARRAY['{"a": 1}'::json]]""",
    "fields of a composite": "SELECT (v).j, (v).b, (v).n FROM sqla_json_rows",
    "domain": """SELECT '{"a": 1}'::sqla_json_domain""",
}
#: Those postgresql+asyncpg decodes and asyncpool's engine (no codec on the pool's connections)
#: gives as JSON text: json inside a record, whose type SQLAlchemy's result processing never
#: sees (docs/sqlalchemy.md, Codecs). Query, then the row as the stock dialect returns it.
JSON_NESTED: dict[str, tuple[str, tuple[Any, ...]]] = {
    "ROW()": ("""SELECT ROW('{"a": 1}'::json, '["b"]'::jsonb, 3)""", (({"a": 1}, ["b"], 3),)),
    "composite column": ("SELECT v FROM sqla_json_rows", (({"a": 1}, ["b"], 3),)),
    "array of composites": ("SELECT ARRAY[v] FROM sqla_json_rows", ([({"a": 1}, ["b"], 3)],)),
    "array of a domain over jsonb": ("""SELECT ARRAY['{"a": 1}'::sqla_json_domain]""",
                                     ([{"a": 1}],)),
}


@pytest.fixture(scope="module")
async def json_records(postgres: PostgresServer) -> None:
    """A composite type with json and jsonb fields, a table of it, a domain over jsonb."""
    import asyncpg

    conn = await asyncpg.connect(postgres.dsn())
    try:
        await conn.execute("""
            DROP TABLE IF EXISTS sqla_json_rows;
            DROP TYPE IF EXISTS sqla_json_pair;
            DROP DOMAIN IF EXISTS sqla_json_domain;
            CREATE TYPE sqla_json_pair AS (j json, b jsonb, n int);
            CREATE DOMAIN sqla_json_domain AS jsonb;
            CREATE TABLE sqla_json_rows (v sqla_json_pair);
            INSERT INTO sqla_json_rows VALUES (ROW('{"a": 1}', '["b"]', 3));""")
    finally:
        await conn.close()


def _plain(value: Any) -> Any:
    """A result as tuples and lists (asyncpg gives a composite as a Record)."""
    import asyncpg

    if isinstance(value, tuple | asyncpg.Record):
        return tuple(_plain(item) for item in value)
    if isinstance(value, list):
        return [_plain(item) for item in value]
    return value


async def _json_results(engine: Any) -> dict[str, Any]:
    """Each JSON_SAME and JSON_NESTED query's row, and Core statements with JSON types."""
    JSONB = sa.dialects.postgresql.JSONB
    statements: dict[str, Any] = {
        name: sa.text(query) for name, query in JSON_SAME.items()}
    statements.update((name, sa.text(query)) for name, (query, _) in JSON_NESTED.items())
    statements["core, typed"] = sa.select(
        sa.cast(sa.literal('{"a": 1}'), sa.JSON), sa.cast(sa.literal('"s"'), JSONB),
        sa.bindparam("p", {"a": [1]}, type_=JSONB))
    statements["text(), typed array"] = sa.text(
        """SELECT ARRAY['{"a": 1}'::jsonb] AS x""").columns(x=sa.ARRAY(JSONB))
    results = {}
    async with engine.connect() as conn:
        for name, statement in statements.items():
            results[name] = _plain(tuple((await conn.execute(statement)).one()))
    return results


async def _stock_json_results(postgres: PostgresServer) -> dict[str, Any]:
    """The same through SQLAlchemy's own postgresql+asyncpg engine, straight to PostgreSQL."""
    from sqlalchemy.ext.asyncio import create_async_engine as stock_create_async_engine

    stock = stock_create_async_engine(
        postgres.dsn().replace("postgresql://", "postgresql+asyncpg://", 1))
    try:
        return await _json_results(stock)
    finally:
        await stock.dispose()


async def test_json_inside_records_is_text_and_the_rest_as_postgresql_asyncpg(
        pool: Pool, postgres: PostgresServer, json_records: None) -> None:
    """Side by side with postgresql+asyncpg, in every pooler/mode pair: json/jsonb at the top
    level, in arrays, in Core statements with JSON types come back the same; inside a record
    (ROW(), a composite column, an array of those) and in an array of a domain over jsonb,
    the stock dialect's codecs decode them and asyncpool's engine gives JSON text (what "JSON
    inside ROW() does not work" was). Pinned both ways, as docs/sqlalchemy.md states it."""
    stock = await _stock_json_results(postgres)
    for name, (_, decoded) in JSON_NESTED.items():
        assert stock[name] == decoded, name
    engine = create_async_engine(pool)
    ours = await _json_results(engine)
    await engine.dispose()
    assert {name: ours[name] for name in ours if name not in JSON_NESTED} == {
        name: stock[name] for name in stock if name not in JSON_NESTED}
    assert ours["ROW()"] == (('{"a": 1}', '["b"]', 3),)
    assert ours["composite column"] == (('{"a": 1}', '["b"]', 3),)
    assert ours["array of composites"] == ([('{"a": 1}', '["b"]', 3)],)
    assert ours["array of a domain over jsonb"] == (['{"a": 1}'],)


def _json_codecs_for_everyone(loads: Callable[[str], Any]) -> Callable[[Any], Any]:
    """docs/sqlalchemy.md's "codec for everyone": the pool's ``init``."""

    async def init(conn: Any) -> None:
        # Binary, as SQLAlchemy's asyncpg dialect sets them: asyncpg decodes a composite type
        # only in binary, its fields included ("text encoding of composite types is not
        # supported"). jsonb's binary form is a version byte, 1, then the text.
        await conn.set_type_codec(
            "json", schema="pg_catalog", format="binary",
            encoder=str.encode, decoder=lambda data: loads(data.decode()))
        await conn.set_type_codec(
            "jsonb", schema="pg_catalog", format="binary",
            encoder=lambda text: b"\x01" + text.encode(),
            decoder=lambda data: loads(data[1:].decode()))

    return init


@pytest.mark.usefixtures("schema", "json_records")
@pytest.mark.parametrize(("which", "mode"), MODES)
async def test_a_codec_for_everyone_with_the_documented_deserializer(
        request: pytest.FixtureRequest, postgres: PostgresServer, which: str,
        mode: PreparedStatements) -> None:
    """docs/sqlalchemy.md's "codec for everyone": the pool's connections decode JSON themselves,
    and ``json_deserializer=lambda value: value`` keeps SQLAlchemy from decoding again (a JSON
    string, "123", stays the string). Every JSON result then comes back as from
    postgresql+asyncpg, json inside records included. The recipe's codecs were text-format:
    a composite type with a json field then failed to decode at all (InterfaceError)."""
    import json

    values: list[Any] = ["hello", "123", "true", {"a": 1}, [1, "x"]]
    async with Pool(_pooler(request, which).dsn(), name=f"sqla-codec-{mode}", max_size=1,
                    prepared_statements=mode, init=_json_codecs_for_everyone(json.loads),
                    telemetry=False) as pool:
        engine = create_async_engine(pool, json_deserializer=lambda value: value)
        async with engine.begin() as conn:
            await conn.execute(sa.text("CREATE TEMP TABLE codec_json (v jsonb) ON COMMIT DROP"))
            table = sa.table("codec_json", sa.column("v", sa.dialects.postgresql.JSONB))
            for value in values:
                await conn.execute(sa.insert(table).values(v=value))
            assert (await conn.execute(sa.select(table.c.v))).scalars().all() == values
            untyped = await conn.execute(sa.text("SELECT v FROM codec_json"))
            assert untyped.scalars().all() == values
        assert await _json_results(engine) == await _stock_json_results(postgres)
        assert await pool.fetchval("""SELECT '{"a": 1}'::jsonb""") == {"a": 1}  # (the codec's)
        await engine.dispose()


async def test_pool_timeout_is_the_cause(request: pytest.FixtureRequest, schema: None) -> None:
    server = _pooler(request, "legacy")
    async with Pool(server.dsn(), name="sqla-timeout", max_size=1, acquire_timeout=0.2,
                    telemetry=False) as pool:
        engine = create_async_engine(pool)
        async with pool.acquire():
            with pytest.raises(sa.exc.OperationalError) as caught:
                async with engine.connect() as conn:
                    await conn.execute(sa.text("SELECT 1"))
        assert isinstance(caught.value.__cause__, PoolTimeoutError)
        assert isinstance(caught.value.orig, PoolTimeoutError)
        assert "sqla-timeout" in str(caught.value)
        async with engine.connect() as conn:  # the pool serves again
            assert (await conn.execute(sa.text("SELECT 2"))).scalar() == 2
        assert pool.stats().in_use == 0
        await engine.dispose()


async def test_server_killed_connection_frees_its_slot(pool: Pool, postgres: PostgresServer) -> None:
    """The server ends the session under SQLAlchemy: the caller gets ConnectionLostError as the
    cause, SQLAlchemy discards the connection, and the pool's slot is free again."""
    import asyncpg

    engine = create_async_engine(pool)
    Session = async_sessionmaker(engine)
    closed = pool.stats().closed_total
    async with Session() as session:
        pid = (await session.execute(sa.text("SELECT pg_backend_pid()"))).scalar()
        admin = await asyncpg.connect(postgres.admin_dsn)
        try:
            assert await admin.fetchval("SELECT pg_terminate_backend($1)", pid)
        finally:
            await admin.close()
        with pytest.raises(sa.exc.DBAPIError) as caught:
            await session.execute(sa.text("SELECT 1"))
        assert isinstance(caught.value.__cause__, ConnectionLostError), repr(caught.value)
        assert caught.value.connection_invalidated
    await _settled(pool)
    stats = pool.stats()
    assert stats.in_use == 0
    assert stats.closed_total == closed + 1
    async with Session() as session:  # and serves again
        assert (await session.execute(sa.text("SELECT 3"))).scalar() == 3
    await engine.dispose()


async def test_pre_ping_after_every_backend_was_killed_gets_a_live_connection(
        postgres: PostgresServer, schema: None) -> None:
    """Every server session killed at once (a restart, a failover), then a session at once,
    with ``pool_pre_ping``: SQLAlchemy's ping fails, it invalidates the record and reconnects
    without pinging again. That reconnect took the next idle connection, dead as well but fresh
    by the clock (stock asyncpg's pool opens a new one there): 14 of 20 such sessions failed.
    The pool now checks its idle connections once one is found lost."""
    import asyncpg

    async with Pool(postgres.dsn(application_name="sqla-pre-ping"), max_size=4,
                    telemetry=False) as pool:
        engine = create_async_engine(pool, pool_pre_ping=True)
        admin = await asyncpg.connect(postgres.admin_dsn)
        failed = []
        try:
            for _ in range(8):
                # The four sessions hold their connections at once (a sleep of 20 ms let them
                # overlap less under load: 3 connections, not 4).
                together = asyncio.Barrier(4)

                async def warm(together: asyncio.Barrier) -> None:
                    async with engine.connect() as conn:
                        await conn.execute(sa.text("SELECT 1"))
                        async with asyncio.timeout(10):
                            await together.wait()

                await asyncio.gather(*(warm(together) for _ in range(4)))
                assert pool.stats().idle == 4
                assert await admin.fetchval(
                    "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                    "WHERE application_name = 'sqla-pre-ping'") == 4
                try:
                    async with engine.connect() as conn:
                        assert (await conn.execute(sa.select(1))).scalar() == 1
                except sa.exc.DBAPIError as error:
                    failed.append(repr(error.__cause__))
                await _settled(pool)
        finally:
            await admin.close()
            await engine.dispose()
        assert failed == []


async def test_a_raw_connection_closed_without_await_goes_back(pool: Pool) -> None:
    """``engine.raw_connection()``'s ``close()`` is not a coroutine: SQLAlchemy's own pools
    take the connection back without awaiting. The return raised ``MissingGreenlet`` and the
    checkout stayed held until the leak timeout. It goes back now (reset by a task of the
    pool's if it needs a round trip)."""
    engine = create_async_engine(pool)
    for in_transaction in (False, True):
        raw = await engine.raw_connection()
        if in_transaction:
            await raw.driver_connection.execute("BEGIN")  # type: ignore[union-attr]
        assert pool.stats().in_use == 1
        raw.close()
        await _settled(pool)
    async with engine.connect() as conn:
        assert (await conn.execute(sa.text("SELECT 9"))).scalar() == 9
    assert pool.stats().closed_total == 0
    await engine.dispose()


async def test_cancelled_session_frees_its_slot(pool: Pool) -> None:
    engine = create_async_engine(pool)
    Session = async_sessionmaker(engine)
    started = asyncio.Event()

    async def slow() -> None:
        async with Session() as session:
            await session.execute(sa.text("SELECT 1"))
            started.set()
            await session.execute(sa.text("SELECT pg_sleep(5)"))

    await cancelled_once_running(slow, started, after=0.2)
    await _settled(pool)
    assert pool.stats().in_use == 0
    async with Session() as session:
        assert (await session.execute(sa.text("SELECT 4"))).scalar() == 4
    await _settled(pool)
    assert pool.stats().in_use == 0
    await engine.dispose()


async def test_leaked_session_points_at_application_code(
        request: pytest.FixtureRequest, schema: None, caplog: pytest.LogCaptureFixture) -> None:
    server = _pooler(request, "legacy")
    async with Pool(server.dsn(), name="sqla-leak", max_size=1, leak_timeout=0.3,
                    acquire_timeout=5, telemetry=False) as pool:
        engine = create_async_engine(pool)
        Session = async_sessionmaker(engine)

        async def forgetful_handler(session: Any) -> None:
            await session.execute(sa.text("SELECT 5"))  # the line that took the connection
            await asyncio.sleep(0.8)
            await session.execute(sa.text("SELECT 6"))

        line = forgetful_handler.__code__.co_firstlineno + 1
        with caplog.at_level(logging.WARNING, logger="asyncpool.leaks"):
            async with Session() as session:
                with pytest.raises(sa.exc.DBAPIError) as caught:
                    await forgetful_handler(session)
        assert isinstance(caught.value.__cause__, ConnectionLeakedError), repr(caught.value)
        records = [r for r in caplog.records if r.name == "asyncpool.leaks"]
        assert len(records) == 1
        site: str = records[0].asyncpool_acquire_site  # type: ignore[attr-defined]
        assert f'File "{__file__}", line {line}, in forgetful_handler' in site, site
        assert "sqlalchemy" not in site.rsplit("in forgetful_handler", maxsplit=1)[-1]
        await _settled(pool)
        assert pool.stats().in_use == 0
        async with Session() as session:
            assert (await session.execute(sa.text("SELECT 7"))).scalar() == 7
        await engine.dispose()


async def test_json_results_without_a_type_are_decoded_as_sqlalchemys_asyncpg_dialect_does(
        pool: Pool) -> None:
    """json/jsonb results with no SQLAlchemy type (``text()``, ``func.jsonb_build_object``,
    ``exec_driver_sql``) come back as Python objects, as with ``postgresql+asyncpg`` (they came
    back as JSON text); typed columns as before, and plain pool users still get text."""
    engine = create_async_engine(pool)
    async with engine.connect() as conn:
        row = (await conn.execute(sa.text(
            """SELECT '{"a": 1}'::jsonb AS b, '[1, 2]'::json AS j, '"s"'::jsonb AS s,"""
            """ NULL::jsonb AS n, 5 AS i"""))).one()
        assert tuple(row) == ({"a": 1}, [1, 2], "s", None, 5)
        built = (await conn.execute(sa.select(sa.func.jsonb_build_object("k", 2)))).scalar()
        assert built == {"k": 2}
        driver = (await conn.exec_driver_sql("""SELECT '{"x": true}'::jsonb""")).scalar()
        assert driver == {"x": True}
        arrays = (await conn.execute(sa.text(
            """SELECT ARRAY['{"a": 1}'::jsonb, '[2]', NULL] AS b,"""
            """ ARRAY[ARRAY['1'::json], ARRAY['"s"'::json]] AS j"""))).one()
        assert tuple(arrays) == ([{"a": 1}, [2], None], [[1], ["s"]])
        typed = sa.text("""SELECT '"hello"'::jsonb AS b""").columns(
            b=sa.dialects.postgresql.JSONB)
        assert (await conn.execute(typed)).scalar() == "hello"
    assert await pool.fetchval("""SELECT '{"a": 1}'::jsonb""") == '{"a": 1}'
    await engine.dispose()


@pytest.mark.parametrize(("which", "mode"), MODES)
async def test_a_stream_reclaimed_as_a_leak_says_so(
        request: pytest.FixtureRequest, which: str, mode: PreparedStatements) -> None:
    """A session streaming a server-side cursor past leak_timeout: the holder gets SQLAlchemy's
    DBAPIError caused by `ConnectionLeakedError`, as on the other paths (it got asyncpg's
    QueryCanceledError, bare, from the stream's fetch)."""
    leaky = Pool(_pooler(request, which).dsn(), name="sqla-stream-leak", max_size=1,
                 prepared_statements=mode, leak_timeout=0.3, telemetry=False)
    async with leaky:
        engine = create_async_engine(leaky)
        Session = async_sessionmaker(engine)
        rows = 0
        with pytest.raises(sa.exc.DBAPIError) as caught:
            async with Session() as session, session.begin():
                result = await session.stream(sa.text(
                    "SELECT g, pg_sleep(0.1) FROM generate_series(1, 10) g"
                ).execution_options(yield_per=1))
                async for _ in result:
                    rows += 1
        assert isinstance(caught.value.__cause__, ConnectionLeakedError), repr(caught.value)
        assert rows < 10
        await _settled(leaky)
        await engine.dispose()


async def test_concurrent_sessions_reuse_records_instead_of_building_one_each(
        pool: Pool) -> None:
    """More sessions at once than the pool has connections: those that wait take the records
    of sessions that end (the ``connect`` event fires once per connection, as documented); each
    waiter built a record of its own before (99 ``connect`` events for 100 sessions)."""
    engine = create_async_engine(pool)
    events: collections.Counter[str] = collections.Counter()
    sa.event.listen(engine.sync_engine, "connect", lambda *_: events.update(["connect"]))
    Session = async_sessionmaker(engine)

    async def session_work() -> None:
        async with Session() as session, session.begin():
            await session.execute(sa.text("SELECT pg_sleep(0.002)"))

    await asyncio.gather(*(session_work() for _ in range(100)))
    assert events["connect"] <= pool.get_max_size(), events
    await _settled(pool)
    await engine.dispose()


async def test_a_session_collected_unclosed_frees_its_slot_at_once(
        request: pytest.FixtureRequest, schema: None) -> None:
    """A handler that makes a session, runs a statement and returns without closing it: once the
    session is collected, SQLAlchemy gives its connection back, as its own pool does. The
    acquire site the pool keeps (for a leak report) holds no frame, so the handler's locals (the
    session) are collectable; it waited for leak_timeout (30 s) before."""
    server = _pooler(request, "legacy")
    async with Pool(server.dsn(), name="sqla-gc", max_size=1, acquire_timeout=5,
                    telemetry=False) as pool:
        engine = create_async_engine(pool)
        Session = async_sessionmaker(engine)

        async def forgetful(tag: str) -> None:
            session = Session()
            await session.execute(sa.text("SELECT :tag"), {"tag": tag})

        await forgetful("first")
        with pytest.warns(sa.exc.SAWarning, match="garbage collector"):  # (as its own pool)
            gc.collect()
        await _settled(pool, timeout=2.0)
        async with Session() as session:
            assert (await session.execute(sa.text("SELECT 8"))).scalar() == 8
        await engine.dispose()


async def test_a_connection_collected_in_another_thread_is_given_back_on_the_pools_loop(
        postgres: PostgresServer, schema: None, caplog: pytest.LogCaptureFixture) -> None:
    """SQLAlchemy terminates a connection the garbage collector finds not given back, in the
    thread the collection runs in. From another thread, the pool's bookkeeping and asyncpg's
    transport were changed off their loop (in debug mode: "Non-thread-safe operation", the
    connection half retired). It is handed to the pool's loop, and a caller waiting for the
    slot gets it: the same connection, its transaction rolled back (it was closed, and the
    waiter logged in again)."""
    import threading

    asyncio.get_running_loop().set_debug(True)
    async with Pool(postgres.dsn(), name="sqla-gc-thread", max_size=1, acquire_timeout=5,
                    telemetry=False) as pool:
        engine = create_async_engine(pool)

        async def forgetful() -> None:
            conn = await engine.connect()
            await conn.exec_driver_sql("SELECT 1")

        await forgetful()
        assert pool.stats().in_use == 1
        waiter = asyncio.ensure_future(pool.fetchval("SELECT 2"))
        await asyncio.sleep(0.01)
        def collect_in_another_thread() -> None:
            collector = threading.Thread(target=gc.collect)
            collector.start()
            collector.join()

        gc.disable()  # (collected in that thread, not in this one's next allocation)
        try:
            with caplog.at_level(logging.ERROR), \
                    pytest.warns(sa.exc.SAWarning, match="garbage collector"):
                collect_in_another_thread()
        finally:
            gc.enable()
        assert not [r for r in caplog.records if "Exception terminating" in r.getMessage()]
        assert await asyncio.wait_for(waiter, 3) == 2
        stats = pool.stats()
        assert (stats.created_total, stats.closed_total, stats.leaked_total) == (1, 0, 1), stats
        await engine.dispose()


async def _use_every_connection(pool: Pool, count: int) -> list[str | None]:
    """Take `count` connections at once (each idle one, when that many are idle), run a
    statement on each, give them back: the mark a dropped transaction set on each, if any."""
    held = [await pool.acquire() for _ in range(count)]
    try:
        return [await conn.fetchval("SELECT current_setting('asyncpool.dropped', true)")
                for conn in held]
    finally:
        for conn in held:
            await pool.release(conn)


@contextlib.asynccontextmanager
async def _warm_engine(dsn: str, name: str, size: int,
                       **options: Any) -> AsyncIterator[tuple[Pool, Any, PoolWork]]:
    """A pool with `size` connections logged in and idle, what it does on its own, and an engine
    over it. validate_after: no connection is due a check by the clock, however slow the
    machine."""
    work = PoolWork()
    async with Pool(dsn, name=name, min_size=0, max_size=size, validate_after=60,
                    acquire_timeout=5, telemetry=False, observers=[work], **options) as pool:
        engine = create_async_engine(pool)
        await _use_every_connection(pool, size)
        yield pool, engine, work
        await engine.dispose()


async def _left_in_a_transaction(engine: Any) -> None:
    """Open a connection and a transaction that marks its session, and drop them."""
    conn = await engine.connect()
    await conn.execute(sa.text("SELECT set_config('asyncpool.dropped', 'left', true)"))


async def _collected(pool: Pool, forgetful: Callable[[], Awaitable[object]],
                     caplog: pytest.LogCaptureFixture | None = None) -> None:
    """Run `forgetful`, which leaves a SQLAlchemy connection unclosed, collect it (SQLAlchemy
    warns of that), and wait until the pool has it back; leak reports go to `caplog`."""
    async def dropped() -> None:
        await forgetful()
        gc.collect()

    with (caplog.at_level(logging.WARNING, logger="asyncpool.leaks") if caplog
          else contextlib.nullcontext()), \
            pytest.warns(sa.exc.SAWarning, match="garbage collector"):
        await dropped()
    await _settled(pool)


@pytest.mark.parametrize("where", ["1.18", "postgres"])
@pytest.mark.parametrize("dropped", ["connection, idle", "connection in a transaction",
                                     "session in a transaction"])
async def test_a_connection_dropped_unclosed_is_given_back_and_the_idle_ones_are_left_alone(
        request: pytest.FixtureRequest, schema: None, caplog: pytest.LogCaptureFixture,
        dropped: str, where: str) -> None:
    """A SQLAlchemy connection (or session) the application drops without closing it is
    terminated by SQLAlchemy when the garbage collector finds it. The pool took that as a lost
    connection: it closed it (a login to replace it) and marked every idle connection for a
    check (a round trip each: 4 here). It is given back now, its transaction rolled back in a
    task of the pool's, and reported as a leak (the WARNING, ``leaked_total``), naming the
    application's line; the idle connections are lent without a check."""
    server: PostgresServer | PgBouncerServer = (
        request.getfixturevalue("postgres") if where == "postgres" else _pooler(request, "legacy"))
    async with _warm_engine(server.dsn(), "sqla-dropped", 5) as (pool, engine, work):
        before = pool.stats()

        async def forgetful() -> None:
            mark = sa.text("SELECT set_config('asyncpool.dropped', 'left open', true)")
            if dropped == "session in a transaction":
                session = async_sessionmaker(engine)()
                await session.execute(mark)
            else:
                conn = await engine.connect()
                if dropped == "connection in a transaction":
                    await conn.execute(mark)

        await _collected(pool, forgetful, caplog)
        # (Rolled back: the mark is gone, or was never set; '' once set in a session.)
        assert not any(await _use_every_connection(pool, 5))
        after = pool.stats()
        # Logins, connections closed, idle ones checked, resets: (1, 1, 4, 0) before.
        assert (after.created_total - before.created_total,
                after.closed_total - before.closed_total, work.counts["validate"],
                work.counts["reset"]) == (0, 0, 0, 0 if dropped == "connection, idle" else 1), \
            work.counts
        assert after.leaked_total == 1
        reports = [r for r in caplog.records if r.name == "asyncpool.leaks"]
        assert len(reports) == 1, [r.getMessage() for r in reports]
        assert reports[0].asyncpool_dropped  # type: ignore[attr-defined]
        assert "dropped without being given back" in reports[0].getMessage()
        site: str = reports[0].asyncpool_acquire_site  # type: ignore[attr-defined]
        assert f'File "{__file__}"' in site, site
        assert "in forgetful" in site, site


@pytest.mark.parametrize("leak_action", ["log", "reclaim"])
async def test_a_connection_dropped_after_its_leak_report_is_reported_once(
        request: pytest.FixtureRequest, schema: None, caplog: pytest.LogCaptureFixture,
        leak_action: LeakAction) -> None:
    """A connection held past leak_timeout, then dropped: with ``leak_action="log"`` it was
    reported and left with its holder, and its collection gives it back (rolled back; closed
    before, as lost) with the "returned after all" line, not a second report. Reclaimed
    (``"reclaim"``), it was closed already: the collection takes nothing back twice."""
    async with _warm_engine(_pooler(request, "legacy").dsn(), "sqla-dropped-late", 2,
                            leak_timeout=1.0, leak_action=leak_action) as (pool, engine, work):

        async def forgetful() -> None:
            # (leak_timeout leaves this statement a second: reclaimed first, under a loaded
            # machine's 0.2 s, it failed, and SQLAlchemy invalidated the connection.)
            await _left_in_a_transaction(engine)
            for _ in range(200):  # until it is reported (bounded: 10 s)
                if pool.stats().leaked_total:
                    break
                await asyncio.sleep(0.05)

        await _collected(pool, forgetful, caplog)
        stats = pool.stats()
        assert stats.leaked_total == 1
        messages = [r.getMessage() for r in caplog.records if r.name == "asyncpool.leaks"]
        if leak_action == "log":
            assert len(messages) == 2, messages
            assert "returned after" in messages[1], messages
            assert (stats.created_total, stats.closed_total, stats.idle) == (2, 0, 2), stats
            assert work.counts["reset"] == 1, work.counts
        else:
            assert len(messages) == 1, messages
            assert "reclaimed it" in messages[0], messages
            assert (stats.created_total, stats.closed_total) == (2, 1), stats
        assert not any(await _use_every_connection(pool, 2))
        assert work.counts["validate"] == 0, work.counts


async def test_a_detached_connection_is_closed_alone(
        request: pytest.FixtureRequest, schema: None) -> None:
    """``Connection.detach()`` takes a connection out of SQLAlchemy's pool (its session state
    must not reach another holder): closed, it is closed, as SQLAlchemy's own pools close it.
    SQLAlchemy terminates it then, and the pool took that for a lost connection: every idle
    connection was checked before its next checkout (a round trip each: 3 here)."""
    async with _warm_engine(_pooler(request, "legacy").dsn(), "sqla-detached", 4) as (
            pool, engine, work):
        conn = await engine.connect()
        await conn.execute(sa.text("SELECT 1"))
        await conn.run_sync(lambda sync_conn: sync_conn.detach())
        assert (await conn.execute(sa.text("SELECT 2"))).scalar() == 2  # still usable
        await conn.close()
        await _settled(pool)
        assert pool.stats().idle == 3
        await _use_every_connection(pool, 3)
        stats = pool.stats()
        # Logins, connections closed, idle ones checked: (4, 1, 3) before.
        assert (stats.created_total, stats.closed_total, work.counts["validate"]) == (4, 1, 0), \
            work.counts
        assert work.counts["closed: detached from SQLAlchemy's pool"] == 1, work.counts


async def test_a_connection_dropped_with_leak_detection_off_is_given_back_unreported(
        request: pytest.FixtureRequest, schema: None, caplog: pytest.LogCaptureFixture) -> None:
    """``leak_timeout=None`` turns leak reports off: a dropped connection is given back all the
    same (it was closed as lost), and nothing is reported (SQLAlchemy's own warning stays)."""
    async with _warm_engine(_pooler(request, "legacy").dsn(), "sqla-dropped-unreported", 2,
                            leak_timeout=None) as (pool, engine, work):
        await _collected(pool, lambda: _left_in_a_transaction(engine), caplog)
        assert not any(await _use_every_connection(pool, 2))
        stats = pool.stats()
        assert (stats.created_total, stats.closed_total, stats.leaked_total) == (2, 0, 0), stats
        assert (work.counts["validate"], work.counts["reset"]) == (0, 1), work.counts
        assert not [r for r in caplog.records if r.name == "asyncpool.leaks"]


async def test_a_connection_dropped_after_its_statement_was_cancelled_is_reset(
        request: pytest.FixtureRequest, schema: None) -> None:
    """A connection whose task was cancelled during a statement, then dropped: SQLAlchemy
    invalidated it on the cancellation, which gives it back (the statement cancelled on the
    server, the transaction rolled back), before the collector finds it; not a leak then,
    and the idle connections are lent without a check."""
    async with _warm_engine(_pooler(request, "legacy").dsn(), "sqla-dropped-cancelled", 3) as (
            pool, engine, work):
        running = asyncio.Event()

        async def forgetful() -> None:
            conn = await engine.connect()
            await conn.execute(sa.text("SELECT set_config('asyncpool.dropped', 'left', true)"))
            running.set()
            await conn.execute(sa.text("SELECT pg_sleep(5)"))

        await cancelled_once_running(forgetful, running, after=0.2)
        gc.collect()  # (SQLAlchemy invalidated it already: no warning)
        await _settled(pool)
        stats = pool.stats()
        assert (stats.created_total, stats.closed_total, stats.leaked_total) == (3, 0, 0), stats
        assert not any(await _use_every_connection(pool, 3))
        assert (work.counts["validate"], work.counts["reset"]) == (0, 1), work.counts


@pytest.fixture
def statement_log(postgres: PostgresServer) -> Iterator[Callable[[str], collections.Counter[str]]]:
    """The server logs every parse, bind and execute step (log_min_duration_statement = 0) while
    the test runs; the returned function counts the steps logged so far for statements whose
    text contains a marker."""
    import asyncpg

    async def configure(value: str | None) -> None:
        admin = await asyncpg.connect(postgres.admin_dsn)
        try:
            if value is None:
                await admin.execute("ALTER SYSTEM RESET log_min_duration_statement")
            else:
                await admin.execute(f"ALTER SYSTEM SET log_min_duration_statement = {value}")
            await admin.execute("SELECT pg_reload_conf()")
        finally:
            await admin.close()

    assert postgres.workdir is not None
    log = postgres.workdir / "postgres.log"

    def steps(marker: str) -> collections.Counter[str]:
        counts: collections.Counter[str] = collections.Counter()
        for line in log.read_text(errors="replace").splitlines():
            found = re.search(r"duration: [\d.]+ ms  (parse|bind|execute) ([^:]*):", line)
            if found and marker in line:
                counts[found.group(1)] += 1
        return counts

    _run_sync(configure("0"))
    time.sleep(0.3)  # backends read the new setting at their next command
    try:
        yield steps
    finally:
        _run_sync(configure(None))


def _run_sync(coro: Any) -> None:
    import threading

    thread = threading.Thread(target=asyncio.run, args=(coro,))
    thread.start()
    thread.join(30)


@pytest.mark.parametrize("case", [
    ("legacy", "off", 2, 2), ("legacy", "unnamed", 1, 1), ("current", "on", 1, 0),
    ("current", "unnamed", 1, 1),
], ids=["1.18-off", "1.18-unnamed", "current-on", "current-unnamed"])
async def test_round_trips_per_repeated_statement(
        request: pytest.FixtureRequest, schema: None, case: tuple[str, str, int, int],
        statement_log: Callable[[str], collections.Counter[str]]) -> None:
    """Counted on the wire between the client and PgBouncer (each Sync, Flush or simple Query
    makes the client wait for the server) and in the server's own log (each parse, bind and
    execute step): SQLAlchemy's statements take the pool's path, not prepare() + execute."""
    which, mode, trips, parses = case
    server = _pooler(request, which)
    marker = f"rt_probe_{which}_{mode}"
    statement = sa.select(Item.name.label(marker)).where(Item.id == sa.bindparam("i"))
    repeats = 20
    async with CountingRelay(server.host, server.port) as relay, \
            Pool(relay.dsn(server.dsn()), name=f"sqla-trips-{mode}",
                 prepared_statements=cast("PreparedStatements", mode),
                 min_size=1, max_size=1, validate_after=None, telemetry=False) as pool:
        engine = create_async_engine(pool)
        Session = async_sessionmaker(engine)

        async def run(n: int) -> None:
            async with Session() as session:
                for i in range(n):
                    await session.execute(statement, {"i": i})

        await run(3)  # the engine's first connection, describing, introspection
        sent_before = relay.sent.copy()
        logged_before = statement_log(marker)
        await run(repeats)
        sent = relay.sent - sent_before
        # BEGIN and ROLLBACK are one simple query each; each statement is a Sync (and a Flush
        # when it is described first).
        assert sent["Q"] == 2, sent
        assert (sent["S"] + sent["H"]) / repeats == trips, sent
        await asyncio.sleep(0.2)
        logged = statement_log(marker) - logged_before
        assert logged["execute"] == repeats, logged
        assert logged["bind"] == repeats, logged
        if mode == "on":
            assert logged["parse"] <= 1, logged  # at most once per server connection
        else:
            assert logged["parse"] == parses * repeats, logged
        if mode != "on":
            assert relay.statement_names == {b""}, "a named statement breaks PgBouncer < 1.21"
        await engine.dispose()


@pytest.mark.parametrize(("which", "mode"), MODES[:3], ids=["1.18-off", "1.18-unnamed",
                                                              "current-on"])
async def test_200_concurrent_sessions_in_four_processes(
        request: pytest.FixtureRequest, schema: None, which: str, mode: str) -> None:
    """Four processes, each a pool of 5 under 50 ORM sessions started at once (insert, flush,
    query, then commit or rollback): no error, every pool back to in_use=0, no connection closed."""
    import json
    import os
    import sys

    server = _pooler(request, which)
    env = {**os.environ, "ASYNCPOOL_TEST_DSN": server.dsn(), "SQLA_MODE": mode,
           "SQLA_SESSIONS": "50"}
    procs = [await asyncio.create_subprocess_exec(
        sys.executable, "-m", "tests.sqlalchemy_worker", env=env,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE) for _ in range(4)]
    results = []
    for proc in procs:
        out, err = await asyncio.wait_for(proc.communicate(), 90)
        assert proc.returncode == 0, err.decode()[-2000:]
        results.append(json.loads(out.decode().strip().splitlines()[-1]))
    for result in results:
        assert result["error_count"] == 0, result
        assert result["stored"] == result["committed"] == 40, result
        assert (result["in_use"], result["closed_total"]) == (0, 0), result
        assert result["size"] <= 5, result


async def test_server_side_cursor_streams_inside_its_transaction(pool: Pool) -> None:
    """``stream()`` keeps SQLAlchemy's own server-side cursor path: a portal inside the
    transaction, which a transaction pooler keeps on one server connection."""
    engine = create_async_engine(pool)
    async with engine.connect() as conn:
        result = await conn.stream(sa.text("SELECT generate_series(1, 250) AS n"))
        assert [row.n async for row in result] == list(range(1, 251))
    await _settled(pool)
    assert pool.stats().closed_total == 0
    await engine.dispose()


def test_sqlalchemys_own_pool_options_are_refused() -> None:
    pool = Pool("postgresql://u@127.0.0.1:1/db", telemetry=False)
    for option, value in [("poolclass", sa.pool.AsyncAdaptedQueuePool), ("pool_size", 5),
                          ("async_creator", pool.acquire), ("connect_args", {"ssl": True})]:
        with pytest.raises(sa.exc.ArgumentError, match=option):
            create_async_engine(pool, **{option: value})


@pytest.mark.parametrize("given", ["str", "URL"])
def test_a_dsn_given_for_the_pool_says_where_it_goes(given: str) -> None:
    """``create_async_engine(dsn)``, as SQLAlchemy's own is called, said only "takes an
    asyncpool.Pool, got str"; the DSN (and its password) is still not shown."""
    dsn = "postgresql://app:Secr3t-xyz@127.0.0.1:1/db"  # pragma: allowlist secret
    with pytest.raises(sa.exc.ArgumentError) as caught:
        create_async_engine(dsn if given == "str" else sa.engine.make_url(dsn))  # type: ignore[arg-type]
    assert "the DSN goes to the pool, create_async_engine(asyncpool.Pool(dsn))" in str(caught.value)
    assert "Secr3t" not in str(caught.value)


@pytest.mark.parametrize(("options", "instead"), [
    ({"poolclass": sa.pool.NullPool}, "keeps no connection between sessions here"),
    ({"pool_size": 5, "max_overflow": 0}, "pool_size: Pool(max_size=...)"),
    ({"pool_recycle": 300, "pool_pre_ping": True}, "Pool(max_lifetime=...)"),
    ({"pool_timeout": 5}, "Pool(acquire_timeout=...)"),
    ({"pool_use_lifo": True}, "most recently used connection"),
    # SQLAlchemy's asyncpg page, for PgBouncer: both statement caches off.
    ({"connect_args": {"statement_cache_size": 0, "prepared_statement_cache_size": 0}},
     "'statement_cache_size': nothing (SQLAlchemy's prepared-statement cache is off here"),
    ({"connect_args": {"prepared_statement_name_func": str}}, 'prepared_statements="on"'),
    ({"connect_args": {"server_settings": {"jit": "off"}}}, "Pool(server_settings=...)"),
    ({"connect_args": {"command_timeout": 5, "timeout": 3}}, "'timeout': Pool(connect_timeout"),
], ids=lambda value: next(iter(value)) if isinstance(value, dict) else None)
def test_refused_engine_options_name_what_to_set_instead(options: dict[str, Any],
                                                         instead: str) -> None:
    """What users copy from SQLAlchemy's pool and asyncpg pages is refused with the pool's option
    to set instead (it said only "set sizes, timeouts and connection options on the
    asyncpool.Pool"; ``pool_use_lifo`` was SQLAlchemy's bare TypeError); an empty
    ``connect_args`` is accepted, as config code passes it."""
    pool = Pool("postgresql://u@127.0.0.1:1/db", telemetry=False)
    with pytest.raises(sa.exc.ArgumentError) as caught:
        create_async_engine(pool, **options)
    assert instead in str(caught.value)
    create_async_engine(pool, connect_args={})


async def test_invalidate_discards_the_connection_and_frees_its_slot(pool: Pool) -> None:
    """SQLAlchemy's terminate() (what invalidate() calls) closes the server connection for good:
    the pool does not get it back, and its slot serves the next checkout."""
    engine = create_async_engine(pool)
    closed = pool.stats().closed_total
    async with engine.connect() as conn:
        raw = (await conn.get_raw_connection()).driver_connection
        assert raw is not None
        server = raw.raw
        await conn.invalidate()
    await _settled(pool)
    assert server.is_closed()
    stats = pool.stats()
    assert (stats.in_use, stats.closed_total) == (0, closed + 1)
    async with engine.connect() as conn:
        assert (await conn.execute(sa.text("SELECT 8"))).scalar() == 8
    await engine.dispose()


async def test_connect_handlers_run_on_every_connection_a_record_is_lent(pool: Pool) -> None:
    """SQLAlchemy's recipe for asyncpg codecs (a ``connect`` handler calling ``set_type_codec``
    through ``run_async``; pgvector's ``register_vector`` is the same) sets them on each server
    connection the engine is lent, once: a kept record lent another connection ran no handler
    before, and its session got `Decimal` where the codec gives text (as after every
    ``max_lifetime`` replacement). A handler that fails there fails the checkout and the
    half-set-up connection is discarded, as SQLAlchemy does with a failed connect event."""
    engine = create_async_engine(pool)
    Session = async_sessionmaker(engine)
    ran_on: list[int] = []
    refuse = False

    @sa.event.listens_for(engine.sync_engine, "connect")
    def on_connect(dbapi_connection: Any, record: Any) -> None:
        ran_on.append(id(dbapi_connection.driver_connection.raw))
        if refuse:
            raise RuntimeError("no codec for you")
        dbapi_connection.run_async(lambda conn: conn.set_type_codec(
            "numeric", schema="pg_catalog", format="text", encoder=str,
            decoder=lambda text: f"numeric {text}"))

    async def numeric() -> Any:
        async with Session() as session:
            return (await session.execute(sa.text("SELECT 1.5::numeric"))).scalar()

    assert await numeric() == "numeric 1.5"
    async with pool.acquire():  # a plain user holds the connection the handler ran on
        assert await numeric() == "numeric 1.5"  # the same record, another connection
        assert len(ran_on) == len(set(ran_on)) == 2
        refuse = True
        async with pool.acquire():
            closed = pool.stats().closed_total
            with pytest.raises(RuntimeError, match="no codec for you"):
                await numeric()
    await _settled(pool)
    assert pool.stats().closed_total == closed + 1, "a connection set up half-way was kept"
    refuse = False
    assert [await numeric() for _ in range(3)] == ["numeric 1.5"] * 3
    assert len(ran_on) == 3, "a handler ran twice on one connection"
    await _settled(pool)
    await engine.dispose()


async def test_sqlalchemys_records_are_kept_and_lent_a_connection_per_checkout(pool: Pool) -> None:
    """LendingPool keeps SQLAlchemy's records between checkouts (the connect event fires once per
    server connection, not per session) while each checkout holds a connection of the pool only while it
    is checked out; at most max_size records are kept."""
    engine = create_async_engine(pool)
    Session = async_sessionmaker(engine)
    connects = checkouts = 0

    @sa.event.listens_for(engine.sync_engine, "connect")
    def on_connect(*_: Any) -> None:
        nonlocal connects
        connects += 1

    @sa.event.listens_for(engine.sync_engine, "checkout")
    def on_checkout(*_: Any) -> None:
        nonlocal checkouts
        checkouts += 1

    for i in range(10):
        async with Session() as session:
            assert (await session.execute(sa.text(f"SELECT {i}"))).scalar() == i
            assert pool.stats().in_use == 1
        assert pool.stats().in_use == 0
    assert (connects, checkouts) == (1, 10)

    async def one() -> None:
        async with Session() as session:
            await session.execute(sa.text("SELECT pg_sleep(0.05)"))

    await asyncio.gather(*(one() for _ in range(12)))  # more sessions than the pool's 5
    await _settled(pool)
    assert pool.stats().in_use == 0
    lending = engine.sync_engine.pool
    assert len(lending._spare) <= pool.stats().max_size  # type: ignore[attr-defined]
    assert pool.stats().closed_total == 0
    await engine.dispose()
    assert pool.stats().in_use == 0


async def test_a_timed_out_statement_is_a_timeout_with_cancel_requests_off(
        postgres: PostgresServer) -> None:
    """With cancel_requests="off" the pool closes a timed-out statement's connection; the caller
    gets the TimeoutError, as SQLAlchemy on asyncpg gives it, not a lost connection."""
    async with Pool(postgres.dsn(), max_size=1, cancel_requests="off", command_timeout=0.2,
                    telemetry=False) as pool:
        engine = create_async_engine(pool)
        with pytest.raises(TimeoutError) as caught:
            async with engine.connect() as conn:
                await conn.execute(sa.text("SELECT pg_sleep(2)"))
        assert not isinstance(caught.value, sa.exc.DBAPIError)
        await _settled(pool)
        async with engine.connect() as conn:  # a new connection in the slot
            assert (await conn.execute(sa.text("SELECT 4"))).scalar() == 4
        assert pool.stats().closed_total == 1
        await engine.dispose()


async def test_a_cancelled_statement_is_not_a_lost_connection(pool: Pool) -> None:
    """statement_timeout (SQLSTATE 57014) is the statement's error: the connection is kept."""
    engine = create_async_engine(pool)
    Session = async_sessionmaker(engine)
    closed = pool.stats().closed_total
    async with Session() as session:
        await session.execute(sa.text("SET LOCAL statement_timeout = 50"))
        with pytest.raises(sa.exc.DBAPIError) as caught:
            await session.execute(sa.text("SELECT pg_sleep(2)"))
        assert not isinstance(caught.value.__cause__, ConnectionLostError)
        assert caught.value.orig.sqlstate == "57014"  # type: ignore[union-attr]
        assert not caught.value.connection_invalidated
    await _settled(pool)
    assert (pool.stats().in_use, pool.stats().closed_total) == (0, closed)
    await engine.dispose()


async def test_isolation_levels_and_autocommit(request: pytest.FixtureRequest, schema: None) -> None:
    server = _pooler(request, "legacy")
    async with Pool(server.dsn(), name="sqla-isolation", max_size=1, telemetry=False) as pool:
        engine = create_async_engine(pool, isolation_level="SERIALIZABLE")
        async with engine.connect() as conn:
            level = (await conn.execute(sa.text("SHOW transaction_isolation"))).scalar()
            assert level == "serializable"
        auto = engine.execution_options(isolation_level="AUTOCOMMIT")
        async with auto.connect() as conn:
            await conn.execute(sa.text("SELECT 1"))
            raw = (await conn.get_raw_connection()).driver_connection
            assert raw is not None
            assert not raw.is_in_transaction()
        async with engine.connect() as conn:  # the level was reset on return
            level = (await conn.execute(sa.text("SHOW transaction_isolation"))).scalar()
            assert level == "serializable"
        assert (pool.stats().in_use, pool.stats().closed_total) == (0, 0)
        await engine.dispose()


@pytest.mark.parametrize("which", ["legacy", "current", "direct"])
async def test_server_settings_hold_in_sessions_behind_a_pooler(
        request: pytest.FixtureRequest, schema: None, postgres: PostgresServer, which: str) -> None:
    """The pool's `server_settings` a pooler does not keep from the login (``search_path``,
    ``jit``) are set in each transaction SQLAlchemy begins, as in ``pool.transaction()``:
    sessions, ``engine.begin()`` and a server-side cursor see them through both PgBouncers as
    directly; in autocommit there is no transaction to set them in (docs/sqlalchemy.md)."""
    dsn = postgres.dsn() if which == "direct" else _pooler(request, which).dsn()
    settings = {"search_path": "pg_catalog", "jit": "off"}
    async with Pool(dsn, name=f"sqla-settings-{which}", max_size=2, telemetry=False,
                    server_settings=settings) as pool:
        engine = create_async_engine(pool)
        show = sa.text("SELECT current_setting('search_path') || ' | ' || current_setting('jit')")
        async with async_sessionmaker(engine)() as session, session.begin():
            assert (await session.execute(show)).scalar() == "pg_catalog | off"
        async with engine.begin() as conn:
            assert (await conn.execute(show)).scalar() == "pg_catalog | off"
            streamed = await conn.stream(show)
            assert [row[0] async for row in streamed] == ["pg_catalog | off"]
        async with engine.connect() as conn:  # autobegin, rolled back
            assert (await conn.execute(show)).scalar() == "pg_catalog | off"
        async with async_sessionmaker(engine)() as session, session.begin():
            # Must come before any query: the settings are set without one (SET LOCAL).
            await session.execute(sa.text("SET TRANSACTION ISOLATION LEVEL SERIALIZABLE"))
            level = (await session.execute(sa.text("SHOW transaction_isolation"))).scalar()
            assert level == "serializable"
            assert (await session.execute(show)).scalar() == "pg_catalog | off"
        async with pool.transaction() as conn:
            assert await conn.fetchval(str(show)) == "pg_catalog | off"
        assert (pool.stats().in_use, pool.stats().closed_total) == (0, 0)
        await engine.dispose()


async def test_a_setting_the_server_does_not_know_is_named_in_sessions_behind_a_pooler(
        pooler: Pooler, schema: None) -> None:
    """A misspelt `server_settings` name behind a pooler is refused in each transaction
    SQLAlchemy begins: the caller gets the PoolConfigError ``pool.transaction()`` gives (the
    setting, where it came from), not asyncpg's bare "unrecognized configuration parameter"."""
    settings = {"search_path": "public", "serach_path": "app"}
    async with Pool(pooler.dsn(), name="sqla-unknown-setting", min_size=0, max_size=1,
                    telemetry=False, server_settings=settings) as pool:
        engine = create_async_engine(pool)
        for _ in range(2):  # every session
            with pytest.raises(sa.exc.DBAPIError) as info:
                async with async_sessionmaker(engine)() as session, session.begin():
                    await session.execute(sa.text("SELECT 1"))
            error = info.value.orig
            assert isinstance(error, PoolConfigError)
            message = str(error)
            assert "'serach_path'" in message
            assert "server_settings" in message
            assert "SQLAlchemy" in message
            assert isinstance(error.__cause__, asyncpg.UndefinedObjectError)
        with pytest.raises(sa.exc.DBAPIError) as info:
            async with engine.begin() as conn:
                await conn.execute(sa.text("SELECT 1"))
        assert isinstance(info.value.orig, PoolConfigError)
        # (SQLAlchemy's first query on a new engine, in its connect event, is the one refused:
        # it discards a connection whose connect events failed.) The pool serves on.
        assert await pool.fetchval("SELECT 1") == 1
        assert pool.stats().in_use == 0
        await engine.dispose()


# -- QueuePool's read-outs on engine.pool -------------------------------------------------------

#: ``(size(), checkedin(), overflow(), checkedout())``, as QueuePool's status() lists them.
Figures = tuple[int, int, int, int]


def _figures(engine: Any) -> Figures:
    lending = engine.pool
    return (lending.size(), lending.checkedin(), lending.overflow(), lending.checkedout())


async def _hold_return_lose(engine: Any, admin_dsn: str, settle: Callable[[], Any],
                            while_held: Callable[[], Any] | None = None) -> list[Figures]:
    """The read-outs at start, while 3 concurrent sessions hold a connection each, after they
    return them, and after a fourth session's connection is killed by the server."""
    import asyncpg

    seen = [_figures(engine)]
    Session = async_sessionmaker(engine)
    held, release = asyncio.Event(), asyncio.Event()
    pids: list[int] = []

    async def hold() -> None:
        async with Session() as session:
            pids.append((await session.execute(sa.text("SELECT pg_backend_pid()"))).scalar_one())
            if len(pids) == 3:
                held.set()
            await release.wait()

    tasks = [asyncio.create_task(hold()) for _ in range(3)]
    await asyncio.wait_for(held.wait(), 10)
    seen.append(_figures(engine))
    if while_held is not None:
        await while_held()
    release.set()
    await asyncio.gather(*tasks)
    await settle()
    seen.append(_figures(engine))
    async with Session() as session:
        pid = (await session.execute(sa.text("SELECT pg_backend_pid()"))).scalar_one()
        admin = await asyncpg.connect(admin_dsn)
        try:
            assert await admin.fetchval("SELECT pg_terminate_backend($1)", pid)
        finally:
            await admin.close()
        with pytest.raises(sa.exc.DBAPIError) as caught:
            await session.execute(sa.text("SELECT 1"))
        assert caught.value.connection_invalidated
    await settle()
    seen.append(_figures(engine))
    return seen


@pytest.mark.parametrize(("which", "mode"), MODES)
async def test_engine_pool_reports_queuepools_figures_from_the_pools_state(
        request: pytest.FixtureRequest, postgres: PostgresServer, schema: None, which: str,
        mode: PreparedStatements) -> None:
    """``engine.pool``'s ``size()``, ``checkedin()``, ``overflow()``, ``checkedout()`` (what
    exporters and health checks read; they did not exist) follow the asyncpool pool's state, with
    the numbers SQLAlchemy's own QueuePool(pool_size=max_size, max_overflow=0) gives for the same
    sessions, side by side; after a lost connection the pool has one connection fewer, where
    QueuePool keeps the invalidated record in its count (docs/sqlalchemy.md)."""
    from sqlalchemy.ext.asyncio import create_async_engine as stock_create_async_engine

    stock = stock_create_async_engine(
        postgres.dsn().replace("postgresql://", "postgresql+asyncpg://", 1),
        pool_size=4, max_overflow=0)
    try:
        queue_pool = await _hold_return_lose(stock, postgres.admin_dsn, lambda: asyncio.sleep(0))
    finally:
        await stock.dispose()
    assert queue_pool == [(4, 0, -4, 0), (4, 0, -1, 3), (4, 3, -1, 0), (4, 3, -1, 0)]

    async with Pool(_pooler(request, which).dsn(), name=f"sqla-figures-{mode}", min_size=0,
                    max_size=4, prepared_statements=mode, acquire_timeout=10,
                    telemetry=False) as pool:
        engine = create_async_engine(pool)
        assert engine.pool is engine.sync_engine.pool
        lending = cast(LendingPool, engine.pool)  # (typed as SQLAlchemy's Pool, as QueuePool)

        async def while_held() -> None:
            # Read from another thread, as a metrics exporter's collector does.
            assert await asyncio.to_thread(lending.checkedout) == 3
            status = lending.status()
            assert ("Pool size: 4  Connections in pool: 0 Current Overflow: -1 Current "
                    "Checked out connections: 3 (connecting: 0, waiting: 0") in status, status

        asyncpool_figures = await _hold_return_lose(
            engine, postgres.admin_dsn, lambda: _settled(pool), while_held)
        assert asyncpool_figures[:3] == queue_pool[:3]
        assert asyncpool_figures[3] == (4, 2, -2, 0)  # the lost one closed, its slot free
        for size, checkedin, overflow, checkedout in asyncpool_figures:
            assert checkedout == size - checkedin + overflow  # QueuePool's own identity
        async with pool.acquire():  # a plain user of the same pool counts too
            assert _figures(engine) == (4, 1, -2, 1)
        assert lending.timeout() == 10
        await engine.dispose()
        assert _figures(engine) == (4, 2, -2, 0)  # dispose() leaves the pool's connections
