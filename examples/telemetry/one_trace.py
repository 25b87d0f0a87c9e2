"""asyncpool + opentelemetry-instrumentation-asyncpg: one trace per request, no duplicate spans.

asyncpool makes the pool's spans (opening a connection, with the credential fetch as a child);
the asyncpg instrumentation makes one span per query. Both land under the request's span:

    GET /orders/{id}                 SERVER   (the web framework's span; made by hand here)
    ├── connect app                  CLIENT   asyncpool, first request only
    │   └── asyncpool.credentials    INTERNAL
    ├── SELECT                       CLIENT   opentelemetry-instrumentation-asyncpg
    ├── BEGIN;  SELECT  COMMIT;      CLIENT   opentelemetry-instrumentation-asyncpg
    └── SELECT                       CLIENT   opentelemetry-instrumentation-asyncpg

    pip install asyncpool-pg opentelemetry-sdk opentelemetry-instrumentation-asyncpg
    ASYNCPOOL_DSN=postgresql://app:secret@127.0.0.1:6432/app python examples/telemetry/one_trace.py

Spans are printed as JSON lines on stdout (swap ConsoleSpanExporter for an OTLP exporter in
production, see otlp_setup.py) and as a tree on stderr. Set OTEL_SEMCONV_STABILITY_OPT_IN=database
so the instrumentation uses the same attribute names as asyncpool (db.system.name, db.namespace).
"""

from __future__ import annotations

import asyncio
import os
import sys
from collections.abc import Sequence

from opentelemetry import trace
from opentelemetry.instrumentation.asyncpg import AsyncPGInstrumentor
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import (
    ConsoleSpanExporter,
    SimpleSpanProcessor,
    SpanExporter,
    SpanExportResult,
)
from opentelemetry.trace import SpanKind

import asyncpool

ORDER_IDS = (7, 8)
#: The statements one request runs, in order (BEGIN/COMMIT come from pool.transaction()).
STATEMENTS = (
    "SELECT $1::int AS id, now() AS fetched_at",
    "BEGIN;",
    "SELECT $1::int * 2",
    "COMMIT;",
    "SELECT $1::int + 1",
)


async def get_order(pool: asyncpool.Pool, tracer: trace.Tracer, order_id: int) -> None:
    """What a request handler does: a few queries on pooled connections."""
    with tracer.start_as_current_span("GET /orders/{id}", kind=SpanKind.SERVER) as span:
        span.set_attribute("http.route", "/orders/{id}")
        async with pool.acquire() as conn:
            await conn.fetchrow("SELECT $1::int AS id, now() AS fetched_at", order_id)
        async with pool.transaction() as conn:
            await conn.fetchval("SELECT $1::int * 2", order_id)
        await pool.fetchval("SELECT $1::int + 1", order_id)


class TreePrinter(SpanExporter):
    """Collects spans and prints each trace as an indented tree when shut down."""

    def __init__(self) -> None:
        self.spans: list[ReadableSpan] = []

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        self.spans.extend(spans)
        return SpanExportResult.SUCCESS

    def shutdown(self) -> None:
        children: dict[int | None, list[ReadableSpan]] = {}
        for span in sorted(self.spans, key=lambda s: s.start_time or 0):
            children.setdefault(span.parent.span_id if span.parent else None, []).append(span)

        def show(span: ReadableSpan, depth: int) -> None:
            kind = span.kind.name
            print(f"{'    ' * depth}{span.name}  [{kind}]", file=sys.stderr)
            for child in children.get(span.context.span_id if span.context else None, []):
                show(child, depth + 1)

        for root in children.get(None, []):
            trace_id = root.context.trace_id if root.context else 0
            print(f"trace {trace_id:032x}", file=sys.stderr)
            show(root, 1)


async def main(dsn: str) -> None:
    provider = TracerProvider(resource=Resource.create({"service.name": "orders-api"}))
    provider.add_span_processor(SimpleSpanProcessor(
        ConsoleSpanExporter(formatter=lambda span: span.to_json(indent=None) + os.linesep)
    ))
    provider.add_span_processor(SimpleSpanProcessor(TreePrinter()))
    trace.set_tracer_provider(provider)
    AsyncPGInstrumentor().instrument()  # type: ignore[no-untyped-call]  # the query spans
    tracer = trace.get_tracer("orders-api")
    try:
        # telemetry=True (the default): the pool reports through the global providers set above.
        # min_size=0 so the first request opens the connection and its trace shows that.
        async with asyncpool.Pool(dsn, name="orders", min_size=0, max_size=2) as pool:
            for order_id in ORDER_IDS:
                await get_order(pool, tracer, order_id)
    finally:
        AsyncPGInstrumentor().uninstrument()  # type: ignore[no-untyped-call]
        provider.shutdown()


if __name__ == "__main__":
    asyncio.run(main(os.environ["ASYNCPOOL_DSN"]))
