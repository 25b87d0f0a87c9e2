"""A web service's clients that go away: FastAPI requests driven as uvicorn drives them (ASGI
spec 2.3: a client that leaves is an ``http.disconnect``, and Starlette cancels a streaming
response at every await until it ends), through real PgBouncers and PostgreSQL."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, AsyncIterator
from contextlib import aclosing
from typing import Annotated, Any

import asyncpg
import pytest

pytest.importorskip("fastapi")
pytest.importorskip("sqlalchemy")

import sqlalchemy as sa
from fastapi import Depends, FastAPI, Request
from fastapi.responses import StreamingResponse
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from asyncpool import Pool, PooledConnection
from asyncpool.config import PreparedStatements
from asyncpool.integrations.fastapi import pool_connection
from asyncpool.integrations.sqlalchemy import create_async_engine
from asyncpool.testing import PostgresServer, ServerStack
from tests.cancel_support import cancelled_once_running

TABLE = "web_clients_leaving"

#: (server, statement mode): direct in the default mode, PgBouncer 1.18 "off", 1.24 "on".
TARGETS: list[tuple[str, PreparedStatements]] = [
    ("postgres", "unnamed"), ("legacy", "off"), ("current", "on")]


@pytest.fixture(params=TARGETS, ids=[f"{t}-{m}" for t, m in TARGETS])
async def pool(request: pytest.FixtureRequest, stack: ServerStack) -> AsyncIterator[Pool]:
    which, mode = request.param
    setup = await asyncpg.connect(stack.postgres.dsn())
    try:
        await setup.execute(f"CREATE TABLE IF NOT EXISTS {TABLE} (id int PRIMARY KEY, n int)")
        await setup.execute(f"INSERT INTO {TABLE} VALUES (1, 0) ON CONFLICT DO NOTHING")
    finally:
        await setup.close()
    server = getattr(stack, which)
    async with Pool(server.dsn(), name=f"leaving-{which}-{mode}", prepared_statements=mode,
                    min_size=1, max_size=3, acquire_timeout=10, telemetry=False) as p:
        yield p


async def stream_then_leave(app: Any, path: str, *, after_chunks: int = 1) -> list[bytes]:
    """GET `path` as uvicorn serves it (ASGI spec 2.3), the client leaving once `after_chunks`
    body chunks arrived: its ``receive()`` then answers ``http.disconnect``."""
    chunks: list[bytes] = []
    left = asyncio.Event()
    requested = False

    async def receive() -> dict[str, Any]:
        nonlocal requested
        if not requested:
            requested = True
            return {"type": "http.request", "body": b"", "more_body": False}
        await left.wait()
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        # (after the disconnect uvicorn drops what is sent, without an error)
        if message["type"] == "http.response.body" and message.get("body"):
            chunks.append(message["body"])
            if len(chunks) >= after_chunks:
                left.set()

    scope = {
        "type": "http", "asgi": {"version": "3.0", "spec_version": "2.3"}, "http_version": "1.1",
        "method": "GET", "scheme": "http", "path": path, "raw_path": path.encode(),
        "query_string": b"", "root_path": "", "headers": [(b"host", b"test")],
        "client": ("127.0.0.1", 50000), "server": ("127.0.0.1", 80),
    }
    async with asyncio.timeout(30):
        await app(scope, receive, send)
    return chunks


async def returned(pool: Pool, within: float = 10.0) -> None:
    """Wait until every checkout of `pool` is back (resets done)."""
    async with asyncio.timeout(within):
        while pool.stats().in_use or pool.stats().pending:
            await asyncio.sleep(0.02)


async def server_left_alone(postgres: PostgresServer, within: float = 10.0) -> None:
    """No session of the app's role is in a transaction, running a statement or holding a lock
    on the table (PgBouncer's server connections included)."""
    admin = await asyncpg.connect(postgres.dsn(postgres.superuser))  # (the table's database)
    try:
        async with asyncio.timeout(within):
            while True:
                busy = await admin.fetch(
                    "SELECT pid, state, query FROM pg_stat_activity WHERE usename = 'app' "
                    "AND (state LIKE 'idle in transaction%' OR state = 'active')")
                locks = await admin.fetch(
                    "SELECT pid, mode FROM pg_locks WHERE relation = $1::regclass", TABLE)
                if not busy and not locks:
                    return
                await asyncio.sleep(0.05)
    except TimeoutError:
        raise AssertionError(f"left on the server: {busy} locks {locks}") from None
    finally:
        await admin.close()


async def _locked_rows(session: AsyncSession) -> AsyncGenerator[bytes, None]:
    """A slow stream of 1,000 rows in a transaction of `session` holding a row lock."""
    async with session.begin():
        await session.execute(sa.text(f"SELECT n FROM {TABLE} WHERE id = 1 FOR UPDATE"))
        result = await session.stream(sa.text(
            "SELECT g, pg_sleep(0.01) FROM generate_series(1, 1000) g"))
        async for row in result:
            yield f"{row[0]}\n".encode()


def orm_stream_app(pool: Pool) -> FastAPI:
    Session = async_sessionmaker(create_async_engine(pool), expire_on_commit=False)
    app = FastAPI()

    @app.get("/rows")
    async def rows() -> StreamingResponse:
        async def body() -> AsyncIterator[bytes]:
            async with Session() as session, aclosing(_locked_rows(session)) as lines:
                async for line in lines:
                    yield line

        return StreamingResponse(body(), media_type="text/plain")

    return app


async def test_an_orm_stream_whose_client_left_keeps_its_connection(
        pool: Pool, stack: ServerStack) -> None:
    """SQLAlchemy invalidates a connection whose statement a cancellation cut short; the pool
    takes it back as it does a cancelled ``async with`` block's (the statement cancelled on the
    server, the transaction and its locks rolled back) instead of closing it: a client leaving
    a streamed ORM response costs no login."""
    app = orm_stream_app(pool)
    for _ in range(3):
        before = pool.stats()
        chunks = await stream_then_leave(app, "/rows")
        assert 0 < len(b"".join(chunks).split()) < 1000  # left part-way
        await returned(pool)
        await server_left_alone(stack.postgres)
        after = pool.stats()
        assert (after.closed_total, after.created_total) == (before.closed_total,
                                                             before.created_total)
    assert await pool.fetchval(f"SELECT n FROM {TABLE} WHERE id = 1") is not None


async def test_an_orm_flush_cancelled_mid_statement_keeps_its_connection(
        pool: Pool, stack: ServerStack) -> None:
    """A session cancelled in its flush (uvicorn's graceful shutdown past its timeout cancels the
    request's task): nothing is written, nothing runs on, and the connection serves again."""
    Session = async_sessionmaker(create_async_engine(pool), expire_on_commit=False)
    started = asyncio.Event()

    async def write() -> None:
        async with Session() as session, session.begin():
            await session.execute(sa.text(f"UPDATE {TABLE} SET n = -1 WHERE id = 1"))
            started.set()
            await session.execute(sa.text("SELECT pg_sleep(5)"))

    before = pool.stats()
    await cancelled_once_running(write, started, after=0.2)
    await returned(pool)
    await server_left_alone(stack.postgres, within=4)  # pg_sleep(5) cancelled, not run out
    after = pool.stats()
    assert after.closed_total == before.closed_total
    assert await pool.fetchval(f"SELECT n FROM {TABLE} WHERE id = 1") != -1


def middleware_stream_app(pool: Pool, source: str) -> FastAPI:
    """A stream under a ``@app.middleware("http")`` (Starlette's BaseHTTPMiddleware), over the
    request's connection (`pool_connection`) or SQLAlchemy session, of FastAPI's default scope
    (as docs/serverless.md says)."""
    app = FastAPI()
    Conn = Annotated[PooledConnection, Depends(pool_connection(pool))]
    Session = async_sessionmaker(create_async_engine(pool), expire_on_commit=False)

    async def request_session() -> AsyncIterator[AsyncSession]:
        async with Session() as session:
            yield session

    SessionDep = Annotated[AsyncSession, Depends(request_session)]

    @app.middleware("http")
    async def stamp(request: Request, call_next: Any) -> Any:
        response = await call_next(request)
        response.headers["x-stamped"] = "1"
        return response

    @app.get("/connection")
    async def by_connection(conn: Conn) -> StreamingResponse:
        async def body() -> AsyncIterator[bytes]:
            async with conn.transaction():
                await conn.execute(f"SELECT n FROM {TABLE} WHERE id = 1 FOR UPDATE")
                async for row in conn.cursor(
                        "SELECT g, pg_sleep(0.01) FROM generate_series(1, 1000) g"):
                    yield f"{row['g']}\n".encode()

        return StreamingResponse(body(), media_type="text/plain")

    @app.get("/session")
    async def by_session(session: SessionDep) -> StreamingResponse:
        async def body() -> AsyncIterator[bytes]:
            async with aclosing(_locked_rows(session)) as lines:  # (closed with the body)
                async for line in lines:
                    yield line

        return StreamingResponse(body(), media_type="text/plain")

    return app


@pytest.mark.parametrize("source", ["connection", "session"])
async def test_a_stream_under_http_middleware_gives_its_connection_back_when_the_client_leaves(
        pool: Pool, stack: ServerStack, source: str) -> None:
    """Under a BaseHTTPMiddleware the cancellation of a stream whose client left reaches the
    response while it waits on the middleware, outside the body's generator, which is left
    suspended at a ``yield``: a connection acquired in the generator stays checked out (idle in
    transaction on the server, its locks held) until the garbage collector finalizes it. The
    request's `pool_connection` or session (default scope) ends with the request whatever the
    generator does: the connection is back, rolled back, when the request is over."""
    app = middleware_stream_app(pool, source)
    for _ in range(3):
        before = pool.stats()
        chunks = await stream_then_leave(app, f"/{source}")
        assert 0 < len(b"".join(chunks).split()) < 1000
        assert pool.stats().in_use == 0  # back when the request ended, reset included
        await server_left_alone(stack.postgres)
        assert pool.stats().closed_total == before.closed_total
