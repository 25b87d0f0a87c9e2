"""Export asyncpool's metrics and spans over OTLP (to an OpenTelemetry Collector, Grafana Alloy...).

    pip install asyncpool-pg opentelemetry-sdk opentelemetry-exporter-otlp-proto-http
    docker compose --profile observability up -d --wait     # the repository's collector on :4318
    ASYNCPOOL_DSN=postgresql://app:secret@127.0.0.1:6432/app python examples/telemetry/otlp_setup.py

The exporters read the standard variables (OTEL_EXPORTER_OTLP_ENDPOINT, default
http://localhost:4318; OTEL_EXPORTER_OTLP_HEADERS...). asyncpool needs nothing beyond installing
the providers: a pool opened with the default ``telemetry=True`` reports through them. The metric
exporter is wrapped with ``export_checkout_times()`` so pools aggregate the two histograms recorded
on every checkout themselves, instead of paying the SDK's ~6 µs per record (docs/telemetry.md).

On AWS Lambda an environment is frozen between invocations and its exporter threads with it: call
``flush()`` before the handler returns, or the last invocation's telemetry waits for the next one.
"""

from __future__ import annotations

import asyncio
import os

from opentelemetry import metrics, trace

# (The ignores only keep the repository's type check green where the exporter is not installed.)
from opentelemetry.exporter.otlp.proto.http.metric_exporter import (  # type: ignore[import-not-found, unused-ignore]
    OTLPMetricExporter,
)
from opentelemetry.exporter.otlp.proto.http.trace_exporter import (  # type: ignore[import-not-found, unused-ignore]
    OTLPSpanExporter,
)
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import PeriodicExportingMetricReader
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor

import asyncpool
from asyncpool.telemetry import export_checkout_times


def install_providers(service_name: str) -> tuple[MeterProvider, TracerProvider]:
    """Global meter and tracer providers exporting over OTLP/HTTP. Call once, at start-up."""
    resource = Resource.create({"service.name": service_name})
    meter_provider = MeterProvider(
        resource=resource,
        metric_readers=[
            PeriodicExportingMetricReader(
                export_checkout_times(OTLPMetricExporter()), export_interval_millis=10_000
            )
        ],
    )
    tracer_provider = TracerProvider(resource=resource)
    tracer_provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    metrics.set_meter_provider(meter_provider)
    trace.set_tracer_provider(tracer_provider)
    return meter_provider, tracer_provider


def flush(meter_provider: MeterProvider, tracer_provider: TracerProvider) -> None:
    """Send what is buffered now (end of a Lambda invocation)."""
    tracer_provider.force_flush(timeout_millis=2_000)
    meter_provider.force_flush(timeout_millis=2_000)


async def main(dsn: str, seconds: float) -> None:
    meter_provider, tracer_provider = install_providers("asyncpool-otlp-example")
    tracer = trace.get_tracer("asyncpool-otlp-example")
    try:
        async with asyncpool.Pool(dsn, name="orders", min_size=1, max_size=5) as pool:
            loop = asyncio.get_running_loop()
            stop = loop.time() + seconds
            while loop.time() < stop:
                with tracer.start_as_current_span("batch"):
                    await asyncio.gather(*(pool.fetchval("SELECT pg_sleep(0.01)") for _ in range(10)))
            print(pool.stats())
            # While the pool is open: its sizes are read from it at export time (end of an
            # invocation on Lambda).
            flush(meter_provider, tracer_provider)
    finally:
        tracer_provider.shutdown()
        meter_provider.shutdown()


if __name__ == "__main__":
    asyncio.run(main(os.environ["ASYNCPOOL_DSN"], float(os.environ.get("SECONDS", "30"))))
