"""Real servers for the suite: one PostgreSQL and two PgBouncers (1.18 and >= 1.21) per session."""

from __future__ import annotations

import os
import socket
from collections.abc import AsyncIterator, Iterator
from typing import TYPE_CHECKING

import pytest

from asyncpool.testing import PgBouncerServer, PostgresServer, ServerStack
from asyncpool.testing.aws_endpoint import aws_environment
from asyncpool.testing.binaries import postgres_bindir, postgres_version
from asyncpool.testing.external import ExternalPgBouncer, external_poolers
from asyncpool.testing.harness_error import HarnessError
from asyncpool.testing.leftovers import leftover_servers
from asyncpool.testing.pki import TestPki, make_test_pki
from tests.aws_support import set_environment

# Small server pools so a test can saturate them; PostgreSQL's max_connections (60) stays above
# what both PgBouncers together may open (2 x 10), leaving room for direct connections.
TEST_POOL_SIZE = 10
TEST_MAX_CONNECTIONS = 60

Pooler = PgBouncerServer | ExternalPgBouncer

if TYPE_CHECKING:
    from tests.lambda_env import Environment

if os.environ.get("ASYNCPOOL_TEST_LOOP") == "uvloop":
    import asyncio
    from collections.abc import Callable, Mapping

    import uvloop

    def pytest_asyncio_loop_factories(
        config: pytest.Config, item: pytest.Item,
    ) -> Mapping[str, Callable[[], asyncio.AbstractEventLoop]]:
        """ASYNCPOOL_TEST_LOOP=uvloop: the async tests on uvloop's loop (what uvicorn runs), by
        hand (for example the fault soak: docs/faults.md)."""
        return {"uvloop": uvloop.new_event_loop}


@pytest.fixture(scope="session")
def stack() -> Iterator[ServerStack]:
    if os.environ.get("ASYNCPOOL_TEST_POSTGRES_DSN"):
        pytest.skip("ASYNCPOOL_TEST_POSTGRES_DSN is set: tests that need harness-controlled servers skip")
    servers = ServerStack.start(
        max_connections=TEST_MAX_CONNECTIONS,
        pgbouncer_overrides={
            "default_pool_size": TEST_POOL_SIZE,
            "max_db_connections": TEST_POOL_SIZE,
            "max_client_conn": 400,
            "query_wait_timeout": 20,
        },
    )
    try:
        yield servers
    finally:
        servers.stop()


@pytest.fixture(scope="session")
def postgres(stack: ServerStack) -> PostgresServer:
    return stack.postgres


@pytest.fixture(params=["legacy", "current"], ids=["pgbouncer-1.18", "pgbouncer-current"])
def pooler(request: pytest.FixtureRequest) -> Pooler:
    """Each PgBouncer in turn: the distribution's (no prepared statements) and a current one."""
    external = external_poolers()
    if external is not None:
        index = 0 if request.param == "legacy" else 1
        if index >= len(external):
            pytest.skip("ASYNCPOOL_TEST_PGBOUNCER_CURRENT_DSN is not set")
        return external[index]
    stack: ServerStack = request.getfixturevalue("stack")
    server: PgBouncerServer = getattr(stack, request.param)
    return server


@pytest.fixture
def legacy(stack: ServerStack) -> PgBouncerServer:
    return stack.legacy


@pytest.fixture
def current(stack: ServerStack) -> PgBouncerServer:
    return stack.current


@pytest.fixture
async def env() -> AsyncIterator[Environment]:
    """A simulated Lambda execution environment (its own runtime thread and loop), closed after."""
    from tests.lambda_env import Environment

    environment = Environment()
    try:
        yield environment
    finally:
        await environment.close()


@pytest.fixture(scope="module")
def pki() -> Iterator[TestPki]:
    """A test CA and a server certificate issued for "localhost" only, so dialling 127.0.0.1 is
    the wrong-host-name case."""
    made = make_test_pki(dns_names=("localhost",), ip_addresses=())
    yield made
    made.remove()


@pytest.fixture(scope="module")
def tls_postgres(pki: TestPki) -> Iterator[PostgresServer]:
    """A PostgreSQL of the module's own that accepts TLS connections only."""
    server = PostgresServer(
        max_connections=20,
        settings=pki.postgres_settings(),
        hba_lines=["hostnossl all all 127.0.0.1/32 reject"],
    )
    server.start()
    yield server
    server.stop()


def pytest_report_header(config: pytest.Config) -> str:
    """Which PostgreSQL the servers run (ASYNCPOOL_PG_BINDIR picks another: PostgreSQL 17)."""
    try:
        bindir = postgres_bindir()
        major, minor = postgres_version(bindir)
    except HarnessError as exc:
        return f"postgresql: {exc}"
    return f"postgresql: {major}.{minor} ({bindir})"


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """Fail the run if any server the harness started outlived it."""
    left = leftover_servers()
    if left:
        lines = "\n".join(f"  pid {pid}: {cmd}" for pid, cmd in left)
        print(f"\nharness servers left running after the suite:\n{lines}")
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


@pytest.fixture
def aws(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fake static credentials, no region, nothing read from this machine's AWS config."""
    set_environment(monkeypatch, aws_environment())


@pytest.fixture
def silent_server() -> Iterator[int]:
    """A port that accepts TCP connections and never answers a login."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(8)
        yield sock.getsockname()[1]
