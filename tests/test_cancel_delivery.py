"""Cancel requests only where they can arrive (#20).

asyncpg cancels a timed-out or cancelled query with a CancelRequest on a new connection and then
waits for the query to end. RDS Proxy sends no BackendKeyData, so there is no key to cancel with;
a PgBouncer fleet without peering hands the request to a process that does not know the key.
Either way the statement runs on, and a pool that waits for it holds the slot for as long. These
tests put a fault proxy in front of a real server that strips BackendKeyData (as RDS Proxy does)
or drops cancel requests (a fleet without peering), and prove the pool closes the connection at
once instead. Without the fallback, each of the timing assertions fails: the release waits for
RELEASE_TIMEOUT (5 s) while the statement sleeps on.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator

import asyncpg
import pytest

from asyncpool import ConnectionLeakedError, Pool
from asyncpool.connect import driver
from asyncpool.testing import PostgresServer
from asyncpool.testing.faultproxy import FaultProxy
from tests.pool_watchers import PoolWork

FAST = 1.5  # seconds: far below RELEASE_TIMEOUT (5 s), the wait a lost cancel costs


def _sleep_sql(token: str, seconds: int = 30) -> str:
    return f"SELECT pg_sleep({seconds}) /* {token} */"


@pytest.fixture
async def keyless(postgres: PostgresServer) -> AsyncIterator[FaultProxy]:
    """The server behind a proxy that keeps BackendKeyData from the client (RDS Proxy)."""
    async with FaultProxy(postgres.host, postgres.port) as proxy:
        proxy.strip_backend_key = True
        yield proxy


@pytest.fixture
async def lost(postgres: PostgresServer) -> AsyncIterator[FaultProxy]:
    """The server behind a proxy that loses every cancel request (a fleet without peering)."""
    async with FaultProxy(postgres.host, postgres.port) as proxy:
        proxy.drop_cancels = True
        yield proxy


async def _time_out_and_release(pool: Pool, token: str) -> float:
    """A statement that outlives its timeout; how long the release takes."""
    loop = asyncio.get_running_loop()
    conn = await pool.acquire()
    with pytest.raises(TimeoutError):
        await conn.fetch(_sleep_sql(token), timeout=0.3)
    started = loop.time()
    await pool.release(conn)
    return loop.time() - started


async def test_backend_key_is_read_from_the_protocol(postgres: PostgresServer,
                                                     keyless: FaultProxy) -> None:
    """`driver.backend_key` reads asyncpg's `_protocol.backend_pid`/`backend_secret`."""
    conn = await asyncpg.connect(postgres.dsn())
    try:
        key = driver.backend_key(conn)
        assert key is not None
        assert key[0] == await conn.fetchval("SELECT pg_backend_pid()")
        assert driver.cancel_deliverable(conn)
    finally:
        await conn.close()
    conn = await asyncpg.connect(keyless.dsn(postgres.dsn()))
    try:
        assert driver.backend_key(conn) is None
        assert not driver.cancel_deliverable(conn)
    finally:
        await conn.close()


async def test_a_delivered_cancel_stops_the_statement_and_keeps_the_connection(
        postgres: PostgresServer) -> None:
    token = f"t{uuid.uuid4().hex[:10]}"
    async with Pool(postgres.dsn(), name="cancel-direct", min_size=0, max_size=1,
                    telemetry=False) as pool:
        took = await _time_out_and_release(pool, token)
        assert took < FAST
        assert await postgres.running_statements(token) == 0
        assert await pool.fetchval("SELECT 1") == 1
        assert pool.stats().closed_total == 0


async def test_finished_cancel_requests_are_not_kept_on_the_connection(
        postgres: PostgresServer) -> None:
    """asyncpg's request task removes itself from the connection's set with
    ``current_task(conn._loop)``, which found nothing through the pool's loop view: every
    cancelled statement left its finished task (with coroutine and context) there until the
    connection closed (300 cancels, 300 tasks kept)."""
    async with Pool(postgres.dsn(), max_size=1, prepared_statements="off",
                    telemetry=False) as pool:
        for _ in range(20):
            with pytest.raises(TimeoutError):
                await pool.fetchval(_sleep_sql(uuid.uuid4().hex), timeout=0.05)
        assert await pool.fetchval("SELECT 1") == 1
        (record,) = pool._slots.records
        assert record.conn._cancellations == set()  # type: ignore[attr-defined]
        assert pool.stats().created_total == 1  # every cancel was delivered: one connection


async def test_without_backend_key_a_timeout_closes_the_connection_at_once(
        postgres: PostgresServer, keyless: FaultProxy) -> None:
    """RDS Proxy's case: no key, no cancel request sent, the connection closed; the next caller
    gets a new one without waiting for the statement."""
    token = f"t{uuid.uuid4().hex[:10]}"
    try:
        async with Pool(keyless.dsn(postgres.dsn()), name="cancel-keyless", min_size=0,
                        max_size=1, telemetry=False) as pool:
            took = await _time_out_and_release(pool, token)
            assert took < FAST, f"release waited {took:.1f}s for a statement nobody can cancel"
            assert keyless.cancels_seen == 0
            assert pool.stats().closed_total == 1
            assert await asyncio.wait_for(pool.fetchval("SELECT 1"), FAST) == 1
    finally:
        await postgres.end_statements(token)


async def test_lost_cancels_with_cancel_requests_off(postgres: PostgresServer,
                                                     lost: FaultProxy) -> None:
    """A fleet without peering: the key is there but a request would be lost. With
    cancel_requests="off" none is sent and the connection goes at once."""
    token = f"t{uuid.uuid4().hex[:10]}"
    try:
        async with Pool(lost.dsn(postgres.dsn()), name="cancel-off", min_size=0, max_size=1,
                        cancel_requests="off", telemetry=False) as pool:
            took = await _time_out_and_release(pool, token)
            assert took < FAST
            assert lost.cancels_seen == 0
            assert await asyncio.wait_for(pool.fetchval("SELECT 1"), FAST) == 1
    finally:
        await postgres.end_statements(token)


async def test_a_lost_cancel_costs_the_release_timeout_when_cancels_are_relied_on(
        postgres: PostgresServer, lost: FaultProxy) -> None:
    """What cancel_requests="off" exists for: relying on a cancel that is lost holds the release
    (and the slot) until RELEASE_TIMEOUT, while the statement sleeps on."""
    token = f"t{uuid.uuid4().hex[:10]}"
    try:
        async with Pool(lost.dsn(postgres.dsn()), name="cancel-lost", min_size=0, max_size=1,
                        telemetry=False) as pool:
            took = await _time_out_and_release(pool, token)
            assert took >= 4.0
            assert lost.cancels_dropped == 1
            assert await postgres.running_statements(token) == 1
    finally:
        await postgres.end_statements(token)


async def test_leak_reclaim_without_backend_key(postgres: PostgresServer,
                                                keyless: FaultProxy) -> None:
    """Leak reclaim cancels the holder; with no key the connection is closed, not cancelled,
    and the slot is free at once."""
    token = f"t{uuid.uuid4().hex[:10]}"
    loop = asyncio.get_running_loop()
    try:
        async with Pool(keyless.dsn(postgres.dsn()), name="cancel-leak", min_size=0, max_size=1,
                        leak_timeout=0.3, telemetry=False) as pool:

            async def holder() -> None:
                async with pool.acquire() as conn:
                    await conn.fetch(_sleep_sql(token))

            task = asyncio.create_task(holder())
            with pytest.raises(ConnectionLeakedError):
                await asyncio.wait_for(task, FAST)
            started = loop.time()
            assert await asyncio.wait_for(pool.fetchval("SELECT 1"), FAST) == 1
            assert loop.time() - started < FAST
            assert keyless.cancels_seen == 0
            assert pool.stats().leaked_total == 1
    finally:
        await postgres.end_statements(token)


async def test_rds_proxy_host_never_sends_cancel_requests() -> None:
    from asyncpool.connect.poolers import is_rds_proxy

    assert is_rds_proxy("app.proxy-abc123xyz.eu-west-1.rds.amazonaws.com")
    assert not is_rds_proxy("db.abc123xyz.eu-west-1.rds.amazonaws.com")
    cls = driver.cancel_aware_class(None, cancels=False)
    assert issubclass(cls, asyncpg.Connection)
    assert cls._asyncpool_cancels is False  # type: ignore[attr-defined]


@pytest.mark.parametrize("how", ["timeout", "cancel"])
@pytest.mark.parametrize("cancels", ["off", "keyless"])
async def test_closing_for_a_cut_short_statement_keeps_the_callers_error_in_conn_transaction(
        postgres: PostgresServer, keyless: FaultProxy, how: str, cancels: str) -> None:
    """Where the pool closes the connection instead of sending a cancel request, asyncpg's
    ``conn.transaction()`` (and a savepoint inside it) cannot roll back on the way out: the
    caller still gets its own TimeoutError or CancelledError, not ConnectionLostError (as from
    ``pool.transaction()``). Found by the cancellation hunt (tests/faults/test_cancel_hunt.py)."""
    token = f"t{uuid.uuid4().hex[:10]}"
    dsn = postgres.dsn() if cancels == "off" else keyless.dsn(postgres.dsn())
    try:
        async with Pool(dsn, name="cancel-in-tx", min_size=0, max_size=1, telemetry=False,
                        cancel_requests="off" if cancels == "off" else "auto") as pool:

            async def in_transaction() -> None:
                async with pool.acquire() as conn, conn.transaction(), conn.transaction():
                    await conn.execute(_sleep_sql(token), timeout=0.3 if how == "timeout" else None)

            task = asyncio.create_task(in_transaction())
            if how == "cancel":
                await asyncio.sleep(0.3)
                task.cancel()
            with pytest.raises(TimeoutError if how == "timeout" else asyncio.CancelledError):
                await asyncio.wait_for(task, 10)
            assert await asyncio.wait_for(pool.fetchval("SELECT 1"), FAST) == 1
    finally:
        await postgres.end_statements(token)


@pytest.mark.parametrize("cancels", ["off", "keyless"])
async def test_a_connection_closed_for_an_undeliverable_cancel_is_not_taken_for_lost(
        postgres: PostgresServer, keyless: FaultProxy, cancels: str) -> None:
    """The connection closed instead of cancelled, given back after its holder awaited
    anything (a log, a fallback), was taken for one the server lost: every idle connection was
    checked before its next checkout (a round trip each: validate_after ignored), and the
    close reported as "broken" to observers. Found by the model (tests/unit/test_model.py)."""
    token = f"t{uuid.uuid4().hex[:10]}"
    dsn = postgres.dsn() if cancels == "off" else keyless.dsn(postgres.dsn())
    closes = PoolWork()
    try:
        async with Pool(dsn, name="cancel-not-lost", min_size=2, max_size=2, telemetry=False,
                        validate_after=60, observers=[closes],
                        cancel_requests="off" if cancels == "off" else "auto") as pool:
            async with pool.acquire() as conn:
                with pytest.raises(TimeoutError):
                    await conn.fetch(_sleep_sql(token), timeout=0.3)
                await asyncio.sleep(0)
                assert conn.is_closed()
            assert closes.reasons == ["cancel undeliverable"]
            assert await asyncio.wait_for(pool.fetchval("SELECT 1"), FAST) == 1  # (the idle one)
            assert closes.counts["validate"] == 0
    finally:
        await postgres.end_statements(token)
