"""One test per core defect of issue #15, against the fake driver on a virtual clock.

Each failed on the pool before the rebuild (commit 9b3c9db) and passes on it; the numbers are
the issue's. Defect 11 (DSN passwords in errors) belongs to the credentials work (#23).
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import math
import os
import sys
import threading
import warnings
import weakref
from collections.abc import AsyncGenerator, AsyncIterator
from typing import Any

import pytest

from asyncpool import (
    ConnectError,
    ConnectionLeakedError,
    Pool,
    PoolClosedError,
    PoolConfigError,
    PoolError,
    PoolObserver,
)
from asyncpool.connect import driver
from tests.cancel_support import cancelled_once_running
from tests.unit.fakes import (
    FakeCredentials,
    FakeServer,
    VirtualClockLoop,
    fake_pool,
    leak_report,
    patched_cancel_requests,
    run,
)


class _Watcher(PoolObserver):
    def __init__(self) -> None:
        self.attached = 0
        self.detached = 0

    def attach(self, pool_name: str, stats: Any) -> None:
        self.attached += 1

    def detach(self) -> None:
        self.detached += 1


# -- 1 ----------------------------------------------------------------------------------------


def test_1_housekeeping_survives_a_refill_that_times_out(
    server: FakeServer, caplog: pytest.LogCaptureFixture
) -> None:
    async def main() -> None:
        async with fake_pool(server, min_size=1, max_size=2, connect_timeout=0.5, max_idle=2.0) as pool:
            server.login_mode = "hang"
            async with pool.acquire() as conn:
                conn.raw.die()  # type: ignore[attr-defined]  # the only connection goes; housekeeping must refill min_size
            await asyncio.sleep(5)  # refills time out
            server.login_mode = "ok"
            await asyncio.sleep(5)
            assert pool.stats().size == 1, "housekeeping stopped refilling min_size"
            assert pool.stats().idle == 1

    with caplog.at_level(logging.INFO, logger="asyncpool"):
        run(main())
    refill_failures = [r.getMessage() for r in caplog.records if "min_size" in r.getMessage()]
    assert refill_failures
    assert all("connect_timeout" in m and "max_size" not in m.split("min_size")[1]
               for m in refill_failures), refill_failures


def test_1_a_connect_timeout_says_it_is_one(server: FakeServer) -> None:
    async def main() -> None:
        server.login_mode = "hang"
        pool = fake_pool(server, min_size=1, connect_timeout=0.5)
        with pytest.raises(ConnectError) as info:
            await pool.open()
        assert "connect_timeout=0.5" in str(info.value)
        assert "max_size" not in str(info.value)

    run(main())


# -- 2 ----------------------------------------------------------------------------------------


def test_2_terminate_fails_waiters_counts_and_detaches(server: FakeServer) -> None:
    watcher = _Watcher()
    creds = FakeCredentials()

    async def main() -> None:
        pool = fake_pool(server, min_size=1, max_size=1, acquire_timeout=None, observers=[watcher],
                         connect_kwargs={"fake_credentials": creds})
        await pool.open()
        held = await pool.acquire()
        waiter = asyncio.ensure_future(pool.fetchval("SELECT 1"))
        await asyncio.sleep(0.01)
        assert pool.stats().waiting == 1
        pool.terminate()
        with pytest.raises(PoolClosedError):
            await asyncio.wait_for(waiter, 1)
        await asyncio.sleep(0.1)
        s = pool.stats()
        assert (s.size, s.in_use, s.waiting) == (0, 0, 0)
        assert s.closed_total == s.created_total == 1
        assert watcher.detached == 1
        assert creds.closed == 1
        with pytest.raises(PoolClosedError):
            await held.fetchval("SELECT 1")

    run(main())


# -- 3 ----------------------------------------------------------------------------------------


def test_3_release_refuses_a_connection_of_another_pool(server: FakeServer) -> None:
    async def main() -> None:
        async with fake_pool(server, name="a") as a, fake_pool(server, name="b") as b:
            conn = await a.acquire()
            with pytest.raises(PoolError, match="pool 'a'"):
                await b.release(conn)
            assert a.stats().in_use == 1
            assert (b.stats().in_use, b.stats().idle) == (0, 1)
            await a.release(conn)
            assert (a.stats().in_use, a.stats().idle) == (0, 1)

    run(main())


# -- 4 ----------------------------------------------------------------------------------------


def test_4_statements_and_transactions_stop_working_after_release(server: FakeServer) -> None:
    async def main() -> None:
        async with fake_pool(server, max_size=1) as pool:
            async with pool.acquire() as conn:
                stmt = await conn.prepare("SELECT 1")
                tx = conn.transaction()
            async with pool.acquire():  # another holder has the same server connection now
                with pytest.raises(Exception, match="released back to the pool"):
                    await stmt.fetchval()
                with pytest.raises(Exception, match="released back to the pool"):
                    await tx.start()

    run(main())


def test_4_listeners_do_not_outlive_the_lease(server: FakeServer) -> None:
    async def main() -> None:
        async with fake_pool(server, max_size=1) as pool:
            seen: list[str] = []
            async with pool.acquire() as conn:
                await conn.add_listener("chan", lambda *args: seen.append(args[-1]))
                raw = conn.raw
            assert raw.notify("chan", "for the next holder") == 0  # type: ignore[attr-defined]
            assert seen == []
            assert "UNLISTEN *" in raw.queries  # type: ignore[attr-defined]

    run(main())


def test_4_pooled_connection_close_gives_it_back(server: FakeServer) -> None:
    async def main() -> None:
        async with fake_pool(server, max_size=1) as pool:
            conn = await pool.acquire()
            raw = conn.raw
            await conn.close()
            assert not raw.is_closed()
            s = pool.stats()
            assert (s.in_use, s.idle, s.closed_total) == (0, 1, 0)
            with pytest.raises(PoolError, match="released"):
                await conn.fetchval("SELECT 1")

    run(main())


# -- 5 ----------------------------------------------------------------------------------------


def test_5_a_cancelled_close_still_closes_idle_connections(server: FakeServer) -> None:
    async def main() -> None:
        pool = fake_pool(server, min_size=2, max_size=3)
        await pool.open()
        held = await pool.acquire()
        closing = asyncio.ensure_future(pool.close(timeout=10))
        await asyncio.sleep(0.5)  # a shutdown deadline cancels close() while it waits for `held`
        closing.cancel()
        with pytest.raises(asyncio.CancelledError):
            await closing
        await asyncio.sleep(1)
        assert server.open_connections() == []
        s = pool.stats()
        assert (s.size, s.closed_total) == (0, s.created_total)
        del held

    run(main())


# -- 6 ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("then", ["nothing", "expire_all", "reaping"])
def test_6_connections_and_slots_freed_during_login_retries_reach_the_callers(
    server: FakeServer, then: str
) -> None:
    """The pooler takes one client (max_client_conn): b's logins are refused while a's
    connection is open. a gives it back while b is logging in: b must get it. Whatever
    frees a slot afterwards (expire_all, idle reaping), nobody waits while one is free."""
    server.max_connections = 1

    async def main() -> None:
        async with fake_pool(server, min_size=0, max_size=2, acquire_timeout=None,
                             max_idle=0.2, validate_after=None) as pool:
            got: list[str] = []

            async def hold(who: str, seconds: float) -> None:
                async with pool.acquire():
                    got.append(who)
                    await asyncio.sleep(seconds)

            a = await pool.acquire()
            b = asyncio.ensure_future(hold("b", 10))
            await asyncio.sleep(0.001)  # b is logging in
            await pool.release(a)  # returned between two of b's login attempts
            await asyncio.sleep(0.05)
            c = asyncio.ensure_future(hold("c", 0))
            await asyncio.sleep(0.05)
            if then == "expire_all":
                pool.expire_all()
            elif then == "reaping":
                await asyncio.sleep(6)
            await asyncio.sleep(0.5)
            s = pool.stats()
            assert not (s.waiting and (s.idle or s.size < s.max_size)), s
            assert "b" in got, "the returned connection did not reach the caller retrying its login"
            for task in (b, c):
                task.cancel()
            await asyncio.gather(b, c, return_exceptions=True)

    run(main())


# -- 7 ----------------------------------------------------------------------------------------


def test_7_a_connection_being_validated_is_not_handed_out_after_close(server: FakeServer) -> None:
    async def main() -> None:
        pool = fake_pool(server, min_size=1, max_size=1, validate_after=0)
        await pool.open()
        await asyncio.sleep(0.01)
        taker = asyncio.ensure_future(pool.fetchval("SELECT 1"))
        await asyncio.sleep(0)  # the idle connection is being checked
        await pool.close()
        with pytest.raises(PoolClosedError):
            await taker
        assert server.open_connections() == []

    run(main())


def test_7_a_connection_handed_to_a_waiter_is_not_used_after_close(server: FakeServer) -> None:
    async def main() -> None:
        pool = fake_pool(server, min_size=1, max_size=1)
        await pool.open()
        held = await pool.acquire()
        waiter = asyncio.ensure_future(pool.fetchval("SELECT 1"))
        await asyncio.sleep(0.01)
        await pool.release(held)  # handed to the waiter, which has not run yet
        await pool.close()
        with pytest.raises(PoolClosedError):
            await waiter
        assert server.open_connections() == []
        s = pool.stats()
        assert (s.size, s.in_use, s.closed_total) == (0, 0, s.created_total)

    run(main())


# -- 8 ----------------------------------------------------------------------------------------


def test_8_a_reclaim_during_rollback_leaves_no_cancel_request(server: FakeServer) -> None:
    async def main() -> None:
        async with fake_pool(server, leak_timeout=1.0) as pool:

            async def leak_in_rollback() -> None:
                async with pool.transaction():  # BEGIN takes one round trip (server.latency)
                    await asyncio.sleep(1.0 - 1.5 * server.latency)
                    raise ValueError("the block fails; its ROLLBACK outlives leak_timeout")

            task = asyncio.current_task()
            assert task is not None
            for _ in range(2):
                with pytest.raises(ConnectionLeakedError):
                    await leak_in_rollback()
                assert task.cancelling() == 0
            assert pool.stats().leaked_total == 2

    run(main())


def test_8_a_reclaim_does_not_cancel_a_task_that_awaited_acquire(server: FakeServer) -> None:
    async def main() -> None:
        async with fake_pool(server, leak_timeout=1.0) as pool:
            conn = await pool.acquire()
            await asyncio.sleep(2)  # not cancelled by the reclaim
            with pytest.raises(ConnectionLeakedError):
                await conn.fetchval("SELECT 1")
            assert pool.stats().leaked_total == 1
            await pool.release(conn)  # harmless
            assert await pool.fetchval("SELECT 1") == 1

    run(main())


# -- 9 ----------------------------------------------------------------------------------------


def test_9_close_stops_logins_under_way_and_counts_them(server: FakeServer) -> None:
    async def main() -> None:
        pool = fake_pool(server, min_size=0, max_size=2)
        await pool.open()
        server.login_latency = 0.5
        taker = asyncio.ensure_future(pool.fetchval("SELECT 1"))
        await asyncio.sleep(0.1)  # logging in
        await pool.close()
        with pytest.raises(PoolClosedError):
            await asyncio.wait_for(taker, 0.01)
        await asyncio.sleep(1)
        s = pool.stats()
        assert s.created_total == s.closed_total
        assert server.open_connections() == []

    run(main())


# -- 10 ---------------------------------------------------------------------------------------


def test_10_stats_from_another_thread_while_waiters_come_and_go(server: FakeServer) -> None:
    errors: list[BaseException] = []
    stop = threading.Event()

    async def main() -> None:
        async with fake_pool(server, min_size=1, max_size=2, acquire_timeout=None) as pool:

            def read() -> None:
                while not stop.is_set():
                    try:
                        pool.stats()
                    except BaseException as exc:
                        errors.append(exc)
                        return

            async def user() -> None:
                for _ in range(40):
                    async with pool.acquire() as conn:
                        await conn.fetchval("SELECT 1")

            reader = threading.Thread(target=read)
            reader.start()
            try:
                for _ in range(30):
                    await asyncio.gather(*(user() for _ in range(20)))
                    if errors:
                        break
            finally:
                stop.set()
                reader.join()

    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    try:
        run(main())
    finally:
        sys.setswitchinterval(interval)
    assert errors == []


# -- 12 ---------------------------------------------------------------------------------------


def test_12_connect_timeout_none_is_refused() -> None:
    with pytest.raises(PoolConfigError, match="connect_timeout"):
        Pool("postgresql://app@db/app", connect_timeout=None)  # type: ignore[call-overload]


@pytest.mark.parametrize("timeout", ["1", -1, math.nan, [1]])
def test_12_acquire_timeout_is_checked(server: FakeServer, timeout: Any) -> None:
    async def main() -> None:
        async with fake_pool(server) as pool:
            with pytest.raises(PoolConfigError, match="timeout"):
                await pool.acquire(timeout=timeout)
            assert pool.stats().in_use == 0

    run(main())


def test_12_close_from_another_loop_is_refused_and_leaves_the_pool_whole(server: FakeServer) -> None:
    home = VirtualClockLoop()
    other = VirtualClockLoop()
    try:
        pool = fake_pool(server, min_size=1)
        run(pool.open(), loop=home)
        with pytest.raises(PoolError, match="another event loop"):
            run(pool.close(), loop=other)
        assert not pool.closed
        assert run(pool.fetchval("SELECT 1"), loop=home) == 1
        run(pool.close(), loop=home)
        assert pool.stats().closed_total == pool.stats().created_total
    finally:
        home.close()
        other.close()


# -- 13 ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("telemetry", [False, True])
def test_13_a_dropped_pool_warns_and_is_collected(server: FakeServer, telemetry: bool) -> None:
    async def main() -> weakref.ref[Pool]:
        pool = fake_pool(server, min_size=2, telemetry=telemetry)
        await pool.open()
        await pool.fetchval("SELECT 1")
        return weakref.ref(pool)

    loop = VirtualClockLoop()
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            ref = run(main(), loop=loop)
            gc.collect()
            loop.advance(10)
        # A recorded warning holds its source (the pool): keep only the text.
        messages = [(w.category, str(w.message)) for w in caught]
        caught.clear()
        gc.collect()
        assert ref() is None, "the pool is still referenced"
        assert (ResourceWarning, "unclosed pool 'unit': close it with 'await pool.close()' or "
                "'async with'") in messages, messages
        assert server.open_connections() == []
    finally:
        loop.close()


# -- 14 ---------------------------------------------------------------------------------------


def test_14_a_leak_report_shows_the_callers_stack(
    server: FakeServer, caplog: pytest.LogCaptureFixture
) -> None:
    async def handler(pool: Pool) -> None:
        await service(pool)

    async def service(pool: Pool) -> None:
        async with pool.acquire() as conn:
            await asyncio.sleep(2)
            await conn.fetchval("SELECT 1")

    async def main() -> None:
        async with fake_pool(server, leak_timeout=1.0, leak_action="log") as pool:
            await handler(pool)

    site, names = leak_report(caplog, main())
    assert "leaks.py" not in site, site
    assert "base_events.py" not in site, site
    assert names[-3:] == ["main", "handler", "service"], site
    assert "async with pool.acquire() as conn:" in site


async def _no_setup(conn: object) -> None:
    return None


@pytest.mark.parametrize(("setup", "by_name"), [(None, False), (_no_setup, False), (None, True)],
                         ids=["fast path", "setup hook", "query by name"])
def test_14_a_query_helpers_leak_report_shows_its_caller(
    server: FakeServer, caplog: pytest.LogCaptureFixture, setup: Any, by_name: bool
) -> None:
    """`pool.fetchval()` keeps no frame: the report finds the caller in the task's chain."""

    async def handler(pool: Pool) -> None:
        await service(pool)

    async def service(pool: Pool) -> None:
        server.latency = 2.0  # this statement runs past leak_timeout
        if by_name:
            await pool.fetchval(query="SELECT 1")
            return
        await pool.fetchval("SELECT 1")

    async def main() -> None:
        async with fake_pool(server, leak_timeout=1.0, leak_action="log", setup=setup) as pool:
            await handler(pool)

    site, names = leak_report(caplog, main())
    assert names[-3:] == ["main", "handler", "service"], site
    assert ('await pool.fetchval(query="SELECT 1")' if by_name
            else 'await pool.fetchval("SELECT 1")') in site, site
    assert "slots.py" not in site, site
    assert "runner.py" not in site, site
    assert "pool.py" not in site, site
    assert any("previously reported as leaked was returned" in r.getMessage()
               for r in caplog.records)


def test_a_leak_held_by_a_suspended_dependency_is_not_said_to_have_returned(
    server: FakeServer, caplog: pytest.LogCaptureFixture
) -> None:
    """FastAPI's way: a generator acquires, yields the connection and stays suspended while the
    endpoint runs; the report shows the generator's line and the endpoint's stack, and does not
    claim the generator returned."""

    @contextlib.asynccontextmanager
    async def dependency(pool: Pool) -> AsyncIterator[Any]:
        async with pool.acquire() as conn:
            yield conn

    async def endpoint(conn: Any) -> None:
        await asyncio.sleep(2.0)  # past leak_timeout, with the connection held

    async def main() -> None:
        async with (fake_pool(server, leak_timeout=1.0, leak_action="log") as pool,
                    dependency(pool) as conn):
            await endpoint(conn)

    site, names = leak_report(caplog, main())
    assert "async with pool.acquire() as conn:" in site, site
    assert "it is a generator suspended at a yield" in site, site
    assert "has returned;" not in site, site
    # Its acquire, the yield it waits at, then the endpoint's stack (then asyncio.sleep's).
    assert names[:4] == ["dependency", "dependency", "main", "endpoint"], site


def test_a_leak_report_shows_the_holder_in_its_own_code(
    server: FakeServer, caplog: pytest.LogCaptureFixture
) -> None:
    """Where the suspended generator waits (its yield), and where the holding task is in the
    caller's code: its awaits through asyncpool's own frames (a statement running) said
    nothing of the holder, and were shown."""

    @contextlib.asynccontextmanager
    async def dependency(pool: Pool) -> AsyncIterator[Any]:
        async with pool.acquire() as conn:
            yield conn

    async def endpoint(conn: Any) -> None:
        server.latency = 2.0  # this statement runs past leak_timeout
        await conn.fetchval("SELECT 1")

    async def main() -> None:
        async with (fake_pool(server, leak_timeout=1.0, leak_action="log") as pool,
                    dependency(pool) as conn):
            await endpoint(conn)

    site, _ = leak_report(caplog, main())
    assert "it last ran at:)" in site, site
    assert "    yield conn" in site, site
    now = site.split("(the holding task is now at:)", 1)[1]
    assert 'await conn.fetchval("SELECT 1")' in now, site
    assert f"{os.sep}asyncpool{os.sep}pool{os.sep}" not in now, site



# -- cancel requests left over from earlier code ----------------------------------------------


async def _with_an_old_cancel_request() -> asyncio.Task[Any]:
    """The current task, left with what a swallowed CancelledError without uncancel() leaves,
    and what a TaskGroup whose child failed leaves on Python 3.11 and 3.12: a count of 1 that
    nobody will withdraw."""
    task = asyncio.current_task()
    assert task is not None
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await asyncio.sleep(0)
    assert task.cancelling() == 1
    return task


async def _reclaimed(pool: Any, leaked: int) -> None:
    """`leaked` connections were reclaimed, none is held any more, and the pool still serves."""
    assert pool.stats().leaked_total == leaked
    assert pool.stats().in_use == 0
    assert await pool.fetchval("SELECT 1") == 1


def test_a_reclaim_counts_against_the_cancel_requests_the_task_already_had(
        server: FakeServer) -> None:
    """A leak reclaim withdraws its own cancel request and gives ConnectionLeakedError, whatever
    count the task carried before (it took `cancelling() != 0` for somebody else's request, and
    the task ended as plain CancelledError)."""
    async def main() -> None:
        task = await _with_an_old_cancel_request()
        async with fake_pool(server, leak_timeout=1.0) as pool:
            with pytest.raises(ConnectionLeakedError):
                async with pool.acquire():
                    await asyncio.sleep(2)
            assert task.cancelling() == 1  # the old one, neither withdrawn nor added to
            with pytest.raises(ConnectionLeakedError):
                async with pool.transaction():
                    await asyncio.sleep(2)
            assert task.cancelling() == 1
            assert await pool.fetchval("SELECT 1") == 1

    run(main())


def test_close_stops_a_login_of_a_task_with_an_old_cancel_request(server: FakeServer) -> None:
    """close() stopping a login under way gives the waiting caller PoolClosedError, also when its
    task carried a cancel request from earlier (it got a bare CancelledError)."""
    async def main() -> None:
        task = await _with_an_old_cancel_request()
        pool = fake_pool(server, min_size=0, max_size=1)
        await pool.open()
        server.login_latency = 0.5
        closing = asyncio.get_running_loop().call_later(0.1, asyncio.ensure_future, pool.close())
        with pytest.raises(PoolClosedError):
            await pool.fetchval("SELECT 1")
        closing.cancel()
        assert task.cancelling() == 1
        await asyncio.sleep(1)
        assert server.open_connections() == []

    run(main())


def test_a_setup_hook_past_leak_timeout_gives_connection_leaked_error(server: FakeServer) -> None:
    """The reclaim cancels the holder while its `setup` hook runs, inside the acquire: no block
    has started to turn the cancel into ConnectionLeakedError, so the acquire does (it ended the
    task as plain CancelledError, with the request left on it)."""
    async def setup(conn: Any) -> None:
        await asyncio.sleep(2)

    async def main() -> None:
        task = asyncio.current_task()
        assert task is not None
        async with fake_pool(server, leak_timeout=1.0, setup=setup, acquire_timeout=5) as pool:
            with pytest.raises(ConnectionLeakedError):
                async with pool.acquire():
                    pass
            assert task.cancelling() == 0
            with pytest.raises(ConnectionLeakedError):
                await pool.fetchval("SELECT 1")
            assert task.cancelling() == 0
            assert pool.stats().in_use == 0

    run(main())


def test_terminate_from_another_thread_while_the_loop_runs_is_refused(server: FakeServer) -> None:
    """terminate() and expire_all() close transports, which asyncio does not allow from another
    thread (a waiter woke only when something else woke the loop; in debug mode the call failed
    half-way): refused while the loop runs, with the way to do it; mark_stale() only marks."""
    loop = asyncio.new_event_loop()
    runner = threading.Thread(target=loop.run_forever, name="pool-loop")
    runner.start()
    try:
        pool = fake_pool(server, min_size=1, max_size=1)
        asyncio.run_coroutine_threadsafe(pool.open(), loop).result(5)
        for call in (pool.terminate, pool.expire_all):
            with pytest.raises(PoolError, match=r"called from thread 'MainThread' while the "
                               r"pool's loop runs in another thread; call it on that loop: "
                               r"loop.call_soon_threadsafe\(pool\."):
                call()
        assert pool.stats().size == 1  # nothing was closed
        pool.mark_stale()
        loop.call_soon_threadsafe(pool.terminate)
        asyncio.run_coroutine_threadsafe(asyncio.sleep(0.05), loop).result(5)
        assert pool.closed
    finally:
        loop.call_soon_threadsafe(loop.stop)
        runner.join(5)
        loop.close()
    assert server.open_connections() == []


def test_a_reclaim_after_the_holders_own_timeout_fired_leaves_no_request(
        server: FakeServer) -> None:
    """The holder's asyncio.timeout fires first and its block's cleanup is still awaiting when
    the reclaim comes: the timeout withdraws its own request on the way out, and the reclaim's
    must be withdrawn too (it was left on the task, and a later asyncio.timeout of the task
    raised CancelledError instead of TimeoutError)."""
    async def main() -> None:
        task = asyncio.current_task()
        assert task is not None
        async with fake_pool(server, leak_timeout=1.0) as pool:
            with pytest.raises(ConnectionLeakedError):
                async with pool.acquire(), asyncio.timeout(0.3):
                    try:
                        await asyncio.sleep(5)
                    finally:
                        await asyncio.sleep(1)  # still cleaning up at leak_timeout
            assert task.cancelling() == 0
            with pytest.raises(TimeoutError):
                async with asyncio.timeout(0.1):
                    await asyncio.sleep(1)

    run(main())


def test_a_query_helper_run_as_a_task_of_its_own_is_reported_with_its_stack(
    server: FakeServer, caplog: pytest.LogCaptureFixture
) -> None:
    """``asyncio.create_task(pool.fetchval(...))``: the statement runner is the task's outermost
    coroutine, so there is no caller to show, and the report said "<acquire site not
    captured>". It says what happened and shows where the task is."""

    async def main() -> None:
        async with fake_pool(server, leak_timeout=1.0, leak_action="log") as pool:
            await asyncio.create_task(pool.fetchval("SELECT pg_sleep(2)"), name="helper-task")

    site, names = leak_report(caplog, main())
    assert "run as a task of its own" in site, site
    assert "<acquire site not captured>" not in site
    assert names[:1] == ["one"], site  # the statement runner, then what it awaits


def test_a_holder_cancelled_before_a_reclaim_ends_with_its_own_cancellation(
        server: FakeServer) -> None:
    """The caller cancels (or times out) the holder, whose block is still cleaning up at
    leak_timeout (pool.transaction()'s ROLLBACK waiting on the server, or the block's own
    cleanup) when the reclaim comes: the caller's own interruption must come out, as it does
    when the reclaim comes first. It ended as ConnectionLeakedError: the request counted before
    the reclaim was taken for one left over from earlier code. Found by
    tests/faults/test_cancel_hunt.py (seed 42, PgBouncer 1.24: a ROLLBACK queued behind busy
    server connections)."""
    async def main() -> None:
        async with fake_pool(server, leak_timeout=1.0) as pool:
            entered = asyncio.Event()

            async def in_transaction() -> None:
                async with pool.transaction():
                    entered.set()
                    server.latency = 2.0  # the ROLLBACK on the way out outlives leak_timeout
                    await asyncio.sleep(5)

            async def cleaning_up() -> None:
                async with pool.acquire():
                    entered.set()
                    try:
                        await asyncio.sleep(5)
                    finally:
                        await asyncio.sleep(2)  # still cleaning up at leak_timeout

            async def timed_out(holder: Any) -> None:
                async with asyncio.timeout(0.2):
                    await holder()

            for holder in (in_transaction, cleaning_up):
                entered.clear()
                await cancelled_once_running(holder, entered)
                server.latency = 0.001
                entered.clear()
                with pytest.raises(TimeoutError) as info:
                    await timed_out(holder)
                assert not isinstance(info.value, ConnectionLeakedError)
                server.latency = 0.001
                current = asyncio.current_task()
                assert current is not None
                assert current.cancelling() == 0
            await _reclaimed(pool, 4)

    run(main())


def test_a_reclaim_while_handling_a_time_limit_is_not_taken_for_the_holders_cancellation(
        server: FakeServer) -> None:
    """A task with a cancel request left over from earlier code (a cancel swallowed without
    uncancel(), a TaskGroup on Python < 3.13) whose block handles an ``asyncio.timeout()`` that
    expired (``except TimeoutError:``, slow fallback work on the connection) when the reclaim
    comes: the block ends in ConnectionLeakedError. It ended in CancelledError, although nobody
    cancelled the holder: the timeout's own CancelledError, converted to TimeoutError and over,
    was still in the chain of exceptions being handled, and was taken for the holder's
    cancellation under way. A caller's cancellation that is under way, with a time limit
    expired in its cleanup, still ends as the caller's."""
    async def main() -> None:
        async with fake_pool(server, leak_timeout=1.0) as pool:
            seen: list[tuple[str, int]] = []

            async def fallback_after_a_time_limit() -> None:
                await _with_an_old_cancel_request()
                try:
                    async with pool.acquire():
                        try:
                            async with asyncio.timeout(0.1):
                                await asyncio.sleep(1)
                        except TimeoutError:
                            await asyncio.sleep(5)  # the slow fallback: reclaimed here
                except BaseException as exc:
                    task = asyncio.current_task()
                    assert task is not None
                    seen.append((type(exc).__name__, task.cancelling()))
                    raise

            with pytest.raises(ConnectionLeakedError):
                await asyncio.create_task(fallback_after_a_time_limit())
            assert seen == [("ConnectionLeakedError", 1)]  # the leftover request only

            async def cleanup_with_a_time_limit() -> None:
                async with pool.acquire():
                    try:
                        await asyncio.sleep(5)
                    finally:  # the caller's cancellation is under way
                        try:
                            async with asyncio.timeout(0.1):
                                await asyncio.sleep(1)
                        except TimeoutError:
                            await asyncio.sleep(5)  # reclaimed here

            task = asyncio.create_task(cleanup_with_a_time_limit())
            await asyncio.sleep(0.2)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            await _reclaimed(pool, 2)

    run(main())


def test_a_reclaim_after_awaiting_another_cancelled_task_is_not_taken_for_the_holders_cancellation(
        server: FakeServer) -> None:
    """A task with a cancel request left over from earlier code awaits, in its block, another
    task that is cancelled, and handles that (``except CancelledError:``) slowly when the
    reclaim comes: nobody cancelled the holder, so its block ends in ConnectionLeakedError with
    the old request alone left. It ended in CancelledError: the other task's CancelledError, in
    the chain of exceptions being handled, was taken for the holder's cancellation under way."""
    async def main() -> None:
        async with fake_pool(server, leak_timeout=1.0) as pool:
            seen: list[tuple[str, int]] = []

            async def holder() -> None:
                task = await _with_an_old_cancel_request()
                try:
                    async with pool.acquire() as conn:
                        await conn.fetchval("SELECT 1")
                        other = asyncio.create_task(asyncio.sleep(5))
                        asyncio.get_running_loop().call_later(0.1, other.cancel)
                        try:
                            await other
                        except asyncio.CancelledError:
                            await asyncio.sleep(5)  # reclaimed here
                except BaseException as exc:
                    seen.append((type(exc).__name__, task.cancelling()))
                    raise

            with pytest.raises(ConnectionLeakedError):
                await asyncio.create_task(holder())
            assert seen == [("ConnectionLeakedError", 1)]  # the leftover request only
            assert pool.stats().leaked_total == 1
            assert await pool.fetchval("SELECT 1") == 1

    run(main())


@pytest.mark.parametrize("cleanup", ["in_except", "after_except", "under_a_time_limit"])
def test_a_holder_that_caught_its_callers_cancel_and_cleans_up_slowly_ends_cancelled(
        server: FakeServer, cleanup: str) -> None:
    """The caller cancels the holder; the block catches the CancelledError, cleans up past
    leak_timeout (the reclaim comes then) and raises it again, or a CancelledError of its own
    after the ``except`` (no exception is being handled there). The caller's cancellation comes
    out, as it does from asyncpg.Pool and psycopg_pool (they never reclaim), and the reclaim's
    request is withdrawn; a caller's asyncio.timeout() sees TimeoutError. The second way ended
    in ConnectionLeakedError: the pool looked for the caller's cancellation in the chain of
    exceptions being handled instead of counting the requests made since the block began."""
    async def main() -> None:
        async with fake_pool(server, leak_timeout=1.0) as pool:
            entered = asyncio.Event()

            async def holder() -> None:
                async with pool.acquire() as conn:
                    entered.set()
                    caught = False
                    try:
                        await conn.execute("SELECT pg_sleep(5)")
                    except asyncio.CancelledError:
                        if cleanup != "after_except":
                            await asyncio.sleep(2)  # reclaimed here
                            raise
                        caught = True
                    if caught:
                        await asyncio.sleep(2)  # reclaimed here
                        raise asyncio.CancelledError

            current = asyncio.current_task()
            assert current is not None
            if cleanup == "under_a_time_limit":
                with pytest.raises(TimeoutError) as info:
                    async with asyncio.timeout(0.2):
                        await holder()
                assert not isinstance(info.value, ConnectionLeakedError)
            else:
                task = await cancelled_once_running(holder, entered)
                assert task.cancelling() == 1  # the caller's request alone
            assert current.cancelling() == 0
            await _reclaimed(pool, 1)

    run(main())


def test_a_block_driven_by_another_task_that_its_caller_cancelled_ends_cancelled(
        server: FakeServer) -> None:
    """A block inside an async generator, entered by one task and driven by another since,
    whose driver its caller cancels while it runs a statement; the block is still cleaning up
    when the reclaim comes (and cancels the driver, `Lease.holder`). The caller's cancellation
    goes on: no count was taken for the driver when the block began, so the exceptions the
    block is handling tell."""
    async def main() -> None:
        async with fake_pool(server, leak_timeout=1.0) as pool:
            async def rows() -> AsyncGenerator[int, None]:
                async with pool.acquire() as conn:
                    yield await conn.fetchval("SELECT 1")
                    try:
                        yield await conn.fetchval("SELECT pg_sleep(5)")
                    except asyncio.CancelledError:
                        await asyncio.sleep(2)  # reclaimed here
                        raise

            gen = rows()
            assert await anext(gen) == 1  # this task enters the block...
            async def drive() -> int:  # ...and another drives it on
                return await anext(gen)

            driver = asyncio.create_task(drive())
            await asyncio.sleep(0.3)
            driver.cancel()
            with pytest.raises(asyncio.CancelledError):
                await driver
            assert driver.cancelled()
            assert driver.cancelling() == 1  # the caller's request alone
            assert pool.stats().leaked_total == 1
            await gen.aclose()
            assert pool.stats().in_use == 0
            assert await pool.fetchval("SELECT 1") == 1

    run(main())


def test_a_release_waiting_on_a_cancel_request_when_close_gives_up_is_not_cancelled(
        server: FakeServer) -> None:
    """A block whose statement ran out of its ``timeout=`` leaves with the cancel request still
    on its way; the release waits for it (the reset). ``close(timeout=0)`` then gives up that
    reset and cancels it: the holder's ``async with`` ended in CancelledError, though nobody had
    cancelled its task (found by the model test, seed 54165758836249573978333436986123604707).
    Now the block ends as it would have, and the connection is closed by the pool."""
    server.requests_outlive = True  # (as the real Connector's connections: the request is waited for)
    server.cancel_latency = 2.0

    async def main() -> None:
        pool = fake_pool(server, min_size=1, max_size=1)
        await pool.open()
        ended: list[str] = []

        async def user() -> None:
            async with pool.acquire() as conn:
                with contextlib.suppress(TimeoutError):
                    await conn.fetchval("SELECT pg_sleep(1)", timeout=0.002)
            ended.append("block")

        task = asyncio.create_task(user())
        await asyncio.sleep(0.003)
        assert not task.done()  # (its release waits for the cancel request)
        await pool.close(timeout=0.0)
        await asyncio.wait([task], timeout=5)
        assert not task.cancelled(), "the holder's block ended cancelled by the pool's close"
        assert task.result() is None
        assert ended == ["block"]
        stats = pool.stats()
        assert (stats.in_use, stats.idle, stats.size) == (0, 0, 0), stats
        # The cancel request goes on past close() (2 s): let it end on this loop, or it stays
        # in the driver's requests in flight for the rest of the process (other tests wait on
        # that set).
        await asyncio.sleep(3)
        assert server.cancels_taken >= 1
        assert not driver._REQUESTS_IN_FLIGHT

    with patched_cancel_requests():
        run(main())
