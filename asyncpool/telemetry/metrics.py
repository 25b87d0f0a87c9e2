"""Pool metrics: one set of instruments per meter, shared by every pool that reports through it.

The sizes (`db.client.connection.count`, `.max`, `.pending_requests`...) are observable instruments
read from `Pool.stats()` when a reader collects, so they cost nothing per checkout. Histograms and
counters are recorded by the observer hooks.

Instruments are shared because a meter keeps the first registration of a name: a second pool
creating its own `db.client.connection.count` would have its callback silently dropped.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

from opentelemetry import metrics
from opentelemetry.metrics import (
    CallbackOptions,
    Counter,
    Histogram,
    Meter,
    MeterProvider,
    Observation,
)

from asyncpool.stats import PoolStats, StatementCacheStats
from asyncpool.telemetry import semconv as sc

Attributes = Mapping[str, str]


@dataclass(frozen=True, slots=True)
class _Watched:
    stats: Callable[[], PoolStats]
    attributes: Attributes
    idle: Attributes
    used: Attributes
    hit: Attributes
    miss: Attributes


class PoolInstruments:
    """The instruments of one meter and the pools whose sizes they report."""

    def __init__(self, meter: Meter) -> None:
        self._pools: dict[object, _Watched] = {}
        self.create_time = _histogram(meter, sc.CREATE_TIME)
        self.wait_time = _histogram(meter, sc.WAIT_TIME)
        self.use_time = _histogram(meter, sc.USE_TIME)
        self.timeouts = _counter(meter, sc.TIMEOUTS)
        self.leaks = _counter(meter, sc.LEAKS)
        self.validation_failures = _counter(meter, sc.VALIDATION_FAILURES)
        self.create_errors = _counter(meter, sc.CREATE_ERRORS)
        for spec, callback in (
            (sc.CONNECTION_COUNT, self._observe_count),
            (sc.CONNECTION_MAX, self._observe(lambda s: s.max_size)),
            # Any open connection may sit idle: the idle ceiling is max_size.
            (sc.CONNECTION_IDLE_MAX, self._observe(lambda s: s.max_size)),
            (sc.CONNECTION_IDLE_MIN, self._observe(lambda s: s.min_size)),
            (sc.PENDING_REQUESTS, self._observe(lambda s: s.waiting)),
        ):
            meter.create_observable_up_down_counter(
                spec.name, [callback], unit=spec.unit, description=spec.description
            )
        for spec, callback in (
            (sc.CACHE_LOOKUPS, self._observe_cache_lookups),
            (sc.CACHE_STALE, self._observe_cache(lambda c: c.stale)),
            (sc.CACHE_EVICTIONS, self._observe_cache(lambda c: c.evicted)),
        ):
            meter.create_observable_counter(
                spec.name, [callback], unit=spec.unit, description=spec.description
            )

    def watch(self, key: object, pool_name: str, stats: Callable[[], PoolStats]) -> Attributes:
        """Report the sizes of the pool `stats` reads; returns the attributes its records use."""
        attributes = {sc.POOL_NAME: pool_name}
        self._pools[key] = _Watched(
            stats,
            attributes,
            {sc.POOL_NAME: pool_name, sc.STATE: sc.STATE_IDLE},
            {sc.POOL_NAME: pool_name, sc.STATE: sc.STATE_USED},
            {sc.POOL_NAME: pool_name, sc.CACHE_RESULT: "hit"},
            {sc.POOL_NAME: pool_name, sc.CACHE_RESULT: "miss"},
        )
        return attributes

    def unwatch(self, key: object) -> None:
        self._pools.pop(key, None)

    # Callbacks run on the reader's thread (PeriodicExportingMetricReader) or on a scrape.

    def _snapshots(self) -> list[tuple[_Watched, PoolStats]]:
        taken = []
        for watched in list(self._pools.values()):
            stats = _read(watched.stats)
            if stats is not None:
                taken.append((watched, stats))
        return taken

    def _observe_count(self, options: CallbackOptions) -> Iterable[Observation]:
        observations = []
        for watched, stats in self._snapshots():
            observations.append(Observation(stats.idle, watched.idle))
            observations.append(Observation(stats.in_use, watched.used))
        return observations

    def _observe(
        self, value: Callable[[PoolStats], int]
    ) -> Callable[[CallbackOptions], Iterable[Observation]]:
        def callback(options: CallbackOptions) -> Iterable[Observation]:
            return [Observation(value(stats), w.attributes) for w, stats in self._snapshots()]

        return callback

    # Only pools in "unnamed" mode report these (stats().statement_cache is None otherwise).

    def _observe_cache_lookups(self, options: CallbackOptions) -> Iterable[Observation]:
        observations = []
        for watched, stats in self._snapshots():
            if stats.statement_cache is not None:
                observations.append(Observation(stats.statement_cache.hits, watched.hit))
                observations.append(Observation(stats.statement_cache.misses, watched.miss))
        return observations

    def _observe_cache(
        self, value: Callable[[StatementCacheStats], int]
    ) -> Callable[[CallbackOptions], Iterable[Observation]]:
        def callback(options: CallbackOptions) -> Iterable[Observation]:
            return [
                Observation(value(stats.statement_cache), w.attributes)
                for w, stats in self._snapshots() if stats.statement_cache is not None
            ]

        return callback


def _read(stats: Callable[[], PoolStats]) -> PoolStats | None:
    # stats() walks the waiter queue, which the event loop's thread may change under a collector
    # thread ("deque mutated during iteration"). A retry nearly always succeeds; otherwise this
    # collection skips the pool rather than failing every pool's metrics.
    for _ in range(3):
        try:
            return stats()
        except RuntimeError:
            continue
    return None


def _histogram(meter: Meter, spec: sc.MetricSpec) -> Histogram:
    try:
        return meter.create_histogram(
            spec.name, unit=spec.unit, description=spec.description,
            explicit_bucket_boundaries_advisory=sc.TIME_BUCKETS,
        )
    except TypeError:  # opentelemetry-api < 1.30 has no bucket advice; views can still set them
        return meter.create_histogram(spec.name, unit=spec.unit, description=spec.description)


def _counter(meter: Meter, spec: sc.MetricSpec) -> Counter:
    return meter.create_counter(spec.name, unit=spec.unit, description=spec.description)


_GLOBAL: list[PoolInstruments] = []
_BY_PROVIDER: weakref.WeakKeyDictionary[MeterProvider, PoolInstruments] = (
    weakref.WeakKeyDictionary()
)


def instruments_for(provider: MeterProvider | None, version: str) -> PoolInstruments:
    """The shared instruments of `provider`'s asyncpool meter (None: the global provider).

    The global meter is taken once: before the application installs the SDK it is a proxy that
    forwards to the SDK later, so pools opened early keep reporting.
    """
    if provider is None:
        if not _GLOBAL:
            _GLOBAL.append(PoolInstruments(metrics.get_meter("asyncpool", version)))
        return _GLOBAL[0]
    found = _BY_PROVIDER.get(provider)
    if found is None:
        found = _BY_PROVIDER[provider] = PoolInstruments(provider.get_meter("asyncpool", version))
    return found
