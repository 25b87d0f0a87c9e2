"""FastAPI on Lambda through Mangum, invoked with API Gateway HTTP API (v2) events.

Mangum runs the ASGI lifespan around every invocation; the pool must survive it. Each test builds
its app and Mangum handler on a thread standing in for the Lambda runtime's (Mangum uses that
thread's event loop), against the session's PostgreSQL and PgBouncers.
"""

# No `from __future__ import annotations`: FastAPI reads the endpoints' annotations at runtime,
# and the dependencies here are local to each app.

import asyncio
import copy
import json
import re
from collections.abc import AsyncIterator, Iterator
from typing import Annotated, Any, Literal

import anyio
import pytest
from fastapi import BackgroundTasks, Depends, FastAPI, HTTPException
from fastapi.responses import StreamingResponse
from mangum import Mangum

from asyncpool import Pool, PooledConnection
from asyncpool.integrations import lambda_deadline
from asyncpool.integrations.aws_lambda import lambda_config
from asyncpool.integrations.fastapi import LambdaDeadline, pool_connection, pool_lifespan
from asyncpool.integrations.invocation import LocalContext, current_invocation
from asyncpool.integrations.lambda_runner import LambdaRunner
from asyncpool.testing import PostgresServer
from asyncpool.testing.faultproxy import FaultProxy
from tests.conftest import Pooler
from tests.lambda_env import (
    TEST_LOOP,
    RuntimeThread,
    app_clients,
    load_event,
    local_port,
    loop_kind,
    loops_like_the_tests,
    scratch_table,
)
from tests.script_support import REPO

HTTP_API_EVENT = load_event(REPO / "examples" / "fastapi_mangum" / "events" / "hello_v2.json")


def http_event(method: str, path: str, query: str = "") -> dict[str, Any]:
    """The example's API Gateway v2 event, re-aimed at `method path?query`."""
    event = copy.deepcopy(HTTP_API_EVENT)
    event["routeKey"] = event["requestContext"]["routeKey"] = f"{method} {path}"
    event["rawPath"] = event["requestContext"]["http"]["path"] = path
    event["requestContext"]["http"]["method"] = method
    event["rawQueryString"] = query
    event.pop("queryStringParameters", None)
    return event


def build_app(pool: Pool, *, keep_open: bool | None = True) -> FastAPI:
    app = FastAPI(lifespan=pool_lifespan(pool, keep_open=keep_open))
    connection = Annotated[PooledConnection, Depends(pool_connection(pool), scope="function")]
    transaction = Annotated[PooledConnection,
                            Depends(pool_connection(pool, transaction=True), scope="function")]

    @app.get("/value")
    async def value(conn: connection, n: int) -> dict[str, int]:
        return {"n": await conn.fetchval("SELECT $1::int", n), "port": local_port(conn)}

    @app.get("/boom")
    async def boom(conn: connection) -> None:
        await conn.execute("SELECT 1")
        raise RuntimeError("the endpoint failed")

    @app.post("/notes/{table}")
    async def add_note(conn: transaction, table: str, body: str, fail: bool = False) -> None:
        await conn.execute(f"INSERT INTO {table} VALUES ($1)", body)
        if fail:
            raise HTTPException(status_code=409, detail="rolled back")

    @app.get("/notes/{table}/count")
    async def count_notes(conn: connection, table: str) -> int:
        count: int = await conn.fetchval(f"SELECT count(*) FROM {table}")
        return count

    @app.get("/cut")
    async def cut() -> dict[str, bool]:
        # A checkout cut short by an anyio cancel scope (as a streaming response whose client
        # went away): the holder leaves before its connection's reset ends.
        with anyio.move_on_after(0.3):
            async with pool.acquire() as conn, conn.transaction():
                await conn.execute("SELECT pg_sleep(2)")
        return {"cut": True}

    @app.get("/loop")
    async def loop(conn: connection) -> str:
        await conn.execute("SELECT 1")
        return loop_kind()

    @app.get("/invocation")
    async def invocation(conn: connection, tx: transaction) -> dict[str, Any]:
        current = current_invocation()
        assert current is not None
        return {"request_id": current.request_id, "cold_start": current.cold_start}

    return app


class MangumEnvironment:
    """One Lambda environment serving `app` through Mangum, on its own runtime thread."""

    def __init__(self, runtime: RuntimeThread, pool: Pool) -> None:
        self.runtime = runtime
        self.pool = pool
        self.handler: Mangum | None = None

    async def start(self, app: FastAPI, lifespan: Literal["auto", "off"] = "auto") -> None:
        # Made on the runtime thread: Mangum takes that thread's event loop.
        self.handler = await self.runtime.call(lambda: Mangum(app, lifespan=lifespan))

    async def invoke(self, event: dict[str, Any], context: Any = None) -> dict[str, Any]:
        assert self.handler is not None
        response: dict[str, Any] = await self.runtime.call(
            self.handler, event, context or LocalContext()
        )
        return response

    async def close(self) -> None:
        def close_on_mangums_loop() -> None:
            loop = asyncio.get_event_loop()
            loop.run_until_complete(self.pool.close())
            loop.close()

        if self.handler is not None:
            await self.runtime.call(close_on_mangums_loop)


@pytest.fixture(autouse=True)
async def _mangums_loop_like_the_tests() -> AsyncIterator[None]:
    """Under ASYNCPOOL_TEST_LOOP=uvloop Mangum's loop is uvloop's too (Mangum makes its own)."""
    with loops_like_the_tests():
        yield


@pytest.fixture
def runtime() -> Iterator[RuntimeThread]:
    thread = RuntimeThread()
    yield thread
    thread.close()


@pytest.fixture
async def lambda_env(runtime: RuntimeThread, pooler: Pooler) -> AsyncIterator[MangumEnvironment]:
    env = MangumEnvironment(runtime, Pool(config=lambda_config(environ={}, dsn=pooler.dsn())))
    try:
        yield env
    finally:
        await env.close()


@pytest.fixture
async def notes(postgres: PostgresServer) -> AsyncIterator[str]:
    async with scratch_table(postgres.dsn()) as name:
        yield name


async def test_each_later_invocation_checks_the_connections_whatever_takes_them(
        runtime: RuntimeThread, pooler: Pooler) -> None:
    """Mangum starts the lifespan for every invocation: at each later start `pool_lifespan`
    marks the pool's connections to be checked, so code that takes them without
    `pool_connection` (SQLAlchemy sessions, the query helpers) gets a new connection, not one
    that vanished while the environment was frozen. ``validate_after=3600`` stands for a clock
    that did not move across the freeze (it is not known to)."""
    async with FaultProxy.to_dsn(pooler.dsn()) as proxy:
        pool = Pool(config=lambda_config(environ={}, dsn=proxy.dsn(pooler.dsn()),
                                         validate_after=3600))
        app = FastAPI(lifespan=pool_lifespan(pool, keep_open=True))

        @app.get("/plain")
        async def plain(n: int) -> int:
            value: int = await pool.fetchval("SELECT $1::int", n)
            return value

        env = MangumEnvironment(runtime, pool)
        await env.start(app)
        try:
            first = await env.invoke(http_event("GET", "/plain", "n=1"))
            assert (first["statusCode"], first["body"]) == (200, "1")
            proxy.set_mode("half-open")  # the connection vanished without a word...
            proxy.set_mode("pass")  # ...and new ones get through
            second = await env.invoke(http_event("GET", "/plain", "n=2"))
            assert (second["statusCode"], second["body"]) == (200, "2")
            stats = pool.stats()
            assert (stats.validation_failures_total, stats.created_total) == (1, 2)
        finally:
            await env.close()


async def test_mangum_runs_on_the_loop_the_tests_run_on(lambda_env: MangumEnvironment) -> None:
    """Under ASYNCPOOL_TEST_LOOP=uvloop, Mangum's loop (and the pool's) is uvloop's: Mangum
    makes its loop through the policy, and without one set its tests ran on asyncio's."""
    await lambda_env.start(build_app(lambda_env.pool))
    response = await lambda_env.invoke(http_event("GET", "/loop"))
    assert (response["statusCode"], json.loads(response["body"])) == (200, TEST_LOOP)


async def test_many_invocations_share_one_pool_and_connection(
    lambda_env: MangumEnvironment, pooler: Pooler
) -> None:
    pool = lambda_env.pool
    await lambda_env.start(build_app(pool))
    ports = set()
    for n in range(15):
        response = await lambda_env.invoke(http_event("GET", "/value", f"n={n}"))
        assert response["statusCode"] == 200
        body = json.loads(response["body"])
        assert body["n"] == n
        ports.add(body["port"])
        # Mangum's lifespan shutdown ran after this invocation: the pool is still open, and idle.
        assert not pool.closed
        assert pool.stats().in_use == 0
    stats = pool.stats()
    assert (stats.created_total, stats.acquired_total, stats.closed_total) == (1, 15, 0)
    [port] = ports
    assert [int(row["port"]) for row in await app_clients(pooler)].count(port) == 1


async def test_a_checkout_cut_short_is_reset_before_the_response(
        lambda_env: MangumEnvironment, pooler: Pooler) -> None:
    """The lifespan's shutdown, which Mangum runs after each invocation, waits for the resets
    holders left running (an anyio cancel scope): once the response is out the environment may
    be frozen, and a reset still waiting would keep PgBouncer's server connection (and its
    transaction) until the thaw."""
    await lambda_env.start(build_app(lambda_env.pool))
    response = await lambda_env.invoke(http_event("GET", "/cut"))
    assert response["statusCode"] == 200, response
    row = await pooler.pool_row()  # (Mangum's loop does not run between invocations)
    assert (row["sv_active"], lambda_env.pool.stats().in_use) == (0, 0), row


async def test_endpoint_that_raises_releases_its_connection(lambda_env: MangumEnvironment) -> None:
    pool = lambda_env.pool
    await lambda_env.start(build_app(pool))
    for _ in range(3):
        response = await lambda_env.invoke(http_event("GET", "/boom"))
        assert response["statusCode"] == 500
        assert pool.stats().in_use == 0
    response = await lambda_env.invoke(http_event("GET", "/value", "n=1"))
    assert response["statusCode"] == 200
    assert pool.stats().created_total == 1


async def test_transaction_dependency_commits_or_rolls_back(
    lambda_env: MangumEnvironment, notes: str
) -> None:
    pool = lambda_env.pool
    await lambda_env.start(build_app(pool))
    kept = await lambda_env.invoke(http_event("POST", f"/notes/{notes}", "body=kept"))
    lost = await lambda_env.invoke(http_event("POST", f"/notes/{notes}", "body=lost&fail=true"))
    assert (kept["statusCode"], lost["statusCode"]) == (200, 409)
    assert pool.stats().in_use == 0
    count = await lambda_env.invoke(http_event("GET", f"/notes/{notes}/count"))
    assert json.loads(count["body"]) == 1


async def test_invocation_reaches_the_endpoint(runtime: RuntimeThread, postgres: PostgresServer) -> None:
    """Both dependencies (two connections) agree on the invocation and on its cold start."""
    config = lambda_config(environ={}, dsn=postgres.dsn(), max_size=2)
    env = MangumEnvironment(runtime, Pool(config=config))
    try:
        await env.start(build_app(env.pool))
        contexts = [LocalContext(), LocalContext()]
        seen = [
            json.loads((await env.invoke(http_event("GET", "/invocation"), c))["body"])
            for c in contexts
        ]
    finally:
        await env.close()
    assert seen == [
        {"request_id": contexts[0].aws_request_id, "cold_start": True},
        {"request_id": contexts[1].aws_request_id, "cold_start": False},
    ]


async def test_without_keep_open_mangum_closes_the_pool_after_one_invocation(
    runtime: RuntimeThread, postgres: PostgresServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Why the lifespan keeps the pool open on Lambda: off Lambda it closes at shutdown, and
    Mangum shuts the lifespan down after every invocation."""
    monkeypatch.delenv("AWS_LAMBDA_FUNCTION_NAME", raising=False)
    env = MangumEnvironment(runtime, Pool(config=lambda_config(environ={}, dsn=postgres.dsn())))
    try:
        await env.start(build_app(env.pool, keep_open=None))
        response = await env.invoke(http_event("GET", "/value", "n=1"))
        assert response["statusCode"] == 200
        assert env.pool.closed
    finally:
        await env.close()


async def test_on_lambda_the_default_keeps_the_pool_open(
    runtime: RuntimeThread, postgres: PostgresServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AWS_LAMBDA_FUNCTION_NAME", "fastapi-tests")
    env = MangumEnvironment(runtime, Pool(config=lambda_config(environ={}, dsn=postgres.dsn())))
    try:
        await env.start(build_app(env.pool, keep_open=None))
        for n in range(3):
            response = await env.invoke(http_event("GET", "/value", f"n={n}"))
            assert response["statusCode"] == 200
        assert not env.pool.closed
        assert env.pool.stats().created_total == 1
    finally:
        await env.close()


async def test_with_mangum_lifespan_off_the_dependency_opens_the_pool(
    runtime: RuntimeThread, postgres: PostgresServer
) -> None:
    env = MangumEnvironment(runtime, Pool(config=lambda_config(environ={}, dsn=postgres.dsn())))
    try:
        await env.start(build_app(env.pool), lifespan="off")
        for n in range(3):
            response = await env.invoke(http_event("GET", "/value", f"n={n}"))
            assert json.loads(response["body"])["n"] == n
        assert env.pool.stats().created_total == 1
    finally:
        await env.close()


def build_slow_app(pool: Pool, finished: list[str]) -> FastAPI:
    """Endpoints that run into the deadline: mid-stream, and after their response is complete."""
    app = FastAPI(lifespan=pool_lifespan(pool, keep_open=True))

    @app.get("/stream")
    async def stream() -> StreamingResponse:
        async def rows() -> AsyncIterator[bytes]:
            yield b"first row\n"
            async with pool.acquire() as conn:
                await conn.execute("SELECT pg_sleep(30)")
            yield b"never\n"
        return StreamingResponse(rows(), media_type="text/plain")

    @app.get("/then-background")
    async def then_background(tasks: BackgroundTasks) -> dict[str, bool]:
        async def after() -> None:
            async with pool.acquire() as conn:
                await conn.execute("SELECT pg_sleep(30)")
            finished.append("background")
        tasks.add_task(after)
        return {"answered": True}

    return app


#: The cancelled statement's connection has half the margin to be cancelled on the server and
#: rolled back before the invocation ends, or it is closed: 0.3 s (0.15 s for that) was once too
#: little for a loaded CI run (closed_total 1).
MARGIN = 1.0


@pytest.mark.parametrize("where", ["add_middleware", "around the app"])
async def test_lambda_deadline_turns_a_stream_cut_short_into_a_504(
        runtime: RuntimeThread, postgres: PostgresServer, where: str) -> None:
    """Mangum holds the whole response: a stream cut short mid-way is a 504, not half a 200."""
    env = MangumEnvironment(runtime, Pool(config=lambda_config(environ={}, dsn=postgres.dsn())))
    try:
        app = build_slow_app(env.pool, [])
        if where == "add_middleware":
            app.add_middleware(LambdaDeadline, timeout_margin=MARGIN)
            await env.start(app)
        else:
            await env.start(LambdaDeadline(app, timeout_margin=MARGIN))  # type: ignore[arg-type]
        response = await env.invoke(http_event("GET", "/stream"), LocalContext(timeout=2.0))
        assert response["statusCode"] == 504, response
        assert "deadline margin was reached" in json.loads(response["body"])["detail"]
        stats = await runtime.call(env.pool.stats)
        assert (stats.in_use, stats.closed_total) == (0, 0), stats
    finally:
        await env.close()


async def test_lambda_deadline_leaves_a_complete_response_alone(
        runtime: RuntimeThread, postgres: PostgresServer) -> None:
    """Background work after the response runs into the deadline: cut short, connection back,
    and the response the client was given stands."""
    env = MangumEnvironment(runtime, Pool(config=lambda_config(environ={}, dsn=postgres.dsn())))
    finished: list[str] = []
    try:
        await env.start(LambdaDeadline(build_slow_app(env.pool, finished), timeout_margin=0.3))  # type: ignore[arg-type]
        response = await env.invoke(http_event("GET", "/then-background"), LocalContext(timeout=1.0))
        assert (response["statusCode"], json.loads(response["body"])) == (200, {"answered": True})
        assert finished == []
        assert (await runtime.call(env.pool.stats)).in_use == 0
    finally:
        await env.close()


@pytest.mark.parametrize(("bad", "error"), [
    (-1, ValueError), (float("nan"), ValueError), (float("inf"), ValueError),
    ("0.5", TypeError), (None, TypeError), (True, TypeError)])
def test_lambda_deadline_and_the_runner_refuse_a_bad_margin(bad: Any, error: type) -> None:
    """NaN and infinity were taken, and cut every request short at once (a 504 each)."""
    for make in (lambda: LambdaDeadline(FastAPI(), timeout_margin=bad),
                 lambda: LambdaRunner(timeout_margin=bad)):
        with pytest.raises(error, match=f"timeout_margin={re.escape(repr(bad))}: must be"):
            make()


async def test_lambda_deadline_with_a_margin_at_or_above_the_timeout_serves_and_says_so_once(
        runtime: RuntimeThread, pooler: Pooler, caplog: pytest.LogCaptureFixture,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """timeout_margin=2 on a 1 s function made every request a 504 the moment it began, with
    nothing saying why; now the requests are served and one WARNING names the margin."""
    monkeypatch.setattr(lambda_deadline, "_margin_warned_in", [])
    env = MangumEnvironment(runtime, Pool(config=lambda_config(environ={}, dsn=pooler.dsn())))
    try:
        await env.start(LambdaDeadline(build_app(env.pool), timeout_margin=2))  # type: ignore[arg-type]
        with caplog.at_level("WARNING", logger="asyncpool.integrations.lambda_deadline"):
            for n in (1, 2):
                response = await env.invoke(http_event("GET", "/value", f"n={n}"),
                                            LocalContext(timeout=1.0))
                assert response["statusCode"] == 200, response
                assert json.loads(response["body"])["n"] == n
        [warning] = [r for r in caplog.records if r.name == "asyncpool.integrations.lambda_deadline"]
        assert warning.getMessage().startswith("timeout_margin=2s is at or above the ")
        assert (await runtime.call(env.pool.stats)).in_use == 0
    finally:
        await env.close()


class _BadClock(LocalContext):
    """A context whose get_remaining_time_in_millis() returns `millis`."""

    def __init__(self, millis: Any) -> None:
        super().__init__()
        self.millis = millis

    def get_remaining_time_in_millis(self) -> Any:
        return self.millis


@pytest.mark.parametrize("millis", [None, "soon", float("nan")])
async def test_lambda_deadline_with_a_context_that_gives_no_time_says_so(
        runtime: RuntimeThread, postgres: PostgresServer, millis: Any,
        caplog: pytest.LogCaptureFixture) -> None:
    """NaN was no time left: every request a 504 that blamed the handler's speed; None and
    text, float()'s own TypeError. Each is an error naming the context's method and value."""
    env = MangumEnvironment(runtime, Pool(config=lambda_config(environ={}, dsn=postgres.dsn())))
    try:
        await env.start(LambdaDeadline(build_app(env.pool)))  # type: ignore[arg-type]
        with caplog.at_level("ERROR", logger="mangum"):
            response = await env.invoke(http_event("GET", "/value", "n=1"), _BadClock(millis))
        assert response["statusCode"] == 500
        assert f"get_remaining_time_in_millis() returned {millis!r}" in caplog.text
    finally:
        await env.close()

