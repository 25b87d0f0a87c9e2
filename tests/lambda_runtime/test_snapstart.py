"""SnapStart hooks in-process: what the before-snapshot hook closes, stops and drops, what the
after-restore hook marks (the real-runtime restore is in test_runtime.py)."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterator
from typing import Any

import pytest
import snapshot_restore_py

from asyncpool import Pool
from asyncpool.credentials.provider import StaticPassword
from asyncpool.errors import PoolError
from asyncpool.integrations.aws_lambda import lambda_config, register_snapstart_hooks
from asyncpool.integrations.lambda_runner import async_handler
from asyncpool.testing import PgBouncerServer
from asyncpool.testing.faultproxy import FaultProxy
from tests.lambda_env import Environment


class CountingPassword(StaticPassword):
    """A provider that counts how often it was closed (its session dropped)."""

    def __init__(self, password: str) -> None:
        super().__init__(password)
        self.closed = 0

    async def close(self) -> None:
        self.closed += 1


def run_hooks(registry: list[Any], start: int) -> None:
    for func, args, kwargs in registry[start:]:
        func(*args, **kwargs)


class Hooks:
    """The SnapStart hooks registered during one test, run as the runtime runs them."""

    def __init__(self) -> None:
        self.before = len(snapshot_restore_py.get_before_snapshot())
        self.after = len(snapshot_restore_py.get_after_restore())

    def added(self) -> tuple[int, int]:
        """How many before-snapshot and after-restore hooks the test registered."""
        return (len(snapshot_restore_py.get_before_snapshot()) - self.before,
                len(snapshot_restore_py.get_after_restore()) - self.after)

    async def snapshot(self, env: Environment) -> None:
        """The before-snapshot hooks, on the runtime's thread."""
        await env.runtime.call(run_hooks, snapshot_restore_py.get_before_snapshot(), self.before)

    async def restore(self, env: Environment) -> None:
        """The after-restore hooks, on the runtime's thread."""
        await env.runtime.call(run_hooks, snapshot_restore_py.get_after_restore(), self.after)

    def drop(self) -> None:
        del snapshot_restore_py.get_before_snapshot()[self.before:]
        del snapshot_restore_py.get_after_restore()[self.after:]


@pytest.fixture
def hooks() -> Iterator[Hooks]:
    """The test's SnapStart hooks; those it registered are dropped after it, whatever happens."""
    registered = Hooks()
    yield registered
    registered.drop()


async def test_attach_registers_hooks_that_close_connections_and_drop_credentials(
    env: Environment, hooks: Hooks, legacy: PgBouncerServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AWS_LAMBDA_INITIALIZATION_TYPE", "snap-start")
    creds = CountingPassword(legacy.postgres.app.password)
    dsn = legacy.dsn().replace(f":{legacy.postgres.app.password}@", "@")
    pool = Pool(config=lambda_config(environ={}, dsn=dsn, credentials=creds))
    try:
        env.runner.attach(pool)
        env.runner.attach(pool)  # once per pool
        assert hooks.added() == (1, 1)
        await env.run(pool.open)
        assert pool.stats().size == 1

        await hooks.snapshot(env)
        stats = pool.stats()
        assert (stats.size, stats.closed_total) == (0, 1)
        assert creds.closed == 1

        await hooks.restore(env)

        async def query() -> int:
            async with pool.acquire() as conn:
                value: int = await conn.fetchval("SELECT 1")
                return value

        assert await env.run(query) == 1
        assert pool.stats().created_total == 2
    finally:
        await env.run(pool.close)


async def test_a_pool_opened_by_the_first_invocation_is_restored_without_an_error(
    env: Environment, hooks: Hooks, legacy: PgBouncerServer, monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture
) -> None:
    """The usual case: a pool attached at INIT (`pooled_connection` does) and opened lazily.
    Its after-restore step asserted that the pool had a loop, and logged an AssertionError
    traceback at ERROR ("Exception in callback resume_after_restore") at every restore."""
    monkeypatch.setenv("AWS_LAMBDA_INITIALIZATION_TYPE", "snap-start")
    pool = env.runner.attach(env.pool(legacy.dsn(), name="lazy"))
    with caplog.at_level(logging.WARNING):
        await hooks.snapshot(env)
        await hooks.restore(env)

        @async_handler(runner=env.runner)
        async def first(event: Any, context: Any) -> Any:
            await pool.open()
            return await pool.fetchval("SELECT 1")

        assert await env.invoke(first) == 1
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING] == []


def test_no_hooks_outside_a_snapstart_initialisation() -> None:
    before = len(snapshot_restore_py.get_before_snapshot())
    pool = Pool(min_size=0)
    loop = asyncio.new_event_loop()
    try:
        assert not register_snapstart_hooks(pool, loop, environ={})
        assert not register_snapstart_hooks(
            pool, loop, environ={"AWS_LAMBDA_INITIALIZATION_TYPE": "on-demand"}
        )
    finally:
        loop.close()
    assert len(snapshot_restore_py.get_before_snapshot()) == before



async def _closed(*proxies: FaultProxy, within: float = 2.0) -> list[int]:
    """The proxies' open connections, once none is left or `within` seconds have passed."""
    deadline = time.monotonic() + within
    while any(p.connections for p in proxies) and time.monotonic() < deadline:
        await asyncio.sleep(0.02)
    return [p.connections for p in proxies]


async def test_nothing_held_idle_or_logging_in_is_kept_in_the_snapshot(
    env: Environment, hooks: Hooks, legacy: PgBouncerServer, monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture
) -> None:
    """The hooks run as SnapStart runs them (before the snapshot, then after a restore) on pools
    with a connection held by a task INIT left running, one idle, and two logins under way (an
    ``open(wait=False)`` refill and a caller's). No socket may be left in the snapshot: every
    restored copy would find it dead (a login went on after the restore on it, up to
    connect_timeout, with a token signed before; the holder's next statement waited on it) or
    share its one server session with the other copies. The idle connection alone was closed:
    the held one and both logins were kept. After the restore (the old sockets reset), the
    first invocation is served at once, the caller's login done anew."""
    monkeypatch.setenv("AWS_LAMBDA_INITIALIZATION_TYPE", "snap-start")
    async with FaultProxy.to_dsn(legacy.dsn()) as network, \
            FaultProxy.to_dsn(legacy.dsn()) as slow:
        used = env.runner.attach(env.pool(network.dsn(legacy.dsn()), min_size=2, max_size=2,
                                          name="used"))
        filling = env.runner.attach(env.pool(slow.dsn(legacy.dsn()), min_size=1, max_size=2,
                                             name="filling"))
        release = asyncio.Event()

        async def init() -> tuple[asyncio.Task[Any], asyncio.Task[Any]]:
            await used.open()
            got = asyncio.Event()

            async def hold() -> Any:
                async with used.acquire() as conn:
                    got.set()
                    await release.wait()
                    return await conn.fetchval("SELECT 1")

            holder = asyncio.create_task(hold())
            await got.wait()
            slow.set_mode("half-open")  # logins get no answer
            await filling.open(wait=False)
            caller = asyncio.create_task(filling.fetchval("SELECT 2"))
            while filling.stats().connecting < 2:
                await asyncio.sleep(0.01)
            return holder, caller

        holder, caller = await env.run(init)
        assert (used.stats().in_use, used.stats().idle, network.connections) == (1, 1, 2)
        # A login counts as connecting before the proxy (on this loop) has accepted its socket:
        # on a loaded machine the second was still on its way (1 == 2 in CI runs).
        deadline = time.monotonic() + 5
        while slow.connections < 2 and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        assert slow.connections == 2
        with caplog.at_level(logging.WARNING, logger="asyncpool.pool"):
            await hooks.snapshot(env)
        assert await _closed(network, slow) == [0, 0]
        assert used.stats().size == 0
        assert filling.stats().created_total == 0
        [held] = [r.getMessage() for r in caplog.records if "snapshot was taken" in r.getMessage()]
        assert "async with used.acquire() as conn" in held, held
        # The restore: the copies have none of the snapshot's sockets.
        network.set_mode("reset")
        slow.set_mode("reset")
        network.set_mode("pass")
        slow.set_mode("pass")
        await hooks.restore(env)

        @async_handler(runner=env.runner)
        async def first(event: Any, context: Any) -> tuple[tuple[Any, Any], int, int]:
            release.set()
            done = await asyncio.gather(holder, caller, return_exceptions=True)
            return done, await used.fetchval("SELECT 3"), await filling.fetchval("SELECT 4")

        started = time.monotonic()
        (kept, login), three, four = await env.invoke(first)
        assert time.monotonic() - started < 1.0
        assert isinstance(kept, PoolError)
        assert "terminated" in str(kept)
        assert (login, three, four) == (2, 3, 4)
        assert (used.stats().in_use, filling.stats().in_use) == (0, 0)


async def test_a_connection_being_validated_at_the_snapshot_is_not_kept_in_it(
    env: Environment, hooks: Hooks, legacy: PgBouncerServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A caller's check of an idle connection (``SELECT 1``, here unanswered) under way at the
    snapshot: the connection was neither idle nor held, so the hook left its socket open in
    the snapshot until the check timed out. It is closed; the caller logs in after the restore
    (the stateful model's example, tests/unit/test_model_defects.py)."""
    monkeypatch.setenv("AWS_LAMBDA_INITIALIZATION_TYPE", "snap-start")
    async with FaultProxy.to_dsn(legacy.dsn()) as network:
        pool = env.runner.attach(env.pool(network.dsn(legacy.dsn()), min_size=1, max_size=1,
                                          validate_after=0.0, connect_timeout=10.0,
                                          name="checked"))

        async def init() -> asyncio.Task[Any]:
            await pool.open()
            network.set_mode("half-open")  # the check gets no answer
            caller = asyncio.create_task(pool.fetchval("SELECT 2"))
            for _ in range(500):  # (bounded: 5 s)
                if pool._slots.checking:
                    break
                await asyncio.sleep(0.01)
            assert pool._slots.checking, "the caller's check did not begin"
            return caller

        caller = await env.run(init)
        assert network.connections == 1
        await hooks.snapshot(env)
        assert await _closed(network) == [0]
        network.set_mode("reset")
        network.set_mode("pass")
        await hooks.restore(env)

        @async_handler(runner=env.runner)
        async def first(event: Any, context: Any) -> Any:
            return await caller

        assert await env.invoke(first) == 2


@pytest.mark.parametrize("with_setup", [False, True], ids=["no-setup", "setup"])
async def test_an_acquire_waiting_at_the_snapshot_gets_its_timeout_from_the_restore(
    env: Environment, hooks: Hooks, legacy: PgBouncerServer, monkeypatch: pytest.MonkeyPatch, with_setup: bool
) -> None:
    """A task INIT left waiting in line for a connection (max_size=1, the one connection held)
    kept its acquire_timeout deadline across the snapshot: restored later, with the monotonic
    clock past it, it failed at the first invocation with "no connection within 2s" without a
    chance to be served. The snapshot also freed the held connection's slot and handed it to the
    waiter, whose login then began during the hook and was under way in the snapshot. With a
    ``setup`` hook (which counts in the acquire's timeout), the hook's time was still counted
    from the acquire's start, before the snapshot: it timed out at once ("the setup hook was
    still running on it when the time ran out"); it gets what is left of the re-armed timeout."""
    monkeypatch.setenv("AWS_LAMBDA_INITIALIZATION_TYPE", "snap-start")
    timeout = 2.0
    set_up: list[int] = []

    async def setup(conn: Any) -> None:
        set_up.append(await conn.fetchval("SELECT 3"))

    pool = env.runner.attach(env.pool(legacy.dsn(), min_size=1, max_size=1,
                                      acquire_timeout=timeout, name="waited",
                                      setup=setup if with_setup else None))
    release = asyncio.Event()

    async def init() -> tuple[asyncio.Task[Any], asyncio.Task[Any]]:
        await pool.open()
        got = asyncio.Event()

        async def hold() -> Any:
            async with pool.acquire() as conn:
                got.set()
                await release.wait()
                return await conn.fetchval("SELECT 1")

        holder = asyncio.create_task(hold())
        await got.wait()
        waiter = asyncio.create_task(pool.fetchval("SELECT 2"))
        while pool.stats().waiting < 1:
            await asyncio.sleep(0.01)
        return holder, waiter

    try:
        holder, waiter = await env.run(init)
        await hooks.snapshot(env)
        assert not pool._slots.attempts, "a login was under way in the snapshot"
        # Restored later than the waiter's deadline, by the monotonic clock.
        await asyncio.sleep(timeout * 1.25)
        await hooks.restore(env)

        @async_handler(runner=env.runner)
        async def first(event: Any, context: Any) -> tuple[Any, Any]:
            release.set()
            return await asyncio.gather(holder, waiter, return_exceptions=True)

        kept, served = await env.invoke(first)
        assert isinstance(kept, PoolError)  # held at the snapshot: closed under its holder
        assert served == 2
        assert pool.stats().timeouts_total == 0
        assert set_up == ([3, 3] if with_setup else [])  # the holder's, then the waiter's
    finally:
        release.set()


@pytest.mark.parametrize("waits_on", ["query", "other"])
async def test_a_setup_hook_running_at_the_snapshot_runs_again_on_a_new_connection_after_the_restore(  # noqa: PLR0917 - fixtures
    env: Environment, hooks: Hooks, legacy: PgBouncerServer, monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture, waits_on: str
) -> None:
    """A task INIT left in an acquire whose ``setup`` hook was still running (on a statement of
    its own, or awaiting something else) when the snapshot was taken. The snapshot closed the
    hook's connection under it, as a held one, with a WARNING telling the user to release it:
    a hook on a statement failed before the snapshot (PoolError: "terminated"), one on something
    else failed after the restore, at its next statement, or, restored later than its deadline
    by the monotonic clock, at once ("the setup hook was still running on it when the time ran
    out"). The hook's time stops at the snapshot, as a waiter's does; after the restore it runs
    again on a new connection, and the acquire is served."""
    monkeypatch.setenv("AWS_LAMBDA_INITIALIZATION_TYPE", "snap-start")
    timeout = 2.0
    began = asyncio.Event()
    restored = asyncio.Event()
    runs: list[tuple[bool, Any]] = []  # (after the restore, the connection it ran on)

    async def setup(conn: Any) -> None:
        raw = conn.raw
        await conn.execute("SELECT 1")
        began.set()
        if waits_on == "query":
            await conn.execute("SELECT pg_sleep(0.5)")
        else:
            await restored.wait()
        runs.append((restored.is_set(), raw))
        await conn.execute("SELECT 2")

    async with FaultProxy.to_dsn(legacy.dsn()) as network:
        pool = env.runner.attach(env.pool(network.dsn(legacy.dsn()), min_size=1, max_size=1,
                                          acquire_timeout=timeout, name="setting-up", setup=setup))

        async def use() -> tuple[Any, int]:
            async with pool.acquire() as conn:
                return conn.raw, await conn.fetchval("SELECT 3")

        async def init() -> asyncio.Task[Any]:
            await pool.open()
            acquiring = asyncio.create_task(use())
            await began.wait()
            return acquiring

        try:
            acquiring = await env.run(init)
            with caplog.at_level(logging.INFO, logger="asyncpool.pool"):
                await hooks.snapshot(env)
            assert await _closed(network) == [0]
            # Restored later than the acquire's deadline, by the monotonic clock; the copies
            # have none of the snapshot's sockets.
            await asyncio.sleep(timeout * 1.25)
            network.set_mode("reset")
            network.set_mode("pass")
            await hooks.restore(env)

            @async_handler(runner=env.runner)
            async def first(event: Any, context: Any) -> Any:
                restored.set()
                return await asyncio.gather(acquiring, return_exceptions=True)

            [served] = await env.invoke(first)
            assert not isinstance(served, BaseException), served
            used, three = served
            assert three == 3
            assert runs[-1] == (True, used)  # set up after the restore, on the connection used
            assert all(raw is not used for _, raw in runs[:-1])
            stats = pool.stats()
            assert (stats.timeouts_total, stats.created_total, stats.in_use) == (0, 2, 0)
            assert stats.acquired_total == 1  # one acquire (its second checkout was counted)
            # Not a holder's connection: no WARNING to release it before INIT ends.
            assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
        finally:
            restored.set()


@pytest.mark.parametrize("doing", ["validating", "resetting"])
async def test_a_connection_being_checked_or_reset_is_not_kept_in_the_snapshot(
    env: Environment, hooks: Hooks, legacy: PgBouncerServer, monkeypatch: pytest.MonkeyPatch, doing: str
) -> None:
    """A task INIT left checking an idle connection (its ``SELECT 1``, the pool marked stale)
    or returning one that needs a reset (its ROLLBACK), the pooler slow to answer. The snapshot
    kept that connection, and its round trip's time limit, set before the snapshot: in a copy
    whose socket leads nowhere, the first invocation waited for it (a reset, up to 5 s, in the
    only slot: "no connection within 2s"; a check, up to half of the acquire's time) however
    soon the restore came. Both are closed for the snapshot now: the checking caller logs in
    after the restore in the slot it holds, and the returning one is done."""
    monkeypatch.setenv("AWS_LAMBDA_INITIALIZATION_TYPE", "snap-start")
    timeout = 2.0
    async with FaultProxy.to_dsn(legacy.dsn()) as network:
        pool = env.runner.attach(env.pool(network.dsn(legacy.dsn()), min_size=1, max_size=1,
                                          acquire_timeout=timeout, name=doing))

        async def init() -> asyncio.Task[Any]:
            await pool.open()
            if doing == "validating":
                pool.mark_stale()
                network.set_mode("stall")
                task = asyncio.create_task(pool.fetchval("SELECT 1"))
                while pool.stats().validating < 1:
                    await asyncio.sleep(0.01)
                return task
            conn = await pool.acquire()
            await conn.execute("BEGIN")
            network.set_mode("stall")
            task = asyncio.create_task(pool.release(conn))
            while not pool._slots.resets:
                await asyncio.sleep(0.01)
            return task

        left = await env.run(init)
        await hooks.snapshot(env)
        # Restored at once, the old sockets leading nowhere (a copy elsewhere). (A stalled
        # proxy does not see its client leave: it does once it forwards again.)
        network.set_mode("half-open")
        assert await _closed(network) == [0]
        network.set_mode("pass")
        await hooks.restore(env)

        @async_handler(runner=env.runner)
        async def first(event: Any, context: Any) -> Any:
            return await asyncio.gather(left, pool.fetchval("SELECT 2"), return_exceptions=True)

        started = time.monotonic()
        done = await env.invoke(first)
        assert done == [1 if doing == "validating" else None, 2]
        assert time.monotonic() - started < 1.0
        assert pool.stats().timeouts_total == 0


async def test_a_connection_given_back_in_the_snapshots_first_turns_serves_the_caller_in_line(
    env: Environment, hooks: Hooks, legacy: PgBouncerServer, monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture
) -> None:
    """A task INIT left holding the one connection gives it back during the before-snapshot
    hook's first turns of the loop, just before the hook closes what is left: the connection is
    handed to the caller in line, whose task has not run yet to take it. The hook closed it as
    a held one (a WARNING to release it, though nobody held it) and the caller got
    PoolClosedError at the first invocation; it is served after the restore."""
    monkeypatch.setenv("AWS_LAMBDA_INITIALIZATION_TYPE", "snap-start")
    pool = env.runner.attach(env.pool(legacy.dsn(), min_size=1, max_size=1, acquire_timeout=2.0,
                                      name="handed"))

    async def init() -> tuple[asyncio.Task[Any], asyncio.Task[Any], asyncio.Future[None]]:
        await pool.open()
        back: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        got = asyncio.Event()

        async def hold() -> None:
            async with pool.acquire():
                got.set()
                await back

        holder = asyncio.create_task(hold())
        await got.wait()
        waiter = asyncio.create_task(pool.fetchval("SELECT 2"))
        while pool.stats().waiting < 1:
            await asyncio.sleep(0.01)
        return holder, waiter, back

    holder, waiter, back = await env.run(init)
    loop = env.runner.loop
    # A timer already due, set ahead of the hook's task: it runs in the hook's second turn
    # after the hook's own step, so the holder gives the connection back in the third,
    # after the hook's step again, and the caller is handed it but runs only after the
    # hook has closed the connections (`snapshot._FIRST_TURNS`). (Any other order fails
    # below: the caller warned about as a holder, or the holder's connection closed.)
    loop.call_soon_threadsafe(loop.call_at, 0.0, back.set_result, None)
    with caplog.at_level(logging.WARNING, logger="asyncpool.pool"):
        await hooks.snapshot(env)
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING] == []
    assert pool.stats().size == 1  # (the caller's slot, to log in after the restore)
    assert not pool._slots.attempts
    await hooks.restore(env)

    @async_handler(runner=env.runner)
    async def first(event: Any, context: Any) -> Any:
        return await asyncio.gather(holder, waiter, return_exceptions=True)

    assert await env.invoke(first) == [None, 2]
    stats = pool.stats()
    assert (stats.timeouts_total, stats.created_total, stats.in_use) == (0, 2, 0)


async def test_a_restore_logs_in_once_for_min_size(
    env: Environment, hooks: Hooks, legacy: PgBouncerServer, monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture
) -> None:
    """Restored later than the housekeeping period, the pool (min_size=1) began its refill as
    the first invocation's loop ran, and the invocation's start (`mark_stale`) gave that login
    up as one begun before a pause: the invocation's query logged in again. One login now."""
    monkeypatch.setenv("AWS_LAMBDA_INITIALIZATION_TYPE", "snap-start")
    async with FaultProxy.to_dsn(legacy.dsn()) as network:
        # max_idle: a housekeeping period of 0.1 s (nothing idle beyond min_size to close).
        pool = env.runner.attach(env.pool(network.dsn(legacy.dsn()), min_size=1, max_size=1,
                                          max_idle=0.2, name="refilled"))
        await env.run(pool.open)
        await hooks.snapshot(env)
        assert await _closed(network) == [0]
        accepted = network.accepted_total
        await asyncio.sleep(0.3)  # (restored after a housekeeping round was due)
        await hooks.restore(env)

        @async_handler(runner=env.runner)
        async def first(event: Any, context: Any) -> Any:
            return await pool.fetchval("SELECT 1")

        with caplog.at_level(logging.INFO, logger="asyncpool.pool"):
            assert await env.invoke(first) == 1
        given_up = [r.getMessage() for r in caplog.records if "given up" in r.getMessage()]
        assert given_up == []
        assert network.accepted_total - accepted == 1
        stats = pool.stats()
        assert (stats.created_total, stats.connect_errors_total) == (2, 0)
