"""The Wire's own requests (`Wire.side`) when their caller stops waiting, against PostgreSQL and
both PgBouncers: the connection the next holder gets is in step."""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator
from typing import Any

import pytest

from asyncpool import Pool
from asyncpool.errors import ConnectionLostError, StaleStatementError
from asyncpool.testing import PostgresServer
from asyncpool.testing.faultproxy import FaultProxy
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


@pytest.fixture
async def proxy(target: Target) -> AsyncIterator[FaultProxy]:  # noqa: F811 (the fixture imported)
    async with FaultProxy(target.host, target.port) as p:
        yield p


@pytest.fixture
async def proxied(proxy: FaultProxy, target: Target) -> AsyncIterator[Pool]:  # noqa: F811
    async with Pool(proxy.dsn(target.dsn()), name="side-proxied", prepared_statements="unnamed",
                    min_size=1, max_size=1, telemetry=False) as p:
        yield p


async def _retyped_to_money(pool: Pool, postgres: PostgresServer, table: str) -> str:
    """Create `table` with one row, prepare its select twice on the pool's connection, then
    retype its column to money (which the server must turn): returns that select."""
    await pool.execute(f"DROP TABLE IF EXISTS {table}; CREATE TABLE {table} (id int, a int);"
                       f"INSERT INTO {table} VALUES (1, 1)")
    select = f"SELECT a FROM {table} WHERE id = $1"
    async with pool.acquire() as conn:
        await conn.fetchval(select, 1)
        await conn.fetchval(select, 1)
    await migrate(postgres, f"ALTER TABLE {table} ALTER COLUMN a TYPE money "
                            "USING a::numeric::money")
    return select


@pytest.mark.parametrize("stop", ["cancel", "timeout"])
async def test_the_next_holder_is_in_step_after_a_side_request_left_pending(
        proxied: Pool, proxy: FaultProxy, postgres: PostgresServer,
        monkeypatch: pytest.MonkeyPatch, stop: str) -> None:
    """The request turning values is held at the network (a stall) and its caller stops
    waiting (cancelled, or its timeout): it comes through with the next holder's first
    statement (a describe) right behind it. That statement is answered."""
    pool = proxied
    table = f"dc_side_pending_{stop}"
    original = Wire.side

    def stalled(self: Wire, data: bytes) -> asyncio.Future[list[bytes]]:
        if data != SYNC_MESSAGE:
            proxy.set_mode("stall")
            if stop == "cancel":
                task = asyncio.current_task()
                assert task is not None
                task.cancel()
        return original(self, data)

    select = await _retyped_to_money(pool, postgres, table)
    monkeypatch.setattr(Wire, "side", stalled)

    async def holder() -> Any:
        async with pool.acquire() as conn:
            return await conn.fetchval(select, 1, timeout=0.5)

    with pytest.raises((asyncio.CancelledError, StaleStatementError)):
        await asyncio.create_task(holder())
    monkeypatch.setattr(Wire, "side", original)
    proxy.set_mode("pass")
    async with asyncio.timeout(10):
        assert await pool.fetchval("SELECT $1::int + 41", 1) == 42
        assert await pool.fetchval(select, 1) == "$1.00"


async def test_a_connection_lost_while_the_server_turns_values_is_reported_lost(
        proxied: Pool, proxy: FaultProxy, postgres: PostgresServer,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The connection is cut as the request turning a retyped column's values goes out: the
    caller gets the pool's `ConnectionLostError` (the statement ran, its rows were received),
    as for any connection lost in use, not `StaleStatementError` ("the server did not turn
    them"); the pool replaces the connection."""
    pool = proxied
    table = "dc_side_lost"
    original = Wire.side
    cut = asyncio.Event()

    def cut_as_sent(self: Wire, data: bytes) -> asyncio.Future[list[bytes]]:
        waiter = original(self, data)
        if data != SYNC_MESSAGE:  # the values to turn
            proxy.set_mode("reset")
            cut.set()
        return waiter

    select = await _retyped_to_money(pool, postgres, table)
    monkeypatch.setattr(Wire, "side", cut_as_sent)
    with pytest.raises(ConnectionLostError) as info:
        async with asyncio.timeout(10), pool.acquire() as conn:
            await conn.fetchval(select, 1)
    assert cut.is_set()
    assert "was lost while in use" in str(info.value)
    assert "turning a retyped column's values" in str(info.value)
    monkeypatch.setattr(Wire, "side", original)
    proxy.set_mode("pass")
    async with asyncio.timeout(10):
        assert await pool.fetchval(select, 1) == "$1.00"
