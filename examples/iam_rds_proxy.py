"""A Lambda handler that logs in to RDS Proxy with IAM auth tokens over verified TLS.

Configure with environment variables (see docs/credentials-and-tls.md):

    ASYNCPOOL_DSN=postgresql://orders_app@orders.proxy-c0ffee123456.us-east-1.rds.amazonaws.com:5432/orders
    ASYNCPOOL_SSL=verify-full
    ASYNCPOOL_SSL_ROOT_CERT=/var/task/certs/amazon-root-cas.pem   # shipped with the function

No password anywhere: each new connection gets a token signed with the function's execution role,
which needs ``rds-db:connect`` on ``arn:aws:rds-db:<region>:<account>:dbuser:prx-<id>/orders_app``;
the proxy needs IAM authentication enabled. The region is read from the proxy's host name.
"""

from __future__ import annotations

import json
from typing import Any

from asyncpool import IamAuth, Pool
from asyncpool.integrations.aws_lambda import close_on_shutdown, lambda_config, running_on_lambda
from asyncpool.integrations.lambda_runner import async_handler, get_runner

# Attached to the runner: each invocation checks the connections a freeze may have cost.
pool = get_runner().attach(
    Pool(config=lambda_config(function_timeout=10, name="orders", credentials=IamAuth())))
close_on_shutdown(pool, get_runner().loop)

if running_on_lambda():
    # INIT phase (boosted CPU, not billed against the first request): import aiobotocore, create
    # the signing client, sign a token and open the first connection now.
    get_runner().run(pool.open())


@async_handler
async def handler(event: dict[str, Any], context: Any) -> dict[str, Any]:
    await pool.open()  # already open on Lambda (INIT above); opens it on a local run
    async with pool.acquire() as conn:
        row = await conn.fetchrow("SELECT current_user AS who, now() AS served_at")
    assert row is not None  # one row, always
    body = {"who": row["who"], "served_at": row["served_at"].isoformat()}
    return {"statusCode": 200, "headers": {"content-type": "application/json"},
            "body": json.dumps(body)}
