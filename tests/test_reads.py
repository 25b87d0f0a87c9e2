"""A pool connection's plain socket reads at most 64 KiB per recv() (`asyncpool.connect.reads`),
and replies of any size still arrive whole: against real PostgreSQL and both PgBouncers."""

from __future__ import annotations

import asyncio
import hashlib
import socket
from collections.abc import AsyncIterator
from typing import Any

import pytest

from asyncpool import Pool
from asyncpool.config import PreparedStatements
from asyncpool.connect import driver
from asyncpool.connect.reads import READ_SIZE, cap_reads
from asyncpool.testing import PostgresServer
from tests.conftest import Pooler

MODES: list[PreparedStatements] = ["off", "on", "unnamed"]


def _socket_transport(asyncpg_conn: Any) -> Any:
    transport = driver.transport_of(asyncpg_conn)
    while hasattr(transport, "real"):  # asyncpool's views: GuardedTransport, WireTransport
        transport = transport.real
    return transport


def _read_size(asyncpg_conn: Any) -> int | None:
    """What the connection's socket transport asks for per recv() (None: no such setting)."""
    return getattr(_socket_transport(asyncpg_conn), "max_size", None)


def _capped() -> int | None:
    """The read size a pool leaves on the running loop: uvloop's transports are left alone."""
    return None if "uvloop" in type(asyncio.get_running_loop()).__module__ else READ_SIZE


# -- the cap itself, on asyncio's own transports ----------------------------------------------


@pytest.fixture
async def plain_transport() -> AsyncIterator[asyncio.Transport]:
    loop = asyncio.get_running_loop()
    if _capped() is None:
        pytest.skip("asyncio's plain transport cannot exist on uvloop's loop")
    listener = socket.create_server(("127.0.0.1", 0))
    transport, _ = await loop.create_connection(asyncio.Protocol, *listener.getsockname())
    try:
        yield transport
    finally:
        transport.close()
        listener.close()


async def test_a_plain_socket_transport_is_capped(plain_transport: Any) -> None:
    assert plain_transport.max_size > READ_SIZE  # asyncio's 256 KiB
    assert cap_reads(plain_transport) is True
    assert plain_transport.max_size == READ_SIZE
    assert type(plain_transport).max_size > READ_SIZE  # the instance only, not asyncio's class


async def test_the_transport_behind_a_view_is_capped(plain_transport: Any) -> None:
    class View:
        def __init__(self, real: Any) -> None:
            self.real = real

    assert cap_reads(View(View(plain_transport))) is True
    assert plain_transport.max_size == READ_SIZE


async def test_a_smaller_read_size_is_kept(plain_transport: Any) -> None:
    plain_transport.max_size = 1024
    assert cap_reads(plain_transport) is True
    assert plain_transport.max_size == 1024


@pytest.mark.parametrize("other", [None, object(), "transport"])
def test_anything_else_is_left_alone(other: object) -> None:
    assert cap_reads(other) is False


def test_uvloop_transports_are_left_alone() -> None:
    uvloop = pytest.importorskip("uvloop")

    async def main() -> tuple[bool, Any]:
        listener = socket.create_server(("127.0.0.1", 0))
        transport, _ = await asyncio.get_running_loop().create_connection(
            asyncio.Protocol, *listener.getsockname())
        try:
            return cap_reads(transport), getattr(transport, "max_size", None)
        finally:
            transport.close()
            listener.close()

    assert uvloop.run(main()) == (False, None)


# -- pool connections, real servers ------------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
async def test_pool_connections_read_capped_and_large_replies_arrive_whole(
        postgres: PostgresServer, mode: PreparedStatements) -> None:
    async with Pool(postgres.dsn(), name=f"reads-{mode}", prepared_statements=mode,
                    min_size=1, max_size=1, telemetry=False) as pool:
        async with pool.acquire() as conn:
            assert _read_size(conn.raw) == _capped()
            big = await conn.fetchval("SELECT repeat('x', $1::int)", 3 * 1024 * 1024)
            rows = await conn.fetch("SELECT g, md5(g::text) FROM generate_series(1, 20000) g")
        assert big == "x" * (3 * 1024 * 1024)
        assert [r[0] for r in rows] == list(range(1, 20001))
        assert all(r[1] == hashlib.md5(str(r[0]).encode(), usedforsecurity=False).hexdigest()
                   for r in rows)
        # Reads were capped on a connection the pool opened; the helpers use the same one.
        assert await pool.fetchval("SELECT length(repeat('y', $1::int))", 500_000) == 500_000


@pytest.mark.parametrize("mode", MODES)
async def test_large_replies_arrive_whole_through_pgbouncer(pooler: Pooler,
                                                           mode: PreparedStatements) -> None:
    if mode == "on" and not pooler.supports_prepared_statements:
        pytest.skip("named prepared statements need PgBouncer >= 1.21")
    async with Pool(pooler.dsn(), name=f"reads-{mode}-{pooler.label}", prepared_statements=mode,
                    min_size=1, max_size=1, telemetry=False) as pool:
        async with pool.acquire() as conn:
            assert _read_size(conn.raw) == _capped()
        for size in (READ_SIZE - 100, READ_SIZE, 4 * READ_SIZE + 7):
            assert await pool.fetchval("SELECT repeat('z', $1::int)", size) == "z" * size


async def test_the_load_engines_capped_asyncpg_reads_as_the_pool_does(postgres: PostgresServer) -> None:
    from asyncpool.load.clients import make_client
    from asyncpool.load.spec import Driver, LoadSpec

    uncapped = None if _capped() is None else 256 * 1024
    cases: list[tuple[Driver, int | None]] = [("asyncpg", uncapped), ("asyncpg-capped", _capped())]
    for name, expected in cases:
        client: Any = make_client(LoadSpec(postgres.dsn(), clients=1, processes=1, driver=name,
                                           prepared_statements="off"), 0)
        try:
            await client.query((1,))
            assert _read_size(client._conn) == expected, name
        finally:
            await client.close()
