"""The Powertools middleware: one pooled connection per invocation, always given back.

Each test drives a decorated handler many times in one environment (runtime thread + runner)
against the session's PostgreSQL and each PgBouncer.
"""

from __future__ import annotations

import asyncio
import io
import json
import logging
import threading
import uuid
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import pytest
from aws_lambda_powertools import Logger, Metrics
from aws_lambda_powertools.metrics import MetricUnit

from asyncpool import ConnectionLeakedError, Pool, PooledConnection, PoolError
from asyncpool.integrations.aws_lambda import lambda_config
from asyncpool.integrations.invocation import REQUEST_ID_FIELD, LocalContext
from asyncpool.integrations.lambda_runner import HandlerTimeoutError, LambdaRunner
from asyncpool.integrations.powertools import current_connection, pooled_connection
from asyncpool.testing import PostgresServer
from tests.conftest import Pooler
from tests.lambda_env import Environment, app_clients, local_port, scratch_table


class HandlerFailed(Exception):
    pass


class Row(asyncpg.Record):
    pass


@pytest.fixture
async def notes(postgres: PostgresServer) -> AsyncIterator[str]:
    async with scratch_table(postgres.dsn()) as name:
        yield name


async def count_rows(env: Environment, pool: Pool, table: str) -> int:
    async def count() -> int:
        value: int = await pool.fetchval(f"SELECT count(*) FROM {table}")
        return value

    return await env.run(count)


async def test_every_invocation_reuses_the_one_connection(env: Environment, pooler: Pooler) -> None:
    pool = env.pool(pooler.dsn())

    @pooled_connection(pool, runner=env.runner)
    async def handler(event: dict[str, Any], context: Any) -> dict[str, int]:
        conn = current_connection()
        return {"port": local_port(conn), "value": await conn.fetchval("SELECT $1::int", event["n"])}

    ports = set()
    for n in range(20):
        result = await env.invoke(handler, {"n": n})
        assert result["value"] == n
        ports.add(result["port"])
        assert pool.stats().in_use == 0
    assert len(ports) == 1
    stats = pool.stats()
    assert (stats.created_total, stats.acquired_total, stats.closed_total) == (1, 20, 0)
    [port] = ports
    assert [int(row["port"]) for row in await app_clients(pooler)].count(port) == 1


async def test_handler_that_raises_releases_and_rolls_back(
    env: Environment, pooler: Pooler, notes: str
) -> None:
    pool = env.pool(pooler.dsn())

    @pooled_connection(pool, runner=env.runner)
    async def handler(event: dict[str, Any], context: Any) -> str:
        conn = current_connection()
        await conn.execute("BEGIN")
        await conn.execute(f"INSERT INTO {notes} VALUES ($1)", event["body"])
        if event.get("fail"):
            raise HandlerFailed("after the insert")
        await conn.execute("COMMIT")
        return "ok"

    for _ in range(3):
        with pytest.raises(HandlerFailed):
            await env.invoke(handler, {"body": "lost", "fail": True})
        assert pool.stats().in_use == 0
    assert await env.invoke(handler, {"body": "kept"}) == "ok"
    assert await count_rows(env, pool, notes) == 1
    assert pool.stats().created_total == 1


async def test_transaction_option_commits_on_return_and_rolls_back_on_raise(
    env: Environment, pooler: Pooler, notes: str
) -> None:
    pool = env.pool(pooler.dsn())

    @pooled_connection(pool, runner=env.runner, transaction=True)
    async def handler(event: dict[str, Any], context: Any) -> None:
        await current_connection().execute(f"INSERT INTO {notes} VALUES ($1)", event["body"])
        if event.get("fail"):
            raise HandlerFailed

    await env.invoke(handler, {"body": "kept"})
    with pytest.raises(HandlerFailed):
        await env.invoke(handler, {"body": "lost", "fail": True})
    assert await count_rows(env, pool, notes) == 1
    assert pool.stats().in_use == 0


@pytest.mark.parametrize("resolver", ["rest", "http"])
async def test_transaction_option_rolls_back_error_responses(
    env: Environment, pooler: Pooler, notes: str, resolver: str
) -> None:
    """Powertools' event handlers turn raised HTTP errors into responses before the middleware
    sees them: a response of status 400 or more rolls the invocation's work back, as the error
    itself would have; the response goes out unchanged."""
    from aws_lambda_powertools.event_handler import (
        APIGatewayHttpResolver,
        APIGatewayRestResolver,
        Response,
    )
    from aws_lambda_powertools.event_handler.exceptions import BadRequestError, NotFoundError

    pool = env.pool(pooler.dsn())
    app = APIGatewayRestResolver() if resolver == "rest" else APIGatewayHttpResolver()

    async def insert(body: str) -> None:
        await current_connection().execute(f"INSERT INTO {notes} VALUES ($1)", body)

    @app.post("/write")
    async def write() -> dict[str, str]:
        await insert("kept")
        return {"ok": "yes"}

    @app.post("/bad")
    async def bad() -> None:
        await insert("lost to a 400")
        raise BadRequestError("no")

    @app.post("/missing")
    async def missing() -> None:
        await insert("lost to a 404")
        raise NotFoundError("none")

    @app.post("/handled")
    async def handled() -> None:
        await insert("lost to a 422")
        raise ValueError("refused")

    @app.exception_handler(ValueError)  # type: ignore[untyped-decorator]
    def unprocessable(exc: ValueError) -> Response[str]:
        return Response(status_code=422, content_type="text/plain", body=str(exc))

    @pooled_connection(pool, runner=env.runner, transaction=True)
    async def handler(event: dict[str, Any], context: Any) -> dict[str, Any]:
        return await app.resolve_async(event, context)

    statuses = []
    for path in ("/write", "/bad", "/missing", "/handled"):
        event: dict[str, Any]
        if resolver == "rest":
            event = {"path": path, "httpMethod": "POST", "requestContext": {}, "headers": {}}
        else:
            event = {"version": "2.0", "rawPath": path, "headers": {},
                     "requestContext": {"http": {"method": "POST", "path": path},
                                        "stage": "$default"}}
        response = await env.invoke(handler, event)
        statuses.append(response["statusCode"])
    assert statuses == [200, 400, 404, 422]
    assert await count_rows(env, pool, notes) == 1
    assert pool.stats().in_use == 0


async def test_handler_cut_off_at_the_deadline_gives_its_connection_back(
    env: Environment, pooler: Pooler, notes: str
) -> None:
    pool = env.pool(pooler.dsn())

    @pooled_connection(pool, runner=env.runner, transaction=True)
    async def handler(event: dict[str, Any], context: Any) -> None:
        await current_connection().execute(f"INSERT INTO {notes} VALUES ('lost')")
        await asyncio.sleep(30)

    with pytest.raises(HandlerTimeoutError):
        await env.invoke(handler, context=LocalContext(timeout=0.7))
    assert pool.stats().in_use == 0
    assert await count_rows(env, pool, notes) == 0
    assert pool.stats().created_total == 1


async def test_handler_holding_past_leak_timeout_is_reclaimed(
    env: Environment, pooler: Pooler
) -> None:
    pool = env.pool(pooler.dsn(), leak_timeout=0.3)

    @pooled_connection(pool, runner=env.runner)
    async def handler(event: dict[str, Any], context: Any) -> int:
        conn = current_connection()
        if event.get("hang"):
            await asyncio.sleep(30)
        value: int = await conn.fetchval("SELECT 1")
        return value

    with pytest.raises(ConnectionLeakedError):
        await env.invoke(handler, {"hang": True})
    assert await env.invoke(handler) == 1
    stats = pool.stats()
    assert (stats.leaked_total, stats.in_use, stats.created_total) == (1, 0, 2)


async def test_a_kept_reference_is_dead_after_the_invocation(env: Environment, pooler: Pooler) -> None:
    pool = env.pool(pooler.dsn())
    kept: list[PooledConnection] = []

    @pooled_connection(pool, runner=env.runner)
    async def handler(event: dict[str, Any], context: Any) -> int:
        if kept:
            await kept[0].fetchval("SELECT 1")  # the previous invocation's connection
        kept.append(current_connection())
        value: int = await current_connection().fetchval("SELECT 2")
        return value

    assert await env.invoke(handler) == 2
    with pytest.raises(PoolError, match="released back to the pool"):
        await env.invoke(handler)
    assert pool.stats().in_use == 0
    assert pool.stats().created_total == 1


async def test_extra_connection_left_checked_out_is_reported_then_closed(
    env: Environment, pooler: Pooler, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="asyncpool")
    pool = env.pool(pooler.dsn(), max_size=2, leak_timeout=0.3)

    @pooled_connection(pool, runner=env.runner)
    async def handler(event: dict[str, Any], context: Any) -> None:
        if event.get("leak"):
            await pool.acquire()

    leaking = LocalContext()
    await env.invoke(handler, {"leak": True}, leaking)
    [report] = [r for r in caplog.records if r.name == "asyncpool.integrations.powertools"]
    assert "1 connection(s) still checked out" in report.getMessage()
    assert "not released, is closed" in report.getMessage()
    assert getattr(report, REQUEST_ID_FIELD) == leaking.aws_request_id
    # Closed as the invocation ended, where it was acquired said (not left to leak_timeout).
    [closed] = [r for r in caplog.records if "was not released" in r.getMessage()]
    assert getattr(closed, REQUEST_ID_FIELD) == leaking.aws_request_id
    stats = pool.stats()
    assert (stats.leaked_total, stats.in_use, stats.closed_total) == (0, 0, 1)
    await env.invoke(handler)
    assert pool.stats().in_use == 0


async def test_stacks_under_powertools_logger_and_metrics(
    env: Environment, pooler: Pooler, capsys: pytest.CaptureFixture[str]
) -> None:
    pool = env.pool(pooler.dsn())
    service = f"svc-{uuid.uuid4().hex[:8]}"
    log_stream = io.StringIO()
    logger = Logger(service=service, stream=log_stream)
    metrics = Metrics(namespace="asyncpool-tests", service=service)

    @logger.inject_lambda_context
    @metrics.log_metrics
    @pooled_connection(pool, runner=env.runner)
    async def handler(event: dict[str, Any], context: Any) -> int:
        value: int = await current_connection().fetchval("SELECT 40 + 2")
        metrics.add_metric(name="Answers", unit=MetricUnit.Count, value=1)
        logger.info("answered")
        return value

    contexts = [LocalContext(function_name=service) for _ in range(3)]
    for context in contexts:
        assert await env.invoke(handler, context=context) == 42
    assert pool.stats().in_use == 0
    assert pool.stats().created_total == 1

    logs = [json.loads(line) for line in log_stream.getvalue().splitlines()]
    answered = [entry for entry in logs if entry["message"] == "answered"]
    assert [e["function_request_id"] for e in answered] == [c.aws_request_id for c in contexts]
    emf = [json.loads(line) for line in capsys.readouterr().out.splitlines() if '"_aws"' in line]
    assert [doc["Answers"] for doc in emf] == [[1.0]] * 3


async def test_current_connection_of_the_decorators_pool_is_the_invocations(
        env: Environment, postgres: PostgresServer) -> None:
    """``current_connection(pool)`` (typed by the pool's rows) is the invocation's connection
    when `pool` is the decorator's; another pool's is a PoolError naming both, not a
    connection of the wrong pool (or rows)."""
    pool = env.pool(postgres.dsn(), name="served", record_class=Row)
    other = env.pool(postgres.dsn(), name="other")

    @pooled_connection(pool, runner=env.runner)
    async def handler(event: dict[str, Any], context: Any) -> tuple[bool, str, str]:
        conn = current_connection(pool)
        row = await conn.fetchrow("SELECT 1 AS n")
        try:
            current_connection(other)
        except PoolError as exc:
            refused = str(exc)
        else:
            refused = "not refused"
        return conn is current_connection(), type(row).__name__, refused

    assert await env.invoke(handler) == (True, "Row", (
        "current_connection(pool): pool 'other' is not the one this handler is decorated with "
        "(@pooled_connection of pool 'served'), whose connection the invocation holds"))
    assert pool.stats().in_use == 0


def test_current_connection_outside_a_decorated_handler_says_how_to_get_one() -> None:
    with pytest.raises(PoolError, match=r"@pooled_connection\(pool\)"):
        current_connection()


def test_tracer_and_metrics_below_the_middleware_are_refused_when_decorating() -> None:
    """Below `pooled_connection` they would wrap the creation of the coroutine: Tracer's
    subsegment would end before the handler ran, Metrics would flush an invocation's metrics
    with the next one. Logger's decorator (which acts before the call) and any decorator of a
    synchronous handler keep working there. tests/lambda_runtime/test_tracer.py runs X-Ray."""
    from aws_lambda_powertools import Tracer

    pool = Pool(config=lambda_config(environ={}, dsn="postgresql://app@127.0.0.1:1/app"))
    runner = LambdaRunner()
    tracer = Tracer(service="refused", disabled=True, auto_patch=False)
    metrics = Metrics(namespace="asyncpool-tests", service="refused")
    logger = Logger(service="refused")

    async def handler(event: Any, context: Any) -> int:
        return 1

    def sync_handler(event: Any, context: Any) -> int:
        return 1

    decorate = pooled_connection(pool, runner=runner)
    try:
        with pytest.raises(TypeError, match=r"^Tracer\.capture_lambda_handler is below @pooled_connection"):
            decorate(tracer.capture_lambda_handler(handler))
        with pytest.raises(TypeError, match=r"^BaseProvider\.log_metrics is below @pooled_connection"):
            decorate(metrics.log_metrics(handler))
        # Under another decorator that is itself below: still found.
        with pytest.raises(TypeError, match="directly on the async def"):
            decorate(logger.inject_lambda_context(tracer.capture_lambda_handler(handler)))
        decorate(logger.inject_lambda_context(handler))
        decorate(tracer.capture_lambda_handler(sync_handler))
        decorate(handler)
    finally:
        runner.close()


def test_a_handler_whose_wrapped_chain_loops_is_decorated() -> None:
    """The order check follows ``__wrapped__`` down to the async def: a chain that leads back
    to itself (a proxy that names itself as what it wraps) hung the import forever."""
    pool = Pool(config=lambda_config(environ={}, dsn="postgresql://app@127.0.0.1:1/app"))
    runner = LambdaRunner()

    def handler(event: Any, context: Any) -> int:
        return 1

    def outer(event: Any, context: Any) -> int:
        return handler(event, context)

    handler.__wrapped__ = outer  # type: ignore[attr-defined]
    outer.__wrapped__ = handler  # type: ignore[attr-defined]
    result: list[object] = []
    try:
        worker = threading.Thread(
            target=lambda: result.append(pooled_connection(pool, runner=runner)(outer)),
            daemon=True)
        worker.start()
        worker.join(5)
        assert result, "decorating did not return"
    finally:
        runner.close()
