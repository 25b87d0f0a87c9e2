"""Leak detection that reclaims: cancel the holder, close the connection, say where it was taken."""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
from collections.abc import AsyncGenerator
from typing import Literal

import asyncpg
import pytest

import asyncpool
from asyncpool import Pool, PoolConfig
from asyncpool.testing import PgBouncerServer, ServerStack
from tests.cancel_support import cancelled_once_running
from tests.conftest import Pooler

LEAK_LOGGER = "asyncpool.leaks"


def _line_of_next_statement() -> int:
    frame = inspect.currentframe()
    assert frame is not None
    assert frame.f_back is not None
    return frame.f_back.f_lineno + 1


async def _server_connections_freed(pooler: Pooler) -> None:
    """Once PgBouncer has no server connection active (5 s at most)."""
    deadline = asyncio.get_running_loop().time() + 5
    while (await pooler.pool_row())["sv_active"] != 0:
        assert asyncio.get_running_loop().time() < deadline, "server connection still active"
        await asyncio.sleep(0.05)


def test_default_leak_timeout_is_30_seconds() -> None:
    assert PoolConfig().leak_timeout == 30.0
    assert PoolConfig().leak_action == "reclaim"


async def test_default_pool_tracks_leaks_at_30_seconds(pooler: Pooler) -> None:
    async with Pool(pooler.dsn(), telemetry=False) as pool:
        tracker = pool._slots.leaks
        assert getattr(tracker, "timeout", None) == 30.0
        async with pool.acquire():
            seen = [r.lease for r in getattr(tracker, "_records", []) if r.lease is not None]
            assert len(seen) == 1
        assert [r.lease for r in getattr(tracker, "_records", []) if r.lease is not None] == []


async def test_forever_holder_is_cancelled_and_sees_leak_error(
    pooler: Pooler, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger=LEAK_LOGGER)
    async with Pool(pooler.dsn(), name="leaky", max_size=1, leak_timeout=0.3,
                    telemetry=False) as pool:

        async def forgetful() -> None:
            line = _line_of_next_statement()
            async with pool.acquire() as conn:
                forgetful.line = line  # type: ignore[attr-defined]
                await conn.fetchval("SELECT 1")
                await asyncio.sleep(3600)

        task = asyncio.create_task(forgetful(), name="forgetful-handler")
        with pytest.raises(asyncpool.ConnectionLeakedError, match="leak_timeout"):
            await asyncio.wait_for(task, 5)
        assert not task.cancelled()  # it ended with ConnectionLeakedError, not CancelledError

        stats = pool.stats()
        assert stats.leaked_total == 1
        assert stats.in_use == 0
        assert stats.size == 0

        records = [r for r in caplog.records if r.name == LEAK_LOGGER]
        assert len(records) == 1
        record = records[0]
        assert record.levelno == logging.WARNING
        assert record.asyncpool_pool == "leaky"  # type: ignore[attr-defined]
        assert record.asyncpool_task == "forgetful-handler"  # type: ignore[attr-defined]
        assert 0.3 <= record.asyncpool_held_seconds < 3  # type: ignore[attr-defined]
        site: str = record.asyncpool_acquire_site  # type: ignore[attr-defined]
        assert f'File "{__file__}", line {forgetful.line}, in forgetful' in site  # type: ignore[attr-defined]
        assert f"line {forgetful.line}" in record.getMessage()  # type: ignore[attr-defined]

        # The pool serves again.
        assert await pool.fetchval("SELECT 4") == 4


async def test_reclaim_cancels_the_task_using_the_connection_not_the_one_that_took_it(
    pooler: Pooler,
) -> None:
    """A block inside an async generator, entered by one task and driven by another since (a
    row generator primed in a request and streamed by a child task): the reclaim cancels the
    task running its statements, and the task that entered the block, now doing something
    else, is left alone."""
    async with Pool(pooler.dsn(), max_size=2, leak_timeout=0.3, telemetry=False) as pool:

        async def rows() -> AsyncGenerator[int, None]:
            async with pool.acquire() as conn:
                for i in range(1000):
                    yield await conn.fetchval("SELECT $1::int", i)

        gen = rows()
        assert await anext(gen) == 0  # this task enters the block

        async def stream() -> None:
            while True:
                await anext(gen)
                await asyncio.sleep(0.05)

        streaming = asyncio.create_task(stream())
        await asyncio.sleep(1.0)  # unrelated work of the task that entered: not cancelled
        assert asyncio.current_task().cancelling() == 0  # type: ignore[union-attr]
        # The reclaim lands where the streaming task is: in its sleep (CancelledError there; the
        # block, still open, reports the leak when closed) or in a statement inside the block
        # (the block reports it there and is over). Either way the leak is reported once.
        try:
            await streaming
        except asyncpool.ConnectionLeakedError:
            await gen.aclose()  # (ended already: nothing left to report)
        except asyncio.CancelledError:
            with pytest.raises(asyncpool.ConnectionLeakedError):
                await gen.aclose()
        else:
            pytest.fail("the streaming task was not cancelled by the reclaim")
        assert pool.stats().leaked_total == 1


async def test_a_holder_whose_statements_ran_in_helper_tasks_is_still_the_holder(
    pooler: Pooler,
) -> None:
    """Statements run through ``asyncio.gather`` (a task each) do not make those short-lived
    tasks the holder: a reclaim cancels the task in the block, and close() awaited by the task
    holding a connection closes it at once."""
    async with Pool(pooler.dsn(), max_size=2, leak_timeout=0.3, telemetry=False) as pool:

        async def holder() -> None:
            async with pool.acquire() as conn:
                await asyncio.gather(conn.fetchval("SELECT 1"))
                await asyncio.sleep(5)

        with pytest.raises(asyncpool.ConnectionLeakedError):
            await asyncio.wait_for(holder(), 3)

    pool = Pool(pooler.dsn(), max_size=1, telemetry=False)
    await pool.open()
    conn = await pool.acquire()
    await asyncio.gather(conn.fetchval("SELECT 1"))
    async with asyncio.timeout(2):
        await pool.close(timeout=None)  # (it waited for itself, forever)


async def test_waiter_gets_the_reclaimed_slot(pooler: Pooler) -> None:
    async with Pool(pooler.dsn(), max_size=1, leak_timeout=0.3, acquire_timeout=5,
                    telemetry=False) as pool:

        async def hog() -> None:
            async with pool.acquire():
                await asyncio.sleep(3600)

        hog_task = asyncio.create_task(hog())
        await asyncio.sleep(0.05)
        loop = asyncio.get_running_loop()
        started = loop.time()
        assert await pool.fetchval("SELECT 8") == 8
        assert loop.time() - started < 3  # well before the 5 s acquire timeout
        with pytest.raises(asyncpool.ConnectionLeakedError):
            await hog_task
        assert pool.stats().leaked_total == 1


async def test_server_connection_is_freed_on_reclaim(pooler: Pooler) -> None:
    async with Pool(pooler.dsn(), max_size=1, leak_timeout=0.5, telemetry=False) as pool:
        holding = asyncio.Event()

        async def stuck_in_transaction() -> None:
            async with pool.transaction() as conn:
                await conn.execute("SELECT 1")
                holding.set()
                await asyncio.sleep(3600)

        task = asyncio.create_task(stuck_in_transaction())
        await holding.wait()
        assert (await pooler.pool_row())["sv_active"] == 1
        with pytest.raises(asyncpool.ConnectionLeakedError):
            await task
        await _server_connections_freed(pooler)
        assert pool.stats().leaked_total == 1


@pytest.mark.parametrize("how", ["cancel", "timeout"])
async def test_a_holder_interrupted_before_the_reclaim_sees_its_own_interruption(
        pooler: Pooler, how: str) -> None:
    """The caller cancels the holder (or its time limit fires) mid-statement; the block's cleanup
    is still running at leak_timeout when the reclaim comes. The caller gets its own
    CancelledError or TimeoutError, as when the reclaim comes first (it got
    ConnectionLeakedError), and the server connection is freed."""
    async with Pool(pooler.dsn(), max_size=1, leak_timeout=0.5, telemetry=False) as pool:
        running = asyncio.Event()

        async def holder() -> None:
            async with pool.transaction() as conn:
                running.set()
                try:
                    await conn.execute("SELECT pg_sleep(30)")
                finally:
                    await asyncio.sleep(2)  # cleanup that outlives leak_timeout

        for _ in range(2):
            running.clear()
            if how == "cancel":
                await cancelled_once_running(holder, running)
            else:
                with pytest.raises(TimeoutError) as info:
                    async with asyncio.timeout(0.2):
                        await holder()
                assert not isinstance(info.value, asyncpool.ConnectionLeakedError)
            current = asyncio.current_task()
            assert current is not None
            assert current.cancelling() == 0
        assert pool.stats().leaked_total == 2
        await _server_connections_freed(pooler)
        assert await pool.fetchval("SELECT 1") == 1


async def test_touching_the_connection_after_reclaim_raises_leak_error(pooler: Pooler) -> None:
    async with Pool(pooler.dsn(), max_size=1, leak_timeout=0.2, telemetry=False) as pool:
        seen: list[BaseException] = []

        async def stubborn() -> None:
            async with pool.acquire() as conn:
                try:
                    await asyncio.sleep(3600)
                except asyncio.CancelledError:
                    try:
                        await conn.fetchval("SELECT 1")
                    except asyncpool.ConnectionLeakedError as exc:
                        seen.append(exc)
                    raise

        with pytest.raises(asyncpool.ConnectionLeakedError):
            await asyncio.create_task(stubborn())
        assert len(seen) == 1


async def test_release_just_before_deadline_is_not_touched(
    pooler: Pooler, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger=LEAK_LOGGER)
    async with Pool(pooler.dsn(), max_size=1, leak_timeout=0.6, telemetry=False) as pool:
        async with pool.acquire() as conn:
            await asyncio.sleep(0.45)
            assert await conn.fetchval("SELECT 1") == 1
        await asyncio.sleep(0.4)  # past where the deadline would have been
        assert pool.stats().leaked_total == 0
        assert pool.stats().size == 1
        assert not [r for r in caplog.records if r.name == LEAK_LOGGER]


async def test_later_leases_are_each_checked_on_time(pooler: Pooler) -> None:
    """One timer serves every lease: a clean return must not delay the next lease's check."""
    async with Pool(pooler.dsn(), max_size=3, leak_timeout=0.4, telemetry=False) as pool:
        async with pool.acquire():
            await asyncio.sleep(0.1)

        async def hold() -> None:
            async with pool.acquire():
                await asyncio.sleep(3600)

        tasks = [asyncio.create_task(hold()) for _ in range(2)]
        done, pending = await asyncio.wait(tasks, timeout=3)
        assert not pending
        assert all(isinstance(t.exception(), asyncpool.ConnectionLeakedError) for t in done)
        assert pool.stats().leaked_total == 2


async def test_log_action_reports_without_reclaiming(
    pooler: Pooler, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger=LEAK_LOGGER)
    async with Pool(pooler.dsn(), max_size=1, leak_timeout=0.2, leak_action="log",
                    telemetry=False) as pool:
        async with pool.acquire() as conn:
            await asyncio.sleep(0.4)
            assert await conn.fetchval("SELECT 6") == 6  # still usable: not reclaimed
        messages = [r.getMessage() for r in caplog.records if r.name == LEAK_LOGGER]
        assert len(messages) == 2
        assert "leak_action='log'" in messages[0]
        assert "was returned after" in messages[1]
        stats = pool.stats()
        assert (stats.leaked_total, stats.size, stats.closed_total) == (1, 1, 0)


async def test_leak_detection_can_be_disabled(pooler: Pooler) -> None:
    async with Pool(pooler.dsn(), leak_timeout=None, telemetry=False) as pool:
        assert not hasattr(pool._slots.leaks, "timeout")
        async with pool.acquire() as conn:
            assert await conn.fetchval("SELECT 1") == 1


@pytest.mark.parametrize("cancel_requests", ["auto", "off"])
async def test_a_holder_that_awaited_acquire_is_not_cancelled_and_the_report_says_so(
    pooler: Pooler, caplog: pytest.LogCaptureFixture, cancel_requests: Literal["auto", "off"]
) -> None:
    """`conn = await pool.acquire()` has no block to end: the reclaim leaves the task running,
    stops its statement (a cancel request where one can be delivered, else the connection
    closes under it), which ends in ConnectionLeakedError whichever came first, and says so in
    the WARNING."""
    caplog.set_level(logging.WARNING, logger=LEAK_LOGGER)
    async with Pool(pooler.dsn(), max_size=1, leak_timeout=0.3, cancel_requests=cancel_requests,
                    telemetry=False) as pool:
        conn = await pool.acquire()
        with pytest.raises(asyncpool.ConnectionLeakedError) as info:
            await conn.fetchval("SELECT pg_sleep(10)")
        # With cancel requests the server's cancel usually reaches the query before the close
        # does (not always: the pool closes once the request is taken); without, only the close.
        stopped: tuple[type[Exception], ...] = (asyncpg.ConnectionDoesNotExistError,)
        if cancel_requests == "auto":
            stopped += (asyncpg.QueryCanceledError,)
        assert isinstance(info.value.__cause__, stopped)
        with pytest.raises(asyncpool.ConnectionLeakedError):
            await conn.fetchval("SELECT 1")
        await pool.release(conn)  # harmless
        assert pool.stats().leaked_total == 1
        [message] = [r.getMessage() for r in caplog.records if r.name == LEAK_LOGGER]
        assert "cancelled the holder" not in message
        assert "the holder is not cancelled (it took the connection without `async with`)" in message


async def test_reclaiming_statements_in_flight_leaves_pgbouncer_1_18_running(
        stack: ServerStack) -> None:
    """A reclaimed holder inside `async with` is cancelled while its statement runs, so asyncpg
    sends a cancel request of its own beside the pool's; closing the connection must wait for
    both: closing a cancel request's socket early crashes PgBouncer 1.18 (pgbouncer#801). Its
    own PgBouncer, so that a crash takes no other test with it."""
    bouncer = PgBouncerServer(stack.legacy.binary, stack.postgres,
                              {"default_pool_size": 4}).start()
    try:
        async with Pool(bouncer.dsn(), name="reclaim-118", min_size=3, max_size=3,
                        leak_timeout=0.5, telemetry=False) as pool:

            async def holder() -> None:
                async with pool.acquire() as conn:
                    await conn.execute("SELECT pg_sleep(10)")

            for _ in range(4):  # the crash came in about half the rounds
                holders = [asyncio.create_task(holder()) for _ in range(3)]
                for task in holders:
                    with pytest.raises(asyncpool.ConnectionLeakedError):
                        await asyncio.wait_for(task, 5)
                for _ in range(100):  # the reclaimed connections' closing, then a moment more
                    if pool.stats().size == 0:
                        break
                    await asyncio.sleep(0.02)
                await asyncio.sleep(0.3)
                assert bouncer.running(), bouncer.process.log_tail() if bouncer.process else ""
                assert await asyncio.wait_for(pool.fetchval("SELECT 5"), 5) == 5
    finally:
        bouncer.stop()



async def test_a_reclaim_is_told_from_the_holders_own_cancellation_by_the_requests_since_the_block(
        pooler: Pooler) -> None:
    """Counted as asyncio.timeout() counts: a task with a cancel request left over from earlier
    code (swallowed without uncancel()), whose block handles another task's cancellation slowly,
    ends in ConnectionLeakedError (it ended in CancelledError); a holder that caught its
    caller's cancel and raises a CancelledError after its slow cleanup ends cancelled (it ended
    in ConnectionLeakedError). Either way the server connection is freed."""
    async with Pool(pooler.dsn(), max_size=1, leak_timeout=0.5, telemetry=False) as pool:

        async def leftover() -> None:
            task = asyncio.current_task()
            assert task is not None
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):  # swallowed: still counted
                await asyncio.sleep(0)
            async with pool.acquire() as conn:
                await conn.fetchval("SELECT 1")
                other = asyncio.create_task(asyncio.sleep(30))
                asyncio.get_running_loop().call_later(0.05, other.cancel)
                try:
                    await other
                except asyncio.CancelledError:
                    await asyncio.sleep(30)  # reclaimed here

        task = asyncio.create_task(leftover())
        with pytest.raises(asyncpool.ConnectionLeakedError):
            await asyncio.wait_for(asyncio.shield(task), 10)
        assert task.cancelling() == 1  # the leftover alone

        running = asyncio.Event()

        async def caught() -> None:
            async with pool.acquire() as conn:
                running.set()
                cancelled = False
                try:
                    await conn.execute("SELECT pg_sleep(30)")
                except asyncio.CancelledError:
                    cancelled = True
                if cancelled:
                    await asyncio.sleep(2)  # cleanup past leak_timeout: reclaimed here
                    raise asyncio.CancelledError

        task = asyncio.create_task(caught())
        await running.wait()
        await asyncio.sleep(0.1)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await asyncio.wait_for(asyncio.shield(task), 10)
        assert task.cancelled()
        assert task.cancelling() == 1  # the caller's alone
        assert pool.stats().leaked_total == 2
        await _server_connections_freed(pooler)
        assert await pool.fetchval("SELECT 1") == 1
