"""SnapStart hooks in-process: what the before-snapshot hook closes, stops and drops, what the
after-restore hook marks (the real-runtime restore is in test_runtime.py)."""

from __future__ import annotations

import asyncio
import logging
import time
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


async def test_attach_registers_hooks_that_close_connections_and_drop_credentials(
    env: Environment, legacy: PgBouncerServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AWS_LAMBDA_INITIALIZATION_TYPE", "snap-start")
    creds = CountingPassword(legacy.postgres.app.password)
    dsn = legacy.dsn().replace(f":{legacy.postgres.app.password}@", "@")
    pool = Pool(config=lambda_config(environ={}, dsn=dsn, credentials=creds))
    before = len(snapshot_restore_py.get_before_snapshot())
    after = len(snapshot_restore_py.get_after_restore())
    try:
        env.runner.attach(pool)
        env.runner.attach(pool)  # once per pool
        assert len(snapshot_restore_py.get_before_snapshot()) == before + 1
        assert len(snapshot_restore_py.get_after_restore()) == after + 1
        await env.run(pool.open)
        assert pool.stats().size == 1

        await env.runtime.call(run_hooks, snapshot_restore_py.get_before_snapshot(), before)
        stats = pool.stats()
        assert (stats.size, stats.closed_total) == (0, 1)
        assert creds.closed == 1

        await env.runtime.call(run_hooks, snapshot_restore_py.get_after_restore(), after)

        async def query() -> int:
            async with pool.acquire() as conn:
                value: int = await conn.fetchval("SELECT 1")
                return value

        assert await env.run(query) == 1
        assert pool.stats().created_total == 2
    finally:
        del snapshot_restore_py.get_before_snapshot()[before:]
        del snapshot_restore_py.get_after_restore()[after:]
        await env.run(pool.close)


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
    env: Environment, legacy: PgBouncerServer, monkeypatch: pytest.MonkeyPatch,
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
    before = len(snapshot_restore_py.get_before_snapshot())
    after = len(snapshot_restore_py.get_after_restore())
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

        try:
            holder, caller = await env.run(init)
            assert (used.stats().in_use, used.stats().idle, network.connections) == (1, 1, 2)
            # A login counts as connecting before the proxy (on this loop) has accepted its socket:
            # on a loaded machine the second was still on its way (1 == 2 in CI runs).
            deadline = time.monotonic() + 5
            while slow.connections < 2 and time.monotonic() < deadline:
                await asyncio.sleep(0.01)
            assert slow.connections == 2
            with caplog.at_level(logging.WARNING, logger="asyncpool.pool"):
                await env.runtime.call(run_hooks, snapshot_restore_py.get_before_snapshot(), before)
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
            await env.runtime.call(run_hooks, snapshot_restore_py.get_after_restore(), after)

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
        finally:
            del snapshot_restore_py.get_before_snapshot()[before:]
            del snapshot_restore_py.get_after_restore()[after:]


async def test_an_acquire_waiting_at_the_snapshot_gets_its_timeout_from_the_restore(
    env: Environment, legacy: PgBouncerServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A task INIT left waiting in line for a connection (max_size=1, the one connection held)
    kept its acquire_timeout deadline across the snapshot: restored later, with the monotonic
    clock past it, it failed at the first invocation with "no connection within 2s" without a
    chance to be served. The snapshot also freed the held connection's slot and handed it to the
    waiter, whose login then began during the hook and was under way in the snapshot."""
    monkeypatch.setenv("AWS_LAMBDA_INITIALIZATION_TYPE", "snap-start")
    before = len(snapshot_restore_py.get_before_snapshot())
    after = len(snapshot_restore_py.get_after_restore())
    timeout = 2.0
    pool = env.runner.attach(env.pool(legacy.dsn(), min_size=1, max_size=1,
                                      acquire_timeout=timeout, name="waited"))
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
        await env.runtime.call(run_hooks, snapshot_restore_py.get_before_snapshot(), before)
        assert not pool._slots.attempts, "a login was under way in the snapshot"
        # Restored later than the waiter's deadline, by the monotonic clock.
        await asyncio.sleep(timeout * 1.25)
        await env.runtime.call(run_hooks, snapshot_restore_py.get_after_restore(), after)

        @async_handler(runner=env.runner)
        async def first(event: Any, context: Any) -> tuple[Any, Any]:
            release.set()
            return await asyncio.gather(holder, waiter, return_exceptions=True)

        kept, served = await env.invoke(first)
        assert isinstance(kept, PoolError)  # held at the snapshot: closed under its holder
        assert served == 2
        assert pool.stats().timeouts_total == 0
    finally:
        release.set()
        del snapshot_restore_py.get_before_snapshot()[before:]
        del snapshot_restore_py.get_after_restore()[after:]
