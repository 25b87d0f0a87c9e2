"""A FastAPI app through Mangum for the runtime tests: an endpoint that runs into the Lambda timeout.

Run by ``python -m awslambdaric mangum_deadline.handler`` with ASYNCPOOL_DSN set. Served through
`LambdaDeadline` (its margin TEST_TIMEOUT_MARGIN seconds, when set) unless TEST_NO_DEADLINE
is set. Every response carries the pool's numbers as they are when the invocation hands its
response to the runtime (``x-pool-*`` headers).
"""

from __future__ import annotations

import os
from typing import Annotated, Any

from fastapi import Depends, FastAPI
from mangum import Mangum

from asyncpool import Pool, PooledConnection
from asyncpool.integrations.aws_lambda import lambda_config
from asyncpool.integrations.fastapi import LambdaDeadline, pool_connection, pool_lifespan

pool = Pool(config=lambda_config(function_timeout=2, name="mangum-deadline"))
app = FastAPI(lifespan=pool_lifespan(pool))
Connection = Annotated[PooledConnection, Depends(pool_connection(pool), scope="function")]
Transaction = Annotated[PooledConnection,
                        Depends(pool_connection(pool, transaction=True), scope="function")]


@app.get("/quick")
async def quick(conn: Connection) -> dict[str, Any]:
    return {"backend_pid": await conn.fetchval("SELECT pg_backend_pid()")}


@app.get("/stall")
async def stall(conn: Transaction, tag: str, table: str) -> dict[str, Any]:
    """A write, then a statement still running on the server when the deadline comes."""
    await conn.execute(f"INSERT INTO {table} VALUES ('written')")
    await conn.execute(f"SELECT pg_sleep(30) /* {tag} */")
    return {"finished": True}


margin = os.environ.get("TEST_TIMEOUT_MARGIN")
deadline = LambdaDeadline(app) if margin is None else LambdaDeadline(app, timeout_margin=float(margin))
served = Mangum(app if os.environ.get("TEST_NO_DEADLINE") else deadline)


def handler(event: dict[str, Any], context: Any) -> dict[str, Any]:
    response: dict[str, Any] = served(event, context)
    stats = pool.stats()
    response.setdefault("headers", {}).update(
        {"x-pool-in-use": str(stats.in_use), "x-pool-created": str(stats.created_total),
         "x-pool-closed": str(stats.closed_total)})
    return response
