"""`leaks.report_dropped`, against the fake driver: a checkout its holder dropped without giving
it back (found when SQLAlchemy's connection is collected) is reported as a leak, once, and only
while leak detection is on. The real thing, through SQLAlchemy: tests/test_sqlalchemy.py."""

from __future__ import annotations

import asyncio
import logging

import pytest

from asyncpool.observer import LeakReport, PoolObserver
from asyncpool.pool.leaks import report_dropped
from tests.unit.fakes import FakeServer, fake_pool, run


class _Leaks(PoolObserver):
    def __init__(self) -> None:
        self.reports: list[LeakReport] = []

    def leaked(self, report: LeakReport) -> None:
        self.reports.append(report)


def _dropped_records(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records
            if r.name == "asyncpool.leaks" and getattr(r, "asyncpool_dropped", False)]


def test_a_dropped_checkout_is_reported_as_a_leak_once(
        server: FakeServer, caplog: pytest.LogCaptureFixture) -> None:
    leaks = _Leaks()

    async def main() -> None:
        async with fake_pool(server, max_size=1, observers=[leaks]) as pool:
            conn = await pool.acquire()
            await asyncio.sleep(2.0)
            report_dropped(pool._slots, conn._lease)
            assert pool.stats().leaked_total == 1
            await pool.release(conn)  # (as the caller does at once)
            report_dropped(pool._slots, conn._lease)  # released: not a leak any more
            assert pool.stats().leaked_total == 1

    with caplog.at_level(logging.WARNING, logger="asyncpool.leaks"):
        run(main())
    records = _dropped_records(caplog)
    assert len(records) == 1
    message = records[0].getMessage()
    assert "held for 2.0s" in message, message
    assert "then dropped without being given back (garbage-collected)" in message, message
    assert "in main" in message, message
    assert "holding task is now at" not in message, message
    assert [(r.reclaimed, r.action) for r in leaks.reports] == [(True, "dropped")]
    assert leaks.reports[0].held_seconds == pytest.approx(2.0, abs=0.1)
    # No "returned after" line: the lease was not marked reported, so its return says nothing.
    assert not [r for r in caplog.records if "returned after" in r.getMessage()]


def test_a_dropped_checkout_reported_already_or_with_leak_detection_off_is_not_reported(
        server: FakeServer, caplog: pytest.LogCaptureFixture) -> None:
    async def main() -> None:
        async with fake_pool(server, max_size=1, leak_timeout=0.5, leak_action="log") as pool:
            conn = await pool.acquire()
            await asyncio.sleep(1.0)  # reported by the leak timer, left with its holder
            assert pool.stats().leaked_total == 1
            report_dropped(pool._slots, conn._lease)
            assert pool.stats().leaked_total == 1
            await pool.release(conn)
        async with fake_pool(server, max_size=1, leak_timeout=None) as pool:
            conn = await pool.acquire()
            report_dropped(pool._slots, conn._lease)
            assert pool.stats().leaked_total == 0
            await pool.release(conn)

    with caplog.at_level(logging.WARNING, logger="asyncpool.leaks"):
        run(main())
    assert _dropped_records(caplog) == []
