"""PgBouncer drops a database's connections (admin ``KILL db``; a database removed from its
``[databases]`` at RELOAD takes the same path, ``kill_pool``): a statement under way ends with
PgBouncer's FATAL "database removed", and the caller is told what that means and what to do."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Iterator
from typing import Literal

import asyncpg
import pytest

from asyncpool import ConnectionLostError, Pool
from asyncpool.testing import PgBouncerServer, ServerStack
from asyncpool.testing.binaries import current_pgbouncer, system_pgbouncer
from asyncpool.testing.invariants import settled

SLEEP = "SELECT pg_sleep(29)"  # (found by its text in pg_stat_activity, ended by the test)


@pytest.fixture(params=["legacy", "current"])
def killable(request: pytest.FixtureRequest, fault_stack: ServerStack) -> Iterator[PgBouncerServer]:
    """A PgBouncer of this test's own (1.18, then the current one): KILL drops every client of
    the database, and a pooler shared with other tests must not see it."""
    binary = system_pgbouncer() if request.param == "legacy" else current_pgbouncer()
    with PgBouncerServer(binary, fault_stack.postgres) as bouncer:
        yield bouncer


async def _cut_in_flight(pool: Pool, direct: asyncpg.Connection,
                         cut: Callable[[], Awaitable[object]]) -> str:
    """The message of the error a statement running on the server gets when `cut` runs."""

    async def sleeper() -> object:
        async with pool.acquire() as conn:
            return await conn.fetchval(SLEEP)

    task = asyncio.create_task(sleeper())
    async with asyncio.timeout(10):  # running on the server: cut in flight
        while not await direct.fetchval(
                "SELECT count(*) FROM pg_stat_activity WHERE query = $1", SLEEP):
            await asyncio.sleep(0.05)
    await cut()
    with pytest.raises(ConnectionLostError) as info:
        async with asyncio.timeout(10):
            await task
    return str(info.value)


@pytest.mark.parametrize("mode", ["unnamed", "off"])
async def test_database_removed_is_explained(killable: PgBouncerServer, fault_stack: ServerStack,
                                             mode: Literal["unnamed", "off"]) -> None:
    """KILL while a statement runs: the caller gets ConnectionLostError saying PgBouncer
    dropped the database's connections (KILL, or removed at RELOAD) and what to do; after
    RESUME the pool serves again."""
    direct = await asyncpg.connect(fault_stack.postgres.dsn())
    try:
        async with Pool(killable.dsn(), name="killed", min_size=1, max_size=1, acquire_timeout=10,
                        validate_after=None, prepared_statements=mode, telemetry=False) as pool:
            assert await pool.fetchval("SELECT $1::int", 1) == 1
            message = await _cut_in_flight(pool, direct, lambda: killable.admin("KILL app"))
            assert "database removed" in message, message  # PgBouncer's own words
            assert "an admin ran KILL on it" in message, message
            assert "until RESUME" in message, message
            await killable.admin("RESUME app")
            async with asyncio.timeout(15):
                assert await pool.fetchval("SELECT $1::int + 1", 1) == 2
            await settled(pool, killable)
    finally:
        await direct.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                             "WHERE query = $1", SLEEP)
        await direct.close()


async def test_a_database_removed_at_reload_is_explained(killable: PgBouncerServer,
                                                        fault_stack: ServerStack) -> None:
    """A database listed in PgBouncer's [databases], removed from it, then RELOAD: the statement
    under way gets the same FATAL "database removed", and the same explanation."""
    assert killable.workdir is not None
    ini = killable.workdir / "pgbouncer.ini"
    original = ini.read_text()
    pg = fault_stack.postgres
    listed = original.replace(
        "[databases]\n", f"[databases]\nlisted = host={pg.host} port={pg.port} dbname={pg.database}\n")
    ini.write_text(listed)
    await killable.admin("RELOAD")
    direct = await asyncpg.connect(pg.dsn())
    try:
        async with Pool(killable.dsn(database="listed"), name="removed", min_size=1, max_size=1,
                        acquire_timeout=10, validate_after=None, telemetry=False) as pool:
            assert await pool.fetchval("SELECT $1::int", 1) == 1

            async def remove() -> None:
                ini.write_text(original)
                await killable.admin("RELOAD")

            message = await _cut_in_flight(pool, direct, remove)
            assert "database removed" in message, message
            assert "RELOAD found it removed" in message, message
    finally:
        await direct.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                             "WHERE query = $1", SLEEP)
        await direct.close()
