"""The OpenTelemetry SDK as an application would install it, for the telemetry-cost benchmark.

Set up like examples/telemetry/otlp_setup.py (periodic metric export every 10 s, batched spans),
with exporters that do all of OTLP's work except the network: each batch is encoded to OTLP
protobuf bytes and dropped. The cost measured is the SDK's (recording, aggregation, collection,
encoding), not a collector's round trips.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

EXPORT_INTERVAL_MS = 10_000


def install_sdk() -> None:
    """Install global meter and tracer providers that export (encode) what pools report."""
    from opentelemetry import metrics, trace
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import PeriodicExportingMetricReader
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    reader = PeriodicExportingMetricReader(_metric_exporter(),
                                           export_interval_millis=EXPORT_INTERVAL_MS)
    metrics.set_meter_provider(MeterProvider(metric_readers=[reader]))
    tracer_provider = TracerProvider()
    tracer_provider.add_span_processor(BatchSpanProcessor(_span_exporter()))
    trace.set_tracer_provider(tracer_provider)


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
