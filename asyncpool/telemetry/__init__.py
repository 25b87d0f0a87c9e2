"""OpenTelemetry for asyncpool: semantic-convention pool metrics, connection spans, log correlation.

Imported only when a pool with ``telemetry=True`` opens (or when you import it), so
``import asyncpool`` does not load OpenTelemetry. See docs/telemetry.md.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from asyncpool.telemetry.checkout_times import CHECKOUT_TIMES, CheckoutTimes
from asyncpool.telemetry.logs import TraceContextFilter
from asyncpool.telemetry.telemetry_observer import TelemetryObserver

if TYPE_CHECKING:
    from typing import Any, TypeVar

    from opentelemetry.sdk.metrics.export import MetricExporter, MetricReader

    from asyncpool.telemetry.export import CheckoutTimesExporter

    Reader = TypeVar("Reader", bound=MetricReader)

__all__ = [
    "CHECKOUT_TIMES",
    "CheckoutTimes",
    "TelemetryObserver",
    "TraceContextFilter",
    "export_checkout_times",
    "reader_with_checkout_times",
]


def export_checkout_times(
    exporter: MetricExporter, times: CheckoutTimes | None = None
) -> CheckoutTimesExporter:
    """Wrap a push exporter so pools aggregate `wait_time` and `use_time` themselves.

    See `asyncpool.telemetry.export.export_checkout_times`; this module imports the SDK only here,
    as asyncpool depends on the OpenTelemetry API alone.
    """
    from asyncpool.telemetry.export import export_checkout_times as wrap

    return wrap(exporter, times)


def reader_with_checkout_times(
    reader_class: type[Reader], *args: Any, times: CheckoutTimes | None = None, **kwargs: Any
) -> Reader:
    """A pull reader (``PrometheusMetricReader``) whose collections carry the pool-aggregated
    checkout times; see `asyncpool.telemetry.export.reader_with_checkout_times`."""
    from asyncpool.telemetry.export import reader_with_checkout_times as make

    return make(reader_class, *args, times=times, **kwargs)
