"""DDL run the way a deploy's migration runs it, beside the pool under test."""

from __future__ import annotations

import asyncpg

from asyncpool.testing import PostgresServer


async def migrate(postgres: PostgresServer, sql: str) -> None:
    """Run DDL on a separate, direct connection, as a deploy's migration would."""
    conn = await asyncpg.connect(postgres.dsn())
    try:
        await conn.execute(sql)
    finally:
        await conn.close()
