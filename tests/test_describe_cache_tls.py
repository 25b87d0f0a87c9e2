"""describe-cache over TLS: asyncio's SSL transport carries the reply inspection too."""

from __future__ import annotations

import pytest

from asyncpool import Pool, StaleStatementError
from asyncpool.testing import PostgresServer
from asyncpool.testing.pki import TestPki


async def test_reuse_and_stale_detection_over_tls(tls_postgres: PostgresServer,
                                                  pki: TestPki) -> None:
    dsn = tls_postgres.app.dsn("localhost", tls_postgres.port, tls_postgres.database)
    async with Pool(dsn, name="dc-tls", ssl="verify-full", ssl_root_cert=str(pki.ca_cert),
                    prepared_statements="describe-cache", min_size=1, max_size=1,
                    telemetry=False) as pool:
        await pool.execute("CREATE TABLE t (id int, v int); INSERT INTO t VALUES (1, 10)")
        select = "SELECT * FROM t WHERE id = $1"
        async with pool.acquire() as conn:
            assert await conn.fetchval("SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()")
            for _ in range(3):
                assert tuple(await conn.fetchrow(select, 1)) == (1, 10)
            assert conn.describe_cache_stats().hits == 2
            await conn.execute("ALTER TABLE t ALTER COLUMN v TYPE float4")
            with pytest.raises(StaleStatementError, match="retyped from int4 to float4"):
                await conn.fetchrow(select, 1)
        assert tuple(await pool.fetchrow(select, 1)) == (1, 10.0)
        assert pool.stats().closed_total == 1
