"""An in-memory OpenTelemetry SDK per test, and lookups over what it collected."""

from __future__ import annotations

import asyncio
import contextlib
import subprocess
import sys
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import pytest
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import (
    AggregationTemporality,
    HistogramDataPoint,
    InMemoryMetricReader,
    Metric,
    MetricExporter,
    MetricExportResult,
    MetricReader,
    MetricsData,
    NumberDataPoint,
)
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

import asyncpool
from asyncpool import Pool, PoolConfig
from asyncpool.connect.dsn import Target
from asyncpool.telemetry import CheckoutTimes, TelemetryObserver
from asyncpool.testing import PostgresServer
from tests.backends import ended_unread


@dataclass
class Collected:
    """One collection: metrics by name."""

    metrics: dict[str, Metric] = field(default_factory=dict)
    schema_urls: dict[str, str] = field(default_factory=dict)

    def points(self, name: str) -> list[Any]:
        metric = self.metrics.get(name)
        return list(metric.data.data_points) if metric is not None else []

    def point(self, name: str, **attributes: str) -> Any:
        """The one data point of `name` whose attributes include `attributes` (dots as `__`)."""
        wanted = {k.replace("__", "."): v for k, v in attributes.items()}
        found = [p for p in self.points(name) if _includes(p.attributes, wanted)]
        assert len(found) == 1, f"{name} {wanted}: {len(found)} points in {self.points(name)}"
        return found[0]

    def value(self, name: str, **attributes: str) -> int | float:
        point = self.point(name, **attributes)
        assert isinstance(point, NumberDataPoint)
        return point.value

    def histogram(self, name: str, **attributes: str) -> HistogramDataPoint:
        point = self.point(name, **attributes)
        assert isinstance(point, HistogramDataPoint)
        return point


def run_app(script: str, dsn: str) -> list[str]:
    """Run `script` in a fresh interpreter (its own global providers) with `dsn` as argv[1];
    its output lines. Fails the test if the script fails."""
    done = subprocess.run(
        [sys.executable, "-c", script, dsn], capture_output=True, text=True, timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout.splitlines()


def metrics_named(data: MetricsData, name: str) -> list[Metric]:
    """Every metric called `name` in one export (a name twice would be a duplicate series)."""
    return [
        metric
        for resource in data.resource_metrics
        for scope in resource.scope_metrics
        for metric in scope.metrics
        if metric.name == name
    ]


class CapturingExporter(MetricExporter):
    """Keeps every batch it is given; `temporality` for every instrument kind when set."""

    def __init__(self, temporality: AggregationTemporality | None = None) -> None:
        from opentelemetry.sdk.metrics import Histogram

        super().__init__(preferred_temporality={Histogram: temporality} if temporality else None)
        self.batches: list[MetricsData] = []
        self.shut_down = False

    def export(self, metrics_data: MetricsData, timeout_millis: float = 10_000,
               **kwargs: Any) -> MetricExportResult:
        self.batches.append(metrics_data)
        return MetricExportResult.SUCCESS

    def force_flush(self, timeout_millis: float = 10_000) -> bool:
        return True

    def shutdown(self, timeout_millis: float = 30_000, **kwargs: Any) -> None:
        self.shut_down = True


def _includes(have: Mapping[str, Any] | None, wanted: Mapping[str, Any]) -> bool:
    have = have or {}
    return all(have.get(k) == v for k, v in wanted.items())


class Sdk:
    """A meter provider with an in-memory reader and a tracer provider with an in-memory exporter."""

    def __init__(
        self, readers: Sequence[MetricReader] = (), checkout_times: bool | CheckoutTimes = True,
        semconv: str | None = None,
    ) -> None:
        self.checkout_times = checkout_times
        self.semconv = semconv
        self.reader = InMemoryMetricReader()
        self.meter_provider = MeterProvider(metric_readers=[self.reader, *readers])
        self.exporter = InMemorySpanExporter()
        self.tracer_provider = TracerProvider()
        self.tracer_provider.add_span_processor(SimpleSpanProcessor(self.exporter))
        self.tracer = self.tracer_provider.get_tracer("tests")

    def observer(self, config: PoolConfig | None = None) -> TelemetryObserver:
        return TelemetryObserver(
            config, meter_provider=self.meter_provider, tracer_provider=self.tracer_provider,
            checkout_times=self.checkout_times, semconv=self.semconv,
        )

    def pool(self, dsn: str, **options: Any) -> Pool:
        """A pool whose only telemetry goes to this SDK."""
        config = PoolConfig(dsn=dsn, telemetry=False, **options)
        return Pool(config=config, observers=[self.observer(config)])

    def collect(self) -> Collected:
        collected = Collected()
        data = self.reader.get_metrics_data()
        if data is None:
            return collected
        for resource in data.resource_metrics:
            for scope in resource.scope_metrics:
                for metric in scope.metrics:
                    collected.metrics[metric.name] = metric
                    collected.schema_urls[metric.name] = scope.schema_url
        return collected

    def spans(self, name: str | None = None) -> list[ReadableSpan]:
        finished = self.exporter.get_finished_spans()
        return [s for s in finished if name is None or s.name == name]

    def shutdown(self) -> None:
        self.meter_provider.shutdown()
        self.tracer_provider.shutdown()


class FirstPasswordWrong:
    """Gives a wrong password once, then the right one after `refresh` (a rotated secret)."""

    requires_tls = False

    def __init__(self, password: str) -> None:
        self._password = password
        self._rotated = False

    async def password(self, target: Target) -> str:
        return self._password if self._rotated else "not-the-password"

    async def refresh(self, target: Target) -> bool:
        self._rotated = True
        return True

    async def warm(self, target: Target) -> None:
        return None

    async def close(self) -> None:
        return None


@contextlib.asynccontextmanager
async def every_instrument_reported(
    sdk: Sdk, postgres: PostgresServer, name: str
) -> AsyncIterator[Pool]:
    """An open pool after a workload that makes every instrument report: checkouts, a failed
    login, a dead idle connection replaced at checkout, an acquire timeout, a reclaimed leak, and
    description cache misses and hits."""
    pool = sdk.pool(
        postgres.dsn(), name=name, min_size=1, max_size=1, validate_after=0, leak_timeout=0.5,
        credentials=FirstPasswordWrong(postgres.app.password),
        prepared_statements="unnamed",
    )
    async with pool:
        for i in range(3):
            assert await pool.fetchval("SELECT $1::int", i) == i
        pid = await pool.fetchval("SELECT pg_backend_pid()")
        import psycopg

        with psycopg.connect(postgres.admin_dsn, autocommit=True) as admin:
            ended_unread(admin, pid)
        await pool.fetchval("SELECT 1")  # the dead idle connection fails its check
        async with pool.acquire():
            with pytest.raises(asyncpool.PoolTimeoutError):
                await pool.acquire(timeout=0.01)

        async def holds_forever() -> None:
            async with pool.acquire():
                await asyncio.sleep(3600)

        with pytest.raises(asyncpool.ConnectionLeakedError):
            await asyncio.wait_for(holds_forever(), 5)
        yield pool
