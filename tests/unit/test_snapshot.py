"""A SnapStart snapshot and a restore 10 minutes later by the monotonic clock, against the fake
driver on a virtual clock: the clock jumps while the loop stands still, as across a restore."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import pytest

from asyncpool.integrations.lambda_runner import LambdaRunner
from asyncpool.observer import PoolObserver
from asyncpool.pool import snapshot
from asyncpool.pool.snapshot import empty_for_snapshot, resume_after_restore
from tests.unit.fakes import FakeServer, VirtualClockLoop, fake_pool

#: How much later the snapshot is restored, by the monotonic clock.
LATER = 600.0


def _snapshot_and_restore(loop: VirtualClockLoop, pool: Any) -> None:
    """The before-snapshot hook, the clock jumping `LATER` with nothing run, then the after-restore
    step, as `asyncpool.integrations.aws_lambda` runs them."""
    loop.run_until_complete(empty_for_snapshot(pool._slots, 2.0))
    loop.now += LATER
    loop.call_soon(resume_after_restore, pool._slots)


@pytest.mark.parametrize("waits_on", ["statement", "other"])
def test_a_setup_hook_under_way_at_the_snapshot_runs_again_after_a_late_restore(
    server: FakeServer, waits_on: str
) -> None:
    loop = VirtualClockLoop()
    began = asyncio.Event()
    go = asyncio.Event()
    ran_on: list[int] = []

    async def setup(conn: Any) -> None:
        ran_on.append(id(conn.raw))
        began.set()
        if waits_on == "statement":
            await conn.execute("SELECT pg_sleep(1)")
        else:
            await go.wait()
        await conn.execute("SELECT 1")

    pool = fake_pool(server, min_size=1, max_size=1, acquire_timeout=2.0, setup=setup)

    async def use() -> int:
        async with pool.acquire() as conn:
            return id(conn.raw)

    try:
        loop.run_until_complete(pool.open())
        task = loop.create_task(use())
        loop.run_until_complete(began.wait())
        _snapshot_and_restore(loop, pool)
        assert server.open_connections() == []  # none in the snapshot
        loop.settle()  # (the timers due by the clock that jumped run first)
        go.set()
        used = loop.run_until_complete(task)
        assert ran_on[-1] == used != ran_on[0]
        stats = pool.stats()
        assert (stats.timeouts_total, stats.created_total, stats.in_use) == (0, 2, 0)
        assert loop.errors == []
    finally:
        loop.run_until_complete(pool.close())
        loop.close()


def test_a_waiter_in_line_at_the_snapshot_is_served_after_a_late_restore(server: FakeServer) -> None:
    loop = VirtualClockLoop()
    pool = fake_pool(server, min_size=1, max_size=1, acquire_timeout=2.0)
    release = asyncio.Event()

    async def hold() -> None:
        async with pool.acquire():
            await release.wait()

    try:
        loop.run_until_complete(pool.open())
        holder = loop.create_task(hold())
        waiter = loop.create_task(pool.fetchval("SELECT 1"))
        loop.settle()
        assert pool.stats().waiting == 1
        _snapshot_and_restore(loop, pool)
        release.set()
        loop.run_until_complete(asyncio.wait([holder, waiter]))
        assert waiter.exception() is None
        assert pool.stats().timeouts_total == 0
    finally:
        loop.run_until_complete(pool.close())
        loop.close()


def test_the_leak_timer_and_housekeeping_across_a_late_restore(server: FakeServer) -> None:
    """The leak timer, armed for a connection held at the snapshot (closed there), and the
    housekeeping period both run out at once after the restore: neither reports nor closes
    what the first invocation then holds (a hold shorter than leak_timeout)."""
    loop = VirtualClockLoop()
    pool = fake_pool(server, min_size=1, max_size=2, acquire_timeout=2.0, leak_timeout=5.0,
                     max_idle=4.0)
    release = asyncio.Event()

    async def hold() -> None:
        async with pool.acquire():
            await release.wait()

    async def first() -> int:
        async with pool.acquire() as conn:
            await asyncio.sleep(1.0)
            value: int = await conn.fetchval("SELECT 1")
            return value

    try:
        loop.run_until_complete(pool.open())
        holder = loop.create_task(hold())
        loop.settle()
        _snapshot_and_restore(loop, pool)
        release.set()
        assert loop.run_until_complete(first()) == 1
        loop.run_until_complete(asyncio.wait([holder]))
        stats = pool.stats()
        assert (stats.leaked_total, stats.timeouts_total, stats.in_use) == (0, 0, 0)
        assert stats.size >= 1
        assert loop.errors == []
    finally:
        loop.run_until_complete(pool.close())
        loop.close()


@pytest.mark.parametrize("waiting", ["in-line", "between-logins"])
def test_a_connection_handed_to_a_waiter_in_the_snapshots_first_turns_serves_it_after_the_restore(
    server: FakeServer, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture,
    waiting: str
) -> None:
    """An INIT holder gives its connection back during the snapshot's first loop turns, in the
    last one: it is handed to the caller in line (or between two login attempts), whose task
    has not run to take it when the snapshot closes the connections. That caller got
    PoolClosedError (and was warned about as a holder); it keeps the slot and logs in after
    the restore."""
    loop = VirtualClockLoop()
    pool = fake_pool(server, min_size=1, max_size=1 if waiting == "in-line" else 2,
                     acquire_timeout=2.0)
    release = asyncio.Event()
    handed_at_close: list[int] = []
    close_in_use = snapshot._close_in_use

    def closing(slots: Any) -> None:
        handed_at_close.append(len(slots.handed))
        close_in_use(slots)

    monkeypatch.setattr(snapshot, "_close_in_use", closing)

    async def hold() -> None:
        async with pool.acquire():
            await release.wait()
            # Back in the third of the snapshot's first turns (_FIRST_TURNS), after its own.
            await asyncio.sleep(0)
            await asyncio.sleep(0)

    try:
        loop.run_until_complete(pool.open())
        holder = loop.create_task(hold())
        loop.settle()
        if waiting == "between-logins":
            server.login_mode = "refuse"  # its login fails, and it waits in line to try again
        caller = loop.create_task(pool.fetchval("SELECT 1"))
        loop.advance(0.005)  # (a login: 3 ms; the first backoff, at least 25 ms)
        slots = pool._slots
        assert len(slots.waiters) == 1
        assert slots.retrying == (waiting == "between-logins")
        emptying = loop.create_task(empty_for_snapshot(slots, 2.0))  # (its first turn first)
        release.set()
        with caplog.at_level(logging.WARNING, logger="asyncpool.pool"):
            loop.run_until_complete(emptying)
        assert [r.getMessage() for r in caplog.records] == []  # (nobody held it)
        assert handed_at_close == [1]  # handed, not yet taken, when the snapshot closed it
        assert server.open_connections() == []
        server.login_mode = "ok"
        loop.now += LATER
        loop.call_soon(resume_after_restore, slots)
        loop.run_until_complete(asyncio.wait([holder, caller]))
        assert caller.result() == 1
        stats = pool.stats()
        assert (stats.timeouts_total, stats.in_use, stats.connecting, stats.size) == (0, 0, 0, 1)
        assert stats.created_total == 2  # (opened at INIT; the caller's, after the restore)
        assert loop.errors == []
    finally:
        loop.run_until_complete(pool.close())
        loop.close()


class _Checkouts(PoolObserver):
    """Counts the checkouts an observer is told of, and their ends."""

    def __init__(self) -> None:
        self.waits: list[float] = []
        self.uses: list[float] = []

    def acquired(self, wait_seconds: float) -> None:
        self.waits.append(wait_seconds)

    def released(self, use_seconds: float) -> None:
        self.uses.append(use_seconds)


def test_an_acquire_whose_setup_hook_runs_again_after_the_restore_counts_once(
    server: FakeServer
) -> None:
    """The hook's second run is on a checkout of its own (its first connection was closed for
    the snapshot): that checkout was counted as an acquire of its own (acquired_total 2, two
    wait times), and the first connection's close as the end of a use (two use times)."""
    loop = VirtualClockLoop()
    began = asyncio.Event()
    runs: list[int] = []
    observer = _Checkouts()

    async def setup(conn: Any) -> None:
        runs.append(id(conn.raw))
        began.set()
        await conn.execute("SELECT 1")

    pool = fake_pool(server, min_size=1, max_size=1, acquire_timeout=2.0, setup=setup,
                     observers=[observer])

    async def use() -> int:
        async with pool.acquire() as conn:
            value: int = await conn.fetchval("SELECT $1", 2)
            return value

    try:
        loop.run_until_complete(pool.open())
        task = loop.create_task(use())
        loop.run_until_complete(began.wait())
        _snapshot_and_restore(loop, pool)
        assert loop.run_until_complete(task) == 2
        assert len(runs) == 2
        assert pool.stats().acquired_total == 1
        assert (len(observer.waits), len(observer.uses)) == (1, 1)
        assert loop.errors == []
    finally:
        loop.run_until_complete(pool.close())
        loop.close()


def test_a_restore_logs_in_once_for_min_size(server: FakeServer) -> None:
    """Restored later than the housekeeping period, the pool (min_size=1) begins a refill as
    the loop runs again, at the first invocation; the invocation's start (`LambdaRunner`'s
    `mark_stale`) gave that login up as one begun before a pause, and the invocation's query
    logged in again: two logins per restore where one is needed."""
    loop = VirtualClockLoop()
    pool = fake_pool(server, min_size=1, max_size=1, acquire_timeout=2.0)
    runner = LambdaRunner()
    runner.attach(pool)

    async def first_invocation() -> int:
        await runner._after_pause()  # (what every invocation begins with)
        value: int = await pool.fetchval("SELECT 1")
        return value

    try:
        loop.run_until_complete(pool.open())
        _snapshot_and_restore(loop, pool)
        logins = server.logins
        assert loop.run_until_complete(first_invocation()) == 1
        loop.advance(1.0)
        assert server.logins - logins == 1
        stats = pool.stats()
        assert (stats.created_total, stats.size, stats.connect_errors_total) == (2, 1, 0)
        assert loop.errors == []
    finally:
        loop.run_until_complete(pool.close())
        loop.close()
