"""Pool metrics through a real OpenTelemetry SDK: semantic-convention names, and numbers that agree
with `Pool.stats()` after a known workload against the real servers."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import asyncpg
import pytest
from opentelemetry.metrics import CallbackOptions
from opentelemetry.sdk.metrics import ObservableCounter
from opentelemetry.sdk.metrics.export import (
    AggregationTemporality,
    Histogram,
    InMemoryMetricReader,
    NumberDataPoint,
    Sum,
)
from opentelemetry.semconv._incubating.metrics import db_metrics
from opentelemetry.trace import NoOpTracerProvider

import asyncpool
from asyncpool import Pool, PoolStats, PoolTimeoutError
from asyncpool.connect.dsn import Target
from asyncpool.errors import ConnectError
from asyncpool.observer import ConnectAttempt, LeakReport
from asyncpool.telemetry import TelemetryObserver
from asyncpool.telemetry import semconv as sc
from asyncpool.telemetry.checkout_times import CheckoutTimes
from asyncpool.telemetry.metrics import instruments_for, qualified_name
from asyncpool.testing import PgBouncerServer, PostgresServer
from asyncpool.testing.faultproxy import FaultProxy
from tests.conftest import Pooler
from tests.telemetry_support import (
    Collected,
    FirstPasswordWrong,
    Sdk,
    every_instrument_reported,
    metrics_named,
    run_app,
)
from tests.waiting import until


@pytest.fixture
def sdk() -> Iterator[Sdk]:
    s = Sdk()
    yield s
    s.shutdown()


# The names, kinds and units the semantic conventions give (and asyncpool's own counters), written
# out rather than read from asyncpool.telemetry.semconv so a typo there fails here.
EXPECTED = {
    db_metrics.DB_CLIENT_CONNECTION_COUNT: ("updowncounter", "{connection}"),
    db_metrics.DB_CLIENT_CONNECTION_MAX: ("updowncounter", "{connection}"),
    db_metrics.DB_CLIENT_CONNECTION_IDLE_MAX: ("updowncounter", "{connection}"),
    db_metrics.DB_CLIENT_CONNECTION_IDLE_MIN: ("updowncounter", "{connection}"),
    db_metrics.DB_CLIENT_CONNECTION_PENDING_REQUESTS: ("updowncounter", "{request}"),
    db_metrics.DB_CLIENT_CONNECTION_TIMEOUTS: ("counter", "{timeout}"),
    db_metrics.DB_CLIENT_CONNECTION_CREATE_TIME: ("histogram", "s"),
    db_metrics.DB_CLIENT_CONNECTION_WAIT_TIME: ("histogram", "s"),
    db_metrics.DB_CLIENT_CONNECTION_USE_TIME: ("histogram", "s"),
    "asyncpool.connection.leaks": ("counter", "{connection}"),
    "asyncpool.connection.validation_failures": ("counter", "{connection}"),
    "asyncpool.connection.create_errors": ("counter", "{error}"),
    "asyncpool.statement_cache.lookups": ("counter", "{execution}"),
    "asyncpool.statement_cache.stale": ("counter", "{statement}"),
    "asyncpool.statement_cache.evictions": ("counter", "{statement}"),
}


def test_semantic_convention_names_are_the_published_ones() -> None:
    assert db_metrics.DB_CLIENT_CONNECTION_COUNT == "db.client.connection.count"
    assert db_metrics.DB_CLIENT_CONNECTION_PENDING_REQUESTS == "db.client.connection.pending_requests"
    assert {spec.name for spec in sc.ALL_METRICS} == set(EXPECTED)
    assert (sc.POOL_NAME, sc.STATE) == (
        "db.client.connection.pool.name", "db.client.connection.state"
    )


def kind_of(collected: Collected, name: str) -> str:
    data = collected.metrics[name].data
    if isinstance(data, Histogram):
        return "histogram"
    assert isinstance(data, Sum), type(data)
    return "counter" if data.is_monotonic else "updowncounter"


async def test_every_instrument_has_its_semantic_convention_name_kind_unit_and_attributes(
    postgres: PostgresServer, sdk: Sdk
) -> None:
    async with every_instrument_reported(sdk, postgres, "every-metric") as pool:
        collected = sdk.collect()
        stats = pool.stats()

    assert stats.validation_failures_total == 1
    assert stats.timeouts_total == 1
    assert stats.leaked_total == 1
    assert set(collected.metrics) == set(EXPECTED)
    for name, (kind, unit) in EXPECTED.items():
        metric = collected.metrics[name]
        assert (kind_of(collected, name), metric.unit) == (kind, unit), name
        for point in collected.points(name):
            assert point.attributes[sc.POOL_NAME] == "every-metric", name
    states = {p.attributes[sc.STATE] for p in collected.points(sc.CONNECTION_COUNT.name)}
    assert states == {"idle", "used"}
    # error.type is what the caller was given, not the driver's exception.
    errors = {p.attributes[sc.ERROR_TYPE]: p.value for p in collected.points(sc.CREATE_ERRORS.name)}
    assert errors == {"asyncpool.errors.AuthenticationError": 1, "asyncpool.errors.ConnectError": 0,
                      "asyncpool.errors.PoolerExhaustedError": 0}
    assert collected.value(sc.LEAKS.name, asyncpool__leak__action="reclaim") == 1
    assert collected.value(sc.LEAKS.name, asyncpool__leak__action="log") == 0
    cache = stats.statement_cache
    assert cache is not None
    assert cache.hits >= 2
    lookups = sc.CACHE_LOOKUPS.name
    assert collected.value(lookups, asyncpool__statement_cache__result="hit") == cache.hits
    assert collected.value(lookups, asyncpool__statement_cache__result="miss") == cache.misses
    for histogram in (sc.CREATE_TIME, sc.WAIT_TIME, sc.USE_TIME):
        assert collected.histogram(histogram.name).explicit_bounds == sc.TIME_BUCKETS


async def test_metrics_equal_stats_after_a_known_workload(pooler: Pooler, sdk: Sdk) -> None:
    release = asyncio.Event()

    async def hold(pool: Pool) -> None:
        async with pool.acquire() as conn:
            await conn.fetchval("SELECT 1")
            await release.wait()

    async with sdk.pool(pooler.dsn(), name="workload", min_size=1, max_size=3) as pool:
        for i in range(20):
            assert await pool.fetchval("SELECT $1::int", i) == i
        holders = [asyncio.create_task(hold(pool)) for _ in range(5)]
        await until(lambda: pool.stats().in_use == 3 and pool.stats().waiting == 2)

        busy, collected = pool.stats(), sdk.collect()
        assert collected.value(sc.CONNECTION_COUNT.name, db__client__connection__state="used") == 3
        assert collected.value(sc.CONNECTION_COUNT.name, db__client__connection__state="idle") == 0
        assert collected.value(sc.PENDING_REQUESTS.name) == busy.waiting == 2
        assert collected.value(sc.CONNECTION_MAX.name) == busy.max_size == 3
        assert collected.value(sc.CONNECTION_IDLE_MAX.name) == 3
        assert collected.value(sc.CONNECTION_IDLE_MIN.name) == busy.min_size == 1

        with pytest.raises(PoolTimeoutError):
            await pool.acquire(timeout=0.05)
        release.set()
        await asyncio.gather(*holders)

        done, collected = pool.stats(), sdk.collect()
        assert done.acquired_total == 25
        assert collected.histogram(sc.WAIT_TIME.name).count == done.acquired_total
        assert collected.histogram(sc.USE_TIME.name).count == 25
        assert collected.histogram(sc.CREATE_TIME.name).count == done.created_total == 3
        assert collected.value(sc.TIMEOUTS.name) == done.timeouts_total == 1
        assert collected.value(sc.CONNECTION_COUNT.name, db__client__connection__state="idle") == (
            done.idle
        )
        assert collected.value(sc.CONNECTION_COUNT.name, db__client__connection__state="used") == 0
        assert collected.value(sc.PENDING_REQUESTS.name) == 0
        # Counters with no event yet report 0 rather than nothing.
        assert collected.value(sc.VALIDATION_FAILURES.name) == 0
        assert collected.value(sc.LEAKS.name, asyncpool__leak__action="reclaim") == 0
        assert collected.value(sc.CREATE_ERRORS.name,
                               error__type="asyncpool.errors.ConnectError") == 0


async def test_two_pools_on_one_meter_report_side_by_side_until_closed(
    postgres: PostgresServer, sdk: Sdk
) -> None:
    reader = sdk.pool(postgres.dsn(), name="reader", min_size=2, max_size=4)
    writer = sdk.pool(postgres.dsn(), name="writer", min_size=1, max_size=2)
    async with reader, writer:
        async with reader.acquire():
            collected = sdk.collect()
            assert collected.value(sc.CONNECTION_MAX.name, db__client__connection__pool__name="reader") == 4
            assert collected.value(sc.CONNECTION_MAX.name, db__client__connection__pool__name="writer") == 2
            assert collected.value(
                sc.CONNECTION_COUNT.name, db__client__connection__pool__name="reader",
                db__client__connection__state="used",
            ) == 1
        await writer.close()
        names = {p.attributes[sc.POOL_NAME] for p in sdk.collect().points(sc.CONNECTION_MAX.name)}
        assert names == {"reader"}


async def test_a_dropped_connection_is_counted_as_dropped_not_reclaimed(
        postgres: PostgresServer, sdk: Sdk) -> None:
    """A checkout its holder dropped unreturned (a SQLAlchemy connection the garbage collector
    found: `leaks.report_dropped`) is given back, not reclaimed from a holder: it was counted
    under ``asyncpool.leak.action="reclaim"``, with ``leak_action="log"`` too, and its span
    marked the ConnectionLeakedError no holder got."""
    from asyncpool.pool.leaks import report_dropped

    async with sdk.pool(postgres.dsn(), name="dropped", min_size=0, max_size=1,
                        leak_action="log") as pool:
        conn = await pool.acquire()
        report_dropped(pool._slots, conn._lease)
        await pool.release(conn)
        collected = sdk.collect()
    assert pool.stats().leaked_total == 1
    counts = {action: collected.value(sc.LEAKS.name, asyncpool__leak__action=action)
              for action in ("reclaim", "log", "dropped")}
    assert counts == {"reclaim": 0, "log": 0, "dropped": 1}, counts
    [span] = sdk.spans(sc.LEAK_SPAN)
    [event] = span.events
    assert (event.attributes or {}).get(sc.LEAK_ACTION) == "dropped"
    assert sc.ERROR_TYPE not in (span.attributes or {})


async def test_an_observer_watches_one_pool(postgres: PostgresServer, sdk: Sdk) -> None:
    observer = sdk.observer()
    async with Pool(postgres.dsn(), name="first", min_size=0, telemetry=False,
                    observers=[observer]):
        second = Pool(postgres.dsn(), name="second", min_size=0, telemetry=False,
                      observers=[observer])
        with pytest.raises(asyncpool.PoolError, match="already watches a pool"):
            await second.open()


async def test_default_pool_publishes_through_the_global_api_without_an_sdk(
    postgres: PostgresServer,
) -> None:
    async with Pool(postgres.dsn(), name="global-noop", min_size=1) as pool:
        assert isinstance(pool._slots.observer, TelemetryObserver)
        assert await pool.fetchval("SELECT 41 + 1") == 42


def test_import_asyncpool_does_not_load_opentelemetry() -> None:
    code = (
        "import sys, asyncpool; "
        "print(sorted(m for m in sys.modules if m.startswith('opentelemetry')))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


async def test_checkout_times_off_skips_only_the_per_checkout_histograms(
    postgres: PostgresServer, sdk: Sdk
) -> None:
    observer = TelemetryObserver(
        meter_provider=sdk.meter_provider, tracer_provider=sdk.tracer_provider,
        checkout_times=False,
    )
    async with Pool(postgres.dsn(), name="lean", min_size=1, telemetry=False,
                    observers=[observer]) as pool:
        for _ in range(3):
            await pool.fetchval("SELECT 1")
        collected = sdk.collect()
        assert pool.stats().acquired_total == 3

    assert sc.WAIT_TIME.name not in collected.metrics
    assert sc.USE_TIME.name not in collected.metrics
    assert collected.histogram(sc.CREATE_TIME.name).count == 1
    assert collected.value(sc.CONNECTION_COUNT.name, db__client__connection__state="idle") == 1


def test_a_collection_racing_the_event_loop_retries_the_stats_read(sdk: Sdk) -> None:
    """Readers collect on their own thread; stats() can then meet a waiter queue being changed."""
    calls = 0

    def racing_stats() -> PoolStats:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise RuntimeError("deque mutated during iteration")
        return PoolStats("racy", 2, 1, 1, 0, 0, 1, 4, 2, 0, 0, 0, 0, 5, 0)

    instruments = instruments_for(sdk.meter_provider, asyncpool.__version__)
    instruments.watch("racy-key", "racy", racing_stats)
    try:
        collected = sdk.collect()
    finally:
        instruments.unwatch("racy-key")
    assert collected.value(sc.CONNECTION_COUNT.name, db__client__connection__state="used") == 1
    assert collected.value(sc.CONNECTION_MAX.name) == 4


# Opens a pool with the default global telemetry, then installs the SDK, as an application whose
# pool is created at import time would; prints the metrics the SDK then collects. Checkout times
# are recorded from the pool's next housekeeping round on (max_idle=0.5: every 0.25 s).
_LATE_SDK = """
import asyncio, sys
import asyncpool
from opentelemetry import metrics
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader

async def main():
    async with asyncpool.Pool(sys.argv[1], name="early", min_size=1, max_idle=0.5) as pool:
        assert pool._slots.on_acquired is None and pool._slots.on_released is None
        await pool.fetchval("SELECT 1")  # nothing listens: not recorded
        reader = InMemoryMetricReader()
        metrics.set_meter_provider(MeterProvider(metric_readers=[reader]))
        await asyncio.sleep(0.6)
        assert pool._slots.on_acquired is not None and pool._slots.on_released is not None
        await pool.fetchval("SELECT 1")
        for rm in reader.get_metrics_data().resource_metrics:
            for sm in rm.scope_metrics:
                for m in sm.metrics:
                    for p in m.data.data_points:
                        print(m.name, p.attributes.get("db.client.connection.state", "-"),
                              getattr(p, "value", None), getattr(p, "count", None))

asyncio.run(main())
"""


def test_a_pool_opened_before_the_sdk_is_installed_reports_through_it(
    postgres: PostgresServer,
) -> None:
    lines = run_app(_LATE_SDK, postgres.dsn())
    assert "db.client.connection.count idle 1 None" in lines
    assert "db.client.connection.max - 10 None" in lines
    # Only the checkout after the SDK came and a housekeeping round passed: 1.
    assert "db.client.connection.wait_time - None 1" in lines
    assert "db.client.connection.use_time - None 1" in lines


async def test_describe_cache_counts_survive_retired_connections_and_match_stats(
    legacy: PgBouncerServer, postgres: PostgresServer, sdk: Sdk
) -> None:
    """Hits, misses, evictions and a stale description after DDL, through PgBouncer 1.18; counts
    stay with the pool whatever happens to the connection."""
    table = "telemetry_stale"
    async with sdk.pool(legacy.dsn(), name="cached", min_size=1, max_size=1,
                        prepared_statements="unnamed", statement_cache_size=2) as pool:
        await pool.execute(f"DROP TABLE IF EXISTS {table}; CREATE TABLE {table} (id int, v int)")
        for query in ("SELECT $1::int", "SELECT $1::int + 1", "SELECT $1::int + 2"):
            for i in range(2):
                await pool.fetchval(query, i)  # a miss, then a hit; the third evicts the first
        await pool.fetch(f"SELECT * FROM {table} WHERE id = $1", 1)  # miss, evicts another
        await pool.fetch(f"SELECT * FROM {table} WHERE id = $1", 1)  # hit
        conn = await asyncpg.connect(postgres.dsn())
        try:
            await conn.execute(f"ALTER TABLE {table} ADD COLUMN extra int")
        finally:
            await conn.close()
        # A hit whose reply shows the new column: decoded with it, counted stale, kept again.
        row = await pool.fetchrow(f"SELECT * FROM {table} WHERE id = $1", 1)
        assert row is None
        assert await pool.fetchval("SELECT $1::int", 5) == 5  # evicted earlier: a miss
        stats, collected = pool.stats(), sdk.collect()
        await pool.execute(f"DROP TABLE {table}")
        await pool.close()
        stats_closed = pool.stats()

    assert stats_closed.statement_cache == stats.statement_cache  # closing loses no count
    # execute() with no arguments takes asyncpg's simple-query path: no lookup.
    assert stats.statement_cache == asyncpool.StatementCacheStats(hits=5, misses=5, stale=1,
                                                                  evicted=3)
    lookups = sc.CACHE_LOOKUPS.name
    assert collected.value(lookups, asyncpool__statement_cache__result="hit") == 5
    assert collected.value(lookups, asyncpool__statement_cache__result="miss") == 5
    assert collected.value(sc.CACHE_STALE.name) == 1
    assert collected.value(sc.CACHE_EVICTIONS.name) == 3


async def test_pools_not_in_unnamed_mode_report_no_cache_metrics(
    postgres: PostgresServer, sdk: Sdk
) -> None:
    async with sdk.pool(postgres.dsn(), name="plain", min_size=1, prepared_statements="off") as pool:
        await pool.fetchval("SELECT $1::int", 1)
        assert pool.stats().statement_cache is None
        collected = sdk.collect()
    for spec in (sc.CACHE_LOOKUPS, sc.CACHE_STALE, sc.CACHE_EVICTIONS):
        assert spec.name not in collected.metrics


def test_the_meter_carries_the_schema_url_of_the_conventions_it_follows(
    sdk: Sdk, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert sc.conventions().schema_url == "https://opentelemetry.io/schemas/1.44.0"
    monkeypatch.setenv(sc.SEMCONV_ENV, "1.24")
    assert sc.conventions() is sc.LEGACY
    monkeypatch.setenv(sc.SEMCONV_ENV, "1.30")
    with pytest.raises(asyncpool.PoolConfigError, match=r"1\.24, 1\.44"):
        TelemetryObserver(meter_provider=sdk.meter_provider)


async def test_the_current_conventions_by_default(postgres: PostgresServer, sdk: Sdk) -> None:
    async with sdk.pool(postgres.dsn(), name="schema", min_size=1):
        collected = sdk.collect()
    assert set(collected.schema_urls.values()) == {sc.CURRENT.schema_url}


async def test_the_1_24_conventions_for_older_dashboards(postgres: PostgresServer) -> None:
    """semconv="1.24": db.client.connections.* names, pool.name/state attributes, times in ms."""
    sdk = Sdk(semconv="1.24")
    try:
        async with every_instrument_reported(sdk, postgres, "legacy-names") as pool:
            collected = sdk.collect()
            stats = pool.stats()
    finally:
        sdk.shutdown()
    legacy = {sc.LEGACY.spec(spec).name for spec in sc.ALL_METRICS}
    assert set(collected.metrics) == legacy
    assert "db.client.connections.usage" in legacy
    assert "db.client.connection.count" not in legacy
    assert set(collected.schema_urls.values()) == {sc.LEGACY.schema_url}
    usage = {p.attributes["state"]: p.value for p in collected.points("db.client.connections.usage")}
    assert usage == {"idle": stats.idle, "used": stats.in_use}
    for name in ("create_time", "wait_time", "use_time"):
        metric = collected.metrics[f"db.client.connections.{name}"]
        assert metric.unit == "ms"
        [point] = collected.points(metric.name)
        assert point.attributes == {"pool.name": "legacy-names"}
        assert list(point.explicit_bounds) == pytest.approx([b * 1000 for b in sc.TIME_BUCKETS])
    # One hold spanned an acquire(timeout=0.01) that timed out: at least 10, in ms.
    assert collected.histogram("db.client.connections.use_time").max >= 10
    assert collected.value("db.client.connections.timeouts") == stats.timeouts_total == 1


async def test_every_checkout_has_one_use_time_however_it_ends(
    postgres: PostgresServer, sdk: Sdk
) -> None:
    """Returned, reclaimed as a leak (scoped or not, released afterwards), its setup hook
    failing, closed under its holder by close(): one use_time point each, as wait_time has."""
    fail_setup = False

    async def setup(conn: object) -> None:
        if fail_setup:
            raise RuntimeError("setup failed on purpose")

    pool = sdk.pool(postgres.dsn(), name="use-time", min_size=0, max_size=2, leak_timeout=0.5,
                    setup=setup)
    await pool.open()
    async with pool.acquire():
        pass

    async def holds_forever() -> None:
        async with pool.acquire():
            await asyncio.sleep(3600)

    with pytest.raises(asyncpool.ConnectionLeakedError):
        await asyncio.wait_for(holds_forever(), 5)
    unscoped = await pool.acquire()
    await until(lambda: pool.stats().leaked_total == 2)
    await pool.release(unscoped)  # (its checkout ended at the reclaim: no second point)
    fail_setup = True
    with pytest.raises(RuntimeError, match="on purpose"):
        await pool.acquire()
    fail_setup = False

    held = asyncio.Event()

    async def holds_through_close() -> None:
        async with pool.acquire():
            held.set()
            await asyncio.sleep(3600)

    holder = asyncio.create_task(holds_through_close())
    await held.wait()
    await pool.close(timeout=0.05)
    holder.cancel()
    await asyncio.gather(holder, return_exceptions=True)

    stats, collected = pool.stats(), sdk.collect()
    assert stats.acquired_total == 5
    assert collected.histogram(sc.WAIT_TIME.name).count == 5
    use_time = collected.histogram(sc.USE_TIME.name)
    assert use_time.count == 5
    assert use_time.max >= 0.4  # the reclaimed holds (leak_timeout=0.5) are among them


async def test_a_connection_on_its_way_to_a_waiter_when_terminated_was_no_checkout(
    postgres: PostgresServer, sdk: Sdk
) -> None:
    """terminate() between a return handing the connection to a waiter and the waiter running:
    the waiter gets PoolClosedError and no wait_time, and its lease no use_time."""
    pool = sdk.pool(postgres.dsn(), name="handoff", min_size=0, max_size=1)
    await pool.open()
    conn = await pool.acquire()
    waiter = asyncio.create_task(pool.fetchval("SELECT 1"))
    await until(lambda: pool.stats().waiting == 1)
    await pool.release(conn)  # handed to the waiter, which has not run yet
    handing = pool.stats()
    pool.terminate()
    with pytest.raises(asyncpool.PoolClosedError):
        await waiter

    assert (handing.waiting, handing.pending, handing.in_use) == (0, 1, 1)
    collected = sdk.collect()
    assert collected.histogram(sc.WAIT_TIME.name).count == 1
    assert collected.histogram(sc.USE_TIME.name).count == 1


async def test_connections_being_checked_are_used_and_every_caller_in_acquire_is_pending(
    postgres: PostgresServer, sdk: Sdk
) -> None:
    """Network stalled: 2 callers check idle connections (SELECT 1), 2 log in, 2 queue. The
    count's states add up to the open connections, and all 6 callers are pending; a login
    for min_size (no caller) is not."""
    async with FaultProxy.to_dsn(postgres.dsn()) as proxy:
        pool = sdk.pool(proxy.dsn(postgres.dsn()), name="stalled", min_size=2, max_size=4,
                        validate_after=0, acquire_timeout=30, connect_timeout=30)
        await pool.open()
        assert pool.stats().idle == 2
        proxy.set_mode("stall")
        callers = [asyncio.create_task(pool.fetchval("SELECT 1")) for _ in range(6)]
        await until(lambda: pool.stats().connecting == 4 and pool.stats().waiting == 2)
        stalled, collected = pool.stats(), sdk.collect()
        proxy.set_mode("pass")
        assert await asyncio.gather(*callers) == [1] * 6
        done, after = pool.stats(), sdk.collect()
        await pool.close()

        assert (stalled.idle, stalled.in_use, stalled.validating) == (0, 0, 2)
        assert stalled.pending == 6
        assert collected.value(sc.CONNECTION_COUNT.name, db__client__connection__state="idle") == 0
        assert collected.value(sc.CONNECTION_COUNT.name, db__client__connection__state="used") == 2
        assert collected.value(sc.PENDING_REQUESTS.name) == 6
        assert (done.pending, done.validating) == (0, 0)
        assert after.value(sc.PENDING_REQUESTS.name) == 0
        assert done.idle == done.size
        assert after.value(sc.CONNECTION_COUNT.name, db__client__connection__state="idle") == (
            done.idle)

        # Opening without waiting: housekeeping's kind of login, for min_size, no caller's.
        proxy.set_mode("stall")
        pool = sdk.pool(proxy.dsn(postgres.dsn()), name="filling", min_size=1, max_size=2,
                        acquire_timeout=30, connect_timeout=30)
        await pool.open(wait=False)
        await until(lambda: pool.stats().connecting == 1)
        filling = pool.stats()
        caller = asyncio.create_task(pool.fetchval("SELECT 1"))
        await until(lambda: pool.stats().connecting == 2)
        with_caller = pool.stats()
        proxy.set_mode("pass")
        assert await caller == 1
        await pool.close()
        assert (filling.pending, with_caller.pending) == (0, 1)


class SwitchedPassword(FirstPasswordWrong):
    """A wrong password until `right` is set (a secret fixed between two invocations)."""

    def __init__(self, password: str) -> None:
        super().__init__(password)
        self.right = False

    async def password(self, target: Target) -> str:
        return self._password if self.right else "not-the-password"

    async def refresh(self, target: Target) -> bool:
        return False


AUTH_ERROR = "asyncpool.errors.AuthenticationError"


async def test_the_failed_logins_of_an_open_that_failed_are_counted(
    postgres: PostgresServer, sdk: Sdk
) -> None:
    """An open() refused before any collection (a Lambda INIT with a wrong secret): its failed
    login is still reported, and still counted once the same pool opens."""
    credentials = SwitchedPassword(postgres.app.password)
    pool = sdk.pool(postgres.dsn(), name="refused", min_size=1, credentials=credentials)
    with pytest.raises(asyncpool.AuthenticationError):
        await pool.open()
    failed = sdk.collect()
    assert failed.value(sc.CREATE_ERRORS.name, error__type=AUTH_ERROR) == 1
    assert sc.CONNECTION_COUNT.name not in failed.metrics  # no open pool: no size

    credentials.right = True
    async with pool:
        opened = sdk.collect()
    assert opened.value(sc.CREATE_ERRORS.name, error__type=AUTH_ERROR) == 1
    assert opened.value(sc.CONNECTION_COUNT.name, db__client__connection__state="idle") == 1


async def test_a_pool_opened_again_under_its_name_goes_on_from_its_counts(
    postgres: PostgresServer,
) -> None:
    """A pool closed and made again with the same name (one per invocation): its counters never
    go back, and a delta exporter is never sent a negative increase."""
    delta = InMemoryMetricReader(preferred_temporality={
        ObservableCounter: AggregationTemporality.DELTA})
    sdk = Sdk(readers=[delta])
    increases: list[float] = []

    def collect_delta() -> None:
        data = delta.get_metrics_data()
        assert data is not None
        for metric in metrics_named(data, sc.TIMEOUTS.name):
            for point in metric.data.data_points:
                assert isinstance(point, NumberDataPoint)
                increases.append(point.value)

    try:
        totals = []
        for _ in range(3):
            async with sdk.pool(postgres.dsn(), name="again", min_size=1, max_size=1,
                                prepared_statements="unnamed") as pool:
                await pool.fetchval("SELECT $1::int", 1)
                async with pool.acquire():
                    with pytest.raises(PoolTimeoutError):
                        await pool.acquire(timeout=0.01)
                collected = sdk.collect()
                collect_delta()
            totals.append((collected.value(sc.TIMEOUTS.name),
                           collected.value(sc.CACHE_LOOKUPS.name,
                                           asyncpool__statement_cache__result="miss")))
        closed = sdk.collect()
        collect_delta()
    finally:
        sdk.shutdown()
    assert totals == [(1, 1), (2, 2), (3, 3)]
    assert increases == [1, 1, 1, 0]
    # Sizes stop with the last pool; the counters stay at their totals.
    assert sc.CONNECTION_COUNT.name not in closed.metrics
    assert closed.value(sc.TIMEOUTS.name) == 3
    assert closed.value(sc.CACHE_LOOKUPS.name, asyncpool__statement_cache__result="miss") == 3


async def test_pools_sharing_a_name_report_one_point_each_adding_up(
    postgres: PostgresServer, sdk: Sdk
) -> None:
    """Two pools left with the default name: one point per attribute set (a callback must not
    observe one twice: the specification leaves which one counts to the SDK), their sizes and
    counts added."""
    first = sdk.pool(postgres.dsn(), min_size=2, max_size=2)
    second = sdk.pool(postgres.dsn(), min_size=1, max_size=5)
    async with first, second, first.acquire(), first.acquire():
        with pytest.raises(PoolTimeoutError):
            await first.acquire(timeout=0.01)
        instruments = instruments_for(sdk.meter_provider, asyncpool.__version__)
        points = instruments._observe_count(CallbackOptions())
        timeouts = instruments._observe_counts(lambda c: c.timeouts)(CallbackOptions())
        collected = sdk.collect()
    assert sorted((dict(p.attributes or {})[sc.STATE], p.value) for p in points) == [
        ("idle", 1), ("used", 2)]
    assert [p.value for p in timeouts] == [1]
    assert collected.value(sc.CONNECTION_MAX.name) == 7
    assert collected.value(sc.CONNECTION_IDLE_MIN.name) == 3
    assert collected.value(sc.TIMEOUTS.name) == 1


# The default observer (telemetry=True, global providers), built again at each open(): an INIT
# whose open() fails on a wrong secret, the next invocation's open() succeeding.
_OPEN_AGAIN = """
import asyncio, sys
import asyncpool
from opentelemetry import metrics
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader

class Switched:
    requires_tls = False
    right = False
    async def password(self, target):
        return PASSWORD if self.right else "not-the-password"
    async def refresh(self, target):
        return False
    async def warm(self, target):
        return None
    async def close(self):
        return None

async def main():
    reader = InMemoryMetricReader()
    metrics.set_meter_provider(MeterProvider(metric_readers=[reader]))
    credentials = Switched()
    pool = asyncpool.Pool(sys.argv[1], name="init", min_size=1, credentials=credentials)
    try:
        await pool.open()
    except asyncpool.AuthenticationError:
        print("refused")
    credentials.right = True
    async with pool:
        for rm in reader.get_metrics_data().resource_metrics:
            for sm in rm.scope_metrics:
                for m in sm.metrics:
                    for p in m.data.data_points:
                        if m.name == "asyncpool.connection.create_errors":
                            print(p.attributes["error.type"], p.value)

asyncio.run(main())
"""


def test_the_default_observer_counts_the_failed_logins_of_an_open_retried(
    postgres: PostgresServer,
) -> None:
    script = _OPEN_AGAIN.replace("PASSWORD", repr(postgres.app.password))
    lines = run_app(script, postgres.dsn())
    assert lines[0] == "refused"
    assert f"{AUTH_ERROR} 1" in lines


def test_pools_of_one_name_on_two_threads_lose_no_count(sdk: Sdk) -> None:
    """Two pools named alike, each on its own thread and event loop (a sync app's threads), add
    to the same counts: an unlocked read-modify-write between the two lost increments."""
    events = 20_000
    target = Target("db.example", 5432, "app", "app")
    failed = ConnectAttempt(target, 0, 1, None, None, error=ConnectError("refused"),
                            caller_error=ConnectError)
    leak = LeakReport("shared", 1.0, None, "", False, target)
    # No spans: the counts are what is measured, and each span would narrow the race window.
    observers = [TelemetryObserver(meter_provider=sdk.meter_provider,
                                   tracer_provider=NoOpTracerProvider()) for _ in range(2)]
    for observer in observers:
        observer.attach("shared", lambda: PoolStats("shared", 0, 0, 0, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0))

    def hammer(observer: TelemetryObserver) -> None:
        for _ in range(events):
            observer.connect_attempted(failed)
            observer.timed_out()
            observer.validation_failed()
            observer.leaked(leak)

    switch = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # switch threads as often as possible: the race happens at once
    try:
        threads = [threading.Thread(target=hammer, args=(o,)) for o in observers]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    finally:
        sys.setswitchinterval(switch)
    collected = sdk.collect()
    for observer in observers:
        observer.detach()
    counts = {
        "create_errors": collected.value(sc.CREATE_ERRORS.name,
                                         error__type=qualified_name(ConnectError)),
        "timeouts": collected.value(sc.TIMEOUTS.name),
        "validation_failures": collected.value(sc.VALIDATION_FAILURES.name),
        "leaks": collected.value(sc.LEAKS.name, asyncpool__leak__action="log"),
    }
    assert counts == dict.fromkeys(counts, 2 * events)


def test_a_collection_copies_the_counts_under_the_lock_their_increments_take(sdk: Sdk) -> None:
    """The leak and failed-login counts (dicts, a key added at a new error type) were copied by
    a collection without the lock the increments hold, correct only while a GIL made the copy
    one step: on free-threaded Python a pool's thread could add to them mid-copy."""
    observer = TelemetryObserver(meter_provider=sdk.meter_provider,
                                 tracer_provider=NoOpTracerProvider())
    observer.attach("locked", lambda: PoolStats("locked", 0, 0, 0, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0))
    collected: list[Collected] = []
    try:
        with observer._counts._lock:  # an increment under way on another pool's thread
            reader = threading.Thread(target=lambda: collected.append(sdk.collect()))
            reader.start()
            reader.join(0.5)
            waited = reader.is_alive()
        reader.join(10)
    finally:
        observer.detach()
    assert waited, "the collection read the counts while an increment held their lock"
    assert collected[0].value(sc.LEAKS.name, asyncpool__leak__action="log") == 0


def _in_a_fork_while_another_thread_holds(lock: Any, use: Callable[[], object]) -> int:
    """Fork while a thread of this process holds `lock`; the child calls `use` and exits 0.
    Returns the child's exit status, or -1 if it did not exit within a few seconds (hung)."""
    held, release = threading.Event(), threading.Event()

    def holder() -> None:
        with lock:
            held.set()
            release.wait()

    thread = threading.Thread(target=holder)
    thread.start()
    held.wait()
    try:
        pid = os.fork()
        if pid == 0:  # the child: the holding thread is not here, its lock state is
            try:
                use()
            finally:
                os._exit(0)
    finally:
        release.set()
        thread.join()
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status)
        time.sleep(0.01)
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    return -1


def test_a_forked_child_counts_with_locks_other_threads_held_at_the_fork(sdk: Sdk) -> None:
    """A worker forked while another thread counted, or collected checkout times, gets the
    telemetry's locks free: the child has no thread to release them, so its pool's loop hung
    at its first timeout, failed login, checkout or open (Lambda managed instances and
    gunicorn fork workers)."""
    observer = TelemetryObserver(meter_provider=sdk.meter_provider,
                                 tracer_provider=NoOpTracerProvider())
    observer.attach("forked", lambda: _no_stats("forked"))
    counts = observer._counts
    instruments = observer._instruments
    times = CheckoutTimes()
    recorder = times.recorder("forked")
    for lock, use in (
        (counts._lock, observer.timed_out),
        (instruments._lock, lambda: instruments.watch(object(), "forked-2", lambda: _no_stats("forked-2"))),
        (recorder._lock, lambda: recorder.wait(0.001)),
        (times._lock, lambda: times.recorder("forked-3")),
    ):
        assert _in_a_fork_while_another_thread_holds(lock, use) == 0, use


def _no_stats(name: str) -> PoolStats:
    return PoolStats(name, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0)


async def test_a_forked_child_does_not_report_its_parents_pool(
    postgres: PostgresServer, sdk: Sdk
) -> None:
    """The child of a fork (gunicorn, multiprocessing) inherits the parent's open pool but not
    its connections: reported there too, they were counted twice (3 idle in a worker that has
    none), and added to the worker's own pool of that name. The child reports none of the
    inherited pool's sizes, and its counters do not go back."""
    async with sdk.pool(postgres.dsn(), name="forked-sizes", min_size=3, max_size=5,
                        prepared_statements="unnamed") as pool:
        assert await pool.fetchval("SELECT $1::int", 1) == 1
        before = sdk.collect()
        assert before.value(sc.CONNECTION_COUNT.name, db__client__connection__state="idle") == 3
        lookups = before.value(sc.CACHE_LOOKUPS.name, asyncpool__statement_cache__result="miss")
        read, write = os.pipe()
        pid = os.fork()
        if pid == 0:  # the child: report what its SDK collects, and leave
            try:
                child = sdk.collect()
                report = (f"{len(child.points(sc.CONNECTION_COUNT.name))} "
                          f"{len(child.points(sc.CONNECTION_MAX.name))} "
                          f"{child.value(sc.CACHE_LOOKUPS.name, asyncpool__statement_cache__result='miss')}")
                os.write(write, report.encode())
            finally:
                os._exit(0)
        os.close(write)
        got = os.fdopen(read)
        try:  # (read until the child exits)
            report = await asyncio.wait_for(asyncio.to_thread(got.read), 10)
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)  # (should it hang: the read ends then)
            await asyncio.to_thread(os.waitpid, pid, 0)
            got.close()
        # The parent goes on reporting its pool.
        assert sdk.collect().value(sc.CONNECTION_MAX.name) == 5
    assert report == f"0 0 {lookups}"
