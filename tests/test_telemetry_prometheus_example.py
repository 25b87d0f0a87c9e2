"""examples/telemetry/prometheus_setup.py, scraped while it runs against the real servers: its
endpoint serves the pool's metrics, with the checkout times the pool aggregates itself."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from asyncpool.testing.ports import free_port
from tests.conftest import Pooler

pytest.importorskip("opentelemetry.exporter.prometheus")
from prometheus_client.parser import text_string_to_metric_families

EXAMPLE = Path(__file__).parent.parent / "examples" / "telemetry" / "prometheus_setup.py"


def scrape(port: int) -> dict[str, float]:
    """Sample values of pool "orders" by sample name ({} while the endpoint is not up)."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2) as response:
            text = response.read().decode()
    except OSError:
        return {}
    return {
        sample.name: sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.labels.get("db_client_connection_pool_name") == "orders"
        and "le" not in sample.labels
    }


def test_prometheus_example_serves_pool_metrics_with_aggregated_checkout_times(
    pooler: Pooler,
) -> None:
    port = free_port()
    env = {**os.environ, "ASYNCPOOL_DSN": pooler.dsn(), "SECONDS": "20",
           "METRICS_PORT": str(port)}
    example = subprocess.Popen([sys.executable, str(EXAMPLE)], env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 15
        seen: dict[str, float] = {}
        while time.monotonic() < deadline and example.poll() is None:
            seen = scrape(port)
            if seen.get("db_client_connection_wait_time_seconds_count", 0) >= 40:
                break
            time.sleep(0.2)
    finally:
        example.terminate()
        _, stderr = example.communicate(timeout=10)
    assert seen.get("db_client_connection_wait_time_seconds_count", 0) >= 40, (seen, stderr)
    assert seen["db_client_connection_use_time_seconds_count"] >= 20
    assert seen["db_client_connection_max"] == 5
    # 20 callers on 5 connections: most wait for a connection, for one or more 20 ms queries.
    assert seen["db_client_connection_wait_time_seconds_sum"] > 0.02
