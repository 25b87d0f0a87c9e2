"""SnapStart hooks in-process: what the before-snapshot hook closes and drops, what the
after-restore hook marks (the real-runtime restore is in test_runtime.py)."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
import snapshot_restore_py

from asyncpool import Pool
from asyncpool.credentials.provider import StaticPassword
from asyncpool.integrations.aws_lambda import lambda_config, register_snapstart_hooks
from asyncpool.testing import PgBouncerServer
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
