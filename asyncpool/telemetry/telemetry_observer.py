"""The pool observer that publishes metrics, spans and log correlation through OpenTelemetry."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from opentelemetry import trace

from asyncpool.errors import PoolError
from asyncpool.observer import ConnectAttempt, LeakReport, PoolObserver
from asyncpool.stats import PoolStats
from asyncpool.telemetry import semconv as sc
from asyncpool.telemetry.checkout_times import CHECKOUT_TIMES, CheckoutTimes, PoolCheckoutTimes
from asyncpool.telemetry.logs import add_trace_ids_to_logs
from asyncpool.telemetry.metrics import Attributes, instruments_for
from asyncpool.telemetry.spans import PoolSpans, error_type

if TYPE_CHECKING:
    from opentelemetry.metrics import Histogram, MeterProvider
    from opentelemetry.trace import TracerProvider

    from asyncpool.config import PoolConfig


class TelemetryObserver(PoolObserver):
    """Publishes one pool's metrics and spans through the OpenTelemetry API.

    Without an SDK installed every call lands on OpenTelemetry's no-op objects. `meter_provider`
    and `tracer_provider` default to the global ones; pass your own to keep a pool's telemetry
    apart (tests, several SDK set-ups in one process) and open the pool with ``telemetry=False``
    so it does not add a second, global observer::

        Pool(dsn, telemetry=False, observers=[TelemetryObserver(meter_provider=mp, tracer_provider=tp)])

    `checkout_times` decides how `db.client.connection.wait_time` and `.use_time`, the only
    metrics recorded on every checkout, are recorded:

    - ``True`` (default): through the OpenTelemetry API, about 6 µs per record with the Python
      SDK; or, for an observer on the global meter provider, aggregated in the pool once an
      exporter has been wrapped with `export_checkout_times()` (docs/telemetry.md);
    - a `CheckoutTimes`: aggregated in the pool, exported by the exporters wrapped with it;
    - ``False``: not recorded.

    One observer watches one pool.
    """

    def __init__(
        self,
        config: PoolConfig | None = None,
        *,
        meter_provider: MeterProvider | None = None,
        tracer_provider: TracerProvider | None = None,
        checkout_times: bool | CheckoutTimes = True,
    ) -> None:
        from asyncpool import __version__

        self._instruments = instruments_for(meter_provider, __version__)
        self._tracer = trace.get_tracer("asyncpool", __version__, tracer_provider)
        # Which provider fetches passwords, for the credentials span (unknown without the config).
        self._credentials_name: str | None = None
        if config is not None:
            provider = config.credentials
            self._credentials_name = type(provider).__name__ if provider else "StaticPassword"
        self._attached = False
        self._spans = PoolSpans(self._tracer, "", None)
        self._attributes: Attributes = {}
        self._reclaimed: Attributes = {}
        self._logged: Attributes = {}
        self._checkout_times = checkout_times
        self._global_provider = meter_provider is None
        # The registry and recorder this pool aggregates its checkout times in, if it does.
        self._aggregated: tuple[CheckoutTimes, PoolCheckoutTimes] | None = None
        self._record_wait: Callable[[float], None] = _ignore
        self._record_use: Callable[[float], None] = _ignore

    def attach(self, pool_name: str, stats: Callable[[], PoolStats]) -> None:
        if self._attached:
            raise PoolError(
                f"pool {pool_name!r}: this TelemetryObserver already watches a pool; "
                "give each pool its own"
            )
        self._attached = True
        # Attribute dicts are built once here: the hooks below run on every checkout.
        self._attributes = self._instruments.watch(self, pool_name, stats)
        self._reclaimed = {**self._attributes, sc.LEAK_ACTION: "reclaim"}
        self._logged = {**self._attributes, sc.LEAK_ACTION: "log"}
        self._spans = PoolSpans(self._tracer, pool_name, self._credentials_name)
        self._choose_checkout_recording(pool_name)
        add_trace_ids_to_logs()

    def _choose_checkout_recording(self, pool_name: str) -> None:
        times = self._checkout_times
        if times is True and self._global_provider and CHECKOUT_TIMES.exporting:
            times = CHECKOUT_TIMES
        if isinstance(times, CheckoutTimes):
            recorder = times.recorder(pool_name)
            self._aggregated = (times, recorder)
            self._record_wait, self._record_use = recorder.wait, recorder.use
        elif times:
            self._record_wait = _recording(self._instruments.wait_time, self._attributes)
            self._record_use = _recording(self._instruments.use_time, self._attributes)

    def detach(self) -> None:
        self._instruments.unwatch(self)
        if self._aggregated is not None:
            times, recorder = self._aggregated
            times.forget(recorder)

    def acquired(self, wait_seconds: float) -> None:
        self._record_wait(wait_seconds)

    def released(self, use_seconds: float) -> None:
        self._record_use(use_seconds)

    def connect_attempted(self, attempt: ConnectAttempt) -> None:
        if attempt.error is None:
            self._instruments.create_time.record(attempt.seconds, self._attributes)
        else:
            self._instruments.create_errors.add(
                1, {**self._attributes, sc.ERROR_TYPE: error_type(attempt.error)}
            )
        self._spans.connect(attempt)

    def timed_out(self) -> None:
        self._instruments.timeouts.add(1, self._attributes)

    def validation_failed(self) -> None:
        self._instruments.validation_failures.add(1, self._attributes)

    def leaked(self, report: LeakReport) -> None:
        self._instruments.leaks.add(1, self._reclaimed if report.reclaimed else self._logged)
        self._spans.leak(report, time.time_ns())


def _ignore(value: float) -> None:
    return None


def _recording(histogram: Histogram, attributes: Attributes) -> Callable[[float], None]:
    # A closure over the bound method: functools.partial with a keyword costs three times more.
    record = histogram.record

    def recorded(value: float) -> None:
        record(value, attributes)

    return recorded
