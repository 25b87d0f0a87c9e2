"""A pool dropped without close(), against real PostgreSQL: its finalizer warns and terminates
its server connections, promptly (by reference counting, with the cyclic GC off), and nothing of
it stays alive: a record refers to its pool's slot owner (`ConnectionRecord.owner`), a cycle
terminate() must break."""

from __future__ import annotations

import asyncio
import gc
import warnings
import weakref
from collections.abc import Iterator

import asyncpg
import pytest

from asyncpool import Pool
from asyncpool.testing import PostgresServer


async def _backends(postgres: PostgresServer, name: str) -> int:
    conn = await asyncpg.connect(postgres.admin_dsn)
    try:
        return int(await conn.fetchval(
            "SELECT count(*) FROM pg_stat_activity WHERE application_name = $1", name))
    finally:
        await conn.close()


@pytest.fixture
def no_cyclic_gc() -> Iterator[None]:
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


@pytest.mark.parametrize("held", [False, True], ids=["all-idle", "one-kept-by-its-holder"])
async def test_a_dropped_pool_ends_its_server_connections_without_the_cyclic_gc(
        postgres: PostgresServer, no_cyclic_gc: None, held: bool) -> None:
    name = f"dropped_pool_{held}"
    pool = Pool(postgres.dsn(application_name=name), min_size=2, max_size=3, telemetry=False)
    await pool.open()
    assert await pool.fetchval("SELECT 1") == 1
    async with pool.acquire() as conn:
        assert await conn.fetchval("SELECT 2") == 2
    kept = await pool.acquire() if held else None
    assert await _backends(postgres, name) == 2
    pool_ref, slots_ref = weakref.ref(pool), weakref.ref(pool._slots)
    records = [weakref.ref(record) for record in pool._slots.records]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        del pool, conn
        # A recorded warning holds its source, the pool: keep only the text.
        messages = [(w.category, str(w.message)) for w in caught]
        caught.clear()
    assert (ResourceWarning, "unclosed pool 'asyncpool': close it with 'await pool.close()' or "
            "'async with'") in messages, messages
    assert pool_ref() is None
    left = -1
    for _ in range(100):  # the terminated connections' backends end (5 s at most)
        left = await _backends(postgres, name)
        if left == 0:
            break
        await asyncio.sleep(0.05)
    assert left == 0
    if kept is not None:
        with pytest.raises(Exception, match="closed"):
            await kept.fetchval("SELECT 3")
        del kept
    assert slots_ref() is None, [type(r).__name__ for r in gc.get_referrers(slots_ref())]
    assert [r for r in records if r() is not None] == []
