"""Hand the pool-aggregated checkout times to the SDK's output: an exporter wrapper for push
exporters (OTLP), a reader subclass for pull readers (Prometheus).

Needs opentelemetry-sdk, which the application that exports already has; asyncpool itself depends
on the API only, so this module is imported only by applications that use it.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any, TypeVar, cast

from opentelemetry.sdk.metrics import Histogram as HistogramInstrument
from opentelemetry.sdk.metrics.export import (
    AggregationTemporality,
    Histogram,
    HistogramDataPoint,
    Metric,
    MetricExporter,
    MetricExportResult,
    MetricReader,
    MetricsData,
    ResourceMetrics,
    ScopeMetrics,
)
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.util.instrumentation import InstrumentationScope

from asyncpool.telemetry import semconv as sc
from asyncpool.telemetry.checkout_times import AGGREGATED, CHECKOUT_TIMES, CheckoutTimes, Point

SCOPE = "asyncpool"


def export_checkout_times(
    exporter: MetricExporter, times: CheckoutTimes | None = None
) -> CheckoutTimesExporter:
    """Wrap a push exporter so pools aggregate `wait_time` and `use_time` themselves.

    Pools opened after this call stop recording those two histograms through the SDK (about 6 µs
    per record, two per checkout) and aggregate them in the pool (under 0.5 µs); every export
    gets them as histogram points with the same names, unit, buckets and attributes::

        reader = PeriodicExportingMetricReader(export_checkout_times(OTLPMetricExporter()))

    `times` defaults to the registry pools with ``telemetry=True`` use; pass your own along with
    ``TelemetryObserver(checkout_times=times)``. Views do not apply to these two histograms, and
    they carry no exemplars.
    """
    return CheckoutTimesExporter(exporter, CHECKOUT_TIMES if times is None else times)


class _Collection:
    """What a wrapped exporter or reader adds: its consumer's points, in its temporality."""

    def __init__(self, times: CheckoutTimes, temporality: AggregationTemporality) -> None:
        self.times = times
        self.temporality = temporality
        self.consumer = times.subscribe(temporality is AggregationTemporality.CUMULATIVE)
        self.resource: Resource | None = None

    def added_to(self, metrics_data: MetricsData) -> MetricsData:
        if metrics_data.resource_metrics:
            self.resource = metrics_data.resource_metrics[0].resource
        points = self.times.collect(self.consumer)
        return with_points(metrics_data, points, self.temporality, self.resource)

    def close(self) -> MetricsData | None:
        """Stop collecting; what came in since the last collection, if anything."""
        points = self.times.collect(self.consumer, only_fresh=True)
        self.times.unsubscribe(self.consumer)
        if not points:
            return None
        return with_points(MetricsData([]), points, self.temporality, self.resource)


class CheckoutTimesExporter(MetricExporter):
    """`exporter`, with asyncpool's pool-aggregated checkout times added to each batch."""

    def __init__(self, exporter: MetricExporter, times: CheckoutTimes) -> None:
        # The reader reads the preferred temporality and aggregation from its exporter: keep the
        # wrapped exporter's, and aggregate the checkout times with the same temporality.
        preferred: dict[type, AggregationTemporality] = dict(
            getattr(exporter, "_preferred_temporality", None) or {}
        )
        super().__init__(
            preferred_temporality=preferred or None,
            preferred_aggregation=getattr(exporter, "_preferred_aggregation", None),
        )
        self.exporter = exporter
        self._collection = _Collection(
            times, preferred.get(HistogramInstrument, AggregationTemporality.CUMULATIVE)
        )

    def export(
        self, metrics_data: MetricsData, timeout_millis: float = 10_000, **kwargs: Any
    ) -> MetricExportResult:
        return self.exporter.export(
            self._collection.added_to(metrics_data), timeout_millis=timeout_millis, **kwargs
        )

    def force_flush(self, timeout_millis: float = 10_000) -> bool:
        return self.exporter.force_flush(timeout_millis=timeout_millis)

    def shutdown(self, timeout_millis: float = 30_000, **kwargs: Any) -> None:
        # The reader exports only when the SDK has data: the last times of pools closed since
        # the last export would otherwise be lost.
        last = self._collection.close()
        if last is not None:
            self.exporter.export(last, timeout_millis=timeout_millis)
        self.exporter.shutdown(timeout_millis=timeout_millis, **kwargs)


Reader = TypeVar("Reader", bound=MetricReader)
_READER_CLASSES: dict[type[MetricReader], type[MetricReader]] = {}


def reader_with_checkout_times(
    reader_class: type[Reader], *args: Any, times: CheckoutTimes | None = None, **kwargs: Any
) -> Reader:
    """``reader_class(*args, **kwargs)``, its collections carrying the pool-aggregated checkout
    times: for pull readers, which have no exporter to wrap::

        reader = reader_with_checkout_times(PrometheusMetricReader)

    Otherwise as `export_checkout_times`.
    """
    subclass = _READER_CLASSES.get(reader_class)
    if subclass is None:
        subclass = _READER_CLASSES[reader_class] = _collecting_subclass(reader_class)
    reader = subclass(*args, **kwargs)
    reader._collect_checkout_times(CHECKOUT_TIMES if times is None else times)  # type: ignore[attr-defined]
    return cast("Reader", reader)


def _collecting_subclass(reader_class: type[MetricReader]) -> type[MetricReader]:
    # A subclass, because a reader hands what it collects to its own _receive_metrics, the hook
    # the SDK gives reader implementations.
    class WithCheckoutTimes(reader_class):  # type: ignore[valid-type, misc]
        _asyncpool_checkout_times: _Collection

        def _collect_checkout_times(self, times: CheckoutTimes) -> None:
            # The reader keys its temporalities by the SDK's private instrument classes
            # (`_Histogram`, a subclass of the public `Histogram`): a lookup by the public
            # class found nothing, and a delta reader got cumulative checkout times.
            temporality = next(
                (t for cls, t in self._instrument_class_temporality.items()
                 if issubclass(cls, HistogramInstrument)),
                AggregationTemporality.CUMULATIVE,
            )
            self._asyncpool_checkout_times = _Collection(times, temporality)

        def _receive_metrics(
            self, metrics_data: MetricsData, timeout_millis: float = 10_000, **kwargs: Any
        ) -> None:
            super()._receive_metrics(
                self._asyncpool_checkout_times.added_to(metrics_data),
                timeout_millis=timeout_millis, **kwargs,
            )

        def shutdown(self, timeout_millis: float = 30_000, **kwargs: Any) -> None:
            # A pulled reader has nobody left to hand its last times to.
            self._asyncpool_checkout_times.close()
            super().shutdown(timeout_millis=timeout_millis, **kwargs)

    WithCheckoutTimes.__name__ = WithCheckoutTimes.__qualname__ = (
        f"{reader_class.__name__}WithCheckoutTimes"
    )
    return WithCheckoutTimes


def with_points(
    metrics_data: MetricsData,
    points: list[Point],
    temporality: AggregationTemporality,
    resource: Resource | None,
) -> MetricsData:
    """`metrics_data` with `points` added to asyncpool's scope (created if the SDK had none)."""
    if not points:
        return metrics_data
    ours = _metrics(points, temporality)
    resources = list(metrics_data.resource_metrics) or [
        ResourceMetrics(resource or Resource.create(), [], "")
    ]
    at = next((i for i, r in enumerate(resources) if _scope_index(r) is not None), 0)
    target = resources[at]
    scopes = list(target.scope_metrics)
    index = _scope_index(target)
    if index is None:
        from asyncpool import __version__

        scopes.append(ScopeMetrics(InstrumentationScope(SCOPE, __version__), ours, ""))
    else:
        scope = scopes[index]
        scopes[index] = ScopeMetrics(scope.scope, _merged(scope.metrics, ours), scope.schema_url)
    resources[at] = ResourceMetrics(target.resource, scopes, target.schema_url)
    return MetricsData(resources)


def _scope_index(resource: ResourceMetrics) -> int | None:
    return next(
        (i for i, s in enumerate(resource.scope_metrics) if s.scope.name == SCOPE), None
    )


def _metrics(points: list[Point], temporality: AggregationTemporality) -> list[Metric]:
    by_name: dict[str, list[HistogramDataPoint]] = defaultdict(list)
    for p in points:
        by_name[p.metric].append(HistogramDataPoint(
            attributes={sc.POOL_NAME: p.pool_name},
            start_time_unix_nano=p.start_ns,
            time_unix_nano=p.time_ns,
            count=p.count,
            sum=p.sum,
            bucket_counts=p.bucket_counts,
            explicit_bounds=p.bounds,
            min=p.min,
            max=p.max,
        ))
    return [
        Metric(spec.name, spec.description, spec.unit, Histogram(by_name[spec.name], temporality))
        for spec in AGGREGATED if spec.name in by_name
    ]


def _merged(existing: Any, ours: list[Metric]) -> list[Metric]:
    """Ours appended; points joined to a metric of the same name (pools still recording through
    the SDK because they opened before the exporter was wrapped)."""
    merged = list(existing)
    for metric in ours:
        at = next((i for i, m in enumerate(merged) if m.name == metric.name), None)
        if at is None:
            merged.append(metric)
            continue
        same = merged[at]
        if isinstance(same.data, Histogram) and isinstance(metric.data, Histogram):
            data = Histogram(
                [*same.data.data_points, *metric.data.data_points],
                same.data.aggregation_temporality,
            )
            merged[at] = Metric(same.name, same.description, same.unit, data)
        else:
            merged.append(metric)
    return merged
