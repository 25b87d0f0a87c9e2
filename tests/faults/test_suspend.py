"""PgBouncer SUSPENDed (an admin's SUSPEND, an online restart with ``-R``): it reads no socket,
takes no cancel request and answers no goodbye until RESUME.

close(timeout=T) is a promise to its caller (a Lambda shutdown ends the process within about a
second): it took 5.5 s for close(timeout=0.5) here, waiting up to 5 s for each held connection's
cancel request to be taken before closing the connection, and 2 s for an idle connection's
goodbye. And a connection closed by suspend_timeout must say why."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import uuid
from collections.abc import AsyncIterator, Iterator
from typing import Any, Literal

import psycopg
import pytest

from asyncpool import ConnectionLostError, Pool
from asyncpool.connect import driver
from asyncpool.testing import PgBouncerServer, PostgresServer, ServerStack
from asyncpool.testing.binaries import current_pgbouncer, system_pgbouncer
from asyncpool.testing.faultproxy import FaultProxy

Holder = Literal["held-idle", "held-running", "idle-pool"]


@pytest.fixture(params=["legacy", "current"], ids=["pgbouncer-1.18", "pgbouncer-current"])
def own_pgbouncer(request: pytest.FixtureRequest, fault_stack: ServerStack) -> Iterator[PgBouncerServer]:
    """A PgBouncer of this test's own: SUSPEND stops every client of it, and its log is read for
    a crash."""
    binary = system_pgbouncer() if request.param == "legacy" else current_pgbouncer()
    with PgBouncerServer(binary, fault_stack.postgres) as bouncer:
        yield bouncer


@contextlib.asynccontextmanager
async def suspended(pooler: PgBouncerServer) -> AsyncIterator[None]:
    """SUSPEND until the block ends. The admin connection stays open meanwhile: PgBouncer
    resumes by itself when the one that suspended it leaves."""
    admin = await psycopg.AsyncConnection.connect(pooler.admin_dsn, autocommit=True,
                                                  cursor_factory=psycopg.AsyncClientCursor)
    try:
        async with asyncio.timeout(10):
            await admin.execute(b"SUSPEND")
        yield
    finally:
        with contextlib.suppress(psycopg.Error):
            await admin.execute(b"RESUME")
        await admin.close()


def assert_alive(pooler: PgBouncerServer) -> None:
    assert pooler.process is not None
    assert pooler.process.popen is not None
    assert pooler.process.popen.poll() is None, pooler.process.log_tail()
    assert pooler.workdir is not None
    log = (pooler.workdir / "pgbouncer.log").read_text()
    assert "FATAL" not in log, [line for line in log.splitlines() if "FATAL" in line]


async def _requests_ended(within: float = 10.0) -> None:
    """Wait (bounded) until the cancel requests left in flight have ended by themselves."""
    async with asyncio.timeout(within):
        while driver._REQUESTS_IN_FLIGHT:
            await asyncio.sleep(0.05)


async def _hold(pool: Pool, holder: Holder, marker: str,
                postgres: PostgresServer) -> asyncio.Task[Any] | None:
    """A task holding one of `pool`'s connections, idle or running a statement (which is running
    on the server when this returns); None for `idle-pool`."""
    if holder == "idle-pool":
        return None
    held = asyncio.Event()

    async def hold() -> None:
        async with pool.acquire() as conn:
            held.set()
            if holder == "held-running":
                await conn.fetchval(f"SELECT pg_sleep(20) AS {marker}")
            else:
                await asyncio.sleep(60)

    task = asyncio.create_task(hold())
    async with asyncio.timeout(10):
        await held.wait()
        while holder == "held-running" and not await postgres.running_statements(marker):
            await asyncio.sleep(0.05)
    return task


@pytest.mark.parametrize("holder", ["held-idle", "held-running", "idle-pool"])
async def test_close_keeps_its_timeout_while_pgbouncer_is_suspended(
    own_pgbouncer: PgBouncerServer, fault_stack: ServerStack, holder: Holder
) -> None:
    """close(timeout=T) ends within about T plus min(T, 1 s) (given to the closes under way)
    while PgBouncer takes neither a cancel request nor a goodbye. A held connection's cancel
    request goes on by itself past close() (its socket closed early would crash PgBouncer 1.18
    at RESUME, pgbouncer#801; the connection closed first does not): after RESUME it ends, and
    nothing is left for the loop to report, and PgBouncer is still there.
    Measured before: 5.5 s with a connection held (idle or running), 2.0 s with none held."""
    pooler, postgres = own_pgbouncer, fault_stack.postgres
    marker = f"suspended_{uuid.uuid4().hex[:8]}"
    timeout, bound = (0.5, 3.0) if holder != "idle-pool" else (0.2, 1.5)
    loop = asyncio.get_running_loop()
    reported: list[dict[str, Any]] = []
    loop.set_exception_handler(lambda _loop, context: reported.append(context))
    pool = Pool(pooler.dsn(), name="suspended", min_size=1, max_size=2, validate_after=None,
                telemetry=False)
    task = None
    try:
        await pool.open()
        task = await _hold(pool, holder, marker, postgres)
        async with suspended(pooler):
            started = loop.time()
            async with asyncio.timeout(20):
                await pool.close(timeout=timeout)
            took = loop.time() - started
        assert took < bound, f"close(timeout={timeout}) took {took:.2f} s"
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        await _requests_ended()
        gc.collect()
        await asyncio.sleep(0.1)  # (the loop's handler is called from a callback)
    finally:
        loop.set_exception_handler(None)
        pool.terminate()
        await postgres.end_statements(marker)
    assert not reported, [context.get("message") for context in reported]
    assert_alive(pooler)


async def test_terminate_leaves_nothing_waiting_on_a_suspended_pgbouncer(
    own_pgbouncer: PgBouncerServer, fault_stack: ServerStack
) -> None:
    """terminate() closes a held connection whose cancel request is in flight within 1 s, not
    after waiting up to 5 s (in a task of the pool's) for PgBouncer to take the request."""
    pooler, postgres = own_pgbouncer, fault_stack.postgres
    marker = f"terminated_{uuid.uuid4().hex[:8]}"
    pool = Pool(pooler.dsn(), name="suspended", min_size=1, max_size=1, validate_after=None,
                telemetry=False)
    try:
        await pool.open()
        task = await _hold(pool, "held-running", marker, postgres)
        assert task is not None
        async with suspended(pooler):
            pool.terminate()
            tasks = pool._slots.own_tasks()
            if tasks:
                _, pending = await asyncio.wait(tasks, timeout=3.5)
                assert not pending, f"{len(pending)} of the pool's tasks still waiting"
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await _requests_ended()
    finally:
        pool.terminate()
        await postgres.end_statements(marker)
    assert_alive(pooler)


@pytest.mark.parametrize("which", ["legacy", "current"])
async def test_suspend_timeout_names_the_cause(fault_stack: ServerStack, which: str) -> None:
    """A statement half forwarded when SUSPEND came (its server connection stalled: a statement
    of 20 MB fills the sockets on the way) is cut by PgBouncer's suspend_timeout: the caller is
    told the pooler was suspended, not only "connection was closed in the middle of operation:
    suspend_timeout". The pool serves again after RESUME."""
    postgres = fault_stack.postgres
    binary = system_pgbouncer() if which == "legacy" else current_pgbouncer()
    async with FaultProxy(postgres.host, postgres.port) as proxy:
        with PgBouncerServer(binary, postgres, {"suspend_timeout": 1},
                             upstream_port=proxy.port) as pooler:
            async with Pool(pooler.dsn(), name="suspend-timeout", min_size=1, max_size=1,
                            validate_after=None, telemetry=False) as pool:
                assert await pool.fetchval("SELECT 1") == 1
                proxy.set_mode("stall")
                task = asyncio.create_task(pool.execute("SELECT '" + "x" * 20_000_000 + "' IS NULL"))
                await asyncio.sleep(0.5)  # (the statement fills the sockets to the stalled proxy)
                try:
                    async with suspended(pooler):
                        with pytest.raises(ConnectionLostError) as info:
                            async with asyncio.timeout(10):
                                await task
                finally:
                    proxy.set_mode("pass")
                message = str(info.value)
                assert "suspend_timeout" in message, message
                assert "PgBouncer was suspended" in message, message
                assert await pool.fetchval("SELECT 2") == 2


def _close_in_a_loop_of_its_own(pooler: PgBouncerServer, reported: list[dict[str, Any]]) -> float:
    """asyncio.run(): open a pool, hold a connection, SUSPEND PgBouncer, close(timeout=0.3), and
    end the loop with the held connection's cancel request still in flight; RESUME after. How
    long close() took; what the loop reports, then and when its tasks are collected, goes to
    `reported`."""
    admin = psycopg.connect(pooler.admin_dsn, autocommit=True, cursor_factory=psycopg.ClientCursor)

    async def scenario() -> float:
        loop = asyncio.get_running_loop()
        loop.set_exception_handler(lambda _loop, context: reported.append(context))
        pool = Pool(pooler.dsn(), name="loop-ends", min_size=1, max_size=1, validate_after=None,
                    telemetry=False)
        await pool.open()
        held = asyncio.Event()

        async def hold() -> None:
            async with pool.acquire():
                held.set()
                await asyncio.sleep(60)

        holder = asyncio.create_task(hold())
        await held.wait()
        admin.execute(b"SUSPEND")  # (blocking: it returns at once)
        started = loop.time()
        await pool.close(timeout=0.3)
        took = loop.time() - started
        holder.cancel()
        await asyncio.gather(holder, return_exceptions=True)
        assert driver._REQUESTS_IN_FLIGHT, "no cancel request was left in flight"
        return took

    try:
        took = asyncio.run(scenario())
        gc.collect()
    finally:
        with contextlib.suppress(psycopg.Error):
            admin.execute(b"RESUME")
        admin.close()
    return took


async def test_a_loop_ended_after_close_leaves_nothing_reported(fault_stack: ServerStack) -> None:
    """The cancel request close() left in flight (PgBouncer suspended) is a task of the loop's:
    asyncio.run() ending the loop cancels it (as the process ending would close its socket),
    without "Task was destroyed but it is pending" or an exception never retrieved. (PgBouncer
    1.24: 1.18 may crash at RESUME on any cancel request cut short, docs/faults.md.)"""
    pooler = fault_stack.current
    reported: list[dict[str, Any]] = []
    took = await asyncio.to_thread(_close_in_a_loop_of_its_own, pooler, reported)
    assert took < 3.0, f"close(timeout=0.3) took {took:.2f} s"
    assert not reported, [context.get("message") for context in reported]
    assert await _select_one(pooler.dsn()) == 1


async def _select_one(dsn: str) -> int:
    async with Pool(dsn, name="after", min_size=0, max_size=1, telemetry=False) as pool:
        return int(await pool.fetchval("SELECT 1"))
