"""An open() that fails or is cancelled leaves the pool as if it had never been opened: nothing
left on the server or the loop, the credentials provider closed, and open() may be called again
(asyncpg's pool can be initialised again; psycopg_pool keeps trying)."""

from __future__ import annotations

import asyncio
import time
import uuid
from typing import Any, Literal

import asyncpg
import pytest

import asyncpool
from asyncpool import Pool
from asyncpool.integrations.aws_lambda import lambda_config
from asyncpool.integrations.invocation import LocalContext
from asyncpool.integrations.lambda_runner import HandlerTimeoutError
from asyncpool.integrations.powertools import current_connection, pooled_connection
from asyncpool.testing import PgBouncerServer, PostgresServer
from asyncpool.testing.binaries import system_pgbouncer
from asyncpool.testing.ports import free_port
from tests.lambda_env import Environment, RuntimeThread, load_event
from tests.provider_support import QuietProvider
from tests.script_support import REPO


class FlakyProvider(QuietProvider):
    """The app role's password, from a provider whose first `warm()` fails (a Secrets Manager
    read that did not answer at a cold start), or takes `slow_warm` seconds."""

    def __init__(self, postgres: PostgresServer, *, fail: bool = True, slow_warm: float = 0.0,
                 slow_close: float = 0.0) -> None:
        self.secret = postgres.app.password
        self.fail, self.slow_warm, self.slow_close = fail, slow_warm, slow_close
        self.warms = self.closes = 0

    async def password(self, target: object) -> str:
        return self.secret

    async def warm(self, target: object) -> None:
        self.warms += 1
        if self.warms == 1:
            await asyncio.sleep(self.slow_warm)
            if self.fail:
                raise asyncpool.CredentialsError("the secret could not be read (this time)")

    async def close(self) -> None:
        self.closes += 1
        await asyncio.sleep(self.slow_close)


def no_password(postgres: PostgresServer) -> str:
    return f"postgresql://app@{postgres.host}:{postgres.port}/{postgres.database}"


def tagged(dsn: str) -> tuple[str, str]:
    """`dsn` with an application_name of the test's own, and that name."""
    name = f"open-again-{uuid.uuid4().hex[:10]}"
    return f"{dsn}{'&' if '?' in dsn else '?'}application_name={name}", name


async def backends(postgres: PostgresServer, name: str, settle: float = 2.0) -> int:
    """The server's sessions of `name`, once those closing have gone (within `settle`)."""
    conn = await asyncpg.connect(postgres.admin_dsn)
    try:
        deadline = time.monotonic() + settle
        while True:
            count: int = await conn.fetchval(
                "SELECT count(*) FROM pg_stat_activity WHERE application_name = $1", name)
            if count == 0 or time.monotonic() > deadline:
                return count
            await asyncio.sleep(0.05)
    finally:
        await conn.close()


def assert_never_opened(pool: Pool) -> None:
    """Back to new: not closed, and no connection, login or task of its own left."""
    assert not pool.closed
    assert repr(pool).startswith(f"<asyncpool.Pool {pool.name!r} new size=0 idle=0 in_use=0")
    assert pool.target != "<not open>"  # what open() dialled, as its error said
    slots = pool._slots
    assert (slots.records, slots.attempts, slots.background, slots.closing) == ([], {}, set(), {})
    assert slots.housekeeper is None
    assert not [t for t in asyncio.all_tasks() if t.get_name() == f"asyncpool:{pool.name}"]


async def test_a_refused_open_can_be_retried_against_the_right_server(
        postgres: PostgresServer) -> None:
    """A wrong port fails open(), and again at a second try (not 'closed'); pointed at the
    server (`set_connect_args`), the same pool opens."""
    pool = Pool(f"postgresql://app@127.0.0.1:{free_port()}/app", min_size=1, max_size=2,
                connect_timeout=1, acquire_timeout=2, telemetry=False, name="refused")
    for _ in range(2):
        with pytest.raises(asyncpool.ConnectError, match="connection refused"):
            await pool.open()
        assert_never_opened(pool)
    with pytest.raises(asyncpool.PoolClosedError, match="not open yet"):
        await pool.fetchval("SELECT 1")
    pool.set_connect_args(postgres.dsn())
    async with pool:
        assert await pool.fetchval("SELECT 1") == 1
        assert pool.stats().size == 1
    assert pool.closed


async def test_an_open_refused_succeeds_once_the_server_has_started(
        postgres: PostgresServer) -> None:
    """The database down at start-up: open() fails until it is up, then opens the same pool."""
    server = PgBouncerServer(system_pgbouncer(), postgres)
    pool = Pool(server.dsn(), min_size=2, max_size=2, connect_timeout=1, acquire_timeout=2,
                telemetry=False, name="started-after")
    with pytest.raises(asyncpool.ConnectError, match="connection refused"):
        await pool.open()
    assert_never_opened(pool)
    with server:
        await pool.open()
        try:
            assert pool.stats().idle == 2
            assert await pool.fetchval("SELECT 3") == 3
        finally:
            await pool.close()


async def test_an_init_that_raises_once_leaves_nothing_open_and_the_next_open_works(
        postgres: PostgresServer) -> None:
    calls = 0

    async def init(conn: Any) -> None:
        nonlocal calls
        calls += 1
        if calls == 2:  # the second of min_size: the first is open, and must be closed
            raise ConnectionRefusedError("stand-in: the database went away")

    dsn, name = tagged(postgres.dsn())
    pool = Pool(dsn, min_size=2, max_size=2, init=init, telemetry=False, name="init-once")
    with pytest.raises(ConnectionRefusedError, match="stand-in"):
        await pool.open()
    assert_never_opened(pool)
    assert await backends(postgres, name) == 0
    await pool.open()
    try:
        assert pool.stats().idle == 2
        assert await backends(postgres, name, settle=0) == 2
    finally:
        await pool.close()
    assert await backends(postgres, name) == 0


async def test_a_provider_whose_warm_fails_is_closed_and_warmed_again_at_the_next_open(
        postgres: PostgresServer) -> None:
    """The provider is closed with the failed open (nothing half-open if the pool is never
    opened again) and warmed again by the next open(), as at a pool's first."""
    provider = FlakyProvider(postgres)
    pool = Pool(no_password(postgres), credentials=provider, min_size=1, telemetry=False,
                name="warm-once")
    with pytest.raises(asyncpool.CredentialsError, match="could not be read"):
        await pool.open()
    assert (provider.warms, provider.closes) == (1, 1)
    assert_never_opened(pool)
    await pool.open()
    try:
        assert provider.warms == 2
        assert await pool.fetchval("SELECT 4") == 4
    finally:
        await pool.close()
    assert provider.closes == 2


async def test_close_after_a_failed_open_closes_the_pool(postgres: PostgresServer) -> None:
    provider = FlakyProvider(postgres)
    pool = Pool(no_password(postgres), credentials=provider, telemetry=False, name="then-closed")
    with pytest.raises(asyncpool.CredentialsError):
        await pool.open()
    await pool.close()
    assert pool.closed
    assert provider.closes == 1  # at the failed open, not again
    with pytest.raises(asyncpool.PoolClosedError, match="is closed; create a new pool"):
        await pool.open()


async def test_close_called_while_a_failed_open_is_undone_keeps_the_pool_closed(
        postgres: PostgresServer) -> None:
    """The undoing awaits the provider's close(): a close() arriving then is not undone."""
    provider = FlakyProvider(postgres, slow_close=0.3)
    pool = Pool(no_password(postgres), credentials=provider, telemetry=False, name="closed-mid")
    opening = asyncio.create_task(pool.open())
    while provider.closes == 0:
        await asyncio.sleep(0.01)
    await pool.close()
    with pytest.raises(asyncpool.CredentialsError):
        await opening
    assert pool.closed
    with pytest.raises(asyncpool.PoolClosedError, match="is closed"):
        await pool.open()


async def test_a_timed_out_open_leaves_nothing_and_can_be_retried(postgres: PostgresServer) -> None:
    """``asyncio.wait_for(pool.open(), ...)`` in a retry loop: the cancelled open() closes its
    logins and connections, and the next one opens the pool."""
    slow = True

    async def init(conn: Any) -> None:
        if slow:
            await asyncio.sleep(0.5)  # a cold first login

    dsn, name = tagged(postgres.dsn())
    pool = Pool(dsn, min_size=2, max_size=2, init=init, telemetry=False, name="timed-out")
    for _ in range(2):
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(pool.open(), 0.2)
        assert_never_opened(pool)
        assert await backends(postgres, name) == 0
    slow = False
    await asyncio.wait_for(pool.open(), 5)
    try:
        assert await pool.fetchval("SELECT 5") == 5
    finally:
        await pool.close()


async def test_a_task_waiting_on_a_cancelled_open_opens_the_pool_itself(
        postgres: PostgresServer) -> None:
    async def init(conn: Any) -> None:
        await asyncio.sleep(0.3)

    pool = Pool(postgres.dsn(), min_size=1, max_size=2, init=init, telemetry=False, name="shared")
    first = asyncio.create_task(pool.open())
    await asyncio.sleep(0.05)
    second = asyncio.create_task(pool.open())
    await asyncio.sleep(0.05)
    first.cancel()
    with pytest.raises(asyncio.CancelledError):
        await first
    try:
        assert await asyncio.wait_for(second, 5) is pool
        assert pool.stats().idle == 1
        assert await pool.fetchval("SELECT 6") == 6
    finally:
        await pool.close()


async def test_concurrent_openers_share_a_failure_and_the_pool_opens_after(
        postgres: PostgresServer) -> None:
    provider = FlakyProvider(postgres, slow_warm=0.1)
    pool = Pool(no_password(postgres), credentials=provider, telemetry=False, name="together")
    results = await asyncio.gather(pool.open(), pool.open(), pool.open(), return_exceptions=True)
    assert [type(r).__name__ for r in results] == ["CredentialsError"] * 3, results
    assert provider.warms == 1
    assert await asyncio.gather(pool.open(), pool.open()) == [pool, pool]
    try:
        assert provider.warms == 2
        assert await pool.fetchval("SELECT 7") == 7
    finally:
        await pool.close()


async def test_powertools_middleware_fails_one_invocation_and_serves_the_next(
        env: Environment, postgres: PostgresServer) -> None:
    """A Lambda cold start whose first secret read fails fails that invocation only."""
    provider = FlakyProvider(postgres)
    pool = env.pool(no_password(postgres), credentials=provider, name="lambda-warm")

    @pooled_connection(pool, runner=env.runner)
    async def handler(event: dict[str, Any], context: Any) -> str:
        value: str = await current_connection().fetchval("SELECT 'served'")
        return value

    with pytest.raises(asyncpool.CredentialsError, match="could not be read"):
        await env.invoke(handler)
    assert not pool.closed
    assert await env.invoke(handler) == "served"
    assert await env.invoke(handler) == "served"
    assert (provider.warms, provider.closes) == (2, 1)


async def test_powertools_middleware_retries_an_open_cut_short_by_the_invocation_deadline(
        env: Environment, postgres: PostgresServer) -> None:
    provider = FlakyProvider(postgres, fail=False, slow_warm=2.0)
    pool = env.pool(no_password(postgres), credentials=provider, name="lambda-slow")

    @pooled_connection(pool, runner=env.runner)
    async def handler(event: dict[str, Any], context: Any) -> int:
        value: int = await current_connection().fetchval("SELECT 8")
        return value

    with pytest.raises(HandlerTimeoutError):
        await env.invoke(handler, context=LocalContext(timeout=0.7))
    assert not pool.closed
    assert await env.invoke(handler) == 8
    assert provider.warms == 2


class Attachments(asyncpool.PoolObserver):
    def __init__(self) -> None:
        self.calls: list[str] = []

    def attach(self, pool_name: str, stats: Any) -> None:
        self.calls.append("attach")

    def detach(self) -> None:
        self.calls.append("detach")


async def test_observers_are_detached_by_a_failed_open_and_attached_again(
        postgres: PostgresServer) -> None:
    """Each open() attaches the observers and its failure detaches them; the telemetry
    observer given by the caller watches the pool once it opens."""
    from asyncpool.telemetry import TelemetryObserver

    calls = Attachments()
    pool = Pool(no_password(postgres), credentials=FlakyProvider(postgres), telemetry=False,
                name="observed", observers=[calls, TelemetryObserver()])
    with pytest.raises(asyncpool.CredentialsError):
        await pool.open()
    assert calls.calls == ["attach", "detach"]
    async with pool:
        assert await pool.fetchval("SELECT 9") == 9
    assert calls.calls == ["attach", "detach", "attach", "detach"]


@pytest.mark.parametrize("lifespan", ["auto", "off"])
async def test_mangum_fails_one_invocation_and_serves_the_next(
        postgres: PostgresServer, lifespan: Literal["auto", "off"]) -> None:
    """FastAPI on Lambda: `pool_lifespan` (Mangum's startup) or, without a lifespan,
    `pool_connection` opens the pool; its failure fails that invocation only."""
    from fastapi import Depends, FastAPI
    from mangum import Mangum
    from mangum.exceptions import LifespanFailure

    from asyncpool.integrations.fastapi import pool_connection, pool_lifespan

    provider = FlakyProvider(postgres)
    pool = Pool(config=lambda_config(environ={}, dsn=no_password(postgres), credentials=provider,
                                     name=f"mangum-{lifespan}"))
    app = FastAPI(lifespan=pool_lifespan(pool, keep_open=True))

    # (A default, not `Annotated`: this module's annotations are strings FastAPI cannot resolve.)
    connection = Depends(pool_connection(pool), scope="function")

    @app.get("/value")
    async def value(conn: Any = connection) -> int:
        result: int = await conn.fetchval("SELECT 10")
        return result

    runtime = RuntimeThread()
    try:
        handler = await runtime.call(lambda: Mangum(app, lifespan=lifespan))
        event = load_event(REPO / "examples" / "fastapi_mangum" / "events" / "hello_v2.json")
        event["rawPath"] = event["requestContext"]["http"]["path"] = "/value"
        event["routeKey"] = event["requestContext"]["routeKey"] = "GET /value"
        event["requestContext"]["http"]["method"] = "GET"
        event["rawQueryString"] = ""
        event.pop("queryStringParameters", None)
        if lifespan == "auto":  # Mangum's startup fails the invocation
            with pytest.raises(LifespanFailure, match="the secret could not be read"):
                await runtime.call(handler, event, LocalContext())
        else:  # the dependency does
            first = await runtime.call(handler, event, LocalContext())
            assert first["statusCode"] == 500, first
        assert not pool.closed
        for _ in range(2):
            response = await runtime.call(handler, event, LocalContext())
            assert (response["statusCode"], response["body"]) == (200, "10"), response
        assert (provider.warms, provider.closes) == (2, 1)
    finally:
        def close_on_mangums_loop() -> None:
            loop = asyncio.get_event_loop()
            loop.run_until_complete(pool.close())
            loop.close()

        await runtime.call(close_on_mangums_loop)
        runtime.close()
