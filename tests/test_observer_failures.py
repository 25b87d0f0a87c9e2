"""An observer raising from `connect_attempted` (reported by the real connector, on every login)
does not stop the pool from connecting (tests/unit/test_observer_failures.py has the others)."""

from __future__ import annotations

import logging

import pytest

from asyncpool import Pool
from asyncpool.observer import ConnectAttempt, PoolObserver
from asyncpool.testing import PostgresServer


class _RaisingOnLogins(PoolObserver):
    def __init__(self) -> None:
        self.attempts = 0

    def connect_attempted(self, attempt: ConnectAttempt) -> None:
        self.attempts += 1
        raise RuntimeError("observer connect_attempted failed")


async def test_an_observer_raising_on_each_login_does_not_stop_the_logins(
        postgres: PostgresServer, caplog: pytest.LogCaptureFixture) -> None:
    observer = _RaisingOnLogins()
    with caplog.at_level(logging.WARNING, logger="asyncpool.pool"):
        async with Pool(postgres.dsn(), min_size=2, max_size=2, telemetry=False,
                        observers=[observer]) as pool:
            assert await pool.fetchval("SELECT 1") == 1
            assert pool.stats().size == 2  # both logins made, each reported (and raising)
    assert observer.attempts == 2
    logged = [r for r in caplog.records if "raised in connect_attempted()" in r.getMessage()]
    assert len(logged) == 1  # once per hook, however often it fails
    assert "_RaisingOnLogins" in logged[0].getMessage()
