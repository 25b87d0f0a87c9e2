"""The "unnamed" mode over TLS (asyncio's and uvloop's SSL transports): the Wire sits on top of TLS."""

from __future__ import annotations

import asyncio

import pytest

from asyncpool import Pool
from asyncpool.testing import PostgresServer
from asyncpool.testing.pki import TestPki


async def test_reuse_and_changes_over_tls(tls_postgres: PostgresServer, pki: TestPki) -> None:
    dsn = tls_postgres.app.dsn("localhost", tls_postgres.port, tls_postgres.database)
    async with Pool(dsn, name="dc-tls", ssl="verify-full", ssl_root_cert=str(pki.ca_cert),
                    prepared_statements="unnamed", min_size=1, max_size=1,
                    telemetry=False) as pool:
        await pool.execute("CREATE TABLE t (id int, v int); INSERT INTO t VALUES (1, 10)")
        select = "SELECT * FROM t WHERE id = $1"
        async with pool.acquire() as conn:
            assert await conn.fetchval("SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()")
            for _ in range(3):
                assert tuple(await conn.fetchrow(select, 1) or ()) == (1, 10)
            assert conn.describe_cache_stats().hits == 2
            await conn.execute("ALTER TABLE t ALTER COLUMN v TYPE float4")
            row = await conn.fetchrow(select, 1)  # decoded with the reply's description
            assert row is not None
            assert tuple(row) == (1, 10.0)
            assert isinstance(row["v"], float)
            assert conn.describe_cache_stats().stale == 1
        row = await pool.fetchrow(select, 1)
        assert row is not None
        assert tuple(row) == (1, 10.0)
        assert pool.stats().closed_total == 0


def test_over_tls_under_uvloop(tls_postgres: PostgresServer, pki: TestPki) -> None:
    uvloop = pytest.importorskip("uvloop")
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(_tls_round(tls_postgres, pki))


async def _tls_round(tls_postgres: PostgresServer, pki: TestPki) -> None:
    dsn = tls_postgres.app.dsn("localhost", tls_postgres.port, tls_postgres.database)
    async with Pool(dsn, name="dc-tls-uv", ssl="verify-full", ssl_root_cert=str(pki.ca_cert),
                    prepared_statements="unnamed", min_size=1, max_size=1,
                    telemetry=False) as pool, pool.acquire() as conn:
        assert "uvloop" in type(asyncio.get_running_loop()).__module__
        assert await conn.fetchval("SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()")
        for i in range(3):
            assert await conn.fetchval("SELECT $1::int + 1", i) == i + 1
        assert conn.describe_cache_stats().hits == 2
