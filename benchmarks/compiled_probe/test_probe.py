"""Checks that the `_probe` extension behaves as the Python acquire path on a real PostgreSQL
(the machine's, 127.0.0.1:5432): the common case, the hand-overs to the Python path, a kept proxy
refused, errors and cancellation. Run (built first):
``cd benchmarks/compiled_probe && PYTHONPATH=<worktree>:. python -m pytest -p no:randomly test_probe.py``"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import sys

import asyncpg
import probe
import pytest

import asyncpool
from asyncpool.errors import PoolError
from asyncpool.pool.lease import GIVEN_BACK

DSN = "postgresql://postgres@127.0.0.1:5432/postgres"


async def check(proxy: str) -> None:
    pool = await asyncpool.create_pool(DSN, min_size=1, max_size=1, prepared_statements="off",
                                       telemetry=False)
    probe.install(pool, proxy=proxy)
    slots = pool._slots
    record = slots.idle[0]
    try:
        # The common case, and the lease reused as the record's spare.
        for i in range(3):
            async with pool.acquire() as conn:
                assert await conn.fetchval("SELECT $1::int + 1", i) == i + 1
                assert record.lease is not None
                assert record.lease.task is asyncio.current_task()
                held = record.lease
            assert record.spare is held
            assert held.state.value == "released"
            assert conn._lease is GIVEN_BACK
            assert list(slots.idle) == [record]
        assert slots.acquired_total == 3
        # A kept proxy is refused, by the next holder's time too.
        with pytest.raises(PoolError, match="released"):
            await conn.fetchval("SELECT 1")
        # Other methods through the Python proxy; kwargs; a statement error.
        async with pool.acquire() as conn:
            assert await conn.fetchval("SELECT 2", timeout=5) == 2
            assert [tuple(row) for row in await conn.fetch("SELECT 1 AS a")] == [(1,)]
            with pytest.raises(asyncpg.DivisionByZeroError):
                await conn.fetchval("SELECT 1/0")
            assert isinstance(conn.raw, asyncpg.Connection)
            assert isinstance(conn, asyncpg.Connection) is (proxy != "c")
        assert list(slots.idle) == [record]
        # An error leaving the block: the Python path's end (no spare kept).
        with pytest.raises(KeyError):
            async with pool.acquire() as conn:
                raise KeyError("x")
        assert record.spare is None
        assert list(slots.idle) == [record]
        # A transaction left open: the return's reset (the Python path).
        async with pool.acquire() as conn:
            await conn.execute("BEGIN")
        await asyncio.sleep(0.05)
        async with pool.acquire() as conn:
            assert not conn.raw.is_in_transaction()
        # Cancellation inside a statement.
        async def slow() -> None:
            async with pool.acquire() as conn:
                await conn.fetchval("SELECT pg_sleep($1)", 5)
        task = asyncio.create_task(slow())
        await asyncio.sleep(0.2)
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await asyncio.sleep(0.2)
        async with pool.acquire() as conn:
            assert await conn.fetchval("SELECT 5") == 5
        # Used twice: refused.
        ctx = pool.acquire()
        async with ctx:
            pass
        with pytest.raises(PoolError, match="already"):
            async with ctx:
                pass
        # Unscoped: the Python path.
        conn = await pool.acquire()
        await pool.release(conn)
        # A busy pool: the slow checkout (a waiter).
        async def hold() -> None:
            async with pool.acquire() as conn:
                await asyncio.sleep(0.1)
                await conn.fetchval("SELECT 1")
        await asyncio.gather(hold(), hold())
        # No reference left behind.
        from asyncpool.pool.lease import ACTIVE, RELEASED
        from asyncpool.pool.record import IDLE, LEASED
        watched = (record, record.conn, ACTIVE, RELEASED, IDLE, LEASED, GIVEN_BACK, slots)
        for i in range(100):  # (the same variables bound before counting)
            async with pool.acquire() as conn:
                await conn.fetchval("SELECT $1::int", i)
        gc.collect()
        refs = [sys.getrefcount(o) for o in watched]
        before = len(gc.get_objects())
        for i in range(2000):
            async with pool.acquire() as conn:
                await conn.fetchval("SELECT $1::int", i)
        gc.collect()
        grown = len(gc.get_objects()) - before
        assert grown < 50, grown
        after = [sys.getrefcount(o) for o in watched]
        assert after == refs, (refs, after)
        assert pool.stats().in_use == 0
    finally:
        await pool.close()


@pytest.mark.parametrize("proxy", list(probe.PROXIES))
def test_probe(proxy: str) -> None:
    asyncio.run(check(proxy))
