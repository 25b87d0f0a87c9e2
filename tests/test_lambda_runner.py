"""LambdaRunner: one event loop for a Lambda environment, so one pool serves every invocation.

Handlers are called synchronously on a thread standing in for the Lambda runtime's, against the
session's PostgreSQL and PgBouncers.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import re
import time
import warnings
from collections.abc import AsyncIterator, Callable
from types import SimpleNamespace
from typing import Any

import asyncpg
import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from asyncpool import Pool, PoolError
from asyncpool.integrations import lambda_deadline
from asyncpool.integrations.invocation import COLD_START_FIELD, REQUEST_ID_FIELD, LocalContext
from asyncpool.integrations.lambda_runner import HandlerTimeoutError, async_handler
from asyncpool.integrations.lambda_spans import COLDSTART, INVOCATION_ID, InvocationSpanProcessor
from asyncpool.pool import alarms
from asyncpool.pool.connection import PooledConnection
from asyncpool.telemetry import TelemetryObserver
from asyncpool.testing import PostgresServer
from tests.conftest import Pooler
from tests.lambda_env import Environment, app_clients, local_port, loops_like_the_tests


@pytest.fixture(autouse=True)
async def _runner_loop_like_the_tests() -> AsyncIterator[None]:
    """Under ASYNCPOOL_TEST_LOOP=uvloop the runner's own loop is uvloop's too."""
    with loops_like_the_tests():
        yield


async def test_asyncio_run_per_invocation_cannot_keep_a_pool(
    env: Environment, postgres: PostgresServer
) -> None:
    """The problem the runner solves: every asyncio.run() makes a new loop, and a pool belongs to
    the loop it was opened on."""
    pool = Pool(postgres.dsn(), min_size=0, max_size=1)

    async def first_invocation() -> None:
        await pool.open()

    async def next_invocation() -> int:
        value: int = await pool.fetchval("SELECT 1")
        return value

    await env.runtime.call(asyncio.run, first_invocation())
    with pytest.raises(PoolError, match=r"another event loop.*lambda_runner"):
        await env.runtime.call(asyncio.run, next_invocation())
    pool.terminate()


async def test_warm_invocations_share_one_loop_pool_and_connection(
    env: Environment, pooler: Pooler
) -> None:
    pool = env.pool(pooler.dsn())

    @async_handler(runner=env.runner)
    async def handler(event: dict[str, Any], context: Any) -> dict[str, int]:
        await pool.open()
        async with pool.acquire() as conn:
            value = await conn.fetchval("SELECT $1::int * 2", event["n"])
            return {"loop": id(asyncio.get_running_loop()), "port": local_port(conn), "value": value}

    results = []
    for n in range(10):
        # A bare context object: no get_remaining_time_in_millis, so no deadline.
        context = SimpleNamespace(aws_request_id=f"req-{n}")
        results.append(await env.invoke(handler, {"n": n}, context))
    assert [r["value"] for r in results] == [n * 2 for n in range(10)]
    assert len({r["loop"] for r in results}) == 1
    assert len({r["port"] for r in results}) == 1
    stats = pool.stats()
    assert (stats.created_total, stats.acquired_total, stats.in_use, stats.idle) == (1, 10, 0, 1)
    # PgBouncer still has that very client connection logged in.
    ports = [int(row["port"]) for row in await app_clients(pooler)]
    assert ports.count(results[0]["port"]) == 1


@pytest.mark.parametrize("in_a_task", [False, True])
async def test_connection_left_checked_out_is_closed_at_the_end_of_its_invocation(
    env: Environment, pooler: Pooler, caplog: pytest.LogCaptureFixture, in_a_task: bool
) -> None:
    """``conn = await pool.acquire()`` not released by the handler (or by a task of it that
    has ended): the invocation's end names where it was taken and closes it, so the next
    invocation gets a connection at once (max_size=1); it was left to leak_timeout, silently,
    and the next invocations waited for it. One taken outside any invocation (INIT) is the
    environment's, left alone."""
    pool = env.pool(pooler.dsn(), max_size=2)
    kept: list[PooledConnection] = []

    async def take() -> None:
        kept.append(await pool.acquire())

    async def init() -> None:
        await pool.open()
        await take()

    await env.run(init)

    @async_handler(runner=env.runner)
    async def leaky(event: Any, context: Any) -> None:
        if in_a_task:
            await asyncio.create_task(take())
        else:
            kept.append(await pool.acquire())  # never released

    @async_handler(runner=env.runner)
    async def query(event: Any, context: Any) -> int:
        async with pool.acquire() as conn:
            value: int = await conn.fetchval("SELECT 7")
            return value

    caplog.set_level(logging.WARNING, logger="asyncpool.pool")
    leaking_context = LocalContext()
    await env.invoke(leaky, context=leaking_context)
    assert pool.stats().in_use == 1  # the INIT one
    started = time.monotonic()
    assert await env.invoke(query) == 7
    assert time.monotonic() - started < 1.0
    stats = pool.stats()
    assert (stats.leaked_total, stats.in_use, stats.closed_total) == (0, 1, 1)
    [record] = [r for r in caplog.records if "was not released" in r.getMessage()]
    assert getattr(record, REQUEST_ID_FIELD) == leaking_context.aws_request_id
    site: str = record.asyncpool_acquire_site  # type: ignore[attr-defined]
    assert ("in take\n    kept.append(await pool.acquire())" if in_a_task
            else "in leaky\n    kept.append(await pool.acquire())") in site, site
    assert "asyncpool/pool" not in site, site
    assert "asyncpool/integrations" not in site, site

    async def use(conn: PooledConnection) -> int:
        value: int = await conn.fetchval("SELECT 8")
        return value

    with pytest.raises(PoolError, match="was terminated"):
        await env.run(lambda: use(kept[1]))
    assert await env.run(lambda: use(kept[0])) == 8  # the INIT one
    await env.run(lambda: pool.release(kept[1]))  # (does nothing)
    await env.run(lambda: pool.release(kept[0]))
    assert pool.stats().in_use == 0


async def test_connection_left_checked_out_under_leak_action_log_is_only_reported(
    env: Environment, pooler: Pooler, caplog: pytest.LogCaptureFixture
) -> None:
    """``leak_action="log"``: the invocation's end reports the connection and leaves it with
    its holder; the leak tracker reports it again past leak_timeout, with the invocation
    that took it."""
    pool = env.pool(pooler.dsn(), max_size=2, leak_timeout=0.3, leak_action="log")
    kept: list[PooledConnection] = []

    @async_handler(runner=env.runner)
    async def leaky(event: Any, context: Any) -> None:
        await pool.open()
        kept.append(await pool.acquire())  # never released

    @async_handler(runner=env.runner)
    async def query(event: Any, context: Any) -> int:
        value: int = await kept[0].fetchval("SELECT 7")
        await asyncio.sleep(0.1)  # (the overdue leak timer fires)
        return value

    caplog.set_level(logging.WARNING)
    leaking_context = LocalContext()
    await env.invoke(leaky, context=leaking_context)
    assert pool.stats().in_use == 1
    [ended] = [r for r in caplog.records if "was not released" in r.getMessage()]
    assert "left with its holder (leak_action='log')" in ended.getMessage()
    # Past leak_timeout while the environment is idle: the loop is not running, nothing fires.
    await asyncio.sleep(0.4)
    assert await env.invoke(query) == 7
    stats = pool.stats()
    assert (stats.leaked_total, stats.in_use, stats.created_total) == (1, 1, 1)
    [leak] = [r for r in caplog.records if r.name == "asyncpool.leaks"]
    # The leak is reported with the invocation that leaked.
    assert getattr(leak, REQUEST_ID_FIELD) == leaking_context.aws_request_id
    assert getattr(leak, COLD_START_FIELD) is True
    await env.run(lambda: pool.release(kept[0]))


async def test_deadline_cancels_the_handler_and_returns_its_connection(
    env: Environment, pooler: Pooler
) -> None:
    pool = env.pool(pooler.dsn())

    @async_handler(runner=env.runner)
    async def opened(event: Any, context: Any) -> None:
        await pool.open()

    @async_handler(runner=env.runner)
    async def slow(event: Any, context: Any) -> int:
        async with pool.acquire() as conn:
            await conn.execute("BEGIN")
            await asyncio.sleep(30)
            pid: int = await conn.fetchval("SELECT pg_backend_pid()")
            return pid

    @async_handler(runner=env.runner)
    async def in_transaction(event: Any, context: Any) -> bool:
        async with pool.acquire() as conn:
            return bool(conn.is_in_transaction())

    # Opened first: under load the open alone took longer than the 0.2 s below, so the
    # deadline cut the open and the next invocation found the pool not open (CI, 2026-12-07).
    await env.invoke(opened)
    # 0.5 s margin before a 0.7 s Lambda deadline: cancelled after about 0.2 s.
    with pytest.raises(HandlerTimeoutError, match="before the Lambda timeout"):
        await env.invoke(slow, context=LocalContext(timeout=0.7))
    assert pool.stats().in_use == 0
    assert await env.invoke(in_transaction) is False
    assert pool.stats().created_total == 1


async def test_a_margin_at_or_above_the_function_timeout_cuts_nothing_and_says_so_once(
    pooler: Pooler, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A 1 s margin on a 0.6 s function cancelled every invocation at once, silently: each
    invocation now runs (the Lambda timeout still bounds it) and one WARNING says what to change."""
    monkeypatch.setattr(lambda_deadline, "_margin_warned_in", [])
    env = Environment(timeout_margin=1.0)
    try:
        pool = env.pool(pooler.dsn())

        @async_handler(runner=env.runner)
        async def handler(event: Any, context: Any) -> int:
            await pool.open()
            async with pool.transaction() as conn:
                await asyncio.sleep(0.05)  # past a budget of "no time left"
                value: int = await conn.fetchval("SELECT $1::int", event["n"])
            return value

        @async_handler(runner=env.runner)
        async def slow(event: Any, context: Any) -> None:
            async with pool.transaction() as conn:
                await conn.execute("SELECT pg_sleep(30)")

        caplog.set_level(logging.WARNING, logger="asyncpool.integrations.lambda_deadline")
        for n in (1, 2):
            assert await env.invoke(handler, {"n": n}, LocalContext(timeout=0.6)) == n
        [warning] = [r for r in caplog.records if r.name == "asyncpool.integrations.lambda_deadline"]
        assert warning.levelno == logging.WARNING
        assert re.match(r"timeout_margin=1s is at or above the 0\.[56]\d*s this invocation had",
                        warning.getMessage()), warning.getMessage()
        assert "Set timeout_margin" in warning.getMessage()
        # An invocation with more time than the margin is still cut short before its deadline.
        with pytest.raises(HandlerTimeoutError):
            await env.invoke(slow, context=LocalContext(timeout=1.3))
        assert pool.stats().in_use == 0
    finally:
        await env.close()


@pytest.mark.parametrize("in_transaction", [True, False])
async def test_a_checkout_cut_short_by_anyio_is_reset_before_the_response(
    env: Environment, pooler: Pooler, in_transaction: bool
) -> None:
    """An anyio cancel scope (a streaming response cut short) leaves its checkout before the
    reset ends (the reset goes on in a task of the pool's): the invocation waits for it before
    its response is posted, as the environment may be frozen then, and a reset still waiting
    would keep PgBouncer's server connection (and the transaction) until the thaw."""
    import anyio

    pool = env.pool(pooler.dsn())

    @async_handler(runner=env.runner)
    async def cut(event: Any, context: Any) -> str:
        await pool.open()
        with anyio.move_on_after(0.3):
            async with pool.acquire() as conn:
                if in_transaction:
                    await conn.execute("BEGIN")
                await conn.execute("SELECT pg_sleep(2)")
        return "cut"

    assert await env.invoke(cut, context=LocalContext(timeout=10)) == "cut"
    # The environment's loop does not run between invocations (a frozen environment's).
    row = await pooler.pool_row()
    assert (row["sv_active"], pool.stats().in_use) == (0, 0), row


async def _stop_in_a_transaction(conn: Any, stopped: list[int]) -> None:
    """Open a transaction on `conn`, then stop its server process (SIGSTOP; its pid goes to
    `stopped`, for the test to continue it): nothing sent there is answered any more."""
    import os
    import signal

    await conn.execute("BEGIN")
    pid: int = await conn.fetchval("SELECT pg_backend_pid()")
    os.kill(pid, signal.SIGSTOP)
    stopped.append(pid)


async def _active_clients(pooler: Pooler) -> list[dict[str, Any]]:
    return [row for row in await pooler.admin("SHOW CLIENTS")
            if row["database"] == "app" and row["state"] == "active"]


async def _invoked_with_a_hung_reset(
    env: Environment, pooler: Pooler
) -> tuple[Pool, float, float, list[dict[str, Any]]]:
    """Invoke (2 s to the deadline) a handler whose held connection is cut by a 0.2 s limit
    while its server process is stopped in a transaction, so that its reset cannot finish.
    Returns the pool, the seconds the invocation took, those it had left at its end, and
    PgBouncer's active clients of ours then (read before the server process goes on)."""
    import os
    import signal

    import anyio

    pool = env.pool(pooler.dsn())
    stopped: list[int] = []

    @async_handler(runner=env.runner)
    async def cut(event: Any, context: Any) -> str:
        await pool.open()
        with anyio.move_on_after(0.2):
            async with pool.acquire() as conn:
                await _stop_in_a_transaction(conn, stopped)
                await conn.execute("SELECT 1")
        return "cut"

    context = LocalContext(timeout=2.0)
    started = time.monotonic()
    try:
        assert await env.invoke(cut, context=context) == "cut"
        took = time.monotonic() - started
        left = context.get_remaining_time_in_millis() / 1000
        return pool, took, left, await _active_clients(pooler)
    finally:
        for pid in stopped:
            os.kill(pid, signal.SIGCONT)


async def test_a_reset_that_hangs_ends_within_the_invocations_time(
    env: Environment, pooler: Pooler
) -> None:
    """A reset left running that cannot finish (its server process is stopped): the invocation
    still returns before its deadline less the runner's margin, and the connection is closed
    before it returns (PgBouncer has no client of ours left while the environment is frozen)."""
    pool, took, _left, clients = await _invoked_with_a_hung_reset(env, pooler)
    assert took < 2.0 - 0.4, took  # the runner's margin (0.5 s) is left for the response
    assert clients == []
    assert pool.stats().in_use == 0


async def test_with_no_margin_a_hung_reset_still_leaves_time_for_the_response(
    pooler: Pooler,
) -> None:
    """``timeout_margin=0``: the invocation's end waited for a reset that cannot finish up to
    the deadline itself, and Lambda would time out an invocation whose handler had returned.
    It leaves `RESPONSE_RESERVE` whatever the margin, the connection closed before that."""
    env = Environment(timeout_margin=0)
    try:
        pool, _took, left, clients = await _invoked_with_a_hung_reset(env, pooler)
        assert left > 0, left  # (it was 0: answered at the deadline itself)
        assert clients == []
        assert pool.stats().in_use == 0
    finally:
        await env.close()


async def test_a_holder_cut_by_the_deadline_does_not_reset_past_it(
    env: Environment, pooler: Pooler
) -> None:
    """A holder cancelled by the runner's own deadline resets its connection in its block's end;
    when that reset cannot finish (the server process is stopped), it gives up within the margin
    the runner left before the Lambda deadline: the error goes out in time, and the connection is
    closed before it does."""
    import os
    import signal

    pool = env.pool(pooler.dsn())
    stopped: list[int] = []

    @async_handler(runner=env.runner)
    async def stuck(event: Any, context: Any) -> str:
        await pool.open()
        async with pool.acquire() as conn:
            await _stop_in_a_transaction(conn, stopped)
            await conn.execute("SELECT 1")
        return "never"

    started = time.monotonic()
    try:
        with pytest.raises(HandlerTimeoutError):
            await env.invoke(stuck, context=LocalContext(timeout=2.0))
        took = time.monotonic() - started
        clients = await _active_clients(pooler)
    finally:
        for pid in stopped:
            os.kill(pid, signal.SIGCONT)
    assert 2.0 - 0.5 <= took < 2.0 - 0.1, took  # cut at the margin; its reset gives up in it
    assert clients == []
    assert pool.stats().in_use == 0


async def test_a_task_left_running_resets_its_return_after_the_invocation(
    env: Environment, pooler: Pooler
) -> None:
    """The bound on resets belongs to the invocation: a task it started and left running (its
    context carries on) still resets the connection it gives back later, not closes it."""
    pool = env.pool(pooler.dsn())
    go_on = asyncio.Event()
    left: list[asyncio.Task[None]] = []

    async def background() -> None:
        await go_on.wait()
        async with pool.acquire() as conn:
            await conn.execute("BEGIN")

    @async_handler(runner=env.runner)
    async def start(event: Any, context: Any) -> None:
        left.append(asyncio.create_task(background()))
        await asyncio.sleep(0.05)

    @async_handler(runner=env.runner)
    async def finish(event: Any, context: Any) -> tuple[int, int]:
        await asyncio.sleep(1.0)  # past where the first invocation's resets had to end
        go_on.set()
        await left[0]
        return pool.stats().idle, pool.stats().closed_total

    await env.run(pool.open)  # (at INIT: the short invocation below only starts the task)
    await env.invoke(start, context=LocalContext(timeout=1.0))
    assert await env.invoke(finish, context=LocalContext(timeout=5)) == (1, 0)


async def test_a_task_left_holding_a_connection_is_waited_for(
    env: Environment, pooler: Pooler, caplog: pytest.LogCaptureFixture
) -> None:
    """A task the handler started and did not await, in a transaction when the handler
    returns: the invocation's end waits for it to give the connection back (its work commits),
    so nothing is pinned at PgBouncer while the environment is frozen; a warning names it."""
    pool = env.pool(pooler.dsn())

    left: list[asyncio.Task[None]] = []

    async def audit(n: int) -> None:
        async with pool.transaction() as conn:
            await conn.execute("INSERT INTO straggler_audit VALUES ($1)", n)
            await asyncio.sleep(0.3)

    @async_handler(runner=env.runner)
    async def handler(event: Any, context: Any) -> str:
        await pool.open()
        await pool.execute("CREATE TABLE IF NOT EXISTS straggler_audit (n int)")
        left.append(asyncio.create_task(audit(event["n"]), name="audit-task"))
        return "sent"

    check = await asyncpg.connect(pooler.dsn(), statement_cache_size=0)
    try:
        assert await env.invoke(handler, {"n": 7}, context=LocalContext(timeout=10)) == "sent"
        # The environment's loop does not run between invocations (a frozen environment's).
        row = await pooler.pool_row()
        assert (row["sv_active"], pool.stats().in_use) == (0, 0), row
        assert await check.fetchval("SELECT count(*) FROM straggler_audit WHERE n = 7") == 1
    finally:
        await check.execute("DROP TABLE IF EXISTS straggler_audit")
        await check.close()
    assert any("audit-task" in r.getMessage() and "still held a connection" in r.getMessage()
               for r in caplog.records)


@pytest.mark.parametrize("stubborn", [False, True])
async def test_a_task_left_holding_a_connection_is_cancelled_in_time(
    env: Environment, pooler: Pooler, stubborn: bool
) -> None:
    """One that would hold it past the invocation's time is cancelled (its transaction rolled
    back, the connection kept); one that will not end even then has its connection closed.
    Either way the invocation returns within its time, and PgBouncer has nothing of ours."""
    pool = env.pool(pooler.dsn())
    never = asyncio.Event()
    left: list[asyncio.Task[None]] = []

    async def hold() -> None:
        async with pool.acquire() as conn:
            await conn.execute("BEGIN")
            await conn.execute("SELECT 1")
            try:
                await never.wait()
            except asyncio.CancelledError:
                if not stubborn:
                    raise
                await never.wait()  # (until the environment's loop is closed)

    @async_handler(runner=env.runner)
    async def handler(event: Any, context: Any) -> str:
        await pool.open()
        left.append(asyncio.create_task(hold()))
        await asyncio.sleep(0.1)
        return "sent"

    started = time.monotonic()
    assert await env.invoke(handler, context=LocalContext(timeout=1.5)) == "sent"
    took = time.monotonic() - started
    assert took < 1.5 - 0.1, took
    row = await pooler.pool_row()
    clients = [r for r in await pooler.admin("SHOW CLIENTS")
               if r["database"] == "app" and r["state"] == "active"]
    assert (row["sv_active"], pool.stats().in_use) == (0, 0), row
    assert (pool.stats().closed_total, len(clients)) == ((1, 0) if stubborn else (0, 1))


async def test_a_generator_kept_past_its_invocation_has_its_connection_closed(
    env: Environment, pooler: Pooler, caplog: pytest.LogCaptureFixture
) -> None:
    """An async generator the handler keeps (a cache) suspended in ``pool.transaction()`` after
    a write: the invocation's end names its acquire site and closes the connection, so the write
    is rolled back by the server and PgBouncer's server connection is free while the environment
    is frozen; one entered at INIT (outside any invocation) is the environment's, left alone."""
    pool = env.pool(pooler.dsn(), max_size=2)
    kept: dict[str, Any] = {}

    async def writes(n: int) -> Any:
        async with pool.transaction() as conn:
            while True:
                await conn.execute("INSERT INTO kept_generator VALUES ($1)", n)
                yield n

    async def init() -> int:
        await pool.open()
        await pool.execute("CREATE TABLE IF NOT EXISTS kept_generator (n int)")
        kept["init"] = writes(1)
        value: int = await anext(kept["init"])
        return value

    assert await env.run(init) == 1

    @async_handler(runner=env.runner)
    async def handler(event: Any, context: Any) -> int:
        kept.setdefault("cache", writes(2))
        value: int = await anext(kept["cache"])
        return value

    check = await asyncpg.connect(pooler.dsn(), statement_cache_size=0)
    try:
        caplog.set_level(logging.WARNING, logger="asyncpool.pool")
        assert await env.invoke(handler, context=LocalContext(timeout=10)) == 2
        stats = pool.stats()
        assert (stats.in_use, stats.closed_total) == (1, 1)  # the INIT one is still held
        assert await check.fetchval("SELECT count(*) FROM kept_generator WHERE n = 2") == 0
        [warning] = [r.getMessage() for r in caplog.records if "no task runs" in r.getMessage()]
        assert "in writes" in warning
        assert "pool.transaction() as conn" in warning
        # Where the block waits, in the handler's code; not the invocation's end, asyncpool's.
        assert "last ran at:)" in warning, warning
        assert "    yield n" in warning, warning
        assert "asyncpool/pool" not in warning, warning
        assert "asyncpool/integrations" not in warning, warning
        with pytest.raises(PoolError, match="was terminated"):
            await env.invoke(handler, context=LocalContext(timeout=10))
    finally:

        async def end() -> None:
            for generator in kept.values():
                await generator.aclose()

        await env.run(end)  # (the INIT one's transaction holds a lock on the table)
        await check.execute("DROP TABLE IF EXISTS kept_generator")
        await check.close()
    assert pool.stats().in_use == 0


@pytest.mark.parametrize("leak_timeout", [30.0, None])
async def test_a_task_started_at_init_is_not_taken_for_one_the_invocation_left(
    env: Environment, pooler: Pooler, leak_timeout: float | None
) -> None:
    """A task started at INIT (outside any invocation) that holds a connection for the
    environment's life is left alone at each invocation's end, leak tracking on or off."""
    pool = env.pool(pooler.dsn(), leak_timeout=leak_timeout, max_size=2)
    stop = asyncio.Event()

    async def keep() -> None:
        async with pool.acquire() as conn:
            await conn.fetchval("SELECT 1")
            await stop.wait()

    async def init() -> asyncio.Task[None]:
        await pool.open()
        task = asyncio.create_task(keep())
        await asyncio.sleep(0.05)
        return task

    kept = await env.run(init)

    @async_handler(runner=env.runner)
    async def handler(event: Any, context: Any) -> int:
        value: int = await pool.fetchval("SELECT 2")
        return value

    started = time.monotonic()
    assert await env.invoke(handler, context=LocalContext(timeout=5)) == 2
    assert time.monotonic() - started < 1.0
    assert not kept.done()
    assert pool.stats().closed_total == 0

    async def end() -> None:
        stop.set()
        await kept

    await env.run(end)


async def test_an_invocation_runs_with_no_timer_in_its_loop(env: Environment, pooler: Pooler) -> None:
    # The time budget, the leak deadline and housekeeping wait off the loop's heap, where a
    # pending timer would make every turn of the loop dearer (asyncpool/pool/alarms.py).
    pool = env.pool(pooler.dsn())

    @async_handler(runner=env.runner)
    async def handler(event: Any, context: Any) -> tuple[type[Any], list[Any]]:
        await pool.open()
        loop = asyncio.get_running_loop()
        pending = []
        for i in range(5):
            assert await pool.fetchval("SELECT $1::int", i) == i
            if alarms.own_clock(loop):  # uvloop keeps them on its own (C) heap, by design
                pending += [h for h in loop._scheduled if not h.cancelled()]  # type: ignore[attr-defined]
        return type(loop), pending

    # The runner's own loop is the kind the suite runs on (uvloop's: tests/conftest.py).
    loop_type, pending = await env.invoke(handler, context=LocalContext(timeout=30))
    assert loop_type is type(asyncio.get_running_loop())
    assert pending == []


async def test_handlers_own_timeout_error_is_not_relabelled(env: Environment) -> None:
    @async_handler(runner=env.runner)
    async def handler(event: Any, context: Any) -> None:
        raise TimeoutError("the handler's own")

    with pytest.raises(TimeoutError, match="the handler's own") as caught:
        await env.invoke(handler)
    assert type(caught.value) is TimeoutError


async def test_invocation_is_stamped_on_asyncpool_records_only(
    env: Environment, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)

    @async_handler(runner=env.runner)
    async def handler(event: Any, context: Any) -> None:
        logging.getLogger("asyncpool.pool").info("from asyncpool")
        logging.getLogger("app").info("from the app")

    first, second = LocalContext(), LocalContext()
    await env.invoke(handler, context=first)
    await env.invoke(handler, context=second)
    logging.getLogger("asyncpool.pool").info("between invocations")

    ours = [r for r in caplog.records if r.name == "asyncpool.pool"]
    stamped = [(getattr(r, REQUEST_ID_FIELD), getattr(r, COLD_START_FIELD)) for r in ours[:2]]
    assert stamped == [
        (first.aws_request_id, True),
        (second.aws_request_id, False),
    ]
    assert not hasattr(ours[2], REQUEST_ID_FIELD)
    assert not any(hasattr(r, REQUEST_ID_FIELD) for r in caplog.records if r.name == "app")


async def test_connect_spans_carry_the_invocation(env: Environment, pooler: Pooler) -> None:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(InvocationSpanProcessor())
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    pool = env.pool(
        pooler.dsn(),
        max_size=2,
        telemetry=False,
        observers=[TelemetryObserver(tracer_provider=provider)],
    )
    await env.run(pool.open)  # connects outside any invocation (an init phase)

    @async_handler(runner=env.runner)
    async def two_at_once(event: Any, context: Any) -> None:
        async with pool.acquire(), pool.acquire():  # the second one connects
            pass

    first_invocation_started = time.time_ns()
    contexts = [LocalContext(), LocalContext()]
    for context in contexts:
        await env.invoke(two_at_once, context=context)
    assert pool.stats().created_total == 2

    spans = exporter.get_finished_spans()
    assert {s.instrumentation_scope.name for s in spans if s.instrumentation_scope} == {"asyncpool"}
    # Each connect span has a credentials child, started by the same code: both are stamped.
    outside = [s.attributes for s in spans if (s.start_time or 0) < first_invocation_started]
    inside = [s.attributes for s in spans if (s.start_time or 0) > first_invocation_started]
    assert len(outside) == len(inside) == 2
    assert not any(INVOCATION_ID in (a or {}) for a in outside)
    assert [(a or {}).get(INVOCATION_ID) for a in inside] == [contexts[0].aws_request_id] * 2
    assert [(a or {}).get(COLDSTART) for a in inside] == [True] * 2


async def test_a_handler_called_from_a_running_loop_says_how_to_call_it() -> None:
    """An async test calling the synchronous handler got asyncio.Runner's "Runner.run() cannot
    be called from a running event loop" (naming neither the handler nor what to do) and a
    "coroutine ... was never awaited" warning. From a thread of its own it serves."""
    from asyncpool.integrations.lambda_runner import LambdaRunner

    async def body() -> int:
        return 1

    async def serve(event: dict[str, Any], context: LocalContext) -> int:
        return await body()

    runner = LambdaRunner()
    try:
        handler = async_handler(serve, runner=runner)
        calls: list[Callable[[], int]] = [lambda: handler({}, LocalContext(timeout=10)),
                                          lambda: runner.run(body())]
        with warnings.catch_warnings(record=True) as warned:
            warnings.simplefilter("always")
            for call in calls:
                with pytest.raises(RuntimeError, match=(
                        r"was called from code that is running an event loop \(an async test, "
                        r"or one handler calling another\): it is synchronous.*Call it from "
                        r"synchronous code \(a plain def test\), or from a thread of its own")):
                    call()
            gc.collect()
        # No coroutine left never awaited (only that: the collection may also find an event
        # loop another test of this worker left unclosed, a ResourceWarning, seen on 3.12).
        assert [str(w.message) for w in warned if "never awaited" in str(w.message)] == []
        assert await asyncio.to_thread(handler, {}, LocalContext(timeout=10)) == 1
    finally:
        await asyncio.to_thread(runner.close)  # (its loop runs on that thread, not this one's)
