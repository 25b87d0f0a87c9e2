"""A Lambda environment frozen while the pooler drops its idle client connection, then thawed.

The example Powertools handler runs in its own process, reading invocations from stdin as the
Lambda runtime would. SIGSTOP freezes it; its own PgBouncer (``client_idle_timeout=1``, as an RDS
Proxy's idle client timeout) closes the connection the frozen process still thinks it has;
SIGCONT thaws it and the next invocation must succeed, the pool having replaced the dead
connection before the handler saw it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from asyncpool import PoolObserver
from asyncpool.integrations.lambda_runner import async_handler
from asyncpool.testing import PgBouncerServer, PostgresServer
from asyncpool.testing.binaries import system_pgbouncer
from tests.lambda_env import POWERTOOLS_EXAMPLE, Environment, HandlerProcess, app_clients, load_event

HELLO = load_event(POWERTOOLS_EXAMPLE / "events" / "hello.json")


@pytest.fixture
def idle_closing_pgbouncer(postgres: PostgresServer) -> Iterator[PgBouncerServer]:
    """A PgBouncer of this test's own that closes clients idle for a second."""
    with PgBouncerServer(system_pgbouncer(), postgres, {"client_idle_timeout": 1}) as server:
        yield server


@pytest.fixture
def handler_process(idle_closing_pgbouncer: PgBouncerServer, tmp_path: Path) -> Iterator[HandlerProcess]:
    proc = HandlerProcess(idle_closing_pgbouncer.dsn(), tmp_path / "handler.stderr")
    try:
        yield proc
    finally:
        proc.stop()


async def wait_for_no_clients(pooler: PgBouncerServer, within: float) -> None:
    deadline = time.monotonic() + within
    while await app_clients(pooler):
        if time.monotonic() > deadline:
            raise AssertionError(f"PgBouncer still has the client after {within}s")
        await asyncio.sleep(0.2)


async def test_invocation_after_thaw_succeeds_on_a_replaced_connection(
    handler_process: HandlerProcess, idle_closing_pgbouncer: PgBouncerServer
) -> None:
    warm = await handler_process.invoke(HELLO)
    assert warm["error"] is None, handler_process.stderr_tail()
    assert warm["response"]["statusCode"] == 200
    assert warm["pool"]["created_total"] == 1
    assert len(await app_clients(idle_closing_pgbouncer)) == 1

    handler_process.signal(signal.SIGSTOP)
    await wait_for_no_clients(idle_closing_pgbouncer, within=15)
    handler_process.signal(signal.SIGCONT)

    thawed = await handler_process.invoke(HELLO)
    assert thawed["error"] is None, handler_process.stderr_tail()
    assert thawed["response"]["statusCode"] == 200
    assert "Hello, Ada!" in thawed["response"]["body"]
    stats = thawed["pool"]
    # The checkout check found the connection dead and replaced it: one close, one new connection.
    assert stats["validation_failures_total"] == 1
    assert stats["closed_total"] == 1
    assert stats["created_total"] == 2
    assert stats["acquired_total"] == 2
    assert stats["in_use"] == 0
    assert len(await app_clients(idle_closing_pgbouncer)) == 1

    again = await handler_process.invoke(HELLO)
    assert again["error"] is None
    assert again["pool"]["created_total"] == 2


class ValidationCounter(PoolObserver):
    """Counts the round trips the pool makes to check a connection."""

    def __init__(self) -> None:
        self.validations = 0

    def pool_statement(self, purpose: str) -> contextlib.AbstractContextManager[object]:
        if purpose == "validate":
            self.validations += 1
        return contextlib.nullcontext()


async def test_a_connection_the_pooler_closed_during_a_pause_is_replaced_without_a_round_trip(
    env: Environment, idle_closing_pgbouncer: PgBouncerServer
) -> None:
    """The runner lets the loop read the pooler's goodbye before the handler asks for a
    connection: the dead one is retired as closed, with no SELECT 1 sent into it. The clock is
    kept out of it (validate_after=3600)."""
    counter = ValidationCounter()
    pool = env.runner.attach(
        env.pool(idle_closing_pgbouncer.dsn(), validate_after=3600, observers=[counter])
    )

    @async_handler(runner=env.runner)
    async def handler(event: Any, context: Any) -> int:
        await pool.open(wait=False)
        async with pool.acquire() as conn:
            value: int = await conn.fetchval("SELECT 1")
            return value

    assert await env.invoke(handler) == 1
    # The loop does not run between invocations: a pause as a frozen environment has.
    await wait_for_no_clients(idle_closing_pgbouncer, within=15)
    assert await env.invoke(handler) == 1
    stats = pool.stats()
    assert (stats.validation_failures_total, stats.closed_total, stats.created_total) == (1, 1, 2)
    assert counter.validations == 0
    # A live connection idle across the boundary still gets its one check.
    assert await env.invoke(handler) == 1
    assert counter.validations == 1
    assert pool.stats().validation_failures_total == 1


async def test_without_the_boundary_check_a_live_connection_is_not_checked(
    env: Environment, legacy: PgBouncerServer
) -> None:
    """check_each_invocation=False: no SELECT 1 while the clock shows no pause."""
    counter = ValidationCounter()
    pool = env.runner.attach(
        env.pool(legacy.dsn(), validate_after=3600, observers=[counter]), check_each_invocation=False
    )

    @async_handler(runner=env.runner)
    async def handler(event: Any, context: Any) -> int:
        await pool.open(wait=False)
        async with pool.acquire() as conn:
            value: int = await conn.fetchval("SELECT 1")
            return value

    for _ in range(3):
        assert await env.invoke(handler) == 1
    assert counter.validations == 0
    env.runner.attach(pool)  # the default again
    assert await env.invoke(handler) == 1
    assert counter.validations == 1


async def test_a_connection_held_across_invocations_is_checked_before_the_caller_in_line_gets_it(
    env: Environment, legacy: PgBouncerServer, caplog: pytest.LogCaptureFixture
) -> None:
    """A task left running across the pause holds the pool's only connection; the next
    invocation's statement waits in line for it. Marked stale at that invocation's start, it gets
    its SELECT 1 before the waiting statement runs (it used to be handed over unchecked)."""
    counter = ValidationCounter()
    pool = env.runner.attach(
        env.pool(legacy.dsn(), validate_after=3600, max_size=1, observers=[counter])
    )
    holders: list[asyncio.Task[None]] = []

    @async_handler(runner=env.runner)
    async def leave_a_holder(event: Any, context: Any) -> int:
        await pool.open(wait=False)
        conn = await pool.acquire()

        async def hold() -> None:
            await asyncio.sleep(0.3)  # runs on in the next invocation
            await pool.release(conn)

        holders.append(asyncio.create_task(hold(), name="hand-over"))
        value: int = await conn.fetchval("SELECT 1")
        return value

    @async_handler(runner=env.runner)
    async def query(event: Any, context: Any) -> tuple[int, int]:
        value = await pool.fetchval("SELECT 2")
        return value, pool.stats().waiting

    with caplog.at_level(logging.WARNING, logger="asyncpool.pool"):
        assert await env.invoke(leave_a_holder) == 1
    # Reported at the invocation's end, not closed: the task it was handed to still runs, and
    # holds it (a closure variable of its coroutine).
    [kept] = [r.getMessage() for r in caplog.records if "was not released" in r.getMessage()]
    assert "running task(s) refer to it ('hand-over')" in kept, kept
    assert counter.validations == 0
    assert await env.invoke(query) == (2, 0)
    assert holders[0].done()
    assert holders[0].exception() is None
    assert counter.validations == 1  # the hand-over was checked
    stats = pool.stats()
    assert (stats.validation_failures_total, stats.created_total) == (0, 1)


async def test_an_unrelated_task_left_running_does_not_keep_a_connection_the_handler_kept(
    env: Environment, legacy: PgBouncerServer, caplog: pytest.LogCaptureFixture
) -> None:
    """The handler keeps ``conn = await pool.acquire()`` (module-level) and leaves a task
    running that has nothing to do with it (a cache refresh): the connection is closed at the
    invocation's end, and the next invocation served at once (max_size=1, acquire_timeout 1 s).
    Any task the invocation started kept it, to leak_timeout: the next one timed out."""
    pool = env.runner.attach(env.pool(legacy.dsn(), max_size=1, acquire_timeout=1.0))
    kept: list[Any] = []
    refresh = asyncio.Event()
    refreshers: list[asyncio.Task[None]] = []

    async def refresh_cache(cache: dict[str, int]) -> None:
        await refresh.wait()
        cache["n"] = 1

    @async_handler(runner=env.runner)
    async def keep(event: Any, context: Any) -> int:
        await pool.open(wait=False)
        kept.append(await pool.acquire())
        refreshers.append(asyncio.create_task(refresh_cache({}), name="refresh"))
        value: int = await kept[0].fetchval("SELECT 1")
        return value

    @async_handler(runner=env.runner)
    async def query(event: Any, context: Any) -> int:
        refresh.set()
        await refreshers[0]
        value: int = await pool.fetchval("SELECT 2")
        return value

    with caplog.at_level(logging.WARNING, logger="asyncpool.pool"):
        assert await env.invoke(keep) == 1
    [report] = [r.getMessage() for r in caplog.records if "was not released" in r.getMessage()]
    assert "it is closed now" in report, report
    assert not refreshers[0].done()  # (it ran on, untouched)
    assert await env.invoke(query) == 2
    stats = pool.stats()
    assert (stats.closed_total, stats.created_total, stats.in_use) == (1, 2, 0)
