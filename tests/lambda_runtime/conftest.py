"""Fixtures for the tests that run handlers under the real Lambda runtime (see support.py)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from asyncpool.testing import PgBouncerServer, PostgresServer
from asyncpool.testing.binaries import system_pgbouncer
from asyncpool.testing.lambda_runtime import RuntimeAPI


@pytest.fixture
def own_pgbouncer(postgres: PostgresServer) -> Iterator[PgBouncerServer]:
    """A PgBouncer whose log holds only this test's clients."""
    with PgBouncerServer(system_pgbouncer(), postgres) as server:
        yield server


@pytest.fixture
def runtime_api() -> Iterator[RuntimeAPI]:
    with RuntimeAPI(function_timeout=10) as api:
        yield api


@pytest.fixture
def idle_closing_pgbouncer(postgres: PostgresServer) -> Iterator[PgBouncerServer]:
    """Closes clients idle for a second, as an RDS Proxy's idle client timeout would."""
    with PgBouncerServer(system_pgbouncer(), postgres, {"client_idle_timeout": 1}) as server:
        yield server
