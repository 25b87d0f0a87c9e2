"""Powertools' event handler with async routes (``resolve_async``, Powertools 3.37+) on the
runner's persistent loop, every route using the invocation's pooled connection.

Powertools' own example runs ``asyncio.run(app.resolve_async(event, context))`` per invocation,
which closes the loop, and with it a module-level pool's connections, every time. Here
`pooled_connection` runs each invocation on `get_runner()`'s loop (one for the environment's
life), opens the pool on the first invocation, hands the routes one connection
(`current_connection()`) and returns it afterwards, whatever the route does.

Handler setting: ``resolver_handler.handler``; configure with ASYNCPOOL_DSN.
"""

from __future__ import annotations

from typing import Any

from aws_lambda_powertools import Logger
from aws_lambda_powertools.event_handler import APIGatewayRestResolver

from asyncpool import Pool
from asyncpool.integrations.aws_lambda import close_on_shutdown, lambda_config
from asyncpool.integrations.lambda_runner import get_runner
from asyncpool.integrations.powertools import current_connection, pooled_connection

logger = Logger(service="greetings-resolver")
app = APIGatewayRestResolver()

# Module level (INIT): one pool per execution environment, opened by the first invocation.
pool = Pool(config=lambda_config(function_timeout=10, name="greetings-resolver"))
close_on_shutdown(pool, get_runner().loop)


@app.get("/hello")
async def hello() -> dict[str, Any]:
    name = app.current_event.get_query_string_value("name", "world")
    row = await current_connection().fetchrow(
        "SELECT 'Hello, ' || $1::text || '!' AS greeting, pg_backend_pid() AS backend", name
    )
    assert row is not None  # one row, always
    return {"greeting": row["greeting"]}


@logger.inject_lambda_context
@pooled_connection(pool)  # innermost: runs the invocation on the runner's loop
async def handler(event: dict[str, Any], context: Any) -> dict[str, Any]:
    return await app.resolve_async(event, context)
