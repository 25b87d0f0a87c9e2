"""Pool metrics: one set of instruments per meter, shared by every pool that reports through it.

The sizes (`db.client.connection.count`, `.max`, `.pending_requests`...) are observable instruments
read from `Pool.stats()` when a reader collects, so they cost nothing per checkout. The counters
(timeouts, leaks, failed checks, failed logins) are observable too, read from the totals each
observer keeps: a pool reports 0 from its first collection, so a dashboard or an alert can tell
"none" from "not reporting". Histograms are recorded by the observer hooks.

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
    Histogram,
    Meter,
    MeterProvider,
    Observation,
)

from asyncpool.errors import AuthenticationError, ConnectError, PoolerExhaustedError
from asyncpool.stats import PoolStats, StatementCacheStats
from asyncpool.telemetry import semconv as sc

Attributes = Mapping[str, str]

LEAK_ACTIONS = ("reclaim", "log")


def qualified_name(cls: type[BaseException]) -> str:
    """A class's fully qualified name, as `error.type` wants it (``asyncpool.errors.ConnectError``)."""
    module = cls.__module__
    return cls.__qualname__ if module == "builtins" else f"{module}.{cls.__qualname__}"


# The errors a failed login gives its caller: each has a series at 0 from the first collection.
# Others (PoolClosedError when close() stops a login...) appear when they first happen.
LOGIN_ERROR_TYPES = tuple(
    qualified_name(cls) for cls in (ConnectError, AuthenticationError, PoolerExhaustedError)
)


class PoolCounts:
    """Events one pool's observer counted. Written on the pool's event loop, read by collections
    on the reader's thread: each value is a single int (or a dict copied whole under the GIL)."""

    __slots__ = ("create_errors", "leaks", "timeouts", "validation_failures")

    def __init__(self) -> None:
        self.timeouts: int = 0
        self.validation_failures: int = 0
        self.leaks: dict[str, int] = dict.fromkeys(LEAK_ACTIONS, 0)
        self.create_errors: dict[str, int] = dict.fromkeys(LOGIN_ERROR_TYPES, 0)


@dataclass(frozen=True, slots=True)
class _Watched:
    stats: Callable[[], PoolStats]
    counts: PoolCounts
    pool_name: str
    attributes: Attributes
    idle: Attributes
    used: Attributes
    hit: Attributes
    miss: Attributes
    leak: dict[str, Attributes]


class PoolInstruments:
    """The instruments of one meter and the pools whose sizes they report."""

    def __init__(self, meter: Meter, conventions: sc.Conventions) -> None:
        self.conventions = conventions
        self._pools: dict[object, _Watched] = {}
        self.create_time: Histogram = _histogram(meter, conventions, sc.CREATE_TIME)
        self.wait_time: Histogram = _histogram(meter, conventions, sc.WAIT_TIME)
        self.use_time: Histogram = _histogram(meter, conventions, sc.USE_TIME)
        for spec, callback in (
            (sc.TIMEOUTS, self._observe_counts(lambda c: c.timeouts)),
            (sc.VALIDATION_FAILURES, self._observe_counts(lambda c: c.validation_failures)),
            (sc.LEAKS, self._observe_leaks),
            (sc.CREATE_ERRORS, self._observe_create_errors),
        ):
            named = conventions.spec(spec)
            meter.create_observable_counter(
                named.name, [callback], unit=named.unit, description=named.description
            )
        for spec, callback in (
            (sc.CONNECTION_COUNT, self._observe_count),
            (sc.CONNECTION_MAX, self._observe(lambda s: s.max_size)),
            # Any open connection may sit idle: the idle ceiling is max_size.
            (sc.CONNECTION_IDLE_MAX, self._observe(lambda s: s.max_size)),
            (sc.CONNECTION_IDLE_MIN, self._observe(lambda s: s.min_size)),
            (sc.PENDING_REQUESTS, self._observe(lambda s: s.pending)),
        ):
            named = conventions.spec(spec)
            meter.create_observable_up_down_counter(
                named.name, [callback], unit=named.unit, description=named.description
            )
        for spec, callback in (
            (sc.CACHE_LOOKUPS, self._observe_cache_lookups),
            (sc.CACHE_STALE, self._observe_cache(lambda c: c.stale)),
            (sc.CACHE_EVICTIONS, self._observe_cache(lambda c: c.evicted)),
        ):
            meter.create_observable_counter(
                spec.name, [callback], unit=spec.unit, description=spec.description
            )

    def watch(self, key: object, pool_name: str, stats: Callable[[], PoolStats],
              counts: PoolCounts) -> Attributes:
        """Report the sizes of the pool `stats` reads and the events in `counts`; returns the
        attributes its records use."""
        named = self.conventions.attributes
        attributes = named({sc.POOL_NAME: pool_name})
        self._pools[key] = _Watched(
            stats,
            counts,
            pool_name,
            attributes,
            named({sc.POOL_NAME: pool_name, sc.STATE: sc.STATE_IDLE}),
            named({sc.POOL_NAME: pool_name, sc.STATE: sc.STATE_USED}),
            named({sc.POOL_NAME: pool_name, sc.CACHE_RESULT: "hit"}),
            named({sc.POOL_NAME: pool_name, sc.CACHE_RESULT: "miss"}),
            {action: named({sc.POOL_NAME: pool_name, sc.LEAK_ACTION: action})
             for action in LEAK_ACTIONS},
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

    def _observe_counts(
        self, value: Callable[[PoolCounts], int]
    ) -> Callable[[CallbackOptions], Iterable[Observation]]:
        def callback(options: CallbackOptions) -> Iterable[Observation]:
            return [Observation(value(w.counts), w.attributes) for w in list(self._pools.values())]

        return callback

    def _observe_leaks(self, options: CallbackOptions) -> Iterable[Observation]:
        return [
            Observation(count, watched.leak[action])
            for watched in list(self._pools.values())
            for action, count in dict(watched.counts.leaks).items()
        ]

    def _observe_create_errors(self, options: CallbackOptions) -> Iterable[Observation]:
        named = self.conventions.attributes
        return [
            Observation(count, named({sc.POOL_NAME: watched.pool_name, sc.ERROR_TYPE: error}))
            for watched in list(self._pools.values())
            for error, count in dict(watched.counts.create_errors).items()
        ]

    def _observe_count(self, options: CallbackOptions) -> Iterable[Observation]:
        observations = []
        for watched, stats in self._snapshots():
            observations.append(Observation(stats.idle, watched.idle))
            # A connection being checked for a caller is as used as one being reset after its
            # return (in `in_use`): the two states add up to the open connections.
            observations.append(Observation(stats.in_use + stats.validating, watched.used))
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
    # stats() reads the pool's lists while the event loop's thread may change them under a
    # collector thread. It is not meant to raise; should a RuntimeError ("... changed size during
    # iteration") come, a retry nearly always succeeds, otherwise this collection skips the pool
    # rather than failing every pool's metrics.
    for _ in range(3):
        try:
            return stats()
        except RuntimeError:
            continue
    return None


def _histogram(meter: Meter, conventions: sc.Conventions, spec: sc.MetricSpec) -> Histogram:
    named = conventions.spec(spec)
    try:
        return meter.create_histogram(
            named.name, unit=named.unit, description=named.description,
            explicit_bucket_boundaries_advisory=conventions.buckets,
        )
    except TypeError:  # opentelemetry-api < 1.30 has no bucket advice; views can still set them
        return meter.create_histogram(named.name, unit=named.unit, description=named.description)


_GLOBAL: dict[sc.Conventions, PoolInstruments] = {}
_BY_PROVIDER: weakref.WeakKeyDictionary[MeterProvider, dict[sc.Conventions, PoolInstruments]] = (
    weakref.WeakKeyDictionary()
)


def global_provider_listens() -> bool:
    """False while the global meter provider is OpenTelemetry's stand-in (no SDK installed yet)
    or its no-op one: what the global meter records then goes nowhere."""
    provider = metrics.get_meter_provider()
    # The stand-in's class is private; were it renamed, this says True: recording as before.
    return not (type(provider).__name__ == "_ProxyMeterProvider"
                or isinstance(provider, metrics.NoOpMeterProvider))


def instruments_for(
    provider: MeterProvider | None, version: str, conventions: sc.Conventions = sc.CURRENT
) -> PoolInstruments:
    """The shared instruments of `provider`'s asyncpool meter (None: the global provider) for
    one version of the conventions; the meter carries that version's schema URL.

    The global meter is taken once: before the application installs the SDK it is a proxy that
    forwards to the SDK later, so pools opened early keep reporting.
    """
    if provider is None:
        found = _GLOBAL.get(conventions)
        if found is None:
            meter = metrics.get_meter("asyncpool", version, schema_url=conventions.schema_url)
            found = _GLOBAL[conventions] = PoolInstruments(meter, conventions)
        return found
    per_version = _BY_PROVIDER.setdefault(provider, {})
    found = per_version.get(conventions)
    if found is None:
        meter = provider.get_meter("asyncpool", version, schema_url=conventions.schema_url)
        found = per_version[conventions] = PoolInstruments(meter, conventions)
    return found
