"""A FastAPI app on Lambda through Mangum, with one pool per execution environment.

Configure with ASYNCPOOL_DSN (and any other ASYNCPOOL_* variable); try it with run_mangum_locally.py,
or serve it with uvicorn (``pip install uvicorn``, then ``uvicorn mangum_app:app``), where the pool
closes with the server. No database at hand? ``asyncpool local-pgbouncer`` runs PostgreSQL and
PgBouncer until Ctrl-C and writes ASYNCPOOL_DSN to ``.env.asyncpool``; load it in the shell that
runs uvicorn with ``set -a; . ./.env.asyncpool; set +a`` (docs/cli.md).
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import Depends, FastAPI, HTTPException
from mangum import Mangum

from asyncpool import Pool, PooledConnection
from asyncpool.integrations.aws_lambda import lambda_config
from asyncpool.integrations.fastapi import LambdaDeadline, pool_connection, pool_lifespan

pool = Pool(config=lambda_config(function_timeout=10, name="greetings-api"))

# On Lambda the pool outlives Mangum's per-invocation lifespan and closes on SIGTERM.
app = FastAPI(lifespan=pool_lifespan(pool))
Connection = Annotated[PooledConnection, Depends(pool_connection(pool), scope="function")]
Transaction = Annotated[PooledConnection,
                        Depends(pool_connection(pool, transaction=True), scope="function")]


@app.get("/hello")
async def hello(conn: Connection, name: str = "world") -> dict[str, Any]:
    row = await conn.fetchrow(
        "SELECT 'Hello, ' || $1::text || '!' AS greeting, now() AS served_at", name
    )
    assert row is not None  # one row, always
    return {"greeting": row["greeting"], "served_at": row["served_at"].isoformat()}


@app.get("/divide")
async def divide(conn: Transaction, a: int, b: int) -> dict[str, Any]:
    if b == 0:
        raise HTTPException(status_code=400, detail="b must not be 0")
    return {"quotient": await conn.fetchval("SELECT $1::numeric / $2", a, b)}


# Each request ends 0.5 s before the Lambda timeout with a 504, its connection back in the pool.
handler = Mangum(LambdaDeadline(app))
