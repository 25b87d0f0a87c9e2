"""examples/telemetry/one_trace.py, run as a user would: asyncpool's spans and
opentelemetry-instrumentation-asyncpg's query spans form one trace per request, each query once."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from tests.conftest import Pooler
from tests.script_support import load_script

EXAMPLE = Path(__file__).parent.parent / "examples" / "telemetry" / "one_trace.py"


def example_constants() -> Any:
    return load_script(EXAMPLE, "one_trace_example")  # defines things only: main() runs under __main__


def run_example(dsn: str) -> list[dict[str, Any]]:
    env = {**os.environ, "ASYNCPOOL_DSN": dsn, "OTEL_SEMCONV_STABILITY_OPT_IN": "database"}
    done = subprocess.run(
        [sys.executable, str(EXAMPLE)], env=env, capture_output=True, text=True, timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    return [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]


def test_pool_and_query_spans_form_one_trace_per_request_without_duplicates(
    pooler: Pooler,
) -> None:
    example = example_constants()
    spans = run_example(pooler.dsn())
    by_id = {s["context"]["span_id"]: s for s in spans}
    roots = sorted((s for s in spans if s["parent_id"] is None), key=lambda s: s["start_time"])
    assert [r["name"] for r in roots] == ["GET /orders/{id}"] * len(example.ORDER_IDS)
    assert len(spans) == len(roots) * (1 + len(example.STATEMENTS)) + 2  # + connect, credentials

    for number, root in enumerate(roots):
        trace_id = root["context"]["trace_id"]
        in_trace = [s for s in spans if s["context"]["trace_id"] == trace_id]
        queries = sorted(
            (s for s in in_trace if "db.query.text" in s["attributes"]),
            key=lambda s: s["start_time"],
        )
        # Each statement the request ran appears once, as a CLIENT child of the request.
        assert [q["attributes"]["db.query.text"] for q in queries] == list(example.STATEMENTS)
        for query in queries:
            assert query["kind"] == "SpanKind.CLIENT"
            assert query["parent_id"] == root["context"]["span_id"]
            assert query["attributes"]["db.system.name"] == "postgresql"
        pool_spans = [s for s in in_trace if "db.client.connection.pool.name" in s["attributes"]]
        assert not [s for s in pool_spans if "db.query.text" in s["attributes"]]
        if number == 0:  # min_size=0: the first request opens the connection
            [connect] = [s for s in pool_spans if s["name"].startswith("connect ")]
            assert connect["kind"] == "SpanKind.CLIENT"
            assert connect["parent_id"] == root["context"]["span_id"]
            assert connect["attributes"]["db.system.name"] == "postgresql"
            [credentials] = [s for s in in_trace if s["name"] == "asyncpool.credentials"]
            assert by_id[credentials["parent_id"]] is connect
        else:
            assert not pool_spans
