# mypy: ignore-errors
"""Mistakes ``mypy --strict`` must catch in user code (tests/typing/test_typing.py).

Each line that must fail ends with ``# error: <mypy error code>``; no other line may fail.
``(asyncpg-stubs only)`` after it: caught only with asyncpg's types installed (without them a
pooled connection's base, asyncpg's Connection, is `Any`). A wrong option to `Pool()` or
`create_pool()` matches neither of their signatures (with or without ``record_class``): mypy
says ``call-overload``, and the pool it made is `Any` to it from there on, so the other lines
use a pool made right.
Not run. The first line keeps the project's own mypy run quiet; the test removes it.
"""

from __future__ import annotations

from typing import Any

import asyncpg

import asyncpool
from asyncpool import Pool


async def setup_takes_an_int(conn: int) -> None:
    pass


async def main() -> None:
    await asyncpool.create_pool("postgresql://app@db/app", max_sise=5)  # error: call-overload
    Pool("postgresql://app@db/app", prepared_statements="maybe")  # error: call-overload
    Pool("postgresql://app@db/app", acquire_timeout="30s")  # error: call-overload
    pool = await asyncpool.create_pool("postgresql://app@db/app", max_size=5)
    Pool("postgresql://app@db/app", setup=setup_takes_an_int)  # error: arg-type (asyncpg-stubs only)
    async with pool.acquire() as conn:
        await conn.fetchvall("SELECT 1")  # error: attr-defined (asyncpg-stubs only)
        await conn.fetchval(123)  # error: arg-type
        await conn.execute("SELECT 1", timeout="soon")  # error: arg-type
        await conn.fetchrow("SELECT 1", column=0)  # error: call-overload
        conn.transaction(isolation=3)  # error: arg-type
        await conn.executemany("INSERT INTO t VALUES ($1)", 5)  # error: arg-type
    await pool.fetchval(42)  # error: arg-type
    pool.transaction(isolation="serialisable")  # error: arg-type
    pool.transaction(readonly="no")  # error: arg-type
    await pool.copy_to_table("orders", source="orders.csv", freez=True)  # error: call-arg
    await pool.copy_records_to_table("orders", records=[(1,)], columns="id", format="csv")  # error: call-arg
    await pool.release(await pool.acquire(), timeout="soon")  # error: arg-type
    print((await pool.fetchrow("SELECT 1 AS one"))["one"])  # error: index
    await pool.executemany("INSERT INTO t VALUES ($1)", 5)  # error: arg-type
    Pool("postgresql://app@db/app", allow_unprotected_credentials="false")  # error: call-overload


def lambda_mistakes() -> None:
    from asyncpool.integrations.aws_lambda import lambda_config
    from asyncpool.integrations.powertools import pooled_connection

    lambda_config(max_sise=1)  # error: call-arg
    lambda_config(prepared_statements="maybe")  # error: arg-type

    @pooled_connection(Pool("postgresql://app@db/app"))
    async def handler(event: object, context: object) -> int:
        return 1

    text: str = handler({}, None)  # error: assignment
    handler({})  # error: call-arg
    print(text)

    @pooled_connection(Pool("postgresql://app@db/app"))
    async def takes_any(event: dict[str, Any], context: Any) -> int:
        return 1

    wrong: str = takes_any({}, None)  # error: assignment
    print(wrong)

    @pooled_connection(Pool("postgresql://app@db/app"))
    async def typed_event(event: dict[str, int], context: object) -> int:
        return event["n"]

    typed_event("n=1", None)  # error: arg-type


def async_handler_mistakes() -> None:
    from asyncpool.integrations.lambda_runner import async_handler

    @async_handler
    async def handler(event: dict[str, int], context: object) -> int:
        return event["n"]

    handler(["n"], None)  # error: arg-type
    text: str = handler({"n": 1}, None)  # error: assignment
    print(text)


class Row(asyncpg.Record):  # type: ignore[misc, unused-ignore]  # (Any without asyncpg's types)
    pass


async def row_mistakes(pool: Pool) -> None:
    rows: list[Row] = await pool.fetch("SELECT 1")  # error: assignment (asyncpg-stubs only)
    async with pool.acquire() as conn:
        one: Row | None = await conn.fetchrow("SELECT 1")  # error: assignment (asyncpg-stubs only)
        await conn.copy_to_table("t", source="t.csv", force_null=True)  # error: arg-type
        conn.query_logger(lambda: None)  # error: arg-type (asyncpg-stubs only)
    print(rows, one)


class OtherRow(asyncpg.Record):  # type: ignore[misc, unused-ignore]  # (Any without asyncpg's types)
    pass


async def pool_record_class_mistakes() -> None:
    pool = Pool("postgresql://app@db/app", record_class=Row)
    others: list[OtherRow] = await pool.fetch("SELECT 1")  # error: assignment (asyncpg-stubs only)
    async with pool.acquire() as conn:
        other: OtherRow | None = await conn.fetchrow("SELECT 1")  # error: assignment (asyncpg-stubs only)
    Pool("postgresql://app@db/app", record_class=dict)  # error: type-var (asyncpg-stubs only)
    print(others, other)
