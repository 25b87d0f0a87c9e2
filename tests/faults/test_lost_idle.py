"""Idle connections closed under the pool by PostgreSQL (``pg_terminate_backend``) or PgBouncer
(``KILL``, ``client_idle_timeout``) leave it as the close arrives, with no checkout: the sizes,
`PoolStats` and the observers say so within a bounded wait, and `min_size` is back within a
bound (`asyncpool.pool.lost_idle`). A server that refuses the refill's logins gets no tight
loop of them."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import asyncpg
import pytest

from asyncpool import Pool, PoolConfig
from asyncpool.observer import ConnectAttempt
from asyncpool.testing import PgBouncerServer, PostgresServer, ServerStack
from asyncpool.testing.binaries import current_pgbouncer, system_pgbouncer
from tests.pool_watchers import PoolWork
from tests.telemetry_support import Sdk
from tests.waiting import until

# Well inside the housekeeping period (5 s), which would otherwise be what notices.
GONE_WITHIN = 2.0
# The refill waits one backoff delay (at most 2 s), then logs in.
BACK_WITHIN = 4.0


class _Logins(PoolWork):
    """`PoolWork`, and the login attempts, with their outcome."""

    def __init__(self) -> None:
        super().__init__()
        self.attempts: list[ConnectAttempt] = []

    def connect_attempted(self, attempt: ConnectAttempt) -> None:
        self.attempts.append(attempt)


def _pids(pool: Pool) -> list[int]:
    return [record.conn.get_server_pid() for record in pool._slots.idle]


@pytest.fixture(params=["legacy", "current"], ids=["pgbouncer-1.18", "pgbouncer-current"])
def own_pgbouncer(request: pytest.FixtureRequest, fault_stack: ServerStack) -> Iterator[PgBouncerServer]:
    """A PgBouncer of this test's own: KILL reaches no other test's clients."""
    binary = system_pgbouncer() if request.param == "legacy" else current_pgbouncer()
    with PgBouncerServer(binary, fault_stack.postgres) as bouncer:
        yield bouncer


@pytest.fixture(params=["legacy", "current"], ids=["pgbouncer-1.18", "pgbouncer-current"])
def idle_closing_pgbouncer(request: pytest.FixtureRequest,
                           fault_stack: ServerStack) -> Iterator[PgBouncerServer]:
    """A PgBouncer of this test's own that closes clients idle for more than a second."""
    binary = system_pgbouncer() if request.param == "legacy" else current_pgbouncer()
    with PgBouncerServer(binary, fault_stack.postgres, {"client_idle_timeout": 1}) as bouncer:
        yield bouncer


async def test_an_idle_connection_terminated_on_the_server_leaves_at_once(
        postgres: PostgresServer) -> None:
    work = PoolWork()
    async with Pool(postgres.dsn(), name="terminated", min_size=2, max_size=3,
                    validate_after=None, observers=[work], telemetry=False) as pool:
        pid = _pids(pool)[0]
        assert await postgres.terminate_backend(pid)
        await until(lambda: pool.stats().closed_total == 1, within=GONE_WITHIN)
        assert pid not in _pids(pool)
        assert work.reasons == ["broken"]
        await until(lambda: pool.get_idle_size() == pool.get_size() == 2, within=BACK_WITHIN)
        s = pool.stats()
        assert (s.created_total, s.closed_total, s.acquired_total) == (3, 1, 0), s
        assert await pool.fetchval("SELECT 1") == 1


def _idle_gauge(sdk: Sdk) -> object:
    """``db.client.connection.count{state=idle}`` as an OpenTelemetry reader collects it now."""
    metric = sdk.collect().metrics["db.client.connection.count"]
    return next(point.value for point in metric.data.data_points  # type: ignore[union-attr]
                if point.attributes is not None
                and point.attributes.get("db.client.connection.state") == "idle")


async def test_the_idle_connection_gauge_drops_without_a_checkout(postgres: PostgresServer) -> None:
    sdk = Sdk()
    try:
        # min_size=0: no refill, so the gauge is read while the pool has no connection.
        config = PoolConfig(dsn=postgres.dsn(), name="gauge", min_size=0, max_size=1,
                            validate_after=None, telemetry=False)
        async with Pool(config=config, observers=[sdk.observer(config)]) as pool:
            assert await pool.fetchval("SELECT 1") == 1
            assert _idle_gauge(sdk) == 1
            assert await postgres.terminate_backend(_pids(pool)[0])
            await until(lambda: _idle_gauge(sdk) == 0, within=GONE_WITHIN)
            s = pool.stats()
            assert (s.size, s.acquired_total, s.created_total) == (0, 1, 1), s
    finally:
        sdk.shutdown()


async def test_pgbouncer_kill_of_idle_connections_leaves_at_once(
        own_pgbouncer: PgBouncerServer) -> None:
    """KILL closes every client of the database (and holds new ones until RESUME): the pool's
    idle ones leave at once; the refill's login waits in PgBouncer, and is served at RESUME."""
    work = PoolWork()
    async with Pool(own_pgbouncer.dsn(), name="killed-idle", min_size=2, max_size=2,
                    validate_after=None, observers=[work], telemetry=False) as pool:
        assert pool.get_idle_size() == 2
        await own_pgbouncer.admin("KILL app")
        await until(lambda: pool.stats().closed_total == 2, within=GONE_WITHIN)
        s = pool.stats()
        assert (s.idle, s.in_use, s.acquired_total) == (0, 0, 0), s
        assert work.reasons == ["broken", "broken"]
        await own_pgbouncer.admin("RESUME app")
        await until(lambda: pool.get_idle_size() == pool.get_size() == 2, within=BACK_WITHIN)
        assert pool.stats().acquired_total == 0
        assert await pool.fetchval("SELECT 1") == 1


async def test_pgbouncer_client_idle_timeout_leaves_at_once(
        idle_closing_pgbouncer: PgBouncerServer) -> None:
    """PgBouncer closes the idle client after client_idle_timeout (checked about once a
    second): the pool's stats say so without a checkout, and min_size comes back, again and
    again, at a bounded pace."""
    work = _Logins()
    async with Pool(idle_closing_pgbouncer.dsn(), name="idle-timeout", min_size=1, max_size=1,
                    validate_after=None, observers=[work], telemetry=False) as pool:
        first = pool._slots.idle[0]
        # Closed after 1 s idle, found by PgBouncer's periodic check (up to 1 s more).
        await until(lambda: first not in pool._slots.idle, within=2.0 + GONE_WITHIN)
        assert pool.stats().closed_total >= 1
        assert "broken" in work.reasons
        await until(lambda: pool.stats().created_total >= 2 and pool.get_idle_size() == 1,
                    within=BACK_WITHIN)
        before = len(work.attempts)
        await asyncio.sleep(6.0)
        # Each connection lives about 1 to 2 s: a refill after each close, at most.
        assert len(work.attempts) - before <= 8, len(work.attempts) - before
        assert pool.stats().acquired_total == 0


async def test_a_server_refusing_the_refill_gets_no_tight_loop(
        postgres: PostgresServer, limited_database: str) -> None:
    """The connections terminated, then every login refused (CONNECTION LIMIT 0): the refill
    tries once, then the housekeeping every 5 s; no login loop."""
    work = _Logins()
    admin = await asyncpg.connect(postgres.admin_dsn)
    try:
        async with Pool(postgres.dsn(database=limited_database), name="refused", min_size=2,
                        max_size=2, validate_after=None, observers=[work],
                        telemetry=False) as pool:
            await admin.execute(f"ALTER DATABASE {limited_database} CONNECTION LIMIT 0")
            before = len(work.attempts)
            for pid in _pids(pool):
                assert await postgres.terminate_backend(pid)
            await until(lambda: pool.stats().closed_total == 2, within=GONE_WITHIN)
            await asyncio.sleep(4.0)  # within one housekeeping period
            refused = work.attempts[before:]
            assert 1 <= len(refused) <= 3, len(refused)
            assert all(attempt.error is not None for attempt in refused)
            assert pool.stats().size == 0
            await admin.execute(f"ALTER DATABASE {limited_database} CONNECTION LIMIT -1")
            assert await pool.fetchval("SELECT 1") == 1
    finally:
        await admin.close()
