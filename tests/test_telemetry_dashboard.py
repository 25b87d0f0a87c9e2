"""The Grafana dashboard charts only what the pool emits, and charts all of it.

The pool's metrics go through OpenTelemetry's Prometheus exporter (the names an OpenTelemetry
Collector's Prometheus exporter gives too); every metric and label the dashboard's PromQL names must
be among the series scraped, and every metric family the pool emits must be on some panel.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from opentelemetry.exporter.prometheus import PrometheusMetricReader
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from asyncpool.telemetry import CheckoutTimes, reader_with_checkout_times
from asyncpool.testing import PostgresServer
from tests.telemetry_support import Sdk, every_instrument_reported

DASHBOARD = Path(__file__).parent.parent / "examples" / "telemetry" / "grafana-dashboard.json"

_SELECTOR = re.compile(r"\{([^{}]*)\}")
_GROUPING = re.compile(r"\b(?:by|without|on|ignoring)\s*\(([^)]*)\)")
_MATCHER = re.compile(r"([A-Za-z_]\w*)\s*(?:=~|!~|!=|=)")
_IDENTIFIER = re.compile(r"[A-Za-z_:][\w:]*")
_LABEL_VALUES = re.compile(r"label_values\(\s*([\w:]+)\s*,\s*(\w+)\s*\)")
_LEGEND_LABEL = re.compile(r"\{\{\s*(\w+)\s*\}\}")
_KEYWORDS = {"and", "or", "unless", "bool", "offset"}


def promql_references(expr: str) -> tuple[set[str], set[str]]:
    """(metric names, label names) an expression uses."""
    labels: set[str] = set()
    for body in _SELECTOR.findall(expr):
        labels.update(_MATCHER.findall(body))
    for body in _GROUPING.findall(expr):
        labels.update(part.strip() for part in body.split(",") if part.strip())
    rest = _GROUPING.sub(" ", _SELECTOR.sub(" ", re.sub(r'"[^"]*"', " ", expr)))
    rest = re.sub(r"\[[^\]]*\]", " ", rest)
    metrics = set()
    for match in _IDENTIFIER.finditer(rest):
        followed_by = rest[match.end():].lstrip()[:1]
        if followed_by != "(" and match.group() not in _KEYWORDS:  # not a function call
            metrics.add(match.group())
    return metrics, labels


def dashboard_queries(dashboard: dict[str, Any]) -> Iterator[tuple[str, str, str]]:
    """(panel title, PromQL, legend format) for every target, and the templating queries."""
    for panel in dashboard["panels"]:
        for target in panel.get("targets", []):
            yield panel["title"], target["expr"], target.get("legendFormat", "")
    for variable in dashboard["templating"]["list"]:
        if variable["type"] == "query":
            found = _LABEL_VALUES.fullmatch(variable["definition"])
            assert found is not None, variable["definition"]
            metric, label = found.groups()
            yield f"${variable['name']}", f"{metric}{{{label}!=\"\"}}", ""


@pytest.fixture(scope="module")
def dashboard() -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return loaded


@pytest.fixture(params=["through-sdk", "aggregated-in-pool"])
async def scraped(
    postgres: PostgresServer, request: pytest.FixtureRequest
) -> tuple[set[str], set[str], set[str]]:
    """(sample names, label names, metric family names) scraped after every instrument reported,
    with the checkout times recorded through the SDK, and aggregated in the pool."""
    registry = CollectorRegistry()
    if request.param == "through-sdk":
        sdk = Sdk(readers=[PrometheusMetricReader(registry=registry)])
    else:
        times = CheckoutTimes()
        reader = reader_with_checkout_times(PrometheusMetricReader, registry=registry, times=times)
        sdk = Sdk(readers=[reader], checkout_times=times)
    try:
        async with every_instrument_reported(sdk, postgres, "dashboard"):
            text = generate_latest(registry).decode()
    finally:
        sdk.shutdown()
    samples: set[str] = set()
    labels: set[str] = set()
    families: set[str] = set()
    for family in text_string_to_metric_families(text):
        if family.name == "target_info":
            continue
        families.add(family.name)
        for sample in family.samples:
            samples.add(sample.name)
            labels.update(sample.labels)
    return samples, labels, families


def test_promql_references_reads_names_and_labels() -> None:
    metrics, labels = promql_references(
        'histogram_quantile(0.99, sum by (le, pool) (rate(wait_seconds_bucket{pool=~"$pool", '
        'state="used"}[$__rate_interval]))) / on (pool) max_total'
    )
    assert metrics == {"wait_seconds_bucket", "max_total"}
    assert labels == {"le", "pool", "state"}


def test_every_dashboard_query_names_metrics_and_labels_the_pool_emits(
    dashboard: dict[str, Any], scraped: tuple[set[str], set[str], set[str]]
) -> None:
    samples, labels, _ = scraped
    queries = list(dashboard_queries(dashboard))
    assert len(queries) >= 12
    for title, expr, legend in queries:
        metrics, used_labels = promql_references(expr)
        assert metrics, f"{title}: no metric in {expr!r}"
        assert metrics <= samples, f"{title}: {sorted(metrics - samples)} not emitted"
        used_labels.update(_LEGEND_LABEL.findall(legend))
        assert used_labels <= labels | {"le"}, f"{title}: {sorted(used_labels - labels)} unknown"


def test_every_metric_the_pool_emits_is_charted(
    dashboard: dict[str, Any], scraped: tuple[set[str], set[str], set[str]]
) -> None:
    _, _, families = scraped
    charted = set()
    for _, expr, _ in dashboard_queries(dashboard):
        charted.update(promql_references(expr)[0])
    assert len(families) == 15
    for family in families:
        assert any(name.startswith(family) for name in charted), f"{family} is on no panel"


def test_panels_use_the_dashboards_datasource_variable(dashboard: dict[str, Any]) -> None:
    panels = [p for p in dashboard["panels"] if p["type"] != "row"]
    assert len({p["id"] for p in dashboard["panels"]}) == len(dashboard["panels"])
    for panel in panels:
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, panel["title"]
        assert panel["targets"], panel["title"]
