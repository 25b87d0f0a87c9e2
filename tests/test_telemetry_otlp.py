"""examples/telemetry/otlp_setup.py against a stand-in OTLP/HTTP receiver on 127.0.0.1: the pool's
metrics and spans arrive as OTLP, with their semantic-convention names."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from tests.conftest import Pooler

pytest.importorskip("opentelemetry.exporter.otlp.proto.http")
from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import (
    ExportMetricsServiceRequest,
)
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
)

EXAMPLE = Path(__file__).parent.parent / "examples" / "telemetry" / "otlp_setup.py"


class Receiver(ThreadingHTTPServer):
    """Keeps the body of every POST by path (/v1/metrics, /v1/traces)."""

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.bodies: dict[str, list[bytes]] = {}
        self.lock = threading.Lock()


class _Handler(BaseHTTPRequestHandler):
    server: Receiver

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers["Content-Length"]))
        with self.server.lock:
            self.server.bodies.setdefault(self.path, []).append(body)
        self.send_response(200)
        self.send_header("Content-Type", "application/x-protobuf")
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, format: str, *args: object) -> None:
        return None


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    server = Receiver()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


def test_otlp_example_exports_pool_metrics_and_spans(pooler: Pooler, receiver: Receiver) -> None:
    port = receiver.server_address[1]
    env = {
        **os.environ,
        "ASYNCPOOL_DSN": pooler.dsn(),
        "SECONDS": "0.5",
        "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{port}",
    }
    done = subprocess.run(
        [sys.executable, str(EXAMPLE)], env=env, capture_output=True, text=True, timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr

    metric_names: set[str] = set()
    pools: set[str] = set()
    wait_counts: list[int] = []
    for body in receiver.bodies.get("/v1/metrics", []):
        request = ExportMetricsServiceRequest.FromString(body)
        for resource in request.resource_metrics:
            for scope in resource.scope_metrics:
                if scope.scope.name != "asyncpool":
                    continue
                for metric in scope.metrics:
                    metric_names.add(metric.name)
                    if metric.name == "db.client.connection.wait_time":
                        wait_counts.append(sum(p.count for p in metric.histogram.data_points))
                    for point in (*metric.sum.data_points, *metric.histogram.data_points):
                        for attribute in point.attributes:
                            if attribute.key == "db.client.connection.pool.name":
                                pools.add(attribute.value.string_value)
    assert {
        "db.client.connection.count", "db.client.connection.max",
        "db.client.connection.pending_requests", "db.client.connection.create_time",
        "db.client.connection.wait_time", "db.client.connection.use_time",
    } <= metric_names
    assert pools == {"orders"}
    # The example aggregates checkout times in the pool (export_checkout_times); the flush while
    # the pool is open exports every checkout it made (cumulative, the OTLP default).
    checkouts = int(re.search(r"acquired_total=(\d+)", done.stdout).group(1))  # type: ignore[union-attr]
    assert checkouts >= 10
    assert max(wait_counts) == checkouts

    span_names: set[str] = set()
    for body in receiver.bodies.get("/v1/traces", []):
        request = ExportTraceServiceRequest.FromString(body)
        for resource in request.resource_spans:
            for scope in resource.scope_spans:
                span_names.update(span.name for span in scope.spans)
    assert any(name.startswith("connect ") for name in span_names), span_names
    assert "batch" in span_names
