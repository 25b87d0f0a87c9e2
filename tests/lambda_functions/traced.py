"""A Lambda function for tests/lambda_runtime/test_tracer.py: Powertools' Tracer (X-Ray) stacked with
`pooled_connection`, under ``python -m awslambdaric traced.<handler>``.

``handler`` has the Tracer above asyncpool's decorator, as docs/serverless.md says (below it with
TEST_TRACER_BELOW). The event's ``op`` picks what the invocation does; every response carries the
pool's numbers and the wall-clock times around the query, to compare with the subsegments' times.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import time
from typing import Any

from aws_lambda_powertools import Tracer

from asyncpool import Pool
from asyncpool.integrations.aws_lambda import lambda_config
from asyncpool.integrations.powertools import current_connection, pooled_connection

spans: Any = None
if os.environ.get("TEST_OTEL"):
    # asyncpool's own OpenTelemetry spans beside X-Ray: an SDK provider keeping them in memory.
    from opentelemetry import trace
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    from asyncpool.integrations.lambda_spans import InvocationSpanProcessor

    spans = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(InvocationSpanProcessor())
    provider.add_span_processor(SimpleSpanProcessor(spans))
    trace.set_tracer_provider(provider)

tracer = Tracer(service="traced")
pool = Pool(config=lambda_config(function_timeout=10, name="traced"))


@tracer.capture_method
async def greeting(name: str) -> dict[str, Any]:
    before = time.time()
    text = await current_connection().fetchval("SELECT 'Hello, ' || $1::text", name)
    return {"greeting": text, "query_started": before, "query_done": time.time()}


@tracer.capture_method
async def divide(by: int) -> int:
    value: int = await current_connection().fetchval("SELECT 1 / $1::int", by)
    return value


@tracer.capture_method
async def nap(seconds: float) -> float:
    await asyncio.sleep(seconds)
    return seconds


@tracer.capture_method
async def naps_together(*seconds: float) -> list[float]:
    """The way around X-Ray's limit: trace the function that gathers, not what it gathers."""

    async def untraced(s: float) -> float:
        await asyncio.sleep(s)
        return s

    return list(await asyncio.gather(*(untraced(s) for s in seconds)))


async def serve(event: dict[str, Any], context: Any) -> dict[str, Any]:
    op = event.get("op", "greet")
    result: dict[str, Any] = {"request_id": context.aws_request_id}
    if op == "greet":
        result.update(await greeting("Ada"))
    elif op == "fail":
        await divide(0)  # division_by_zero, raised out of the handler
    elif op == "fail_caught":
        try:
            await divide(0)
        except Exception as exc:  # the handler answers; the subsegment keeps the error
            result["caught"] = type(exc).__name__
        result["after"] = await divide(1)
    elif op == "gather":
        # Two traced coroutines at once, the first to start ending first.
        await asyncio.gather(nap(0.05), nap(0.3))
    elif op == "gather_outside":
        result["naps"] = await naps_together(0.05, 0.3)
    elif op == "nap":
        result["nap"] = await nap(float(event["seconds"]))
    elif op == "spans":
        result["spans"] = [
            {"name": s.name, "attributes": dict(s.attributes or {})} for s in spans.get_finished_spans()
        ]
    elif op != "stats":
        raise ValueError(f"unknown op {op!r}")
    result["pool"] = dataclasses.asdict(pool.stats())
    return result


if os.environ.get("TEST_TRACER_BELOW"):
    # The wrong order: pooled_connection refuses it when the module is imported (INIT).
    @pooled_connection(pool)
    @tracer.capture_lambda_handler
    async def handler(event: dict[str, Any], context: Any) -> dict[str, Any]:
        return await serve(event, context)

else:

    @tracer.capture_lambda_handler
    @pooled_connection(pool)
    async def handler(event: dict[str, Any], context: Any) -> dict[str, Any]:
        return await serve(event, context)
