"""Serve asyncpool's metrics for Prometheus to scrape, with no collector in between.

    pip install asyncpool-pg opentelemetry-sdk opentelemetry-exporter-prometheus
    ASYNCPOOL_DSN=postgresql://app:secret@127.0.0.1:6432/app python examples/telemetry/prometheus_setup.py
    curl -s http://127.0.0.1:9464/metrics | grep db_client_connection

OpenTelemetry names become Prometheus names: dots turn into underscores, the unit `s` adds
`_seconds`, counters end in `_total`, and histograms expose `_bucket`, `_sum` and `_count`:
`db.client.connection.wait_time` is `db_client_connection_wait_time_seconds_bucket`, and the
attribute `db.client.connection.pool.name` the label `db_client_connection_pool_name`. The Grafana
dashboard next to this file queries those names. Suits a long-running service; on Lambda nothing
can scrape a frozen environment, so export over OTLP instead (otlp_setup.py).

The reader comes from ``reader_with_checkout_times()`` so pools aggregate the two histograms
recorded on every checkout themselves, instead of paying the SDK's ~6 µs per record
(docs/telemetry.md).
"""

from __future__ import annotations

import asyncio
import os

from opentelemetry import metrics
from opentelemetry.exporter.prometheus import PrometheusMetricReader
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.resources import Resource
from prometheus_client import start_http_server

import asyncpool
from asyncpool.telemetry import reader_with_checkout_times


def serve_metrics(port: int, service_name: str) -> MeterProvider:
    """A global meter provider whose metrics are served on http://127.0.0.1:<port>/metrics."""
    start_http_server(port, addr="127.0.0.1")
    provider = MeterProvider(
        resource=Resource.create({"service.name": service_name}),
        metric_readers=[reader_with_checkout_times(PrometheusMetricReader)],
    )
    metrics.set_meter_provider(provider)
    return provider


async def main(dsn: str, seconds: float) -> None:
    provider = serve_metrics(int(os.environ.get("METRICS_PORT", "9464")), "asyncpool-example")
    try:
        async with asyncpool.Pool(dsn, name="orders", min_size=1, max_size=5) as pool:
            loop = asyncio.get_running_loop()
            stop = loop.time() + seconds
            while loop.time() < stop:
                # 20 callers on 5 connections: some wait, so pending_requests and wait_time move.
                await asyncio.gather(*(pool.fetchval("SELECT pg_sleep(0.02)") for _ in range(20)))
            print(pool.stats())
    finally:
        provider.shutdown()


if __name__ == "__main__":
    asyncio.run(main(os.environ["ASYNCPOOL_DSN"], float(os.environ.get("SECONDS", "60"))))
