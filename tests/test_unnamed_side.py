"""The Wire's own requests (`Wire.side`) when their caller stops waiting, against PostgreSQL and
both PgBouncers: the connection the next holder gets is in step."""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator
from typing import Any

import pytest

from asyncpool import Pool
from asyncpool.testing import PostgresServer
from asyncpool.unnamed.messages import SYNC_MESSAGE
from asyncpool.unnamed.wire import Wire
from tests.migrations import migrate
from tests.test_unnamed_prepare import Target, target  # noqa: F401 (a fixture)


@pytest.fixture
async def pool(target: Target) -> AsyncIterator[Pool]:  # noqa: F811 (the fixture imported)
    async with Pool(target.dsn(), name="side", prepared_statements="unnamed",
                    min_size=1, max_size=1, telemetry=False) as p:
        yield p


@pytest.fixture
async def table(pool: Pool, request: pytest.FixtureRequest) -> str:
    name = "dc_side_" + re.sub(r"\W", "_", request.node.callspec.id)[:40]
    await pool.execute(f"DROP TABLE IF EXISTS {name}; CREATE TABLE {name} (id int, a int)")
    await pool.execute(f"INSERT INTO {name} VALUES (1, 1)")
    return name


async def test_a_holder_cancelled_while_the_server_turns_values(
        pool: Pool, table: str, postgres: PostgresServer,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A column retyped to one asyncpg reads in the other format is turned by the server (a side
    request, `convert`); the holder is cancelled as that request goes out. The next holder's
    first statement (a describe: Parse, Describe, Flush) is answered: the connection given to
    it is not one with a side reply still to come (PgBouncer 1.18 loses the reply to a
    describe written before that reply came back)."""
    sent = asyncio.Event()
    original = Wire.side

    def side_then_cancel(self: Wire, data: bytes) -> asyncio.Future[list[bytes]]:
        waiter = original(self, data)
        if data != SYNC_MESSAGE:  # the values to turn
            sent.set()
            task = asyncio.current_task()
            assert task is not None
            task.cancel()
        return waiter

    monkeypatch.setattr(Wire, "side", side_then_cancel)
    select = f"SELECT a FROM {table} WHERE id = $1"
    retypes = ["money USING a::numeric::money", "int USING a::numeric::int"]
    for i in range(6):
        async with pool.acquire() as conn:
            await conn.fetchval(select, 1)
            await conn.fetchval(select, 1)
        await migrate(postgres, f"ALTER TABLE {table} ALTER COLUMN a TYPE {retypes[i % 2]}")
        sent.clear()

        async def holder() -> Any:
            async with pool.acquire() as conn:
                return await conn.fetchval(select, 1)

        with pytest.raises(asyncio.CancelledError):
            await asyncio.create_task(holder())
        assert sent.is_set()
        async with asyncio.timeout(10):
            assert await pool.fetchval(f"SELECT $1::int + {i}", 1) == 1 + i
            assert await pool.fetchval(select, 1) in (1, "$1.00")
