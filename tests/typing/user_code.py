"""Code a user coming from asyncpg writes: it must pass ``mypy --strict`` (tests/typing/test_typing.py).

Not run: it is type-checked only.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any, TypeVar, assert_type

import asyncpg

import asyncpool
from asyncpool import Pool, PoolConfig, PooledConnection


class Row(asyncpg.Record):  # type: ignore[misc, unused-ignore]  # (Any without asyncpg's types)
    pass


async def init(conn: asyncpg.Connection) -> None:
    await conn.set_type_codec("jsonb", encoder=json.dumps, decoder=json.loads, schema="pg_catalog")


async def setup(conn: PooledConnection) -> None:
    await conn.execute("SELECT set_config('app.user', $1, false)", "someone")


async def setup_as_for_asyncpg(conn: asyncpg.Connection) -> None:
    """A setup hook written for asyncpg's pool takes the pooled connection."""
    await conn.execute("SELECT 1")


class AppPool(Pool):
    """A subclass keeps its type through open(), ``async with`` and ``await``."""

    async def user_count(self) -> int:
        value: int = await self.fetchval("SELECT count(*) FROM users")
        return value


class EnvPassword(asyncpool.CredentialProvider):
    """A provider subclass that has nothing to warm leaves warm() out."""

    requires_tls = False

    async def password(self, target: asyncpool.Target) -> str:
        return "from somewhere"

    async def refresh(self, target: asyncpool.Target) -> bool:
        return False

    async def close(self) -> None:
        pass


async def subclasses() -> int:
    async with AppPool("postgresql://app@db/app", setup=setup_as_for_asyncpg,
                       credentials=EnvPassword(), ssl_root_cert=Path("/etc/ssl/rds.pem"),
                       host=("a.example", "b.example"), port=(5432, 5433)) as pool:
        rows: list[Row] | None = await pool.fetch("SELECT 1", record_class=Row)
        row: Row | None = await pool.fetchrow("SELECT 1", record_class=Row)
        many: list[Row] = await pool.fetchmany("SELECT $1::int", [(1,)], record_class=Row)
        await pool.copy_to_table("orders", source="orders.csv", format="csv", header="match")
        print(rows, row, many)
        return await pool.user_count() + await (await AppPool().open()).user_count()


async def count_orders(conn: asyncpg.Connection) -> int:
    """A function written against asyncpg's Connection takes a pooled connection too."""
    value: int = await conn.fetchval("SELECT count(*) FROM orders")
    return value


async def main() -> None:
    pool = await asyncpool.create_pool(
        "postgresql://app@db:5432/app",
        min_size=1,
        max_size=5,
        init=init,
        setup=setup,
        command_timeout=10,
        max_inactive_connection_lifetime=60.0,
        max_queries=10_000,
        record_class=Row,
        server_settings={"application_name": "orders"},
        statement_cache_size=0,
        timeout=5,
    )
    async with pool.acquire() as conn:
        await conn.execute("INSERT INTO orders (id) VALUES ($1)", 1, timeout=2.0)
        await conn.executemany("INSERT INTO orders (id) VALUES ($1)", [(2,), (3,)])
        rows = await conn.fetch("SELECT id FROM orders WHERE id > $1", 0, record_class=Row)
        ids = [row["id"] for row in rows]
        row = await conn.fetchrow("SELECT id FROM orders LIMIT 1")
        if row is not None:
            ids.append(row["id"])
        total = await conn.fetchval("SELECT sum(id) FROM orders", column=0)
        stmt = await conn.prepare("SELECT $1::int")
        await stmt.fetchval(1)
        async with conn.transaction(isolation="serializable"):
            async for record in conn.cursor("SELECT id FROM orders", prefetch=10):
                ids.append(record["id"])
        await count_orders(conn)
        typed: list[Row] = await conn.fetch("SELECT id FROM orders", record_class=Row)
        first: Row | None = await conn.fetchrow("SELECT 1", record_class=Row)
        statement_rows: list[Row] = await (await conn.prepare("SELECT 1", record_class=Row)).fetch()
        print(typed, first, statement_rows)
        pid: int = conn.get_server_pid()
        print(ids, total, pid, conn.is_in_transaction(), conn.raw)
        # asyncpg's own types, not Any.
        assert_type(conn.get_server_version(), asyncpg.ServerVersion)
        with conn.query_logger(lambda query: print(query.query)):
            await conn.execute("SELECT 1")
    async with pool.transaction(readonly=True) as conn:
        await conn.fetchval("SELECT 1")
    other = Pool(max_size=2, prepared_statements="unnamed", acquire_timeout=None, ssl=True)
    await other.open()
    print(await other.fetchval("SELECT $1::int", 1), other.stats().size)
    await other.close()
    await pool.close()


POOL = asyncpool.create_pool("postgresql://app@db:5432/app", max_size=2)  # opened at start-up


async def start() -> Pool:
    return await POOL


async def as_with_asyncpg(rows: list[tuple[int, str]]) -> int:
    """asyncpg.Pool's other ways, the same on asyncpool's pool."""
    async with asyncpool.create_pool("postgresql://app@db:5432/app", max_size=2) as pool:
        opened: Pool = pool
        await pool.copy_records_to_table("orders", records=rows, columns=["id", "note"],
                                         timeout=5.0)
        status: str = await pool.copy_to_table("orders", source="orders.csv", format="csv",
                                               header=True, force_null=["note"])
        await pool.copy_from_query("SELECT id FROM orders WHERE id > $1", 0,
                                   output="ids.csv", format="csv")
        await pool.copy_from_table("orders", output="all.csv", columns=["id"])
        returned = await pool.fetchmany("INSERT INTO orders (id) VALUES ($1) RETURNING id",
                                        [(4,), (5,)])
        await pool.expire_connections()
        await pool.executemany(command="INSERT INTO orders (id) VALUES ($1)", args=[(6,)])
        row = await pool.fetchrow(query="SELECT id FROM orders LIMIT 1")
        if row is not None:
            print(row["id"])
        print(opened, status, returned, pool.is_closing(), pool.get_idle_size())
        return pool.get_size() + pool.get_min_size() + pool.get_max_size()


def lambda_handlers() -> int:
    """The Lambda integrations keep a handler's return type (and take Pool()'s options)."""
    from asyncpool.integrations.aws_lambda import lambda_config
    from asyncpool.integrations.powertools import current_connection, pooled_connection

    pool = Pool(config=lambda_config(function_timeout=10, max_size=2, timeout=3))

    @pooled_connection(pool, transaction=True)
    async def handler(event: dict[str, int], context: object) -> int:
        return int(await current_connection().fetchval("SELECT $1::int", event["n"]))

    @pooled_connection(pool)
    def plain(event: dict[str, int], context: object) -> str:
        return str(event)

    @pooled_connection(pool)
    async def as_lambda_types_it(event: dict[str, Any], context: Any) -> int:
        return len(event)

    counted: int = as_lambda_types_it({}, None)

    answer: int = handler({"n": 1}, None)
    text: str = plain({"n": 1}, None)
    return answer + len(text) + counted


def async_handlers() -> int:
    """`async_handler` keeps the handler's event, context and return types."""
    from asyncpool.integrations.lambda_runner import LambdaRunner, async_handler

    @async_handler
    async def handler(event: dict[str, int], context: object) -> int:
        return event["n"]

    @async_handler(runner=LambdaRunner())
    async def on_a_runner(event: list[str], context: None) -> str:
        return event[0]

    return handler({"n": 1}, None) + len(on_a_runner(["a"], None))


RecordT = TypeVar("RecordT", bound=asyncpg.Record)


class OtherRow(asyncpg.Record):  # type: ignore[misc, unused-ignore]  # (Any without asyncpg's types)
    pass


def rows_anywhere(pool: Pool, conn: PooledConnection) -> None:
    """Written for a bare Pool and PooledConnection (of asyncpg's Records): takes any pool's."""


async def pool_record_class() -> None:
    """A pool's ``record_class=`` types its rows, as asyncpg's pool's does with asyncpg-stubs."""
    pool = Pool("postgresql://app@db/app", record_class=Row)
    assert_type(pool, Pool[Row])
    assert_type(await pool.fetch("SELECT 1"), list[Row])
    assert_type(await pool.fetchrow("SELECT 1"), Row | None)
    assert_type(await pool.fetchmany("SELECT $1::int", [(1,)]), list[Row])
    assert_type(await pool.fetch("SELECT 1", record_class=OtherRow), list[OtherRow])
    async with pool.acquire() as conn:
        assert_type(conn, PooledConnection[Row])
        assert_type(await conn.fetch("SELECT 1"), list[Row])
        assert_type(await conn.fetchrow("SELECT 1"), Row | None)
        assert_type(await conn.fetchmany("SELECT $1::int", [(1,)]), list[Row])
        assert_type(await conn.fetchrow("SELECT 1", record_class=OtherRow), OtherRow | None)
        assert_type(conn.raw, asyncpg.Connection[Row])  # opened with the pool's record_class
        async for record in conn.cursor("SELECT 1"):
            row: Row = record
            print(row)
        rows_anywhere(pool, conn)
        await count_orders(conn)  # still an asyncpg.Connection
    async with pool.transaction() as tx:
        assert_type(tx, PooledConnection[Row])
    held = await pool.acquire()
    assert_type(held, PooledConnection[Row])
    await pool.release(held)
    async with asyncpool.create_pool("postgresql://app@db/app", record_class=Row) as created:
        assert_type(created, Pool[Row])
        assert_type(await created.fetch("SELECT 1"), list[Row])
    async with asyncpool.create_pool("postgresql://app@db/app") as plain:
        assert_type(plain, Pool[asyncpg.Record])
        assert_type(plain, Pool)
        assert_type(await plain.fetch("SELECT 1"), list[asyncpg.Record])
        async with plain.acquire() as conn:
            assert_type(await conn.fetchrow("SELECT 1"), asyncpg.Record | None)
            assert_type(conn.raw, asyncpg.Connection[asyncpg.Record])
    async with AppPool("postgresql://app@db/app", record_class=Row) as app:
        assert_type(app, AppPool)  # a subclass that names no record class: Records
        print(await app.user_count())
    typed_later: Pool[Row] = await Pool(record_class=Row).open()
    print(typed_later)
    assert_type(Pool("postgresql://app@db/app", max_size=2), Pool[asyncpg.Record])
    assert_type(Pool(config=PoolConfig(max_size=2)), Pool[asyncpg.Record])
    assert_type(GenericPool("postgresql://app@db/app", record_class=Row), GenericPool[Row])


class RowPool(Pool[Row]):
    """A subclass that names its rows: made with ``record_class=Row`` (refused at run time
    without it, which type checkers cannot tell: a Pool[Row] is a Pool[Record])."""


async def asyncpg_loop_and_config_options() -> None:
    """asyncpg's ``loop=`` (the loop that opens the pool), and a config's typed options."""
    loop = asyncio.get_running_loop()
    async with asyncpool.create_pool("postgresql://app@db/app", loop=loop) as pool:
        assert_type(pool, Pool[asyncpg.Record])
    async with Pool("postgresql://app@db/app", loop=None, record_class=Row) as rows:
        assert_type(rows, Pool[Row])
    async with RowPool("postgresql://app@db/app", loop=loop, record_class=Row) as own:
        assert_type(own, RowPool)
        assert_type(await own.fetch("SELECT 1"), list[Row])
    config = PoolConfig.from_env(max_size=5, prepared_statements="off", dsn=None)
    assert_type(config.replace(max_size=2, validate_after=None, init=init, setup=setup), PoolConfig)
    assert_type(PoolConfig.from_env({}, leak_action="log", ssl="verify-full"), PoolConfig)


class GenericPool(Pool[RecordT]):
    """A subclass generic in its rows, as Pool is: typed by the ``record_class=`` it is given."""
