"""Servers restarted under load: nothing lost, no slot leaked, the pool serves again."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import pytest

from asyncpool import ConnectError, ConnectionLostError, Pool, PoolTimeoutError
from asyncpool.testing import PgBouncerServer, ServerStack
from asyncpool.testing.crash import crash_and_restart
from asyncpool.testing.invariants import assert_clear, clients_of, full_width, pooler_forgets, settled
from asyncpool.testing.ledger import Ledger

from .load import Load

# What a caller may see while a server restarts: its connection died (ConnectionLostError), no
# connection could be opened (ConnectError), or none came within acquire_timeout.
CLEAR = (ConnectionLostError, ConnectError, PoolTimeoutError)


def _pool(dsn: str, name: str) -> Pool:
    return Pool(dsn, name=name, min_size=2, max_size=4, acquire_timeout=5, connect_timeout=1,
                telemetry=False)


async def _under_load(pool: Pool, ledger: Ledger, fault: Callable[[], None]) -> None:
    """Writes before, during and after `fault`; the pool must commit again afterwards."""
    load = Load(pool, ledger).start()
    try:
        await load.commits(30, within=15)
        await asyncio.to_thread(fault)
        await load.commits(30, within=20)
    finally:
        await load.stop()


@pytest.mark.parametrize("how", ["restart", "crash"])
async def test_pgbouncer_restart_under_load(
    fault_pooler: PgBouncerServer, ledger: Ledger, how: str
) -> None:
    fault = fault_pooler.restart if how == "restart" else lambda: crash_and_restart(fault_pooler)
    async with _pool(fault_pooler.dsn(), f"pgbouncer-{how}") as pool:
        created = pool.stats().created_total
        await _under_load(pool, ledger, fault)
        check = await ledger.verify()
        assert_clear(ledger.errors, *CLEAR)
        # Every client connection died with the old process: the pool must have reconnected.
        assert pool.stats().created_total > created
        assert check.committed >= 60
        await settled(pool, fault_pooler)
        await full_width(pool)
    await pooler_forgets(fault_pooler, 0)


@pytest.mark.parametrize("path", ["pgbouncer", "direct"])
async def test_postgres_restart_under_load(
    fault_stack: ServerStack, ledger: Ledger, path: str
) -> None:
    postgres = fault_stack.postgres
    pooler = fault_stack.legacy if path == "pgbouncer" else None
    dsn = pooler.dsn() if pooler is not None else postgres.dsn()
    clients_before = await clients_of(fault_stack.legacy)
    loop = asyncio.get_running_loop()
    inserted, restarted = asyncio.Event(), asyncio.Event()

    def restart() -> None:
        postgres.restart()
        loop.call_soon_threadsafe(restarted.set)

    async def across_the_restart(conn: object) -> None:
        inserted.set()
        await asyncio.wait_for(restarted.wait(), 60)

    async with _pool(dsn, f"postgres-restart-{path}") as pool:
        # One transaction is open on the server when it stops, whatever the timing of the load's
        # writes (through PgBouncer, a write between two transactions holds no server connection
        # and is not touched).
        held = asyncio.create_task(ledger.write(pool, before_commit=across_the_restart))
        await asyncio.wait_for(inserted.wait(), 10)
        await _under_load(pool, ledger, restart)
        assert await held is not None  # its COMMIT went to a backend the shutdown ended
        check = await ledger.verify()
        assert_clear(ledger.errors, *CLEAR)
        # A fast shutdown ends every backend: the held transaction at least was caught by it.
        assert check.failed + check.ambiguous_present + check.ambiguous_absent > 0
        await settled(pool, pooler)
        await full_width(pool)
    await pooler_forgets(fault_stack.legacy, clients_before)
