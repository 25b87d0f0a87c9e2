"""`error.type` on the connect metric and span names the error the caller was given, for every
login failure the fault suite produces (real PostgreSQL, both PgBouncers, the fault proxy)."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any

import pytest

from asyncpool import Pool
from asyncpool.telemetry import semconv as sc
from asyncpool.telemetry.metrics import qualified_name
from asyncpool.testing import PgBouncerServer, PostgresServer, ServerStack
from asyncpool.testing.binaries import system_pgbouncer
from asyncpool.testing.faultproxy import FaultProxy
from tests.telemetry_support import Sdk


@pytest.fixture
def sdk() -> Iterator[Sdk]:
    made = Sdk()
    yield made
    made.shutdown()


@pytest.fixture(scope="module")
def one_client_pooler(fault_stack: ServerStack) -> Iterator[PgBouncerServer]:
    server = PgBouncerServer(system_pgbouncer(), fault_stack.postgres, {"max_client_conn": 1})
    server.start()
    yield server
    server.stop()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def _fail(sdk: Sdk, dsn: str, action: Callable[[Pool], Awaitable[Any]], *,
                metrics: bool = True, retried: bool = False, **options: Any) -> BaseException:
    """`action`'s error, checked against the connect spans and the create_errors counter.

    `retried`: failed logins are retried until acquire_timeout; when the deadline falls in the
    pause between two attempts rather than during one, no login is cut, so the caller's
    PoolTimeoutError follows a last attempt that ended as ConnectError.
    """
    config: dict[str, Any] = {"name": "faulty", "min_size": 0, "max_size": 2,
                              "acquire_timeout": 2.0, "connect_timeout": 1.0}
    config.update(options)
    pool = sdk.pool(dsn, **config)
    await pool.open()
    try:
        with pytest.raises(Exception) as info:  # noqa: PT011 - each case checks the type below
            await action(pool)
        # A login stopped part-way is reported when its task has taken the cancellation, a loop
        # turn or two after the caller got its error.
        expected = {qualified_name(type(info.value))}
        if retried and type(info.value).__name__ == "PoolTimeoutError":
            expected.update({"asyncpool.errors.ConnectError",
                             "asyncpool.errors.PoolerExhaustedError"})
        for _ in range(100):
            if _failed_types(sdk)[-1:] and _failed_types(sdk)[-1] in expected:
                break
            await asyncio.sleep(0.02)
        # Metrics and spans read together, with no await between: a login that close() stops
        # below ends after this and must be in neither (it was counted in one only, 2 runs of 5
        # under load).
        collected = sdk.collect()
        failed = _failed_types(sdk)
    finally:
        await pool.close(timeout=1)
    caught = info.value
    errors = {p.attributes[sc.ERROR_TYPE]: p.value
              for p in collected.points(sc.CREATE_ERRORS.name) if p.value}
    # The caller's error is the last failed attempt's, on the span and in the metric.
    assert failed, "no connect span"
    assert failed[-1] in expected, (failed, caught)
    if not metrics:  # the pool was closed: it no longer reports
        return caught
    assert errors.get(failed[-1], 0) >= 1, errors
    assert sum(errors.values()) == len([f for f in failed if f]), (errors, failed)
    # Never the driver's class (asyncpg.exceptions.*) or a bare cancellation.
    assert all(str(kind).startswith("asyncpool.errors.") for kind in errors), errors
    return caught


def _failed_types(sdk: Sdk) -> list[Any]:
    spans = [s for s in sdk.spans() if s.name.startswith(sc.CONNECT_SPAN)]
    return [dict(s.attributes or {}).get(sc.ERROR_TYPE) for s in spans]


def _fetch(pool: Pool) -> Awaitable[Any]:
    return pool.fetchval("SELECT 1")


@pytest.mark.parametrize("via", ["postgres", "pgbouncer-1.18", "pgbouncer-current"])
async def test_wrong_password(sdk: Sdk, fault_stack: ServerStack, via: str) -> None:
    servers: dict[str, PostgresServer | PgBouncerServer] = {
        "postgres": fault_stack.postgres, "pgbouncer-1.18": fault_stack.legacy,
        "pgbouncer-current": fault_stack.current,
    }
    server = servers[via]
    dsn = server.dsn().replace(fault_stack.postgres.app.password, "wrong-password")
    caught = await _fail(sdk, dsn, _fetch)
    assert type(caught).__name__ == "AuthenticationError"


async def test_unknown_database(sdk: Sdk, fault_stack: ServerStack) -> None:
    caught = await _fail(sdk, fault_stack.postgres.dsn(database="no_such_db"), _fetch)
    assert type(caught).__name__ == "ConnectError"


async def test_nothing_listening(sdk: Sdk) -> None:
    caught = await _fail(sdk, f"postgresql://app@127.0.0.1:{_free_port()}/app", _fetch,
                         retried=True, acquire_timeout=0.6)
    assert type(caught).__name__ in {"ConnectError", "PoolTimeoutError"}


async def test_max_client_conn(sdk: Sdk, one_client_pooler: PgBouncerServer) -> None:
    async def second_client(pool: Pool) -> None:
        async with pool.acquire(), pool.acquire():
            pass

    caught = await _fail(sdk, one_client_pooler.dsn(), second_client, validate_after=None,
                         retried=True)
    # Refused logins are retried until acquire_timeout: under load the deadline can fall
    # between two attempts, and the caller's PoolTimeoutError then names the refusal.
    if type(caught).__name__ == "PoolTimeoutError":
        assert "max_client_conn" in str(caught), caught
    else:
        assert type(caught).__name__ == "PoolerExhaustedError"


@pytest.fixture
async def stalled(fault_stack: ServerStack) -> AsyncIterator[FaultProxy]:
    async with FaultProxy.to_dsn(fault_stack.postgres.dsn()) as proxy:
        proxy.set_mode("stall")
        yield proxy


async def test_connect_timeout(sdk: Sdk, fault_stack: ServerStack, stalled: FaultProxy) -> None:
    """Logins cut by connect_timeout: the caller sees ConnectError or, once acquire_timeout has
    run out during a later login, PoolTimeoutError; each attempt is labelled as it ended."""
    caught = await _fail(sdk, stalled.dsn(fault_stack.postgres.dsn()), _fetch,
                         retried=True, connect_timeout=0.2, acquire_timeout=0.7)
    assert type(caught).__name__ in {"ConnectError", "PoolTimeoutError"}


async def test_acquire_deadline_during_a_login(sdk: Sdk, fault_stack: ServerStack,
                                               stalled: FaultProxy) -> None:
    caught = await _fail(sdk, stalled.dsn(fault_stack.postgres.dsn()), _fetch,
                         connect_timeout=5.0, acquire_timeout=0.3)
    assert type(caught).__name__ == "PoolTimeoutError"


async def test_close_during_a_login(sdk: Sdk, fault_stack: ServerStack, stalled: FaultProxy) -> None:
    async def closed_meanwhile(pool: Pool) -> None:
        waiting = asyncio.ensure_future(pool.fetchval("SELECT 1"))
        await asyncio.sleep(0.2)
        await pool.close(timeout=0)
        await waiting

    caught = await _fail(sdk, stalled.dsn(fault_stack.postgres.dsn()), closed_meanwhile,
                         metrics=False, connect_timeout=5.0, acquire_timeout=5.0)
    assert type(caught).__name__ == "PoolClosedError"
