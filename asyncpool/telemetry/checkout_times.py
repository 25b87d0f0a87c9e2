"""`wait_time` and `use_time` aggregated inside the pool, for an exporter to take at collection.

opentelemetry-sdk spends about 6 µs on each histogram record (most of it copying, checking and
hashing the attributes), and every checkout makes two. Aggregated here, a record is a bisect and a
few additions under an uncontended lock. `asyncpool.telemetry.export.export_checkout_times` then
adds the totals to each export as ordinary histogram points: the MetricProducer of the
OpenTelemetry specification, which opentelemetry-python does not have yet
(open-telemetry/opentelemetry-python#4768).

Pools write on their event loop's thread; a metric reader collects on its own thread. Each pool's
recorder swaps its totals out under its lock, so a record is counted once, in one collection.
"""

from __future__ import annotations

import os
import time
import weakref
from bisect import bisect_left
from collections.abc import Sequence
from dataclasses import dataclass

from asyncpool.telemetry import semconv as sc
from asyncpool.telemetry.fork_locks import fork_safe_lock

#: The two histograms aggregated here, by metric name.
AGGREGATED = (sc.WAIT_TIME, sc.USE_TIME)


class Totals:
    """One explicit-bucket histogram: counts per bucket, sum, count, min and max."""

    __slots__ = ("count", "counts", "max", "min", "sum")

    def __init__(self, buckets: int) -> None:
        self.counts: list[int] = [0] * buckets
        self.sum: float = 0.0
        self.count: int = 0
        self.min: float = float("inf")
        self.max: float = float("-inf")

    def merge(self, other: Totals) -> None:
        self.counts = [a + b for a, b in zip(self.counts, other.counts, strict=True)]
        self.sum += other.sum
        self.count += other.count
        self.min = min(self.min, other.min)
        self.max = max(self.max, other.max)


class PoolCheckoutTimes:
    """The recorder of one pool: its wait and use times since the last collection."""

    __slots__ = ("__weakref__", "_bounds", "_buckets", "_lock", "_use", "_wait", "closed",
                 "pool_name")

    def __init__(self, pool_name: str, bounds: Sequence[float]) -> None:
        self.pool_name: str = pool_name
        self.closed: bool = False
        self._bounds = bounds
        self._buckets = len(bounds) + 1
        self._lock = fork_safe_lock(self)
        self._wait = Totals(self._buckets)
        self._use = Totals(self._buckets)

    def wait(self, seconds: float) -> None:
        """Record one checkout's `db.client.connection.wait_time`."""
        with self._lock:
            _add(self._wait, bisect_left(self._bounds, seconds), seconds)

    def use(self, seconds: float) -> None:
        """Record one checkout's `db.client.connection.use_time`."""
        with self._lock:
            _add(self._use, bisect_left(self._bounds, seconds), seconds)

    def drain(self) -> tuple[Totals, Totals]:
        """The wait and use totals recorded since the last drain."""
        fresh_wait, fresh_use = Totals(self._buckets), Totals(self._buckets)
        with self._lock:
            wait, use = self._wait, self._use
            self._wait, self._use = fresh_wait, fresh_use
        return wait, use


def _add(totals: Totals, bucket: int, seconds: float) -> None:
    totals.counts[bucket] += 1
    totals.sum += seconds
    totals.count += 1
    # Comparisons rather than min()/max(): this runs twice per checkout.
    if seconds < totals.min:  # noqa: PLR1730
        totals.min = seconds
    if seconds > totals.max:  # noqa: PLR1730
        totals.max = seconds


@dataclass(frozen=True, slots=True)
class Point:
    """One histogram data point, as an exporter needs it."""

    metric: str
    pool_name: str
    start_ns: int
    time_ns: int
    bucket_counts: tuple[int, ...]
    bounds: tuple[float, ...]
    sum: float
    count: int
    min: float
    max: float


class _Series:
    __slots__ = ("start_ns", "totals")

    def __init__(self, start_ns: int, totals: Totals) -> None:
        self.start_ns = start_ns
        self.totals = totals


class Consumer:
    """One exporter's view: cumulative totals since it started, or deltas since it last collected."""

    def __init__(self, cumulative: bool, now_ns: int) -> None:
        self.cumulative = cumulative
        #: Whether times came in since the last `take`.
        self.fresh: bool = False
        self._last_ns = now_ns
        self._series: dict[tuple[str, str], _Series] = {}

    def add(self, metric: str, pool_name: str, totals: Totals) -> None:
        if not totals.count:
            return
        self.fresh = True
        series = self._series.get((metric, pool_name))
        if series is None:
            series = self._series[(metric, pool_name)] = _Series(self._last_ns, Totals(len(totals.counts)))
        series.totals.merge(totals)

    def take(self, now_ns: int, bounds: tuple[float, ...]) -> list[Point]:
        points = [
            Point(metric, pool_name, s.start_ns, now_ns, tuple(s.totals.counts), bounds,
                  s.totals.sum, s.totals.count, s.totals.min, s.totals.max)
            for (metric, pool_name), s in self._series.items()
        ]
        if not self.cumulative:
            # A delta series with nothing new reports no point, as the SDK does.
            self._series.clear()
        self.fresh = False
        self._last_ns = now_ns
        return points


class CheckoutTimes:
    """Where pools aggregate their checkout times and exporters collect them.

    ``asyncpool.telemetry.CHECKOUT_TIMES`` is the one used by pools with ``telemetry=True``;
    make your own only to keep pools apart (tests, several SDK set-ups in one process).
    """

    def __init__(self, bounds: Sequence[float] = sc.TIME_BUCKETS) -> None:
        self.bounds: tuple[float, ...] = tuple(bounds)
        self._lock = fork_safe_lock(self)
        self._recorders: list[PoolCheckoutTimes] = []
        # Weakly: an exporter dropped without shutdown() (nobody unsubscribes it) must not keep
        # every closed pool's recorder waiting for a collection that never comes.
        self._consumers: list[weakref.ref[Consumer]] = []
        _REGISTRIES.add(self)

    def _live(self) -> list[Consumer]:
        """The consumers whose exporter is still there (under the lock)."""
        live = [consumer for ref in self._consumers if (consumer := ref()) is not None]
        if len(live) != len(self._consumers):
            self._consumers = [ref for ref in self._consumers if ref() is not None]
        return live

    @property
    def exporting(self) -> bool:
        """Whether an exporter collects from here (pools opened now aggregate here)."""
        with self._lock:
            return bool(self._live())

    def recorder(self, pool_name: str) -> PoolCheckoutTimes:
        """A new recorder for the pool named `pool_name`."""
        recorder = PoolCheckoutTimes(pool_name, self.bounds)
        with self._lock:
            self._recorders.append(recorder)
        return recorder

    def forget(self, recorder: PoolCheckoutTimes) -> None:
        """The pool has closed: the next collection takes its last times and drops it."""
        recorder.closed = True
        with self._lock:
            if not self._live() and recorder in self._recorders:
                self._recorders.remove(recorder)

    def subscribe(self, cumulative: bool) -> Consumer:
        consumer = Consumer(cumulative, time.time_ns())
        with self._lock:
            self._consumers = [*self._consumers, weakref.ref(consumer)]
        return consumer

    def unsubscribe(self, consumer: Consumer) -> None:
        with self._lock:
            self._consumers = [ref for ref in self._consumers if ref() not in (consumer, None)]

    def collect(self, consumer: Consumer, only_fresh: bool = False) -> list[Point]:
        """Hand every pool's new times to every consumer; return `consumer`'s points (none when
        `only_fresh` and no time came in since its last collection)."""
        with self._lock:
            consumers = self._live()
            for recorder in list(self._recorders):
                wait, use = recorder.drain()
                for each in consumers:
                    each.add(sc.WAIT_TIME.name, recorder.pool_name, wait)
                    each.add(sc.USE_TIME.name, recorder.pool_name, use)
                if recorder.closed:
                    self._recorders.remove(recorder)
            if only_fresh and not consumer.fresh:
                return []
            return consumer.take(time.time_ns(), self.bounds)

    def _after_fork_in_child(self) -> None:
        """Hand the parent's pools' times to the exporters the child inherited, and drop them.

        opentelemetry-sdk keeps an inherited reader's aggregations across a fork: an exporter
        made before it goes on with its series, and gets what the parent recorded since its
        last collection (as the SDK's own instruments do). An exporter the child makes gets the
        child's times only, and the parent's pools (refused in the child) record no more.
        """
        # (Single-threaded here, and the locks are new: `fork_locks` renewed them first.)
        consumers = self._live()
        for recorder in self._recorders:
            wait, use = recorder.drain()
            for each in consumers:
                each.add(sc.WAIT_TIME.name, recorder.pool_name, wait)
                each.add(sc.USE_TIME.name, recorder.pool_name, use)
        self._recorders = []


_REGISTRIES: weakref.WeakSet[CheckoutTimes] = weakref.WeakSet()


def _after_fork_in_child() -> None:
    for times in list(_REGISTRIES):
        times._after_fork_in_child()


# (Registered after `fork_locks`' renewal, imported above: after-fork hooks run in order.)
if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


#: The registry pools with ``telemetry=True`` use once an exporter collects from it.
CHECKOUT_TIMES = CheckoutTimes()
