"""OpenTelemetry for asyncpool: semantic-convention pool metrics, connection spans, log correlation.

Imported only when a pool with ``telemetry=True`` opens (or when you import it), so
``import asyncpool`` does not load OpenTelemetry. See docs/telemetry.md.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from asyncpool.telemetry.checkout_times import CHECKOUT_TIMES, CheckoutTimes
from asyncpool.telemetry.logs import TraceContextFilter
from asyncpool.telemetry.observer import TelemetryObserver

if TYPE_CHECKING:
    from opentelemetry.sdk.metrics.export import MetricExporter

    from asyncpool.telemetry.export import CheckoutTimesExporter

__all__ = [
    "CHECKOUT_TIMES",
    "CheckoutTimes",
    "TelemetryObserver",
    "TraceContextFilter",
    "export_checkout_times",
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
