"""Direct-TLS cancel requests where the connection's verification is least like the default: a
host given as an IP address (verified against the certificate's IP names, no SNI), a multi-host
DSN whose first host is down (the request goes to the host dialled), and uvloop's SSL transport.
The front taking direct TLS only serves from an asyncio loop of its own thread (`_DirectTlsFront`),
whatever loop the client runs on."""

from __future__ import annotations

import asyncio
import socket
import uuid
from collections.abc import Callable, Iterator

import pytest

from asyncpool import Pool
from asyncpool.testing import PostgresServer
from asyncpool.testing.pki import TestPki, make_test_pki
from tests.test_tls import _DirectTlsFront, _ended


@pytest.fixture(scope="module")
def ip_pki() -> Iterator[TestPki]:
    """A test CA and a server certificate for "localhost" and 127.0.0.1."""
    made = make_test_pki(dns_names=("localhost",), ip_addresses=("127.0.0.1",))
    yield made
    made.remove()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def _cancel_round(dsn: str, postgres: PostgresServer, front: _DirectTlsFront,
                        names: list[str | None]) -> None:
    token = f"direct-host-{uuid.uuid4().hex[:10]}"
    try:
        async with Pool(dsn, min_size=0, max_size=1, connect_timeout=5,
                        telemetry=False) as pool, pool.acquire() as conn:
            before = len(front.names)
            with pytest.raises(TimeoutError):
                await conn.fetch(f"SELECT pg_sleep(30) /* {token} */", timeout=0.3)
            assert await _ended(postgres, token), "the cancelled statement ran on"
            assert await conn.fetchval("SELECT 1") == 1  # the same connection goes on
            assert front.names[before:] == names
            assert pool.stats().closed_total == 0
    finally:
        await postgres.end_statements(token)


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
@pytest.mark.parametrize("host", ["localhost", "127.0.0.1"])
def test_a_direct_tls_cancel_verifies_the_host_dialled_as_the_connection_did(
    postgres: PostgresServer, ip_pki: TestPki, loop: str, host: str
) -> None:
    """verify-full: the request's TLS names the host as the connection's did (SNI "localhost";
    none for an IP address, checked against the certificate's IP name), on either loop."""
    factory: Callable[[], asyncio.AbstractEventLoop] = asyncio.new_event_loop
    if loop == "uvloop":
        uvloop = pytest.importorskip("uvloop")
        factory = uvloop.new_event_loop
    front = _DirectTlsFront(ip_pki, postgres.port)
    port = front.start()
    try:
        dsn = postgres.app.dsn(host, port, postgres.database, sslmode="verify-full",
                               sslnegotiation="direct", sslrootcert=str(ip_pki.ca_cert))
        sni: list[str | None] = ["localhost"] if host == "localhost" else [None]
        with asyncio.Runner(loop_factory=factory) as runner:
            runner.run(_cancel_round(dsn, postgres, front, sni))
    finally:
        front.close()


async def test_a_multi_host_dsns_direct_tls_cancel_goes_to_the_host_dialled(
    postgres: PostgresServer, ip_pki: TestPki
) -> None:
    """The first host refuses connections; the connection is made to the second, and so is its
    cancel request (asyncpg's ``_addr``), verified for that host's name."""
    front = _DirectTlsFront(ip_pki, postgres.port)
    port = front.start()
    try:
        dead = _free_port()
        dsn = (f"postgresql://{postgres.app.name}:{postgres.app.password}@127.0.0.1:{dead},"
               f"localhost:{port}/{postgres.database}?sslmode=verify-full"
               f"&sslnegotiation=direct&sslrootcert={ip_pki.ca_cert}")
        await _cancel_round(dsn, postgres, front, ["localhost"])
    finally:
        front.close()
