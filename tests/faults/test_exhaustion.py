"""A full pooler: max_client_conn reached, and a server pool saturated past query_wait_timeout."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

import pytest

from asyncpool import ConnectionLostError, Pool, PoolerExhaustedError, PoolTimeoutError
from asyncpool.testing import PgBouncerServer, ServerStack
from asyncpool.testing.binaries import current_pgbouncer, system_pgbouncer
from asyncpool.testing.invariants import settled
from asyncpool.testing.ledger import Ledger
from tests.faults.poolers import both_pgbouncers

MAX_CLIENTS = 3


@pytest.fixture(scope="module")
def tight_poolers(fault_stack: ServerStack) -> Iterator[dict[str, PgBouncerServer]]:
    """Both PgBouncer versions with room for 3 clients and 1 server connection."""
    settings: dict[str, str | int] = {
        "max_client_conn": MAX_CLIENTS,
        "default_pool_size": 1,
        "max_db_connections": 1,
        "query_wait_timeout": 1,
    }
    with both_pgbouncers(fault_stack, settings) as servers:
        yield servers


@pytest.fixture(params=["legacy", "current"], ids=["pgbouncer-1.18", "pgbouncer-current"])
def tight(request: pytest.FixtureRequest, tight_poolers: dict[str, PgBouncerServer]
          ) -> PgBouncerServer:
    return tight_poolers[request.param]


def _pool(pooler: PgBouncerServer, **options: Any) -> Pool:
    config: dict[str, Any] = {"name": "crowded", "min_size": 0, "max_size": 6,
                                 "acquire_timeout": 1.5, "connect_timeout": 0.5,
                                 "validate_after": None, "telemetry": False}
    config.update(options)
    return Pool(pooler.dsn(), **config)


async def test_max_client_conn_is_a_clear_error(tight: PgBouncerServer) -> None:
    async with _pool(tight) as pool:
        held = [await pool.acquire() for _ in range(MAX_CLIENTS)]
        # The refusal itself, or, when the last retry's login was still under way as
        # acquire_timeout ran out (a loaded machine, seen in CI), the time-out naming it.
        with pytest.raises((PoolerExhaustedError, PoolTimeoutError)) as info:
            await pool.acquire()
        message = str(info.value)
        assert "'crowded'" in message
        assert "max_client_conn" in message
        if isinstance(info.value, PoolTimeoutError):
            assert "last error" in message
        stats = pool.stats()
        assert (stats.size, stats.in_use, stats.connecting, stats.waiting) == (3, 3, 0, 0)
        for conn in held:
            await pool.release(conn)
        await settled(pool)
        # All three connections serve again.
        conns = [await pool.acquire() for _ in range(MAX_CLIENTS)]
        for conn in conns:
            assert await conn.fetchval("SELECT 1") == 1
            await pool.release(conn)


async def test_connection_released_while_the_pooler_is_full_reaches_the_retrying_caller(
    tight: PgBouncerServer,
) -> None:
    """A caller retrying a login the full pooler refuses takes a connection another task
    returns meanwhile, rather than failing at its deadline with one idle in the pool."""
    async with _pool(tight, acquire_timeout=10) as pool:
        held = [await pool.acquire() for _ in range(MAX_CLIENTS)]
        caller = asyncio.create_task(pool.fetchval("SELECT 42"))
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 5
        while pool.stats().connect_errors_total == 0:
            assert loop.time() < deadline, "the caller never met the full pooler"
            await asyncio.sleep(0.01)
        await pool.release(held.pop())
        assert await asyncio.wait_for(caller, 5) == 42
        for conn in held:
            await pool.release(conn)
        await settled(pool)
        assert pool.stats().size == MAX_CLIENTS


async def test_saturated_server_pool_past_query_wait_timeout_is_a_clear_error(
    tight: PgBouncerServer, ledger: Ledger
) -> None:
    """PgBouncer's only server connection is held by a long transaction: the next transaction
    waits in PgBouncer until query_wait_timeout, then its connection is closed."""
    async with _pool(tight, acquire_timeout=5) as pool:
        blocker = await pool.acquire()
        await blocker.execute("BEGIN; SELECT 1")  # holds the only server connection
        error = await ledger.write(pool)
        assert isinstance(error, ConnectionLostError), repr(error)
        message = str(error)
        assert "query_wait_timeout" in message
        assert "default_pool_size" in message  # what to change
        await blocker.execute("COMMIT")
        await pool.release(blocker)
        check = await ledger.verify()
        assert (check.committed, check.failed) == (0, 1)
        assert await ledger.write(pool) is None
        await settled(pool, tight)


@pytest.mark.parametrize("which", ["legacy", "current"])
async def test_a_transaction_waiting_past_query_timeout_is_told_it_did_not_run(
        fault_stack: ServerStack, which: str) -> None:
    """PgBouncer's query_timeout also closes a client still waiting for a server connection,
    with "query_timeout" (its running one gets "query timeout", which may have run): that
    caller is told that nothing reached the server, and what to change."""
    binary = system_pgbouncer() if which == "legacy" else current_pgbouncer()
    settings: dict[str, str | int] = {"default_pool_size": 1, "max_db_connections": 1,
                                      "query_timeout": 1}
    with PgBouncerServer(binary, fault_stack.postgres, settings) as pooler:
        async with _pool(pooler, acquire_timeout=5) as pool:
            blocker = await pool.acquire()
            await blocker.execute("BEGIN; SELECT 1")  # holds the only server connection
            with pytest.raises(ConnectionLostError) as info:
                await pool.fetchval("SELECT 2")
            await pool.release(blocker)
    message = str(info.value)
    assert "query_timeout" in message, message
    assert "nothing of it reached the server" in message, message
    assert "default_pool_size" in message, message
