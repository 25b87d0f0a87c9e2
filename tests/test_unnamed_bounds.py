"""The description cache is bounded, can expire entries, can be invalidated, and refuses to run
on an asyncpg that lacks what it builds on."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import pytest

import asyncpool
from asyncpool import Pool, PoolConfigError
from asyncpool.testing import PgBouncerServer
from asyncpool.unnamed import invalidate_all
from tests.conftest import Pooler

QUERIES = [f"SELECT $1::int + {n}" for n in range(4)]


def _pool(pooler: Pooler, **options: Any) -> Pool:
    return Pool(pooler.dsn(), name="bounds", prepared_statements="unnamed", min_size=1,
                max_size=2, telemetry=False, **options)


@pytest.fixture
async def pool(pooler: Pooler) -> AsyncIterator[Pool]:
    async with _pool(pooler) as p:
        yield p


async def test_size_is_bounded_least_recently_used_first(pooler: Pooler) -> None:
    async with _pool(pooler, statement_cache_size=2) as pool, pool.acquire() as conn:
        for query in QUERIES[:3]:  # the third evicts the first
            assert await conn.fetchval(query, 1) == 1 + int(query[-1])
        await conn.fetchval(QUERIES[2], 1)  # hit
        await conn.fetchval(QUERIES[1], 1)  # hit, now most recent
        await conn.fetchval(QUERIES[0], 1)  # miss: evicts QUERIES[2]
        await conn.fetchval(QUERIES[1], 1)  # hit
        stats = conn.describe_cache_stats()
        assert (stats.size, stats.max_size) == (2, 2)
        assert (stats.hits, stats.misses, stats.evicted) == (3, 4, 2)


async def test_entries_expire_after_the_ttl(pooler: Pooler) -> None:
    async with _pool(pooler, statement_cache_ttl=1.0) as pool, pool.acquire() as conn:
        await conn.fetchval(QUERIES[0], 1)
        await conn.fetchval(QUERIES[0], 1)
        assert (conn.describe_cache_stats().hits, conn.describe_cache_stats().misses) == (1, 1)
        await asyncio.sleep(1.1)
        assert await conn.fetchval(QUERIES[0], 2) == 2
        assert (conn.describe_cache_stats().hits, conn.describe_cache_stats().misses) == (1, 2)
        await conn.fetchval(QUERIES[0], 1)
        assert conn.describe_cache_stats().hits == 2


async def test_without_ttl_entries_stay(pool: Pool) -> None:
    async with pool.acquire() as conn:
        await conn.fetchval(QUERIES[0], 1)
        await asyncio.sleep(0.4)
        await conn.fetchval(QUERIES[0], 1)
        assert conn.describe_cache_stats().hits == 1


async def test_invalidate_forgets_every_connections_descriptions(pool: Pool) -> None:
    async with pool.acquire() as a, pool.acquire() as b:
        for conn in (a, b):
            await conn.fetchval(QUERIES[0], 1)
            await conn.fetchval(QUERIES[0], 1)
        pool.invalidate_statement_cache()
        for conn in (a, b):
            misses = conn.describe_cache_stats().misses
            await conn.fetchval(QUERIES[0], 1)
            assert conn.describe_cache_stats().misses == misses + 1
            await conn.fetchval(QUERIES[0], 1)
            assert conn.describe_cache_stats().misses == misses + 1  # cached again
    assert pool.stats().closed_total == 0  # forgetting costs no connection


async def test_module_invalidate_all_reaches_every_pool(pooler: Pooler) -> None:
    async with _pool(pooler) as one, _pool(pooler) as two:
        conns = [await one.acquire(), await two.acquire()]
        for conn in conns:
            await conn.fetchval(QUERIES[1], 1)
        invalidate_all()
        for conn in conns:
            misses = conn.describe_cache_stats().misses
            await conn.fetchval(QUERIES[1], 1)
            assert conn.describe_cache_stats().misses == misses + 1
        await one.release(conns[0])
        await two.release(conns[1])


async def test_a_description_made_during_invalidation_is_not_kept(pool: Pool) -> None:
    """A statement described before a migration but cached after invalidate() ran must not
    survive it."""
    async with pool.acquire() as conn:
        slow = "SELECT pg_sleep(0.2)::text || $1::text"
        task = asyncio.create_task(conn.fetchval(slow, "x"))
        await asyncio.sleep(0.05)  # described, now executing
        pool.invalidate_statement_cache()
        assert await task == "x"
        misses = conn.describe_cache_stats().misses
        await conn.fetchval(slow, "y")
        assert conn.describe_cache_stats().misses == misses + 1


async def test_codec_changes_drop_descriptions(pool: Pool) -> None:
    """A reused statement must decode with the codec in force now, not the one it was described
    with."""
    async with pool.acquire() as conn:
        query = "SELECT $1::json"
        assert await conn.fetchval(query, '{"a": 1}') == '{"a": 1}'
        assert await conn.fetchval(query, '{"a": 1}') == '{"a": 1}'
        await conn.set_type_codec("json", encoder=json.dumps, decoder=json.loads,
                                  schema="pg_catalog")
        assert await conn.fetchval(query, {"a": 1}) == {"a": 1}
        await conn.reset_type_codec("json", schema="pg_catalog")


async def test_off_mode_has_no_description_cache(pooler: Pooler) -> None:
    async with Pool(pooler.dsn(), name="off", prepared_statements="off", min_size=1,
                    telemetry=False) as pool, \
            pool.acquire() as conn:
        assert not hasattr(conn.raw, "describe_cache_stats")
        assert conn.raw._stmt_cache_enabled is False  # type: ignore[attr-defined]


async def test_describe_cache_keeps_asyncpgs_named_cache_off(pool: Pool) -> None:
    async with pool.acquire() as conn:
        assert conn.raw._stmt_cache_enabled is False  # type: ignore[attr-defined]


async def test_a_users_connection_class_is_kept(pooler: Pooler) -> None:
    class Mine(asyncpg.Connection):
        def mine(self) -> str:
            return "mine"

    async with Pool(pooler.dsn(), name="mine", prepared_statements="unnamed",
                    connect_kwargs={"connection_class": Mine}, telemetry=False) as pool, \
            pool.acquire() as conn:
        assert conn.raw.mine() == "mine"  # type: ignore[attr-defined]  # a connection_class method: through .raw
        await conn.fetchval(QUERIES[0], 1)
        await conn.fetchval(QUERIES[0], 1)
        assert conn.describe_cache_stats().hits == 1


async def test_an_asyncpg_without_the_hook_fails_at_open(legacy: PgBouncerServer,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delattr(asyncpg.Connection, "_do_execute")
    pool = Pool(legacy.dsn(), name="old-asyncpg", prepared_statements="unnamed",
                telemetry=False)
    with pytest.raises(PoolConfigError, match=r"'old-asyncpg'.*Connection\._do_execute.*tested"):
        await pool.open()
    assert pool.stats().size == 0


async def test_an_asyncpg_with_another_signature_fails_at_open(
    legacy: PgBouncerServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def _do_execute(self: object, query: str, executor: object, timeout: float) -> None:
        raise AssertionError("never called")

    monkeypatch.setattr(asyncpg.Connection, "_do_execute", _do_execute)
    with pytest.raises(PoolConfigError, match=r"record_class"):
        await asyncpool.create_pool(legacy.dsn(), prepared_statements="unnamed",
                                    telemetry=False)


async def test_a_connection_opened_without_the_pools_loop_is_refused(
    legacy: PgBouncerServer,
) -> None:
    from asyncpool.config import PoolConfig
    from asyncpool.unnamed import describe_cache_connection_class

    cls = describe_cache_connection_class(
        PoolConfig(dsn=legacy.dsn(), name="bare", prepared_statements="unnamed"))
    with pytest.raises(PoolConfigError, match=r"open the connection through the pool"):
        await asyncpg.connect(legacy.dsn(), connection_class=cls, statement_cache_size=0)


def test_the_former_name_still_works_with_a_deprecation_warning() -> None:
    from asyncpool.config import PoolConfig

    with pytest.warns(DeprecationWarning, match="'describe-cache' is now called 'unnamed'"):
        config = PoolConfig(dsn="postgresql://u@h/d",
                            prepared_statements="describe-cache")  # type: ignore[arg-type]
    assert config.prepared_statements == "unnamed"
    with pytest.warns(DeprecationWarning, match="now called"):
        assert PoolConfig.from_env({"ASYNCPOOL_PREPARED_STATEMENTS": "describe-cache"},
                                   dsn="postgresql://u@h/d").prepared_statements == "unnamed"


async def test_an_asyncpg_whose_prepared_statement_runs_elsewhere_fails_at_open(
    legacy: PgBouncerServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An unnamed prepare()'s executions are checked through asyncpg's private funnel; if it
    went away they would run unchecked (wrong values after a migration): refused instead."""
    from asyncpg.prepared_stmt import PreparedStatement

    monkeypatch.delattr(PreparedStatement, "_PreparedStatement__bind_execute")
    with pytest.raises(PoolConfigError, match=r"PreparedStatement\.__bind_execute"):
        await asyncpool.create_pool(legacy.dsn(), prepared_statements="unnamed",
                                    telemetry=False)
