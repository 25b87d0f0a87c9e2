"""Concurrency, cancellation, checkout validation, lifetimes and connection loss, with real servers."""

from __future__ import annotations

import asyncio
import itertools
import math
import random
import time
from collections.abc import Iterator

import asyncpg
import pytest

import asyncpool
from asyncpool import Pool
from asyncpool.config import PreparedStatements
from asyncpool.pool import alarms
from asyncpool.testing import PgBouncerServer, PostgresServer, ServerStack
from tests.cancelled_logins import cancel_logins, loop_messages
from tests.conftest import Pooler
from tests.waiting import until


async def _baseline(pool: Pool, pooler: Pooler, timeout: float = 5.0) -> None:
    """Wait until neither the pool nor PgBouncer shows work in flight; fail if it never settles."""
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        stats = pool.stats()
        row = await pooler.pool_row()
        settled = (
            stats.in_use == 0
            and stats.waiting == 0
            and stats.connecting == 0
            and stats.size <= stats.max_size
            and stats.idle == stats.size
            and row["cl_waiting"] == 0
            and row["sv_active"] == 0
        )
        if settled:
            return
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"did not return to baseline: {stats} / {row}")
        await asyncio.sleep(0.05)


async def test_many_tasks_share_a_small_pool(pooler: Pooler) -> None:
    peak_servers = 0

    async def watch() -> None:
        nonlocal peak_servers
        while True:
            peak_servers = max(peak_servers, int((await pooler.pool_row())["sv_active"]))
            await asyncio.sleep(0.01)

    async with Pool(pooler.dsn(), name="crowd", max_size=5, acquire_timeout=30,
                    telemetry=False) as pool:

        async def task(i: int) -> int:
            async with pool.transaction() as conn:
                value: int = await conn.fetchval("SELECT $1::int FROM pg_sleep(0.002)", i)
                return value

        watcher = asyncio.create_task(watch())
        try:
            results = await asyncio.gather(*[task(i) for i in range(250)])
        finally:
            watcher.cancel()
        assert results == list(range(250))
        stats = pool.stats()
        assert stats.size <= 5
        assert stats.acquired_total == 250
        assert stats.timeouts_total == 0
        assert 0 < peak_servers <= 5
        await _baseline(pool, pooler)


async def test_a_busy_pool_adds_no_timer_to_the_event_loop(pooler: Pooler) -> None:
    # A timer waiting in asyncio's heap costs every turn of the loop (asyncpool/pool/alarms.py):
    # on asyncio's own loops the leak deadline and the housekeeping period wait elsewhere.
    # uvloop keeps the pool's timers on its own heap (C, not readable): the leak still fires.
    loop = asyncio.get_running_loop()

    def timers() -> set[asyncio.TimerHandle]:
        if not alarms.own_clock(loop):
            return set()
        return {h for h in loop._scheduled if not h.cancelled()}  # type: ignore[attr-defined]

    before = timers()
    async with Pool(pooler.dsn(), max_size=2, leak_timeout=0.5, telemetry=False) as pool:
        for i in range(20):
            assert await pool.fetchval("SELECT $1::int", i) == i
            async with pool.acquire() as conn:
                assert await conn.fetchval("SELECT $1::int", i) == i
                assert timers() - before == set()
            assert timers() - before == set()
        housekeeper = pool._slots.housekeeper
        assert housekeeper is not None
        assert not housekeeper.done()
        assert pool._slots.leak_timer_unarmed is False  # the leak deadline is set...

        async def holder() -> None:
            async with pool.acquire():
                await asyncio.sleep(30)

        with pytest.raises(asyncpool.ConnectionLeakedError):  # ...and still fires
            await asyncio.wait_for(holder(), 5)
        assert pool.stats().leaked_total == 1


async def test_cancellation_storm_returns_to_baseline(pooler: Pooler) -> None:
    rng = random.Random(1234)
    async with Pool(pooler.dsn(), name="storm", max_size=4, acquire_timeout=30,
                    telemetry=False) as pool:

        async def work(i: int) -> None:
            if i % 3 == 0:
                async with pool.transaction() as conn:
                    await conn.execute("SELECT pg_sleep(0.01)")
            elif i % 3 == 1:
                async with pool.acquire() as conn:
                    await conn.fetchval("SELECT pg_sleep(0.005), $1::int", i)
            else:
                await pool.fetchval("SELECT $1::int", i)

        for _round in range(4):
            tasks = [asyncio.create_task(work(i)) for i in range(120)]
            for _ in range(60):
                await asyncio.sleep(rng.uniform(0, 0.004))
                rng.choice(tasks).cancel()
            done = await asyncio.gather(*tasks, return_exceptions=True)
            unexpected = [e for e in done if e is not None and not isinstance(e, asyncio.CancelledError)]
            assert not unexpected, unexpected[:3]
            assert any(isinstance(e, asyncio.CancelledError) for e in done)
        await _baseline(pool, pooler)
        # The pool still works at full width afterwards.
        results = await asyncio.gather(*[pool.fetchval("SELECT $1::int", i) for i in range(40)])
        assert results == list(range(40))
        assert pool.stats().in_use == 0


async def test_cancel_while_waiting_does_not_lose_the_slot(pooler: Pooler) -> None:
    async with Pool(pooler.dsn(), max_size=1, telemetry=False) as pool:
        held = await pool.acquire()
        waiters = [asyncio.create_task(pool.fetchval("SELECT 1")) for _ in range(5)]
        await asyncio.sleep(0.05)
        assert pool.stats().waiting == 5
        for w in waiters[:4]:
            w.cancel()
        await asyncio.sleep(0)
        await pool.release(held)
        assert await waiters[4] == 1
        stats = pool.stats()
        assert (stats.size, stats.in_use, stats.waiting) == (1, 0, 0)


async def test_cancel_during_query_leaves_no_half_used_connection(pooler: Pooler) -> None:
    async with Pool(pooler.dsn(), max_size=1, telemetry=False) as pool:

        async def slow() -> None:
            async with pool.transaction() as conn:
                await conn.execute("SELECT pg_sleep(5)")

        task = asyncio.create_task(slow())
        await asyncio.sleep(0.2)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        # The next user gets a clean connection (no transaction, no query in flight).
        async with pool.acquire() as conn:
            assert not conn.is_in_transaction()
            assert await conn.fetchval("SELECT 7") == 7
        await _baseline(pool, pooler)


@pytest.mark.parametrize("target", ["postgres", "legacy", "current"])
async def test_a_holder_cancelled_at_every_await_keeps_its_connection(
        request: pytest.FixtureRequest, target: str) -> None:
    """An anyio cancel scope (Starlette's streaming response when its client goes away) cancels
    the holder again at every await, the return's ROLLBACK too: the reset runs in the pool's own
    task, so the connection comes back rolled back instead of being closed at every return."""
    import anyio

    server = request.getfixturevalue(target)
    async with Pool(server.dsn(), min_size=1, max_size=2, validate_after=None,
                    telemetry=False) as pool:
        await pool.fetchval("SELECT 1")
        before = pool.stats()

        async def holder(started: asyncio.Event) -> None:
            async with pool.acquire() as conn, conn.transaction():
                await conn.execute("SELECT 1")
                started.set()
                await conn.execute("SELECT pg_sleep(5)")

        for _ in range(5):
            started = asyncio.Event()
            async with anyio.create_task_group() as group:
                group.start_soon(holder, started)
                await started.wait()
                await asyncio.sleep(0.05)
                group.cancel_scope.cancel()
        # The holder left at once; its connection comes back when the server has cancelled
        # its statement and rolled back (the next holder may meanwhile open the second one).
        for _ in range(100):
            if pool.stats().in_use == 0:
                break
            await asyncio.sleep(0.05)
        after = pool.stats()
        assert after.in_use == 0
        assert after.closed_total == before.closed_total, (before, after)
        assert after.created_total <= pool.get_max_size()
        async with pool.acquire() as conn:
            assert not conn.is_in_transaction()
            assert await conn.fetchval("SELECT 7") == 7


@pytest.mark.parametrize("mode", ["unnamed", "off"])
async def test_logins_cancelled_as_they_connect_leave_no_unretrieved_error(
        postgres: PostgresServer, mode: PreparedStatements) -> None:
    """asyncpg's TLS negotiation keeps an error when its connection is lost after the login that
    waited for it was cancelled (as the TCP connection came up); asyncio then logged "Future
    exception was never retrieved" for about one such login in four. Logins cancelled at random
    moments in their first milliseconds (seeded) leave nothing for the loop's handler."""
    async with loop_messages() as seen, Pool(postgres.dsn(), min_size=0, max_size=1,
                                             telemetry=False, prepared_statements=mode) as pool:
        await cancel_logins(pool, 150)
    assert [m for m in seen if "never retrieved" in m] == []


_ORPHANS = {
    # A simple query holds no lock of asyncpg's: the proxy counts it.
    "simple query opening a transaction": lambda conn: conn.execute("SELECT pg_sleep(0.3); BEGIN"),
    # asyncpg's _execute (the proxy runs its body): its lock says it is running.
    "statement with arguments": lambda conn: conn.fetchval("SELECT pg_sleep($1::float8)", 0.3),
    "statement with a keyword": lambda conn: conn.execute("SELECT pg_sleep(0.3)", timeout=5),
}
#: asyncpg's prepared statements take no lock of asyncpg's: the pool's subclass takes it.
PREPARED = "prepared statement"


@pytest.mark.parametrize("first", [*_ORPHANS, PREPARED])
async def test_a_connection_returned_with_a_statement_running_is_closed(
        pooler: Pooler, postgres: PostgresServer, caplog: pytest.LogCaptureFixture,
        first: str) -> None:
    """Two statements at once on one connection (``asyncio.gather`` in the block): the second
    fails, "another operation is in progress", and the block ends while the first still runs.
    That connection is closed and its statement cancelled, not handed to the next caller: what
    the statement leaves (here a BEGIN) would make the next caller's write, reported done,
    roll back at its return."""
    import asyncpg

    table = f"returned_busy_{abs(hash((pooler.dsn(), first)))}"
    async with Pool(pooler.dsn(), max_size=1, telemetry=False) as pool:
        await pool.execute(f"CREATE TABLE {table} (a int)")
        try:
            with pytest.raises(asyncpg.InterfaceError, match="another operation is in progress"):
                async with pool.acquire() as conn:
                    if first == PREPARED:
                        stmt = await conn.prepare("SELECT pg_sleep($1::float8)")
                        orphan = stmt.fetchval(0.3)
                    else:
                        orphan = _ORPHANS[first](conn)
                    await asyncio.gather(orphan, conn.fetchval("SELECT 1"))
            assert pool.stats().closed_total == 1
            assert "still running" in caplog.text
            await asyncio.sleep(0.5)  # the orphaned statement would have ended by now
            assert await pool.execute(f"INSERT INTO {table} VALUES (1)") == "INSERT 0 1"
            direct = await asyncpg.connect(postgres.dsn())
            try:
                assert await direct.fetchval(f"SELECT count(*) FROM {table}") == 1
            finally:
                await direct.close()
            await _baseline(pool, pooler)
        finally:
            await pool.execute(f"DROP TABLE {table}")


@pytest.fixture(scope="module")
def dropping_poolers(stack: ServerStack) -> Iterator[list[PgBouncerServer]]:
    """Both PgBouncer versions, closing client connections idle for more than a second."""
    from asyncpool.testing.binaries import current_pgbouncer, system_pgbouncer

    servers = [
        PgBouncerServer(binary(), stack.postgres, {"client_idle_timeout": 1, "default_pool_size": 3})
        for binary in (system_pgbouncer, current_pgbouncer)
    ]
    for s in servers:
        s.start()
    try:
        yield servers
    finally:
        for s in servers:
            s.stop()


@pytest.mark.parametrize("which", [0, 1], ids=["pgbouncer-1.18", "pgbouncer-current"])
async def test_connection_dropped_by_pooler_is_replaced_unseen(
    dropping_poolers: list[PgBouncerServer], which: int
) -> None:
    pooler = dropping_poolers[which]
    async with Pool(pooler.dsn(), max_size=2, validate_after=0.2, telemetry=False) as pool:
        assert await pool.fetchval("SELECT 1") == 1
        # PgBouncer's client_idle_timeout closes our idle connection (its check runs about once
        # a second): the pool retires it as the close arrives, not at the next checkout's check.
        await until(lambda: pool.stats().closed_total == 1, within=4.0)
        assert await pool.fetchval("SELECT 2") == 2
        stats = pool.stats()
        assert stats.validation_failures_total == 0
        assert stats.created_total >= 2


async def test_idle_connection_killed_on_server_is_replaced_unseen(postgres: PostgresServer) -> None:
    async with Pool(postgres.dsn(), max_size=1, validate_after=0.05, telemetry=False) as pool:
        pid = await pool.fetchval("SELECT pg_backend_pid()")
        assert await postgres.terminate_backend(pid)
        # Retired as the close arrives (`asyncpool.pool.lost_idle`), before any checkout.
        await until(lambda: pool.stats().closed_total == 1, within=2.0)
        new_pid = await pool.fetchval("SELECT pg_backend_pid()")
        assert new_pid != pid
        assert pool.stats().validation_failures_total == 0


async def test_recently_used_connection_is_not_validated(pooler: Pooler) -> None:
    """Within validate_after the checkout costs no round trip."""

    async with Pool(pooler.dsn(), max_size=1, validate_after=30, telemetry=False) as pool:
        await pool.fetchval("SELECT 1")
        before = await pooler.total_queries()
        for _ in range(20):
            async with pool.acquire():
                pass
        assert await pooler.total_queries() == before
    async with Pool(pooler.dsn(), max_size=1, validate_after=0, telemetry=False) as pool:
        await pool.fetchval("SELECT 1")
        before = await pooler.total_queries()
        for _ in range(20):
            async with pool.acquire():
                pass
        assert await pooler.total_queries() - before == 20


async def test_connection_lost_mid_transaction_is_reported_and_slot_restored(
    pooler: Pooler, postgres: PostgresServer
) -> None:
    async with Pool(pooler.dsn(), name="lossy", max_size=2, telemetry=False) as pool:
        with pytest.raises(asyncpool.ConnectionLostError, match="lost while in use") as info:
            async with pool.transaction() as conn:
                backend = await conn.fetchval("SELECT pg_backend_pid()")
                await postgres.terminate_backend(backend)
                await asyncio.sleep(0.1)
                await conn.fetchval("SELECT 1")
        assert "not committed" in str(info.value)
        assert info.value.__cause__ is not None
        stats = pool.stats()
        assert stats.in_use == 0
        assert await pool.fetchval("SELECT 11") == 11
        await _baseline(pool, pooler)


class _AppError(Exception):
    """The holder's own error, unrelated to the database."""


async def test_the_holders_own_error_goes_on_when_the_connection_is_gone(
    pooler: Pooler, postgres: PostgresServer
) -> None:
    """Only the driver's failure becomes ConnectionLostError: an error the block raises itself
    (an HTTP 404, say) reaches the caller as it is, whether the connection was closed by the
    holder or lost to the server, and the slot is restored either way."""
    async with Pool(pooler.dsn(), name="own-error", max_size=1, telemetry=False) as pool:
        with pytest.raises(_AppError, match="404 not found"):
            async with pool.acquire() as conn:
                conn.terminate()
                raise _AppError("404 not found")
        with pytest.raises(_AppError, match="gone"):
            async with pool.acquire() as conn:
                await conn.execute("BEGIN")  # the pooler keeps the backend for the transaction
                await postgres.terminate_backend(await conn.fetchval("SELECT pg_backend_pid()"))
                await asyncio.sleep(0.1)
                try:
                    await conn.fetchval("SELECT 1")
                except Exception as exc:
                    assert conn.is_closed()
                    raise _AppError("gone") from exc
        assert pool.stats().in_use == 0
        assert await pool.fetchval("SELECT 12") == 12


async def test_asyncpgs_own_error_on_a_working_connection_is_not_a_lost_connection(
    postgres: PostgresServer,
) -> None:
    """asyncpg raises InternalClientError for a value it cannot decode (an enum inside an
    anonymous record: it has no codec for the field's type) on a connection that works on; so
    did asyncpg's own pool. It reached the caller as ConnectionLostError ("the pool replaced the
    connection; retry"), the connection closed and a retry failing alike, since the COPY fix
    took every InternalClientError for a protocol out of step."""
    kind = f"mood_{random.randrange(10**9)}"
    owner = await asyncpg.connect(postgres.dsn(postgres.superuser))
    try:
        await owner.execute(f"CREATE TYPE {kind} AS ENUM ('happy')")
        async with Pool(postgres.dsn(), name="undecodable", max_size=1,
                        telemetry=False) as pool:
            pid = await pool.fetchval("SELECT pg_backend_pid()")
            with pytest.raises(asyncpg.InternalClientError, match="no decoder") as info:
                await pool.fetch(f"SELECT ROW('happy'::{kind})")
            assert not isinstance(info.value, asyncpool.ConnectionLostError)
            with pytest.raises(asyncpg.InternalClientError, match="no decoder"):
                async with pool.acquire() as conn:
                    await conn.fetchval(f"SELECT ROW('happy'::{kind})")
            # The same connection serves on: not closed, not replaced.
            assert await pool.fetchval("SELECT pg_backend_pid()") == pid
            assert pool.stats().closed_total == 0
    finally:
        await owner.execute(f"DROP TYPE IF EXISTS {kind}")
        await owner.close()


async def test_a_timed_out_statement_is_a_timeout_when_its_connection_is_closed(
    pooler: Pooler,
) -> None:
    """With cancel_requests="off" a timed-out statement's connection is closed rather than
    cancelled; the caller still sees the TimeoutError (docs/faults.md), not a lost connection."""
    async with Pool(pooler.dsn(), name="timeout-off", max_size=1, cancel_requests="off",
                    telemetry=False) as pool:
        with pytest.raises(TimeoutError) as info:
            await pool.fetchval("SELECT pg_sleep(2)", timeout=0.2)
        assert not isinstance(info.value, asyncpool.ConnectionLostError)
        with pytest.raises(TimeoutError) as info:
            async with pool.acquire() as conn:
                await conn.fetchval("SELECT pg_sleep(2)", timeout=0.2)
        assert not isinstance(info.value, asyncpool.ConnectionLostError)
        assert pool.stats().closed_total == 2
        assert await pool.fetchval("SELECT 13") == 13


async def test_max_lifetime_retires_connections(pooler: Pooler) -> None:
    async with Pool(pooler.dsn(), max_size=1, max_lifetime=0.3, lifetime_jitter=0.0,
                    telemetry=False) as pool:
        first = await pool.fetchval("SELECT 1")
        created = pool.stats().created_total
        await asyncio.sleep(0.4)
        assert await pool.fetchval("SELECT 1") == first
        stats = pool.stats()
        assert stats.created_total == created + 1
        assert stats.closed_total >= 1


@pytest.mark.parametrize("limits", [{"max_lifetime": 1e-9}, {"max_lifetime": 0.05},
                                    {"max_idle": 1e-9}, {"max_idle": 0.099}])
async def test_a_lifetime_or_idle_limit_too_short_to_use_is_refused(
        pooler: Pooler, limits: dict[str, float]) -> None:
    """max_lifetime=1e-9: `open()` logged in and out ~1,000 times in 8 s and never returned
    (each new connection had expired before it was placed), and housekeeping, every half of
    the limit, kept the loop busy (max_idle=1e-9: 90% of a core on an idle pool)."""
    name = next(iter(limits))
    with pytest.raises(asyncpool.PoolConfigError, match=f"{name}=.*: must be at least 0.1 "
                                                        "seconds"):
        Pool(pooler.dsn(), min_size=1, telemetry=False, **limits)  # type: ignore[call-overload]


async def test_the_shortest_lifetime_taken_renews_at_its_pace(pooler: Pooler) -> None:
    """At the floor (0.1 s) `open()` returns and connections are renewed about once per
    lifetime each, not in a loop."""
    async with asyncio.timeout(5), Pool(pooler.dsn(), min_size=2, max_size=2, max_lifetime=0.1,
                                        telemetry=False) as pool:
        assert pool.stats().size == 2
        await asyncio.sleep(1.0)
        assert await pool.fetchval("SELECT 1") == 1
        # 2 connections, each renewed at most every 0.09 s (jitter) and found by housekeeping
        # every 0.05 s: ~22 logins in the second, far from the ~125 a second of the bug.
        assert pool.stats().created_total <= 2 + 2 * 1.0 / 0.09 + 4


def test_lifetime_jitter_spreads_expiry() -> None:
    from asyncpool.pool.record import expiry

    deadlines = {expiry(0.0, 100.0, 0.2) for _ in range(200)}
    assert len(deadlines) > 150
    assert all(80.0 <= d <= 100.0 for d in deadlines)
    assert expiry(0.0, None, 0.2) == math.inf  # no max_lifetime: never


async def test_max_idle_shrinks_to_min_size(pooler: Pooler) -> None:
    async with Pool(pooler.dsn(), min_size=1, max_size=4, max_idle=0.3, telemetry=False) as pool:
        conns = [await pool.acquire() for _ in range(4)]
        for c in conns:
            await pool.release(c)
        assert pool.stats().size == 4
        deadline = asyncio.get_running_loop().time() + 5
        while pool.stats().size > 1 and asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(0.1)
        assert pool.stats().size == 1


async def test_min_size_is_restored_in_background(pooler: Pooler) -> None:
    async with Pool(pooler.dsn(), min_size=2, max_size=3, max_idle=0.2, telemetry=False) as pool:
        assert pool.stats().size == 2
        async with pool.acquire() as conn:
            conn.raw.terminate()
        assert pool.stats().size == 1
        deadline = asyncio.get_running_loop().time() + 5
        while pool.stats().size < 2 and asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(0.05)
        assert pool.stats().size == 2


async def test_housekeeping_comes_a_period_after_opening_then_on_its_multiples(
        postgres: PostgresServer, monkeypatch: pytest.MonkeyPatch) -> None:
    """The first round never comes before a whole period has passed since the pool opened (a
    dead idle connection is then found by the checkout's check, as before); later rounds fall
    on multiples of the period, where every pool of the process keeps house together."""
    from asyncpool.pool import housekeeping
    from asyncpool.pool.slots import Slots

    rounds: list[float] = []
    real = housekeeping.housekeep

    async def recorded(slots: Slots) -> None:
        rounds.append(time.monotonic())
        await real(slots)

    monkeypatch.setattr(housekeeping, "housekeep", recorded)
    period = 0.25  # max_idle / 2
    await asyncio.sleep(period - time.monotonic() % period + 0.08)  # open well off a multiple
    async with Pool(postgres.dsn(), max_size=1, max_idle=2 * period, telemetry=False):
        opened = time.monotonic()
        async with asyncio.timeout(5):
            while len(rounds) < 3:
                await asyncio.sleep(0.01)
    assert rounds[0] - opened >= period
    if not alarms.own_clock(asyncio.get_running_loop()):
        # uvloop: each round is asyncio.sleep(period) after the last (alarms.tick).
        assert all(b - a >= period - 0.005 for a, b in itertools.pairwise(rounds)), rounds  # ms timers
        return
    for later in rounds[1:]:
        assert 0 <= later % period < 0.05, (period, [t % period for t in rounds])
