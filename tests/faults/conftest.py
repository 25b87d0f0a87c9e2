"""Private servers for faults that would disturb the session's shared ones (restarts, PAUSE)."""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator, Iterator
from typing import Any

import asyncpg
import pytest

from asyncpool.testing import PgBouncerServer, PostgresServer, ServerStack
from asyncpool.testing.faultproxy import FaultProxy
from asyncpool.testing.ledger import Ledger
from tests.loop_errors import caught_by_loop

# Small enough to saturate, large enough for a few pools at once.
FAULT_POOL_SIZE = 6


@pytest.fixture(scope="package")
def fault_stack() -> Iterator[ServerStack]:
    """PostgreSQL and both PgBouncers of our own, free to restart, pause and crash."""
    if os.environ.get("ASYNCPOOL_TEST_POSTGRES_DSN"):
        pytest.skip("fault tests restart servers: they need harness-controlled ones")
    servers = ServerStack.start(
        max_connections=40,
        pgbouncer_overrides={
            "default_pool_size": FAULT_POOL_SIZE,
            "max_db_connections": FAULT_POOL_SIZE,
            "max_client_conn": 200,
            "query_wait_timeout": 15,
            # After a failed login to PostgreSQL (it is restarting), PgBouncer refuses clients
            # for this long; the default 15 s would make the restart tests slow, not stricter.
            "server_login_retry": 1,
        },
    )
    try:
        yield servers
    finally:
        servers.stop()


@pytest.fixture(params=["legacy", "current"], ids=["pgbouncer-1.18", "pgbouncer-current"])
def fault_pooler(request: pytest.FixtureRequest, fault_stack: ServerStack) -> PgBouncerServer:
    """Each of our private PgBouncers in turn."""
    server: PgBouncerServer = getattr(fault_stack, request.param)
    return server


@pytest.fixture
async def ledger(request: pytest.FixtureRequest) -> Ledger:
    """A fresh ledger table on whichever PostgreSQL the test uses (`fault_stack` or `postgres`)."""
    if "fault_stack" in request.fixturenames:
        server: PostgresServer = request.getfixturevalue("fault_stack").postgres
    else:
        server = request.getfixturevalue("postgres")
    return await Ledger(server.dsn(), f"ledger_{uuid.uuid4().hex[:12]}").create()


@pytest.fixture
async def proxy_to_postgres(postgres: PostgresServer) -> AsyncIterator[FaultProxy]:
    """A fault proxy in front of the session's PostgreSQL."""
    async with FaultProxy(postgres.host, postgres.port) as proxy:
        yield proxy


@pytest.fixture
async def loop_errors() -> AsyncIterator[list[dict[str, Any]]]:
    """What reaches the loop's exception handler during the test (`tests.loop_errors`)."""
    with caught_by_loop() as errors:
        yield errors


@pytest.fixture
async def limited_database(postgres: PostgresServer) -> AsyncIterator[str]:
    """A database of the test's own, owned by the pool's role (free to take a CONNECTION
    LIMIT), dropped after."""
    name = f"limited_{uuid.uuid4().hex[:10]}"
    admin = await asyncpg.connect(postgres.admin_dsn)
    try:
        await admin.execute(f"CREATE DATABASE {name} OWNER app")
        yield name
    finally:
        await admin.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
        await admin.close()
