"""Testing a FastAPI app that uses asyncpool: the two recipes of docs/serverless.md ("Testing a
FastAPI app"), `with TestClient(app)` and `httpx.AsyncClient(transport=ASGITransport(app))`, and
the errors with advice when a test leaves one event loop for another.
"""

# No `from __future__ import annotations`: FastAPI reads the endpoints' annotations at runtime.

import asyncio
import uuid
import warnings
from collections.abc import AsyncIterator, Iterator
from typing import Annotated

import asyncpg
import httpx
import pytest
from fastapi import Depends, FastAPI

from asyncpool import (
    Pool,
    PoolClosedError,
    PoolConfigError,
    PooledConnection,
    TransactionRolledBackError,
)
from asyncpool.integrations.fastapi import pool_connection, pool_lifespan
from asyncpool.testing import PgBouncerServer
from tests.lambda_env import TEST_LOOP, loop_kind, loops_like_the_tests

with warnings.catch_warnings():
    # Starlette 1.x suggests httpx2 for its TestClient; the TestClient itself is what users run.
    warnings.simplefilter("ignore")
    from fastapi.testclient import TestClient


def build_app(dsn: str) -> tuple[FastAPI, Pool]:
    """The app as a user writes it: a module-level pool, its lifespan, two dependencies."""
    pool = Pool(dsn, max_size=2, telemetry=False)
    app = FastAPI(lifespan=pool_lifespan(pool))
    connection = Annotated[PooledConnection, Depends(pool_connection(pool), scope="function")]
    transaction = Annotated[PooledConnection,
                            Depends(pool_connection(pool, transaction=True), scope="function")]

    @app.get("/double")
    async def double(conn: connection, n: int) -> dict[str, int]:
        return {"n": await conn.fetchval("SELECT $1::int * 2", n)}

    @app.get("/loop")
    async def loop(conn: connection) -> str:
        await conn.execute("SELECT 1")
        return loop_kind()

    @app.post("/sum")
    async def total(conn: transaction, n: int) -> dict[str, int]:
        await conn.execute("CREATE TEMP TABLE t (n int) ON COMMIT DROP")
        await conn.executemany("INSERT INTO t VALUES ($1)", [(i,) for i in range(n + 1)])
        return {"sum": await conn.fetchval("SELECT sum(n)::int FROM t")}

    return app, pool


@pytest.fixture(autouse=True)
async def _client_loop_like_the_tests() -> AsyncIterator[None]:
    """Under ASYNCPOOL_TEST_LOOP=uvloop TestClient's loop is uvloop's too (its portal makes
    its own, through the policy)."""
    with loops_like_the_tests():
        yield


@pytest.fixture
def app_and_pool(legacy: PgBouncerServer) -> Iterator[tuple[FastAPI, Pool]]:
    app, pool = build_app(legacy.dsn())
    yield app, pool
    if not pool.closed:
        pool.terminate()


def test_with_test_client_every_request_shares_one_loop(app_and_pool: tuple[FastAPI, Pool]) -> None:
    app, pool = app_and_pool
    with TestClient(app) as client:  # runs the lifespan: the pool opens on the client's loop
        assert client.get("/double", params={"n": 2}).json() == {"n": 4}
        assert client.get("/double", params={"n": 3}).json() == {"n": 6}
        assert client.post("/sum", params={"n": 4}).json() == {"sum": 10}
        assert pool.stats().created_total == 1  # one connection served every request
    assert pool.closed  # the lifespan closed it with the client


def test_test_client_runs_on_the_loop_the_tests_run_on(app_and_pool: tuple[FastAPI, Pool]) -> None:
    app, _ = app_and_pool
    with TestClient(app) as client:
        assert client.get("/loop").json() == TEST_LOOP


def test_a_second_test_client_on_a_closed_pool_says_what_to_do(
    app_and_pool: tuple[FastAPI, Pool],
) -> None:
    app, _ = app_and_pool
    with TestClient(app) as client:
        assert client.get("/double", params={"n": 1}).status_code == 200
    with pytest.raises(PoolClosedError) as caught, TestClient(app):
        pass
    message = str(caught.value)
    assert "previous `with TestClient(app)` block" in message
    assert "session-scoped fixture" in message
    assert "Mangum outside Lambda" in message
    assert "pool_lifespan(pool, keep_open=True)" in message


def test_a_pool_closed_outside_the_app_is_named_so(app_and_pool: tuple[FastAPI, Pool]) -> None:
    """A test's set-up that used the app's pool and closed it (``async with pool:`` around a
    table set-up, before ``with TestClient(app)``): the lifespan's error says that, not that a
    previous TestClient block closed it (there was none)."""
    app, pool = app_and_pool

    async def set_up() -> None:
        async with pool:
            await pool.execute("SELECT 1")

    asyncio.run(set_up())
    with pytest.raises(PoolClosedError) as caught, TestClient(app):
        pass
    message = str(caught.value)
    assert "closed before this app's lifespan started, by code outside the app" in message
    assert "a pool of its own" in message
    assert "previous" not in message


async def test_httpx_async_client_with_asgi_transport(app_and_pool: tuple[FastAPI, Pool]) -> None:
    app, pool = app_and_pool
    # ASGITransport runs no lifespan: pool_connection opens the pool on first use, on this loop.
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        assert (await client.get("/double", params={"n": 5})).json() == {"n": 10}
        assert (await client.post("/sum", params={"n": 3})).json() == {"sum": 6}
        assert (await client.get("/double", params={"n": 6})).json() == {"n": 12}
    assert pool.stats().created_total == 1
    await pool.close()


def _commit_app(dsn: str, table: str, scope: str | None) -> tuple[FastAPI, Pool]:
    pool = Pool(dsn, max_size=2, telemetry=False)
    app = FastAPI(lifespan=pool_lifespan(pool))
    depends = (Depends(pool_connection(pool, transaction=True)) if scope is None
               else Depends(pool_connection(pool, transaction=True), scope=scope))  # type: ignore[arg-type]
    transaction = Annotated[PooledConnection, depends]

    @app.post("/twice")
    async def twice(conn: transaction) -> dict[str, bool]:
        # Two equal rows under a deferred UNIQUE: each INSERT succeeds, the COMMIT fails.
        await conn.execute(f"INSERT INTO {table} VALUES (1), (1)")
        return {"saved": True}

    @app.get("/count")
    async def count() -> dict[str, int]:
        return {"rows": await pool.fetchval(f"SELECT count(*)::int FROM {table}")}

    return app, pool


@pytest.mark.parametrize("scope", ["function", None])
def test_a_commit_that_fails_is_not_reported_as_success(legacy: PgBouncerServer,
                                                        scope: str | None) -> None:
    """With ``scope="function"`` the dependency commits before the response is sent, so a
    failed COMMIT is the client's 500; with FastAPI's default scope it would commit after the
    response (the client saw 200 and the row was lost), so the dependency refuses to run."""
    table = f"fastapi_commit_{uuid.uuid4().hex[:8]}"
    app, pool = _commit_app(legacy.dsn(), table, scope)
    with TestClient(app, raise_server_exceptions=scope is None) as client:
        portal = client.portal
        assert portal is not None  # the client's loop, where the lifespan opened the pool
        portal.call(pool.execute, f"CREATE TABLE {table} (n int UNIQUE DEFERRABLE INITIALLY DEFERRED)")
        try:
            if scope is None:
                with pytest.raises(PoolConfigError, match=r'scope="function"'):
                    client.post("/twice")
            else:
                response = client.post("/twice")
                assert response.status_code == 500, response.text
            assert client.get("/count").json() == {"rows": 0}
            assert pool.stats().in_use == 0
        finally:
            portal.call(pool.execute, f"DROP TABLE {table}")


def test_an_endpoint_that_swallowed_a_statement_error_does_not_report_its_writes_saved(
        legacy: PgBouncerServer) -> None:
    """An endpoint that catches a unique violation and returns normally leaves a failed
    transaction, which the server rolls back at COMMIT: the client gets a 500 naming
    `TransactionRolledBackError`, not a 200 for a write that was not kept; the same endpoint
    with the statement in a savepoint keeps the first write."""
    table = f"fastapi_swallowed_{uuid.uuid4().hex[:8]}"
    pool = Pool(legacy.dsn(), max_size=2, telemetry=False)
    app = FastAPI(lifespan=pool_lifespan(pool))
    transaction = Annotated[PooledConnection,
                            Depends(pool_connection(pool, transaction=True), scope="function")]

    @app.post("/items")
    async def create(conn: transaction, savepoint: bool = False) -> dict[str, bool]:
        await conn.execute(f"INSERT INTO {table} VALUES (1)")
        try:
            if savepoint:
                async with conn.transaction():
                    await conn.execute(f"INSERT INTO {table} VALUES (1)")
            else:
                await conn.execute(f"INSERT INTO {table} VALUES (1)")
        except asyncpg.UniqueViolationError:
            return {"duplicate": True}
        return {"duplicate": False}

    with TestClient(app) as client:  # the server's exception raised here, as the client's 500
        portal = client.portal
        assert portal is not None
        portal.call(pool.execute, f"CREATE TABLE {table} (n int UNIQUE)")
        try:
            with pytest.raises(TransactionRolledBackError, match="not committed"):
                client.post("/items")
            assert portal.call(pool.fetchval, f"SELECT count(*) FROM {table}") == 0
            response = client.post("/items", params={"savepoint": True})
            assert response.json() == {"duplicate": True}
            assert portal.call(pool.fetchval, f"SELECT count(*) FROM {table}") == 1
            assert pool.stats().in_use == 0
        finally:
            portal.call(pool.execute, f"DROP TABLE {table}")


def test_an_override_keeps_the_scope_check(legacy: PgBouncerServer) -> None:
    """A test that overrides the app's transaction dependency with another one is checked
    against the app's declaration, whose scope FastAPI keeps: refused under the default scope
    in the test as in production."""
    pool = Pool(legacy.dsn(), max_size=1, telemetry=False)
    app = FastAPI(lifespan=pool_lifespan(pool))
    production = pool_connection(pool, transaction=True)

    @app.get("/one")
    async def one(conn: Annotated[PooledConnection, Depends(production)]) -> dict[str, int]:
        return {"v": await conn.fetchval("SELECT 1")}

    app.dependency_overrides[production] = pool_connection(pool, transaction=True)
    with TestClient(app) as client, pytest.raises(PoolConfigError, match=r'scope="function"'):
        client.get("/one")


async def test_a_busy_pool_answers_503_with_the_documented_handler(legacy: PgBouncerServer) -> None:
    """docs/serverless.md's handler: `PoolTimeoutError` (every connection held past
    acquire_timeout) becomes a 503 with Retry-After, not FastAPI's bare 500."""
    from fastapi import Request
    from fastapi.responses import JSONResponse

    from asyncpool import PoolTimeoutError

    pool = Pool(legacy.dsn(), max_size=1, acquire_timeout=0.2, telemetry=False)
    app = FastAPI()
    connection = Annotated[PooledConnection, Depends(pool_connection(pool), scope="function")]

    @app.exception_handler(PoolTimeoutError)
    async def busy(request: Request, exc: PoolTimeoutError) -> JSONResponse:
        return JSONResponse({"detail": "busy, retry"}, status_code=503,
                            headers={"Retry-After": "1"})

    @app.get("/one")
    async def one(conn: connection) -> dict[str, int]:
        return {"n": await conn.fetchval("SELECT 1")}

    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        assert (await client.get("/one")).json() == {"n": 1}  # opens the pool on this loop
        held = await pool.acquire()
        busy_answer = await client.get("/one")
        await pool.release(held)
        assert (busy_answer.status_code, busy_answer.headers["retry-after"]) == (503, "1")
        assert (await client.get("/one")).json() == {"n": 1}
    await pool.close()
