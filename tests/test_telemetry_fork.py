"""Counts and checkout times across a real `os.fork()`, as a gunicorn/uvicorn worker or a Lambda
managed-instance worker gets them: asyncpool's own totals follow the SDK state they are reported
into, which opentelemetry-sdk keeps in the child (it renews its locks and resource at a fork,
not its aggregations)."""

from __future__ import annotations

from asyncpool.testing import PostgresServer
from tests.telemetry_support import run_app

# The parent opens a pool, counts a timeout, records checkouts and forks with the pool open (an
# app that used its database before its workers were forked). With SETUP = "child" the SDK is
# installed in the worker after the fork (what OpenTelemetry recommends for fork models); with
# "parent" before, and the parent collects once before its last events. The worker opens its
# own pool of the same name, counts one timeout and makes one checkout, and prints its first
# delta collection next to an SDK counter and histogram that saw the same events.
_FORKED = """
import asyncio, os, sys, threading
import asyncpool
from opentelemetry import metrics
from opentelemetry.sdk.metrics import Counter, Histogram, MeterProvider, ObservableCounter
from opentelemetry.sdk.metrics.export import AggregationTemporality, InMemoryMetricReader
from asyncpool.telemetry import CheckoutTimes, TelemetryObserver, reader_with_checkout_times

SETUP = "MODE"
times = CheckoutTimes()
DELTA = AggregationTemporality.DELTA

def install():
    reader = reader_with_checkout_times(
        InMemoryMetricReader, times=times,
        preferred_temporality={Counter: DELTA, ObservableCounter: DELTA, Histogram: DELTA})
    metrics.set_meter_provider(MeterProvider(metric_readers=[reader]))
    meter = metrics.get_meter("probe")
    return reader, meter.create_counter("probe.count"), meter.create_histogram("probe.time")

def report(who, reader):
    for rm in reader.get_metrics_data().resource_metrics:
        for sm in rm.scope_metrics:
            for m in sm.metrics:
                if m.name.endswith(("timeouts", "wait_time")) or m.name.startswith("probe."):
                    print(who, m.name, [getattr(p, "value", None) or getattr(p, "count", None)
                                        for p in m.data.data_points])
    sys.stdout.flush()

async def work(checkouts, probe, then=None):
    observer = TelemetryObserver(checkout_times=times)
    async with asyncpool.Pool(sys.argv[1], name="forked", min_size=1, max_size=1,
                              telemetry=False, observers=[observer]) as pool:
        for _ in range(checkouts):
            await pool.fetchval("SELECT 1")
        async with pool.acquire():
            try:
                await pool.acquire(timeout=0.05)
            except asyncpool.PoolTimeoutError:
                pass
        if probe is not None:
            counter, histogram = probe
            counter.add(1)
            for _ in range(checkouts + 1):  # as many as the pool's checkouts
                histogram.record(0.001)
        if then is not None:
            then()  # (the pool still open: a worker forked from a running app inherits it)

def fork():
    global probe, reader
    pid = os.fork()
    if pid == 0:
        try:
            if SETUP == "child":
                reader, *probe = install()
            # (On a thread: this one is inside the parent's running loop.)
            worker = threading.Thread(target=asyncio.run, args=(work(1, probe),))
            worker.start()
            worker.join()
            report("child", reader)
        finally:
            os._exit(0)
    os.waitpid(pid, 0)

if SETUP == "parent":
    reader, *probe = install()
    asyncio.run(work(3, probe))
    report("parent-collected", reader)
    asyncio.run(work(2, probe, fork))  # recorded, not yet collected, at the fork
    report("parent", reader)
else:
    probe = None
    asyncio.run(work(3, None, fork))
"""


def _forked(dsn: str, setup: str) -> set[str]:
    return set(run_app(_FORKED.replace("MODE", setup), dsn))


def test_a_worker_that_installs_the_sdk_after_the_fork_reports_its_own_counts_only(
    postgres: PostgresServer,
) -> None:
    """Each worker's first delta export sent the timeouts and checkout times its parent had
    counted before the fork as its own: with N workers, the parent's counts N times over."""
    lines = _forked(postgres.dsn(), "child")
    assert {
        "child db.client.connection.timeouts [1]",
        "child db.client.connection.wait_time [2]",  # its query's checkout and its held one
    } <= lines, "\n".join(sorted(lines))


def test_a_worker_that_inherits_the_sdk_goes_on_as_the_sdk_does(
    postgres: PostgresServer,
) -> None:
    """The SDK installed before the fork keeps its aggregations in the child: its counter and
    histogram give the worker what the parent recorded since its last collection. asyncpool's
    counts and times do the same (neither lost, nor a counter going back)."""
    lines = _forked(postgres.dsn(), "parent")
    assert {
        "parent-collected db.client.connection.timeouts [1]",
        "parent-collected probe.count [1]",
        "parent-collected db.client.connection.wait_time [4]",
        "parent-collected probe.time [4]",
        # The worker: the parent's uncollected timeout and 3 checkouts, and its own 1 and 2.
        "child db.client.connection.timeouts [2]",
        "child probe.count [2]",
        "child db.client.connection.wait_time [5]",
        "child probe.time [5]",
        # The parent's own next export: its events since its last collection, once.
        "parent db.client.connection.timeouts [1]",
        "parent probe.count [1]",
        "parent db.client.connection.wait_time [3]",
        "parent probe.time [3]",
    } <= lines, "\n".join(sorted(lines))
