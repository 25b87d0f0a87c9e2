"""The pool observer that publishes metrics, spans and log correlation through OpenTelemetry."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

from opentelemetry import trace
from opentelemetry.trace import SpanKind, Status, StatusCode

from asyncpool.errors import PoolError
from asyncpool.observer import ConnectAttempt, Hook, LeakReport, PoolObserver
from asyncpool.stats import PoolStats
from asyncpool.telemetry import semconv as sc
from asyncpool.telemetry.checkout_times import CHECKOUT_TIMES, CheckoutTimes, PoolCheckoutTimes
from asyncpool.telemetry.logs import add_trace_ids_to_logs
from asyncpool.telemetry.metrics import (
    Attributes,
    PoolCounts,
    global_provider_listens,
    instruments_for,
    qualified_name,
)
from asyncpool.telemetry.spans import PoolSpans, error_type

_ERROR = Status(StatusCode.ERROR)

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

    `semconv` picks the version of the semantic conventions the metrics follow: ``"1.44"``
    (default; `db.client.connection.*`, times in seconds) or ``"1.24"`` (the older
    `db.client.connections.*` names with `pool.name`/`state` attributes and times in ms, for
    dashboards built on them). None reads ``ASYNCPOOL_OTEL_SEMCONV``. The meter carries the
    version's schema URL. Checkout times aggregated in the pool follow 1.44 only: with 1.24 they
    are recorded through the SDK.

    One observer watches one pool.
    """

    def __init__(
        self,
        config: PoolConfig | None = None,
        *,
        meter_provider: MeterProvider | None = None,
        tracer_provider: TracerProvider | None = None,
        checkout_times: bool | CheckoutTimes = True,
        semconv: str | None = None,
    ) -> None:
        from asyncpool import __version__

        self._conventions = sc.conventions(semconv)
        self._instruments = instruments_for(meter_provider, __version__, self._conventions)
        # The counts of this pool's name (from attach): shared with its other pools, kept when
        # it closes.
        self._counts = PoolCounts()
        self._tracer = trace.get_tracer("asyncpool", __version__, tracer_provider)
        # Which provider fetches passwords, for the credentials span (unknown without the config).
        self._credentials_name: str | None = None
        if config is not None:
            provider = config.credentials
            self._credentials_name = type(provider).__name__ if provider else "StaticPassword"
        self._attached = False
        self._spans = PoolSpans(self._tracer, "", None)
        self._attributes: Attributes = {}
        self._statement_attributes: Attributes = {}
        self._checkout_times = checkout_times
        self._global_provider = meter_provider is None
        # The registry and recorder this pool aggregates its checkout times in, if it does.
        self._aggregated: tuple[CheckoutTimes, PoolCheckoutTimes] | None = None
        self._record_wait: Callable[[float], None] = _ignore
        self._record_use: Callable[[float], None] = _ignore
        # Checkout times wait for an SDK: the global meter provider was OpenTelemetry's
        # stand-in when the pool opened (`checkout_hooks` looks again).
        self._awaiting_sdk = False
        self._pool_name = ""  # set by attach

    def attach(self, pool_name: str, stats: Callable[[], PoolStats]) -> None:
        if self._attached:
            raise PoolError(
                f"pool {pool_name!r}: this TelemetryObserver already watches a pool; "
                "give each pool its own"
            )
        self._attached = True
        # Attribute dicts are built once here: the hooks below run on every checkout.
        series = self._instruments.watch(self, pool_name, stats)
        self._attributes, self._counts = series.attributes, series.counts
        self._statement_attributes = {sc.POOL_NAME: pool_name}
        self._spans = PoolSpans(self._tracer, pool_name, self._credentials_name)
        self._pool_name = pool_name
        self._choose_checkout_recording()
        add_trace_ids_to_logs()

    def _choose_checkout_recording(self) -> None:
        times = self._checkout_times
        # Nothing listens yet: record nothing (each record on the stand-in's instruments costs
        # about 1,400 instructions per checkout) until an SDK is installed.
        self._awaiting_sdk = (times is True and self._global_provider
                              and not CHECKOUT_TIMES.exporting and not global_provider_listens())
        if self._awaiting_sdk:
            return
        if times is True and self._global_provider and CHECKOUT_TIMES.exporting:
            times = CHECKOUT_TIMES
        scale = self._conventions.time_scale
        if isinstance(times, CheckoutTimes) and scale == 1.0:
            recorder = times.recorder(self._pool_name)
            self._aggregated = (times, recorder)
            self._record_wait, self._record_use = recorder.wait, recorder.use
        elif times:
            self._record_wait = _recording(self._instruments.wait_time, self._attributes, scale)
            self._record_use = _recording(self._instruments.use_time, self._attributes, scale)

    def detach(self) -> None:
        # Attached again if the pool's open() failed and is called again.
        self._attached = False
        self._instruments.unwatch(self)
        if self._aggregated is not None:
            times, recorder = self._aggregated
            times.forget(recorder)

    def acquired(self, wait_seconds: float) -> None:
        self._record_wait(wait_seconds)

    def released(self, use_seconds: float) -> None:
        self._record_use(use_seconds)

    def checkout_hooks(self) -> tuple[Hook | None, Hook | None]:
        # The recorders themselves: one call less per checkout, none when nothing is recorded.
        if self._awaiting_sdk:
            self._choose_checkout_recording()
        wait, use = self._record_wait, self._record_use
        return (None if wait is _ignore else wait), (None if use is _ignore else use)

    @contextlib.contextmanager
    def pool_statement(self, purpose: str) -> Iterator[object]:
        # A parent span that marks the query span opentelemetry-instrumentation-asyncpg makes
        # for the pool's own SELECT 1 or ROLLBACK, and shows its time inside the request's trace.
        # A failure is marked as on the connect span: error.type, no description and no
        # exception event (the SDK's default would copy the server's message and a traceback).
        with self._tracer.start_as_current_span(
            f"{sc.POOL_STATEMENT_SPAN} {purpose}", kind=SpanKind.INTERNAL,
            attributes={**self._statement_attributes, sc.POOL_STATEMENT_PURPOSE: purpose},
            record_exception=False, set_status_on_exception=False,
        ) as span:
            try:
                yield span
            except Exception as exc:
                span.set_attribute(sc.ERROR_TYPE, qualified_name(type(exc)))
                span.set_status(_ERROR)
                raise

    def connect_attempted(self, attempt: ConnectAttempt) -> None:
        if attempt.error is None:
            seconds = attempt.seconds * self._conventions.time_scale
            self._instruments.create_time.record(seconds, self._attributes)
        else:
            # (An abandoned login is counted too, under CancelledError: a client that went away
            # is rare during a login of milliseconds, and a deadline cutting logins that hang is
            # an outage, which must not vanish from the metrics.)
            self._counts.login_failed(error_type(attempt))
        self._spans.connect(attempt)

    def timed_out(self) -> None:
        self._counts.timed_out()

    def validation_failed(self) -> None:
        self._counts.validation_failed()

    def leaked(self, report: LeakReport) -> None:
        self._counts.leaked(report.action)
        self._spans.leak(report, time.time_ns())


def _ignore(value: float) -> None:
    return None


def _recording(histogram: Histogram, attributes: Attributes,
               scale: float) -> Callable[[float], None]:
    # A closure over the bound method: functools.partial with a keyword costs three times more.
    record = histogram.record
    if scale != 1.0:
        def scaled(value: float) -> None:
            record(value * scale, attributes)

        return scaled

    def recorded(value: float) -> None:
        record(value, attributes)

    return recorded
