"""Code a FastAPI, Lambda or SQLAlchemy user writes around a pool typed by its rows: it must pass
``mypy --strict`` (tests/typing/test_typing.py) and pyright's strict mode
(tests/typing/test_pyright.py), with the types asserted.

Not run: it is type-checked only.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import Annotated, Any, assert_type

import asyncpg
from fastapi import Depends, FastAPI
from mangum import Mangum
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine, async_sessionmaker
from starlette.requests import Request

import asyncpool
from asyncpool import Pool, PooledConnection
from asyncpool.integrations.aws_lambda import lambda_config
from asyncpool.integrations.fastapi import LambdaDeadline, pool_connection, pool_lifespan
from asyncpool.integrations.lambda_runner import async_handler
from asyncpool.integrations.powertools import current_connection, pooled_connection
from asyncpool.integrations.sqlalchemy import create_async_engine


class Row(asyncpg.Record):  # type: ignore[misc, unused-ignore]  # (Any without asyncpg's types)
    pass


#: Made without a record class: asyncpg's Records (pyright read the default as Any).
pool = Pool(config=lambda_config(function_timeout=10, max_size=2))
assert_type(pool, Pool[asyncpg.Record])
assert_type(asyncpool.create_pool("postgresql://app@db/app"), Pool[asyncpg.Record])
rows_pool = asyncpool.create_pool("postgresql://app@db/app", record_class=Row)
assert_type(rows_pool, Pool[Row])


def pool_name(any_pool: Pool) -> str:
    """Written for a bare Pool: takes a Pool[Row]."""
    return any_pool.name


async def count(conn: asyncpg.Connection) -> int:
    """Written against asyncpg's Connection: takes a pooled connection of any rows."""
    value: int = await conn.fetchval("SELECT 1")
    return value


async def rows_and_connections() -> int:
    opened = await rows_pool
    assert_type(opened, Pool[Row])
    async with opened.acquire() as conn:
        assert_type(conn, PooledConnection[Row])
        assert_type(await conn.fetch("SELECT 1"), list[Row])
        total = await count(conn)
    async with pool.transaction() as plain:
        assert_type(await plain.fetchrow("SELECT 1"), asyncpg.Record | None)
    return total + len(pool_name(opened))


# -- FastAPI: the dependency yields connections of the pool's rows -----------------------------
app = FastAPI(lifespan=pool_lifespan(pool))
assert_type(pool_connection(pool),
            Callable[[Request], AsyncIterator[PooledConnection[asyncpg.Record]]])
assert_type(pool_connection(rows_pool, transaction=True),
            Callable[[Request], AsyncIterator[PooledConnection[Row]]])
Conn = Annotated[PooledConnection, Depends(pool_connection(pool), scope="function")]
RowConn = Annotated[PooledConnection[Row],
                    Depends(pool_connection(rows_pool, transaction=True), scope="function")]


@app.get("/items/{item_id}")
async def read_item(item_id: int, conn: Conn) -> dict[str, Any]:
    row = await conn.fetchrow("SELECT $1::int AS id", item_id)
    return {} if row is None else dict(row)


@app.post("/items")
async def add_items(conn: RowConn) -> int:
    rows = await conn.fetch("SELECT 1")
    assert_type(rows, list[Row])
    return len(rows)


handler = Mangum(LambdaDeadline(app))


# -- Lambda ------------------------------------------------------------------------------------
@pooled_connection(pool, transaction=True)
async def lambda_handler(event: dict[str, Any], context: Any) -> dict[str, int]:
    return {"n": await count(current_connection())}


@pooled_connection(rows_pool)
async def rows_handler(event: dict[str, Any], context: Any) -> int:
    """Given the decorator's pool, the invocation's connection has its rows."""
    conn = current_connection(rows_pool)
    assert_type(conn, PooledConnection[Row])
    assert_type(await conn.fetch("SELECT 1"), list[Row])
    assert_type(current_connection(), PooledConnection[asyncpg.Record])
    return await count(conn)


@async_handler
async def plain_handler(event: dict[str, Any], context: object) -> int:
    async with rows_pool.acquire() as conn:
        return await count(conn)


answer: dict[str, int] = lambda_handler({}, None)
number: int = plain_handler({}, None)
counted: int = rows_handler({}, None)


# -- SQLAlchemy --------------------------------------------------------------------------------
engine = create_async_engine(rows_pool, echo=False)
assert_type(engine, AsyncEngine)
sessions = async_sessionmaker(engine, expire_on_commit=False)


async def with_engine() -> int:
    async with sessions() as session:
        value: int = (await session.execute(text("SELECT 1"))).scalar_one()
    return value
