"""An observer is the user's code: whatever it raises, the pool goes on as if it had returned
(each failing hook logged once), and no connection or slot is lost."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

import pytest

from asyncpool.errors import ConnectionLeakedError, PoolTimeoutError
from asyncpool.observer import ConnectAttempt, LeakReport, PoolObserver
from tests.unit.fakes import FakeServer, fake_pool, run


class _Raising(PoolObserver):
    """Raises from every hook named in `failing`."""

    def __init__(self, failing: set[str]) -> None:
        self.failing = failing
        self.calls: list[str] = []

    def _hook(self, name: str) -> None:
        self.calls.append(name)
        if name in self.failing:
            raise RuntimeError(f"observer {name} failed")

    def attach(self, pool_name: str, stats: Any) -> None:
        self._hook("attach")

    def detach(self) -> None:
        self._hook("detach")

    def pool_statement(self, purpose: str) -> contextlib.AbstractContextManager[object]:
        self._hook("pool_statement")
        return contextlib.nullcontext()

    def connect_attempted(self, attempt: ConnectAttempt) -> None:
        self._hook("connect_attempted")

    def connection_closed(self, reason: str) -> None:
        self._hook("connection_closed")

    def acquired(self, wait_seconds: float) -> None:
        self._hook("acquired")

    def released(self, use_seconds: float) -> None:
        self._hook("released")

    def timed_out(self) -> None:
        self._hook("timed_out")

    def validation_failed(self) -> None:
        self._hook("validation_failed")

    def leaked(self, report: LeakReport) -> None:
        self._hook("leaked")


# (connect_attempted: the fake driver's connector reports no attempts; tests/test_observer_
# failures.py raises from it against PostgreSQL.)
HOOKS = ["attach", "detach", "pool_statement", "connection_closed", "acquired", "released",
         "timed_out", "validation_failed", "leaked"]


@pytest.mark.parametrize("failing", HOOKS)
def test_an_observer_that_raises_loses_nothing(server: FakeServer, failing: str,
                                               caplog: pytest.LogCaptureFixture) -> None:
    observer = _Raising({failing})

    async def main() -> None:
        pool = fake_pool(server, min_size=1, max_size=1, acquire_timeout=0.05,
                         validate_after=0.0, leak_timeout=0.1, leak_action="reclaim",
                         observers=[observer])
        await pool.open()
        for _ in range(3):  # the common path, both ways, and back to the pool each time
            async with pool.acquire() as conn:
                assert await conn.fetchval("SELECT 1") == 1
            assert await pool.fetchval("SELECT 1") == 1
        assert pool.stats().in_use == 0
        async with pool.acquire():  # timed_out: nothing for a second caller
            with pytest.raises(PoolTimeoutError):
                async with pool.acquire():
                    pass
        held = await pool.acquire()  # leaked: held past leak_timeout, reclaimed
        await asyncio.sleep(0.3)
        with pytest.raises(ConnectionLeakedError):
            await held.fetchval("SELECT 1")
        async with pool.acquire() as conn:  # a new connection, in place of the reclaimed one
            assert await conn.fetchval("SELECT 1") == 1
        (idle,) = server.open_connections()
        idle.die_silently()  # validation_failed, connection_closed: replaced at the next checkout
        async with pool.acquire() as conn:
            assert await conn.fetchval("SELECT 1") == 1
        stats = pool.stats()
        assert (stats.in_use, stats.size) == (0, 1), stats
        await pool.close()
        assert pool.stats().size == 0

    with caplog.at_level(logging.WARNING, logger="asyncpool.pool"):
        run(main())
    assert failing in observer.calls  # (the hook was reached, and raised)
    failures = [r for r in caplog.records if f"observer {failing} failed" in r.getMessage()
                or (r.exc_info and f"observer {failing} failed" in str(r.exc_info[1]))]
    assert len(failures) == 1, [r.getMessage() for r in caplog.records]
    assert "_Raising" in failures[0].getMessage()

