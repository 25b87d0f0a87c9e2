"""PgBouncer's graceful shutdowns. ``SHUTDOWN WAIT_FOR_CLIENTS`` (1.24; SIGTERM since 1.23)
stops taking logins and waits for its clients to leave. A guard, not a fix: the pool keeps
serving on the connections it has, a login it needs meanwhile fails clearly, and PgBouncer
exits once the pool closes (docs/faults.md: rolling restarts and `max_lifetime`).
``SHUTDOWN WAIT_FOR_SERVERS`` (1.23+; SIGINT) lets transactions under way finish and closes a
client that starts a new one: the caller is told why, and that nothing reached the server."""

from __future__ import annotations

import asyncio

import pytest

from asyncpool import ConnectError, ConnectionLostError, Pool, PoolTimeoutError
from asyncpool.testing import PgBouncerServer, ServerStack
from asyncpool.testing.binaries import current_pgbouncer


async def test_wait_for_clients_drains_when_the_pool_closes(fault_stack: ServerStack) -> None:
    binary = current_pgbouncer()
    if binary.version < (1, 24):
        pytest.skip("SHUTDOWN WAIT_FOR_CLIENTS needs PgBouncer 1.24")
    with PgBouncerServer(binary, fault_stack.postgres, {"default_pool_size": 2}) as pooler:
        pool = Pool(pooler.dsn(), name="draining", min_size=2, max_size=3, acquire_timeout=1,
                    connect_timeout=0.5, telemetry=False)
        async with pool:
            assert pool.stats().size == 2
            await pooler.admin("SHUTDOWN WAIT_FOR_CLIENTS")
            # The connections it has still serve, in as many transactions as it likes.
            for i in range(20):
                async with pool.transaction() as conn:
                    assert await conn.fetchval("SELECT $1::int", i) == i
            # A third connection needs a login, which PgBouncer no longer takes.
            held = [await pool.acquire() for _ in range(2)]
            try:
                with pytest.raises((ConnectError, PoolTimeoutError)) as info:
                    await pool.acquire()
                assert "'draining'" in str(info.value)
            finally:
                for conn in held:
                    await pool.release(conn)
            assert pooler.running(), "PgBouncer waits for its clients"
        # Closed: its clients gone, PgBouncer exits by itself.
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 10
        while pooler.running():
            assert loop.time() < deadline, "PgBouncer did not exit once the pool closed"
            await asyncio.sleep(0.05)


async def test_wait_for_servers_closes_a_new_transaction_and_says_why(
        fault_stack: ServerStack) -> None:
    binary = current_pgbouncer()
    if binary.version < (1, 23):
        pytest.skip("SHUTDOWN WAIT_FOR_SERVERS needs PgBouncer 1.23")
    with PgBouncerServer(binary, fault_stack.postgres, {"default_pool_size": 2}) as pooler:
        async with Pool(pooler.dsn(), name="shutting", min_size=2, max_size=2, acquire_timeout=2,
                        connect_timeout=0.5, telemetry=False) as pool:
            async with pool.transaction() as conn:  # (PgBouncer waits for this one's server)
                assert await conn.fetchval("SELECT 1") == 1
                await pooler.admin("SHUTDOWN WAIT_FOR_SERVERS")
                with pytest.raises(ConnectionLostError) as info:
                    await pool.fetchval("SELECT 2")
                assert await conn.fetchval("SELECT 3") == 3  # the one under way goes on
            message = str(info.value)
            assert "server shutting down" in message, message
            assert "PgBouncer is shutting down" in message, message
            assert "this one did not reach the server" in message, message
