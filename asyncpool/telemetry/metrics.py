"""Pool metrics: one set of instruments per meter, shared by every pool that reports through it.

The sizes (`db.client.connection.count`, `.max`, `.pending_requests`...) are observable instruments
read from `Pool.stats()` when a reader collects, so they cost nothing per checkout. The counters
(timeouts, leaks, failed checks, failed logins) are observable too, read from the totals kept per
pool name (`Series`): a pool reports 0 from its first collection, so a dashboard or an alert can
tell "none" from "not reporting", and a counter never goes back. Histograms are recorded by the
observer hooks.

Instruments are shared because a meter keeps the first registration of a name: a second pool
creating its own `db.client.connection.count` would have its callback silently dropped.
"""

from __future__ import annotations

import os
import weakref
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import get_args

from opentelemetry import metrics
from opentelemetry.metrics import (
    CallbackOptions,
    Histogram,
    Meter,
    MeterProvider,
    Observation,
)

from asyncpool.errors import AuthenticationError, ConnectError, PoolerExhaustedError
from asyncpool.observer import LeakOutcome
from asyncpool.stats import PoolStats, StatementCacheStats
from asyncpool.telemetry import semconv as sc
from asyncpool.telemetry.fork_locks import fork_safe_lock

Attributes = Mapping[str, str]

LEAK_ACTIONS: tuple[LeakOutcome, ...] = get_args(LeakOutcome)


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
    """Events counted for one pool name.

    Pools of one name may run on several threads, an event loop each (a sync app's threads),
    and add to the same counts while collections read them on the reader's thread. Each
    increment takes the lock (``+=`` is a read and a write that another thread can come
    between, losing its own), and so does each copy of a dict (`leak_counts`,
    `create_error_counts`), which another thread may be adding a key to: nothing here relies
    on the GIL, so it holds on free-threaded Python too. `timeouts` and `validation_failures`
    are read without the lock: one attribute load, which gives a whole int on every build.
    These are rare events (a timeout, a failed login, a leak), none on the checkout path.
    """

    __slots__ = ("__weakref__", "_lock", "create_errors", "leaks", "timeouts",
                 "validation_failures")

    def __init__(self) -> None:
        self._lock = fork_safe_lock(self)
        self.timeouts: int = 0
        self.validation_failures: int = 0
        self.leaks: dict[str, int] = dict.fromkeys(LEAK_ACTIONS, 0)
        self.create_errors: dict[str, int] = dict.fromkeys(LOGIN_ERROR_TYPES, 0)

    def timed_out(self) -> None:
        with self._lock:
            self.timeouts += 1

    def validation_failed(self) -> None:
        with self._lock:
            self.validation_failures += 1

    def leaked(self, action: str) -> None:
        with self._lock:
            self.leaks[action] += 1

    def login_failed(self, error_type: str) -> None:
        with self._lock:
            self.create_errors[error_type] = self.create_errors.get(error_type, 0) + 1

    def leak_counts(self) -> dict[str, int]:
        """A copy of `leaks` (by leak action), for a collection."""
        with self._lock:
            return dict(self.leaks)

    def create_error_counts(self) -> dict[str, int]:
        """A copy of `create_errors` (by error type), for a collection."""
        with self._lock:
            return dict(self.create_errors)


class Series:
    """What one pool name reports: its attribute sets and its counters' totals.

    Kept for as long as the process runs, whatever becomes of its pools. A counter is
    monotonic: a pool opened again under the same name (a failed open() retried, a pool made
    per invocation) goes on from the totals of the ones before rather than from 0, which a
    delta exporter would send as a negative increase; and the failed logins of an open() that
    failed before any collection are still reported. Pools open under the same name at once
    share it: their counts add up, as their sizes do. A forked child keeps them only for a
    provider it inherited (`_after_fork_in_child`).
    """

    __slots__ = ("attributes", "counts", "hit", "idle", "leak", "miss", "pool_name",
                 "retired_cache", "used")

    def __init__(self, pool_name: str, named: Callable[[dict[str, str]], dict[str, str]]) -> None:
        self.pool_name = pool_name
        self.counts = PoolCounts()
        self.attributes: Attributes = named({sc.POOL_NAME: pool_name})
        self.idle: Attributes = named({sc.POOL_NAME: pool_name, sc.STATE: sc.STATE_IDLE})
        self.used: Attributes = named({sc.POOL_NAME: pool_name, sc.STATE: sc.STATE_USED})
        self.hit: Attributes = named({sc.POOL_NAME: pool_name, sc.CACHE_RESULT: "hit"})
        self.miss: Attributes = named({sc.POOL_NAME: pool_name, sc.CACHE_RESULT: "miss"})
        self.leak: dict[str, Attributes] = {
            action: named({sc.POOL_NAME: pool_name, sc.LEAK_ACTION: action})
            for action in LEAK_ACTIONS}
        # The description cache counts of this name's closed pools (read from their stats()).
        self.retired_cache: StatementCacheStats | None = None


@dataclass(frozen=True, slots=True)
class _Watched:
    stats: Callable[[], PoolStats]
    series: Series


class PoolInstruments:
    """The instruments of one meter and the pools whose sizes they report."""

    def __init__(self, meter: Meter, conventions: sc.Conventions) -> None:
        self.conventions = conventions
        self._pools: dict[object, _Watched] = {}
        self._series: dict[str, Series] = {}
        # Held by watch/unwatch (on a pool's loop) and by collections (on a reader's thread)
        # while they copy the pools and names, or add a closed pool's cache counts to its
        # name's, so none counts one twice.
        self._lock = fork_safe_lock(self)
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

    def watch(self, key: object, pool_name: str, stats: Callable[[], PoolStats]) -> Series:
        """Report the sizes of the pool `stats` reads; returns the series of its name, whose
        attributes its records use and whose counts its events go to."""
        with self._lock:
            series = self._series.get(pool_name)
            if series is None:
                series = self._series[pool_name] = Series(pool_name, self.conventions.attributes)
            self._pools[key] = _Watched(stats, series)
        return series

    def unwatch(self, key: object) -> None:
        """Stop reporting the sizes of a pool that has closed; its name's counters go on."""
        with self._lock:
            watched = self._pools.pop(key, None)
            if watched is None:
                return
            # Its cache counts stay in its name's totals (stats() still reads them, closed).
            last = _read(watched.stats)
            cache = last.statement_cache if last is not None else None
            if cache is not None:
                series = watched.series
                series.retired_cache = _add_cache(series.retired_cache, cache)

    def reset_counts(self) -> None:
        """Every name's counters back to 0 (the child of a fork whose provider is its own)."""
        with self._lock:
            for series in self._series.values():
                series.counts = PoolCounts()
                series.retired_cache = None

    # Callbacks run on the reader's thread (PeriodicExportingMetricReader) or on a scrape. Each
    # reports one point per pool name (a callback must not observe one attribute set twice):
    # pools that share a name add up.

    def _snapshots(self) -> list[tuple[Series, list[PoolStats]]]:
        """The stats of the open pools, by name, for each name with one open."""
        by_series: dict[Series, list[PoolStats]] = {}
        with self._lock:  # (watch and unwatch change it on the pools' loops)
            pools = list(self._pools.values())
        for watched in pools:
            stats = _read(watched.stats)
            if stats is not None:
                by_series.setdefault(watched.series, []).append(stats)
        return list(by_series.items())

    def _all_series(self) -> list[Series]:
        with self._lock:  # (watch adds to it on a pool's loop)
            return list(self._series.values())

    def _observe_counts(
        self, value: Callable[[PoolCounts], int]
    ) -> Callable[[CallbackOptions], Iterable[Observation]]:
        def callback(options: CallbackOptions) -> Iterable[Observation]:
            return [Observation(value(s.counts), s.attributes) for s in self._all_series()]

        return callback

    def _observe_leaks(self, options: CallbackOptions) -> Iterable[Observation]:
        return [
            Observation(count, series.leak[action])
            for series in self._all_series()
            for action, count in series.counts.leak_counts().items()
        ]

    def _observe_create_errors(self, options: CallbackOptions) -> Iterable[Observation]:
        named = self.conventions.attributes
        return [
            Observation(count, named({sc.POOL_NAME: series.pool_name, sc.ERROR_TYPE: error}))
            for series in self._all_series()
            for error, count in series.counts.create_error_counts().items()
        ]

    def _observe_count(self, options: CallbackOptions) -> Iterable[Observation]:
        observations = []
        for series, taken in self._snapshots():
            observations.append(Observation(sum(s.idle for s in taken), series.idle))
            # A connection being checked for a caller is as used as one being reset after its
            # return (in `in_use`): the two states add up to the open connections.
            observations.append(Observation(sum(s.in_use + s.validating for s in taken),
                                            series.used))
        return observations

    def _observe(
        self, value: Callable[[PoolStats], int]
    ) -> Callable[[CallbackOptions], Iterable[Observation]]:
        def callback(options: CallbackOptions) -> Iterable[Observation]:
            return [Observation(sum(value(s) for s in taken), series.attributes)
                    for series, taken in self._snapshots()]

        return callback

    # Only pools in "unnamed" mode report these (stats().statement_cache is None otherwise).

    def _cache_totals(self) -> list[tuple[Series, StatementCacheStats]]:
        """Each name's cache counts: its open pools' and its closed ones'."""
        with self._lock:  # a pool closing now is counted either open or closed, not both
            pools = list(self._pools.values())
            retired = [(s, s.retired_cache) for s in self._series.values()]
        totals: dict[Series, StatementCacheStats | None] = dict(retired)
        for watched in pools:
            stats = _read(watched.stats)
            if stats is not None and stats.statement_cache is not None:
                totals[watched.series] = _add_cache(totals[watched.series],
                                                    stats.statement_cache)
        return [(series, cache) for series, cache in totals.items() if cache is not None]

    def _observe_cache_lookups(self, options: CallbackOptions) -> Iterable[Observation]:
        observations = []
        for series, cache in self._cache_totals():
            observations.append(Observation(cache.hits, series.hit))
            observations.append(Observation(cache.misses, series.miss))
        return observations

    def _observe_cache(
        self, value: Callable[[StatementCacheStats], int]
    ) -> Callable[[CallbackOptions], Iterable[Observation]]:
        def callback(options: CallbackOptions) -> Iterable[Observation]:
            return [Observation(value(cache), series.attributes)
                    for series, cache in self._cache_totals()]

        return callback


def _add_cache(total: StatementCacheStats | None,
               more: StatementCacheStats) -> StatementCacheStats:
    if total is None:
        return more
    return StatementCacheStats(total.hits + more.hits, total.misses + more.misses,
                               total.stale + more.stale, total.evicted + more.evicted)


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


def _after_fork_in_child() -> None:
    # A forked child inherits its parent's open pools, whose connections are the parent's: it
    # neither uses nor closes them (`asyncpool.pool.forks`). Reported from the child too, they
    # would be counted once per worker on top of the parent's own report, and add up with a
    # worker's pool of the same name. Their sizes go.
    for per_version in (_GLOBAL, *list(_BY_PROVIDER.values())):
        for instruments in per_version.values():
            for key in list(instruments._pools):
                instruments.unwatch(key)
    # Counts follow the SDK state they are reported into, which opentelemetry-sdk keeps across
    # a fork (it renews its locks and resource, not its aggregations). A provider made before
    # the fork (here, or the global one if already installed) goes on in the child with its
    # last observations: its counts go on too, or its counters would go back. With no SDK
    # installed at the fork, the provider a worker installs is its own and has seen nothing:
    # the global counts start again, or each worker's first export would send the parent's
    # as its own.
    if not global_provider_listens():
        for instruments in _GLOBAL.values():
            instruments.reset_counts()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)
