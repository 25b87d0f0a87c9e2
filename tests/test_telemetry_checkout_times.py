"""Checkout times aggregated in the pool: the same histogram points the SDK would make, at a
fraction of its cost per checkout, exported through a wrapped exporter."""

from __future__ import annotations

import asyncio
import math
import threading
from collections.abc import Iterator

import pytest
from opentelemetry.sdk.metrics import Histogram as HistogramInstrument
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import (
    AggregationTemporality,
    Histogram,
    HistogramDataPoint,
    InMemoryMetricReader,
    MetricsData,
    PeriodicExportingMetricReader,
)

from asyncpool import Pool
from asyncpool.telemetry import (
    CheckoutTimes,
    TelemetryObserver,
    export_checkout_times,
    reader_with_checkout_times,
)
from asyncpool.telemetry import semconv as sc
from asyncpool.testing import PostgresServer
from tests.telemetry_support import CapturingExporter, metrics_named, run_app

TEMPORALITIES = [AggregationTemporality.CUMULATIVE, AggregationTemporality.DELTA]

# Values on, between and beyond the bucket bounds (a value equal to a bound counts in the bucket
# that bound closes, as in the SDK), in three rounds: the last one empty.
ROUNDS: list[list[float]] = [
    [0.0, 0.00005, 0.0001, 0.00010001, 0.0004, 0.003, 0.003, 1.0, 61.0],
    [0.00025, 0.02, 0.75, 30.0, 30.5],
    [],
]


def histogram_points(data: MetricsData | None, name: str) -> list[HistogramDataPoint]:
    if data is None:
        return []
    found = metrics_named(data, name)
    assert len(found) <= 1, f"{name} exported {len(found)} times"
    if not found:
        return []
    assert isinstance(found[0].data, Histogram)
    return list(found[0].data.data_points)


def pool_of(point: HistogramDataPoint) -> str:
    return str((point.attributes or {})[sc.POOL_NAME])


def same_point(ours: HistogramDataPoint, sdks: HistogramDataPoint) -> None:
    assert list(ours.bucket_counts) == list(sdks.bucket_counts)
    assert list(ours.explicit_bounds) == list(sdks.explicit_bounds)
    assert ours.count == sdks.count
    assert ours.sum == pytest.approx(sdks.sum)
    assert (ours.min, ours.max) == (sdks.min, sdks.max)
    assert dict(ours.attributes or {}) == dict(sdks.attributes or {})


@pytest.mark.parametrize("temporality", TEMPORALITIES, ids=["cumulative", "delta"])
def test_pool_aggregated_points_equal_the_sdk_histogram(
    temporality: AggregationTemporality,
) -> None:
    reader = InMemoryMetricReader(preferred_temporality={HistogramInstrument: temporality})
    provider = MeterProvider(metric_readers=[reader])
    sdk_histogram = provider.get_meter("reference").create_histogram(
        sc.WAIT_TIME.name, unit="s", explicit_bucket_boundaries_advisory=sc.TIME_BUCKETS
    )
    times = CheckoutTimes()
    recorder = times.recorder("orders")
    capture = CapturingExporter(temporality)
    exporter = export_checkout_times(capture, times)
    attributes = {sc.POOL_NAME: "orders"}
    try:
        for values in ROUNDS:
            for value in values:
                sdk_histogram.record(value, attributes)
                recorder.wait(value)
            sdks = histogram_points(reader.get_metrics_data(), sc.WAIT_TIME.name)
            exporter.export(MetricsData([]))
            ours = histogram_points(capture.batches[-1], sc.WAIT_TIME.name)
            assert len(ours) == len(sdks)
            for mine, theirs in zip(ours, sdks, strict=True):
                same_point(mine, theirs)
        # Cumulative keeps reporting the series, delta reports nothing once nothing came in.
        expected = 1 if temporality is AggregationTemporality.CUMULATIVE else 0
        assert len(histogram_points(capture.batches[-1], sc.WAIT_TIME.name)) == expected
        assert histogram_points(capture.batches[-1], sc.USE_TIME.name) == []  # none recorded
    finally:
        exporter.shutdown()
        provider.shutdown()


def test_the_wrapper_keeps_the_exporter_temporality_and_adds_to_the_sdk_batch() -> None:
    capture = CapturingExporter(AggregationTemporality.DELTA)
    times = CheckoutTimes()
    exporter = export_checkout_times(capture, times)
    reader = PeriodicExportingMetricReader(exporter, export_interval_millis=math.inf)
    provider = MeterProvider(metric_readers=[reader])
    other = provider.get_meter("app").create_counter("app.requests")
    try:
        assert exporter._preferred_temporality == {HistogramInstrument: AggregationTemporality.DELTA}
        other.add(1)
        times.recorder("p").use(0.002)
        provider.force_flush()
        batch = capture.batches[-1]
        [use] = metrics_named(batch, sc.USE_TIME.name)
        assert isinstance(use.data, Histogram)
        assert use.data.aggregation_temporality is AggregationTemporality.DELTA
        assert use.unit == "s"
        assert use.description == sc.USE_TIME.description
        assert len(metrics_named(batch, "app.requests")) == 1
        # Both in the batch's one resource, so the SDK's resource attributes label ours too.
        assert len(batch.resource_metrics) == 1
        scopes = {s.scope.name for s in batch.resource_metrics[0].scope_metrics}
        assert scopes == {"app", "asyncpool"}
    finally:
        provider.shutdown()
    assert capture.shut_down


def test_a_pull_reader_that_prefers_delta_gets_delta_checkout_times() -> None:
    """The reader's preference was looked up by the SDK's public Histogram class while the
    reader keys it by its private one: a delta pull reader got cumulative checkout times next
    to the SDK's delta points (the totals since start, again at every collection)."""
    times = CheckoutTimes()
    reader = reader_with_checkout_times(
        InMemoryMetricReader, times=times,
        preferred_temporality={HistogramInstrument: AggregationTemporality.DELTA})
    provider = MeterProvider(metric_readers=[reader])
    # (The SDK hands a collection to its reader only when it has metrics of its own.)
    requests = provider.get_meter("app").create_counter("app.requests")
    recorder = times.recorder("p")
    try:
        counts = []
        for records in (3, 2):
            requests.add(1)
            for _ in range(records):
                recorder.wait(0.002)
            data = reader.get_metrics_data()
            assert data is not None
            [metric] = metrics_named(data, sc.WAIT_TIME.name)
            assert isinstance(metric.data, Histogram)
            assert metric.data.aggregation_temporality is AggregationTemporality.DELTA
            counts.append([point.count for point in metric.data.data_points])
        assert counts == [[3], [2]]
    finally:
        provider.shutdown()


def test_times_of_a_pool_closed_after_the_last_export_are_sent_at_shutdown() -> None:
    capture = CapturingExporter(AggregationTemporality.DELTA)
    times = CheckoutTimes()
    exporter = export_checkout_times(capture, times)
    recorder = times.recorder("short-lived")
    for _ in range(3):
        recorder.wait(0.001)
    times.forget(recorder)
    exporter.shutdown()  # the SDK had nothing: the reader would not have exported
    [point] = histogram_points(capture.batches[-1], sc.WAIT_TIME.name)
    assert point.count == 3
    assert not times.exporting
    later = CapturingExporter()
    exporter_again = export_checkout_times(later, times)
    try:
        exporter_again.export(MetricsData([]))
        assert later.batches == [MetricsData([])]  # the closed pool is gone: nothing added
    finally:
        exporter_again.shutdown()


def test_an_exporter_dropped_without_shutdown_lets_closed_pools_go() -> None:
    """A wrapped exporter dropped without shutdown() stayed subscribed for good: every pool
    closed afterwards kept its recorder, waiting for a collection that never came (2 KB a pool,
    without limit), and new pools aggregated for nobody instead of recording through the SDK."""
    import gc

    times = CheckoutTimes()
    exporter = export_checkout_times(CapturingExporter(), times)
    assert times.exporting
    del exporter
    gc.collect()
    assert not times.exporting
    for number in range(50):
        recorder = times.recorder(f"pool-{number}")
        recorder.wait(0.001)
        times.forget(recorder)
    assert times._recorders == []


def test_records_racing_a_collector_thread_are_each_counted_once() -> None:
    times = CheckoutTimes()
    capture = CapturingExporter(AggregationTemporality.DELTA)
    exporter = export_checkout_times(capture, times)
    recorder = times.recorder("busy")
    records = 200_000
    stop = threading.Event()

    def collect_until_stopped() -> None:
        while not stop.is_set():
            exporter.export(MetricsData([]))

    collector = threading.Thread(target=collect_until_stopped)
    collector.start()
    try:
        for i in range(records):
            recorder.wait(i % 7 / 1000)
            recorder.use(0.0001)
    finally:
        stop.set()
        collector.join()
    exporter.export(MetricsData([]))
    counted = {
        name: sum(p.count for batch in capture.batches for p in histogram_points(batch, name))
        for name in (sc.WAIT_TIME.name, sc.USE_TIME.name)
    }
    assert counted == {sc.WAIT_TIME.name: records, sc.USE_TIME.name: records}
    assert len(capture.batches) > 2  # the collector really ran during the records
    exporter.shutdown()


@pytest.fixture
def exported() -> Iterator[tuple[MeterProvider, CapturingExporter, CheckoutTimes]]:
    times = CheckoutTimes()
    capture = CapturingExporter()
    reader = PeriodicExportingMetricReader(export_checkout_times(capture, times),
                                           export_interval_millis=math.inf)
    provider = MeterProvider(metric_readers=[reader])
    yield provider, capture, times
    provider.shutdown()


async def test_a_pool_aggregating_its_checkout_times_exports_them_once_with_its_other_metrics(
    postgres: PostgresServer, exported: tuple[MeterProvider, CapturingExporter, CheckoutTimes]
) -> None:
    provider, capture, times = exported
    aggregated = TelemetryObserver(meter_provider=provider, checkout_times=times)
    through_sdk = TelemetryObserver(meter_provider=provider)  # explicit provider: the API path
    async with (
        Pool(postgres.dsn(), name="aggregated", min_size=0, max_size=1, telemetry=False,
             observers=[aggregated]) as pool,
        Pool(postgres.dsn(), name="through-sdk", min_size=0, telemetry=False,
             observers=[through_sdk]) as other,
    ):
        async def hold() -> None:
            async with pool.acquire():
                await asyncio.sleep(0.05)

        # One caller holds the only connection for 50 ms while another waits for it.
        await asyncio.gather(hold(), hold())
        for _ in range(10):
            await pool.fetchval("SELECT 1")
        await other.fetchval("SELECT 1")
        provider.force_flush()
        stats = pool.stats()

    batch = capture.batches[-1]
    for name in (sc.WAIT_TIME.name, sc.USE_TIME.name):
        points = {pool_of(p): p for p in histogram_points(batch, name)}
        assert set(points) == {"aggregated", "through-sdk"}  # one metric, both pools' points
        assert points["aggregated"].count == stats.acquired_total == 12
        assert points["through-sdk"].count == 1
        assert list(points["aggregated"].explicit_bounds) == list(sc.TIME_BUCKETS)
        assert points["aggregated"].max >= 0.05  # the wait, and the hold
    created = {pool_of(p): p.count
               for p in histogram_points(batch, sc.CREATE_TIME.name)}
    assert created == {"aggregated": 1, "through-sdk": 1}  # still recorded by the SDK


# An application as docs/telemetry.md sets one up: the global provider with a wrapped exporter,
# then a pool with the defaults. Prints the wait/use counts exported and the pool's checkouts.
_GLOBAL_SETUP = """
import asyncio, math, sys
import asyncpool
from opentelemetry import metrics
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import PeriodicExportingMetricReader
from asyncpool.telemetry import export_checkout_times
from tests.telemetry_support import CapturingExporter, metrics_named

capture = CapturingExporter()
reader = PeriodicExportingMetricReader(export_checkout_times(capture),
                                       export_interval_millis=math.inf)
provider = MeterProvider(metric_readers=[reader])
metrics.set_meter_provider(provider)

async def main():
    async with asyncpool.Pool(sys.argv[1], name="defaults", min_size=1) as pool:
        for _ in range(5):
            await pool.fetchval("SELECT 1")
        provider.force_flush()
        print("checkouts", pool.stats().acquired_total)
    # A point per pool: had the SDK recorded them too, its point would be merged in beside ours.
    for name in ("db.client.connection.wait_time", "db.client.connection.use_time"):
        [metric] = metrics_named(capture.batches[-1], name)
        print(name, [(p.attributes["db.client.connection.pool.name"], p.count)
                     for p in metric.data.data_points])

asyncio.run(main())
"""


def test_pools_with_default_telemetry_aggregate_once_the_global_exporter_is_wrapped(
    postgres: PostgresServer,
) -> None:
    lines = run_app(_GLOBAL_SETUP, postgres.dsn())
    assert "checkouts 5" in lines
    assert "db.client.connection.wait_time [('defaults', 5)]" in lines
    assert "db.client.connection.use_time [('defaults', 5)]" in lines



def test_two_wrapped_exporters_each_receive_every_checkout() -> None:
    times = CheckoutTimes()
    cumulative, delta = CapturingExporter(), CapturingExporter(AggregationTemporality.DELTA)
    first = export_checkout_times(cumulative, times)
    second = export_checkout_times(delta, times)
    recorder = times.recorder("shared")
    try:
        for _ in range(4):
            recorder.use(0.01)
        first.export(MetricsData([]))  # drains the pool for both
        recorder.use(0.01)
        second.export(MetricsData([]))
        first.export(MetricsData([]))
        [delta_point] = histogram_points(delta.batches[-1], sc.USE_TIME.name)
        [cumulative_point] = histogram_points(cumulative.batches[-1], sc.USE_TIME.name)
        assert delta_point.count == 5
        assert cumulative_point.count == 5
        assert cumulative_point.start_time_unix_nano < cumulative_point.time_unix_nano
    finally:
        first.shutdown()
        second.shutdown()


async def test_a_prometheus_scrape_carries_the_pool_aggregated_checkout_times(
    postgres: PostgresServer,
) -> None:
    from opentelemetry.exporter.prometheus import PrometheusMetricReader
    from prometheus_client import CollectorRegistry, generate_latest
    from prometheus_client.parser import text_string_to_metric_families

    registry = CollectorRegistry()
    times = CheckoutTimes()
    reader = reader_with_checkout_times(PrometheusMetricReader, registry=registry, times=times)
    assert isinstance(reader, PrometheusMetricReader)
    provider = MeterProvider(metric_readers=[reader])
    observer = TelemetryObserver(meter_provider=provider, checkout_times=times)
    try:
        async with Pool(postgres.dsn(), name="scraped", min_size=1, telemetry=False,
                        observers=[observer]) as pool:
            for _ in range(7):
                await pool.fetchval("SELECT 1")
            first = generate_latest(registry).decode()
            await pool.fetchval("SELECT 1")
            second = generate_latest(registry).decode()
    finally:
        provider.shutdown()

    def counts(text: str) -> dict[str, float]:
        return {
            sample.name: sample.value
            for family in text_string_to_metric_families(text)
            for sample in family.samples
            if sample.name.endswith("_time_seconds_count")
            and sample.labels.get("db_client_connection_pool_name") == "scraped"
        }

    wait, use = ("db_client_connection_wait_time_seconds_count",
                 "db_client_connection_use_time_seconds_count")
    assert counts(first)[wait] == counts(first)[use] == 7
    assert counts(second)[wait] == 8  # cumulative across scrapes, as Prometheus expects
