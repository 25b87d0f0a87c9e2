"""A Powertools Lambda handler behind API Gateway, serving every invocation from one pooled
connection that stays open while the execution environment is warm.

Configure with ASYNCPOOL_DSN (and any other ASYNCPOOL_* variable); try it with run_powertools_locally.py.
"""

from __future__ import annotations

import json
from typing import Any

from aws_lambda_powertools import Logger, Metrics
from aws_lambda_powertools.metrics import MetricUnit

from asyncpool import Pool
from asyncpool.integrations.aws_lambda import close_on_shutdown, lambda_config
from asyncpool.integrations.lambda_runner import get_runner
from asyncpool.integrations.powertools import current_connection, pooled_connection

logger = Logger(service="greetings")
metrics = Metrics(namespace="asyncpool-example", service="greetings")

# Module level: made once per execution environment, opened by the first invocation.
pool = Pool(config=lambda_config(function_timeout=10, name="greetings"))
close_on_shutdown(pool, get_runner().loop)


@logger.inject_lambda_context
@metrics.log_metrics
@pooled_connection(pool)  # innermost: it turns the async handler into the sync one Lambda calls
async def handler(event: dict[str, Any], context: Any) -> dict[str, Any]:
    name = (event.get("queryStringParameters") or {}).get("name")
    if not name:
        metrics.add_metric(name="MissingName", unit=MetricUnit.Count, value=1)
        return _response(400, {"error": "add ?name=... to the URL"})
    row = await current_connection().fetchrow(
        "SELECT 'Hello, ' || $1::text || '!' AS greeting, now() AS served_at", name
    )
    assert row is not None  # one row, always
    metrics.add_metric(name="Greetings", unit=MetricUnit.Count, value=1)
    logger.info("greeted", extra={"name_length": len(name)})
    return _response(200, {"greeting": row["greeting"], "served_at": row["served_at"].isoformat()})


def _response(status: int, body: dict[str, Any]) -> dict[str, Any]:
    return {
        "statusCode": status,
        "headers": {"content-type": "application/json"},
        "body": json.dumps(body),
    }
