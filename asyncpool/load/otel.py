"""The OpenTelemetry SDK as an application would install it, for the telemetry-cost benchmark."""

from __future__ import annotations

import os

EXPORT_INTERVAL_MS = 1000


def install_sdk() -> None:
    """Install SDK meter and tracer providers that really export (serialise) every second.

    The exporters write to /dev/null: the cost measured is the SDK's own (aggregation, span
    processing, serialisation), not a collector's network round trips.
    """
    from opentelemetry import metrics, trace
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import (
        ConsoleMetricExporter,
        PeriodicExportingMetricReader,
    )
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter

    sink = open(os.devnull, "w")  # noqa: SIM115 - lives as long as the process
    reader = PeriodicExportingMetricReader(
        ConsoleMetricExporter(out=sink), export_interval_millis=EXPORT_INTERVAL_MS
    )
    metrics.set_meter_provider(MeterProvider(metric_readers=[reader]))
    tracer_provider = TracerProvider()
    tracer_provider.add_span_processor(BatchSpanProcessor(ConsoleSpanExporter(out=sink)))
    trace.set_tracer_provider(tracer_provider)
