"""The OpenTelemetry SDK as an application would install it, for the telemetry-cost benchmark.

Set up like examples/telemetry/otlp_setup.py (periodic metric export every 10 s, batched spans),
with exporters that do all of OTLP's work except the network: each batch is encoded to OTLP
protobuf bytes and dropped. The cost measured is the SDK's (recording, aggregation, collection,
encoding), not a collector's round trips.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from opentelemetry.sdk.metrics import MeterProvider

    from asyncpool.telemetry import CheckoutTimes

EXPORT_INTERVAL_MS = 10_000


def install_sdk(*, aggregate_checkout_times: bool = False) -> None:
    """Install global meter and tracer providers that export (encode) what pools report.

    `aggregate_checkout_times` wraps the metric exporter with `export_checkout_times()`, so pools
    aggregate wait_time and use_time themselves instead of recording them through the SDK.
    """
    from opentelemetry import metrics, trace
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    times = None
    if aggregate_checkout_times:
        from asyncpool.telemetry import CHECKOUT_TIMES

        times = CHECKOUT_TIMES
    metrics.set_meter_provider(exporting_meter_provider(times))
    tracer_provider = TracerProvider()
    tracer_provider.add_span_processor(BatchSpanProcessor(_span_exporter()))
    trace.set_tracer_provider(tracer_provider)


def exporting_meter_provider(checkout_times: CheckoutTimes | None = None) -> MeterProvider:
    """A meter provider exporting every 10 s; with `checkout_times`, its exporter collects them."""
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import PeriodicExportingMetricReader

    exporter = _metric_exporter()
    if checkout_times is not None:
        from asyncpool.telemetry import export_checkout_times

        exporter = export_checkout_times(exporter, checkout_times)
    reader = PeriodicExportingMetricReader(exporter, export_interval_millis=EXPORT_INTERVAL_MS)
    return MeterProvider(metric_readers=[reader])


def _metric_exporter() -> Any:
    from opentelemetry.exporter.otlp.proto.common.metrics_encoder import encode_metrics
    from opentelemetry.sdk.metrics.export import MetricExporter, MetricExportResult, MetricsData

    class EncodingMetricExporter(MetricExporter):
        def export(self, metrics_data: MetricsData, timeout_millis: float = 10_000,
                   **kwargs: Any) -> MetricExportResult:
            encode_metrics(metrics_data).SerializeToString()
            return MetricExportResult.SUCCESS

        def force_flush(self, timeout_millis: float = 10_000) -> bool:
            return True

        def shutdown(self, timeout_millis: float = 30_000, **kwargs: Any) -> None:
            return None

    return EncodingMetricExporter()


def _span_exporter() -> Any:
    from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
    from opentelemetry.sdk.trace import ReadableSpan
    from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult

    class EncodingSpanExporter(SpanExporter):
        def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
            encode_spans(spans).SerializeToString()
            return SpanExportResult.SUCCESS

    return EncodingSpanExporter()
