"""`asyncpool.pool.shutdown` against PgBouncer: a loop blocked at shutdown, and what is said of
the cancel requests that could not be delivered.

What a shutdown said of them (`lifecycle.send_cancels`) was "N of M cancel requests were not
taken within 0s", both for requests it had no time to send at all (the budget spent before: by
the held connections' share, by another loop's pools) and for requests written to a server that
had not answered yet (which may still cancel the statement). Now one warning says, pool by
pool, which were sent and not confirmed, which were not sent, and why.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import threading
import time
import uuid
from collections.abc import AsyncIterator

import pytest

from asyncpool import Pool, PoolClosedError
from asyncpool.integrations import aws_lambda
from asyncpool.pool import lifecycle, shutdown
from asyncpool.pool.slots import Slots
from asyncpool.testing import PgBouncerServer, PostgresServer
from asyncpool.testing.faultproxy import FaultProxy


async def _stalled(dsn: str, name: str, tag: str) -> tuple[Pool, asyncio.Task[str]]:
    """A pool named `name` whose one connection runs ``pg_sleep(30)`` tagged `tag`."""
    pool = Pool(dsn, min_size=0, max_size=1, telemetry=False, name=name)
    await pool.open()
    return pool, asyncio.create_task(pool.execute(f"SELECT pg_sleep(30) /* {tag} */"))


async def _warning_of_close(budget: float, dsns: dict[str, str], postgres: PostgresServer,
                            caplog: pytest.LogCaptureFixture) -> str:
    """The one warning of `shutdown.close_together` with `budget` seconds, closing a pool per
    name of `dsns` whose connection runs a statement."""
    tag = f"report-{uuid.uuid4().hex[:10]}"
    stalled = [await _stalled(dsn, name, tag) for name, dsn in dsns.items()]
    caplog.set_level(logging.WARNING, "asyncpool.pool")
    try:
        await _running(postgres, tag, len(stalled))
        await shutdown.close_together([pool for pool, _ in stalled], time.monotonic() + budget)
        await asyncio.gather(*(task for _, task in stalled), return_exceptions=True)
    finally:
        await postgres.end_statements(tag)
    [warning] = _warnings(caplog)
    return warning


async def _settled() -> None:
    """Once the running loop's other tasks are done (a terminated pool's cancel requests...)."""
    others = asyncio.all_tasks() - {asyncio.current_task()}
    if others:
        await asyncio.wait(others, timeout=5)


def _warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [record.getMessage() for record in caplog.records
            if record.name == "asyncpool.pool" and record.levelno == logging.WARNING]


async def _running(postgres: PostgresServer, tag: str, count: int = 1) -> None:
    """Once `count` statements tagged `tag` run on the server (5 s at most)."""
    async with asyncio.timeout(5):
        while await postgres.running_statements(tag) < count:
            await asyncio.sleep(0.05)


async def _left_running(postgres: PostgresServer, tag: str) -> int:
    """How many statements tagged `tag` still run once they end, or after a second."""
    deadline = time.monotonic() + 1.0
    while (left := await postgres.running_statements(tag)) and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    return left


@contextlib.asynccontextmanager
async def _pools_loop(postgres: PostgresServer, tag: str
                      ) -> AsyncIterator[tuple[asyncio.AbstractEventLoop, threading.Event]]:
    """A loop running on a thread of its own (as the pools' of an application whose handler
    runs elsewhere), and an event that lets it go on once set; on the way out the event is set,
    `tag`'s statements ended, the loop stopped and closed."""
    loop = asyncio.new_event_loop()
    runner = threading.Thread(target=loop.run_forever, name="pools-loop", daemon=True)
    runner.start()
    unblock = threading.Event()
    try:
        yield loop, unblock
    finally:
        unblock.set()
        await postgres.end_statements(tag)
        # The loop runs what a close or terminate queued on it left (a terminated pool's cancel
        # requests, its connections' and credentials' closes) before it stops. Stopped at once
        # (a test failing with its loop still blocked, the pool's terminate queued behind the
        # block), the terminate and the stop ran in one iteration, those tasks never ran, and a
        # later test's garbage collection reported their coroutines "never awaited".
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(10):
                await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(_settled(), loop))
        loop.call_soon_threadsafe(loop.stop)
        runner.join(5)
        loop.close()


async def _closed_once_unblocked(loop: asyncio.AbstractEventLoop, unblock: threading.Event,
                                 pool: Pool, stalled: asyncio.Task[str]) -> None:
    """`loop` let go on: `pool` ends closed, and its statement's caller told so."""
    unblock.set()
    await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(_settled(), loop))
    assert pool.closed
    assert isinstance(stalled.exception(), PoolClosedError)


async def test_requests_sent_but_unanswered_are_told_apart_from_those_taken(
        legacy: PgBouncerServer, postgres: PostgresServer, caplog: pytest.LogCaptureFixture) -> None:
    """`slow`'s requests reach PgBouncer only after a second (a busy pooler): sent, not
    confirmed within the budget; `quick`'s are taken, and not reported."""
    async with FaultProxy.to_dsn(legacy.dsn()) as proxy:
        proxy.cancel_delay = 1.0
        warning = await _warning_of_close(
            0.6, {"slow": proxy.dsn(legacy.dsn()), "quick": legacy.dsn()}, postgres, caplog)
    # (The time left after the held connections' share of the budget: 0.45 s, less what the
    # machine took meanwhile.)
    assert re.search(r"pool 'slow': 1 of 1 sent, not confirmed within 0\.[1-4]\d*s;", warning), warning
    assert "'quick'" not in warning, warning


async def test_requests_with_no_time_left_are_said_not_sent(
        legacy: PgBouncerServer, postgres: PostgresServer, caplog: pytest.LogCaptureFixture) -> None:
    """The budget spent before the pools' turn: no request is even tried, and the warning (one
    for both pools) says so rather than that the servers did not take them."""
    warning = await _warning_of_close(0, {"first": legacy.dsn(), "second": legacy.dsn()},
                                      postgres, caplog)
    assert ("pool 'first': 1 of 1 not sent (no time left); "
            "pool 'second': 1 of 1 not sent (no time left)") in warning, warning


async def test_a_blocked_loop_has_its_statements_cancelled_from_the_closing_thread(
        legacy: PgBouncerServer, postgres: PostgresServer) -> None:
    """The pools' loop (a thread of its own) busy in synchronous code at shutdown: the close
    waited for it to run `close_together` for the whole budget, then queued `terminate()` on it,
    and the process ended with the statement running on the server. Now the statement is
    cancelled from the closing thread within the budget, and the pool terminated once the loop
    runs again."""
    tag = f"blocked-{uuid.uuid4().hex[:10]}"
    async with _pools_loop(postgres, tag) as (loop, unblock):
        pool, stalled = asyncio.run_coroutine_threadsafe(
            _stalled(legacy.dsn(), "blocked", tag), loop).result(10)
        await _running(postgres, tag)
        loop.call_soon_threadsafe(unblock.wait, 10)
        started = time.monotonic()
        # (As `close_on_shutdown`'s hooks close pools whose loop runs on another thread.)
        await asyncio.to_thread(aws_lambda._close_pools, [pool], loop, started + 1.0)
        took = time.monotonic() - started
        assert await _left_running(postgres, tag) == 0, "the statement runs on while the loop is blocked"
        assert took < 1.1, f"{took:.2f}s for a 1 s budget"
        assert not pool.closed  # (the loop is still blocked)
        await _closed_once_unblocked(loop, unblock, pool, stalled)


async def test_a_loop_blocked_after_the_close_began_has_its_statements_cancelled_from_the_closing_thread(
        legacy: PgBouncerServer, postgres: PostgresServer, monkeypatch: pytest.MonkeyPatch) -> None:
    """The close starts on the pools' loop (its own thread) in time, then other synchronous
    code blocks that loop before the close's cancel step: the closing thread waited out the
    budget, queued `terminate()` on the loop, and the process ended with the statement running
    on the server. Now the closing thread sends the cancel requests itself when the loop has not
    reached that step in time (one side or the other, never both)."""
    tag = f"blocked-later-{uuid.uuid4().hex[:10]}"
    blocked = threading.Event()
    stop = lifecycle._stop

    async with _pools_loop(postgres, tag) as (loop, unblock):

        def stop_then_block(slots: Slots, reason: str, graceful: bool) -> None:
            # Synchronous code of someone else's, run by the loop just after the close began.
            stop(slots, reason, graceful)
            if graceful and not blocked.is_set():
                blocked.set()
                loop.call_soon(unblock.wait, 10)

        monkeypatch.setattr(lifecycle, "_stop", stop_then_block)
        pool, stalled = asyncio.run_coroutine_threadsafe(
            _stalled(legacy.dsn(), "blocked-later", tag), loop).result(10)
        await _running(postgres, tag)
        started = time.monotonic()
        await asyncio.to_thread(aws_lambda._close_pools, [pool], loop, started + 1.0)
        took = time.monotonic() - started
        assert blocked.is_set(), "the close never began on the loop"
        assert await _left_running(postgres, tag) == 0, "the statement runs on while the loop is blocked"
        # By design within the budget + 0.1 s (`close_elsewhere` waits that long for the blocked
        # loop's close); the rest is thread scheduling, 0.15 s at a load of 6 (a full-suite run).
        assert took < 1.5, f"{took:.2f}s for a 1 s budget"
        await _closed_once_unblocked(loop, unblock, pool, stalled)
