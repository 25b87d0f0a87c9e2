"""Once a guarded login (`asyncpool.connect.authguard`) is through, nothing of the guard stays
between asyncpg and the socket: asyncio's transports are given to asyncpg as they are, with a
``set_protocol`` of their own that removes itself; uvloop's, which take no attributes, keep the
`GuardedTransport` view. Against a real PostgreSQL, plain (TLS declined under the default
``prefer``-like setting on loopback) and over verified TLS with ``require_auth``; the guard's
refusals are `tests/test_tls_mitm.py`'s, and one of them runs here under uvloop."""

from __future__ import annotations

import asyncio
from asyncio import selector_events, sslproto
from typing import Any

import pytest

from asyncpool import AuthMethodRefusedError, Pool
from asyncpool.config import PreparedStatements
from asyncpool.connect import driver
from asyncpool.connect.authguard import GuardedTransport
from asyncpool.testing import PostgresServer
from asyncpool.testing.mitm import FakeServer
from asyncpool.testing.pki import TestPki

MODES: tuple[PreparedStatements, ...] = ("off", "unnamed")
# asyncio's plain socket transport (typeshed does not list it).
PLAIN: type[Any] = getattr(selector_events, "_SelectorSocketTransport")  # noqa: B009


def _views(conn: Any) -> list[Any]:
    """The transport asyncpg writes to, then each one under it (asyncpool's views have `real`)."""
    transport = driver.transport_of(conn)
    chain = [transport]
    while hasattr(transport, "real"):
        transport = transport.real
        chain.append(transport)
    return chain


def _assert_nothing_of_the_guard(conn: Any, transport_type: type[Any],
                                 mode: PreparedStatements) -> None:
    chain = _views(conn)
    real = chain[-1]
    if "uvloop" in type(asyncio.get_running_loop()).__module__:
        # uvloop's transports take no attributes: the guard stays a view just above the socket's.
        assert "uvloop" in type(real).__module__, chain
        assert isinstance(chain[-2], GuardedTransport), chain
        assert len(chain) == (2 if mode == "off" else 3)
        return
    assert not any(isinstance(t, GuardedTransport) for t in chain), chain
    assert isinstance(real, transport_type)
    # "off" writes straight to the loop's transport; "unnamed" through its Wire's only.
    assert len(chain) == (1 if mode == "off" else 2)
    # The one-shot set_protocol removed itself: the class's own method again.
    assert real.set_protocol.__func__ is type(real).set_protocol


@pytest.mark.parametrize("mode", MODES)
async def test_a_guarded_plain_login_leaves_asyncpg_the_loops_transport(
        postgres: PostgresServer, mode: PreparedStatements) -> None:
    # A password on loopback without verified TLS: the guard reads the login (SCRAM only).
    async with Pool(postgres.dsn(), name=f"guard-plain-{mode}", prepared_statements=mode,
                    min_size=1, max_size=1, telemetry=False) as pool:
        async with pool.acquire() as conn:
            _assert_nothing_of_the_guard(conn.raw, PLAIN, mode)
            assert not await conn.fetchval("SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()")
        for i in range(3):
            assert await pool.fetchval("SELECT $1::int + 1", i) == i + 1


@pytest.mark.parametrize("mode", MODES)
async def test_a_guarded_tls_login_leaves_asyncpg_the_loops_tls_transport(
        tls_postgres: PostgresServer, pki: TestPki, mode: PreparedStatements) -> None:
    dsn = tls_postgres.app.dsn("localhost", tls_postgres.port, tls_postgres.database)
    # Verified TLS, but require_auth keeps the guard on.
    async with Pool(dsn, name=f"guard-tls-{mode}", ssl="verify-full",
                    ssl_root_cert=str(pki.ca_cert), require_auth="scram-sha-256",
                    prepared_statements=mode, min_size=1, max_size=1, telemetry=False) as pool:
        async with pool.acquire() as conn:
            _assert_nothing_of_the_guard(conn.raw, sslproto._SSLProtocolTransport, mode)
            assert await conn.fetchval("SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()")
        for i in range(3):
            assert await pool.fetchval("SELECT $1::int + 1", i) == i + 1


def test_under_uvloop_the_guard_stays_a_view_and_still_refuses(postgres: PostgresServer) -> None:
    uvloop = pytest.importorskip("uvloop")

    async def main() -> None:
        async with Pool(postgres.dsn(), name="guard-uvloop", prepared_statements="off",
                        min_size=1, max_size=1, telemetry=False) as pool:
            async with pool.acquire() as conn:
                chain = _views(conn.raw)
                assert isinstance(chain[0], GuardedTransport)
                assert "uvloop" in type(chain[-1]).__module__
            for i in range(3):
                assert await pool.fetchval("SELECT $1::int + 1", i) == i + 1
        async with FakeServer(tls="refuse") as fake:
            with pytest.raises(AuthMethodRefusedError, match="cleartext password"):
                await Pool(f"postgresql://app:secret@localhost:{fake.port}/app",  # pragma: allowlist secret
                           min_size=1, max_size=1, connect_timeout=5, telemetry=False).open()
            assert fake.received == []

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(main())
