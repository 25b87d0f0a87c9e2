# mypy: ignore-errors
"""A pool's rows (and its hooks' connections) are of the record class it was made with, whatever
its annotation says.

Each line ending with ``# error: <mypy error code> / <pyright rule>`` must fail under
``mypy --strict`` (tests/typing/test_typing.py) and pyright's strict mode
(tests/typing/test_pyright.py), on that line; no other line may fail. Caught with asyncpg's
types installed only: without them a Record is `Any` to type checkers.
Not run. The first line keeps the project's own mypy run quiet; the test removes it.
"""

from __future__ import annotations

import asyncpg

import asyncpool
from asyncpool import Pool, PoolConfig, PooledConnection
from asyncpool.integrations.powertools import current_connection

DSN = "postgresql://app@db/app"


class Row(asyncpg.Record):  # type: ignore[misc, unused-ignore]  # (Any without asyncpg's types)
    pass


class OtherRow(asyncpg.Record):  # type: ignore[misc, unused-ignore]  # (Any without asyncpg's types)
    pass


async def init_for_rows(conn: asyncpg.Connection[Row]) -> None:
    pass


async def setup_for_rows(conn: PooledConnection[Row]) -> None:
    pass


async def hooks_for_rows_on_a_pool_of_records() -> None:
    Pool(DSN, init=init_for_rows)  # error: arg-type / reportArgumentType
    Pool(DSN, setup=setup_for_rows)  # error: arg-type / reportArgumentType
    await asyncpool.create_pool(DSN, setup=setup_for_rows)  # error: arg-type / reportArgumentType


async def annotated_with_rows_it_does_not_return() -> None:
    """Made without ``record_class=Row``: asyncpg's Records, which have no Row's attributes."""
    made: Pool[Row] = Pool(DSN)  # error: assignment / reportAssignmentType
    spelt: Pool[Row] = Pool[Row](DSN)  # error: assignment / reportAssignmentType
    created: Pool[Row] = asyncpool.create_pool(DSN, max_size=2)  # error: assignment / reportAssignmentType
    opened: Pool[Row] = await asyncpool.create_pool(DSN)  # error: assignment / reportAssignmentType
    configured: Pool[Row] = Pool(config=PoolConfig(max_size=2))  # error: assignment / reportAssignmentType
    other: Pool[Row] = Pool(DSN, record_class=OtherRow)  # error: arg-type / reportAssignmentType
    print(made, spelt, created, opened, configured, other)


async def rows_of_a_pool_made_without_record_class() -> None:
    async with asyncpool.create_pool(DSN) as pool:
        rows: list[Row] = await pool.fetch("SELECT 1")  # error: assignment / reportAssignmentType
        row: Row | None = await pool.fetchrow("SELECT 1")  # error: assignment / reportAssignmentType
        async with pool.acquire() as conn:
            held: PooledConnection[Row] = conn  # error: assignment / reportAssignmentType
            many: list[Row] = await conn.fetchmany("SELECT 1", [])  # error: assignment / reportAssignmentType
        awaited: PooledConnection[Row] = await pool.acquire()  # error: assignment / reportAssignmentType
        await pool.release(awaited)
    print(rows, row, held, many)


def invocation_connection_of_a_pool_of_records() -> None:
    """`current_connection(pool)` is typed by the pool's rows: a pool of Records' is no Row's."""
    held: PooledConnection[Row] = current_connection(Pool(DSN))  # error: arg-type / reportAssignmentType
    print(held)


async def made_right() -> None:
    """The same annotations, true: no error."""
    made: Pool[Row] = Pool(DSN, record_class=Row, init=init_for_rows, setup=setup_for_rows)
    created: Pool[Row] = await asyncpool.create_pool(DSN, record_class=Row, init=init_for_rows,
                                                     setup=setup_for_rows)
    wide: Pool = Pool(DSN, record_class=Row)  # a Pool of Rows is a Pool of Records
    async with made.acquire() as conn:
        held: PooledConnection[Row] = conn
        rows: list[Row] = await conn.fetch("SELECT 1")
    print(created, wide, held, rows)
