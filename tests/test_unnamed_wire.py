"""On the wire: one round trip per reused statement, unnamed statements only, and a reply's
head read correctly however the bytes arrive."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import re
import struct
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import pytest

from asyncpool import Pool
from asyncpool.config import PreparedStatements
from asyncpool.unnamed.check import CHANGED, MATCH, UNREADABLE, Check
from asyncpool.unnamed.entries import Description
from asyncpool.unnamed.messages import (
    BIND_COMPLETE_MESSAGE,
    DATA_ROW,
    PARSE_COMPLETE_MESSAGE,
    message_header,
)
from asyncpool.unnamed.wire import Wire
from tests.conftest import Pooler

_SSL_REQUEST, _GSSENC_REQUEST = 80877103, 80877104


class CountingRelay:
    """A loopback relay that counts the client's protocol messages (by type) and keeps every
    byte the server sent, so tests can see round trips and replies exactly."""

    def __init__(self, upstream_host: str, upstream_port: int) -> None:
        self.upstream = (upstream_host, upstream_port)
        self.sent: collections.Counter[str] = collections.Counter()
        self.statement_names: set[bytes] = set()
        self.replies = bytearray()
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    async def __aenter__(self) -> CountingRelay:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    def dsn(self, dsn: str) -> str:
        assert self._server is not None
        port = self._server.sockets[0].getsockname()[1]
        parts = urlsplit(dsn)
        netloc = parts.netloc.rsplit("@", 1)[0] + f"@127.0.0.1:{port}"
        return urlunsplit(parts._replace(netloc=netloc))

    def round_trips(self) -> int:
        """Each Sync or Flush makes the client wait for the server: one round trip each."""
        return self.sent["S"] + self.sent["H"]

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection(*self.upstream)
        for coro in (self._requests(reader, up_writer), self._replies(up_reader, writer)):
            task = asyncio.create_task(coro)
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _requests(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        buf = bytearray()
        started = False
        with contextlib.suppress(ConnectionError):
            while data := await reader.read(65536):
                writer.write(data)
                buf += data
                while True:
                    if not started:  # untyped: SSL/GSS requests, then the startup message
                        if len(buf) < 8:
                            break
                        size, code = struct.unpack_from("!ii", buf)
                        if len(buf) < size:
                            break
                        started = code not in (_SSL_REQUEST, _GSSENC_REQUEST)
                        del buf[:size]
                        continue
                    head = message_header(buf, 0)
                    if head is None:
                        break
                    kind, end = head
                    self.sent[chr(kind)] += 1
                    if kind == ord("P"):
                        self.statement_names.add(bytes(buf[5:buf.index(b"\0", 5)]))
                    del buf[:end]
                await writer.drain()
        writer.close()

    async def _replies(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError):
            while data := await reader.read(65536):
                self.replies += data
                writer.write(data)
                await writer.drain()
        writer.close()


@pytest.fixture
async def relay(pooler: Pooler) -> AsyncIterator[CountingRelay]:
    async with CountingRelay(pooler.host, pooler.port) as r:
        yield r


async def _trips_per_query(relay: CountingRelay, pooler: Pooler,
                           mode: PreparedStatements) -> float:
    query = "SELECT $1::int + 1 AS n, $2::text[] AS t"
    async with Pool(relay.dsn(pooler.dsn()), name=f"wire-{mode}", prepared_statements=mode,
                    min_size=1, max_size=1, telemetry=False) as pool, pool.acquire() as conn:
        for i in range(3):  # warm up: describe, introspect
            await conn.fetchrow(query, i, ["a"])
        before = relay.round_trips()
        for i in range(20):
            row = await conn.fetchrow(query, i, ["a"])
            assert row is not None
            assert (row["n"], row["t"]) == (i + 1, ["a"])
        return (relay.round_trips() - before) / 20


async def test_one_round_trip_per_reused_statement(relay: CountingRelay, pooler: Pooler) -> None:
    assert await _trips_per_query(relay, pooler, "off") == 2
    flushes = relay.sent["H"]
    assert await _trips_per_query(relay, pooler, "unnamed") == 1
    # Only the first execution described the statement (Parse/Describe/Flush).
    assert relay.sent["H"] - flushes == 1
    assert relay.statement_names == {b""}, "a named statement would break PgBouncer < 1.21"


async def test_executemany_is_one_round_trip_too(relay: CountingRelay, pooler: Pooler) -> None:
    async with Pool(relay.dsn(pooler.dsn()), name="wire-many", prepared_statements="unnamed",
                    min_size=1, max_size=1, telemetry=False) as pool, pool.transaction() as conn:
        # A temporary table lives on one server connection: use it within one transaction.
        await conn.execute("CREATE TEMP TABLE t (k int) ON COMMIT DROP")
        await conn.executemany("INSERT INTO t VALUES ($1)", [(1,), (2,)])
        before = relay.round_trips()
        await conn.executemany("INSERT INTO t VALUES ($1)", [(i,) for i in range(500)])
        assert relay.round_trips() - before == 1
        assert await conn.fetchval("SELECT count(*) FROM t") == 502


# -- the Wire's reading side, fed real replies a few bytes at a time -----------------------------


class Recorder:
    """Stands in for asyncpg's protocol: records what the Wire forwards."""

    def __init__(self) -> None:
        self.received = bytearray()

    def data_received(self, data: bytes) -> None:
        self.received += data


class FakeTransport:
    aborted = False

    def abort(self) -> None:
        self.aborted = True


def _messages(reply: bytes) -> list[bytes]:
    found, pos = [], 0
    while (head := message_header(reply, pos)) is not None:
        found.append(reply[pos:head[1]])
        pos = head[1]
    assert pos == len(reply)
    return found


def _wire(inner: Recorder, transport: FakeTransport, verdicts: list[Check] | None = None) -> Wire:
    wire = Wire(inner)
    wire.real = transport
    wire.on_verdict = (verdicts if verdicts is not None else []).append
    return wire


def _without_data_rows(reply: bytes) -> bytes:
    return b"".join(m for m in _messages(reply) if m[0] != DATA_ROW)


async def _reply_of_reuse(relay: CountingRelay, pooler: Pooler, ddl: str | None) -> tuple[Any, bytes]:
    """A cached description and the server's real reply to its reuse (after `ddl`, if any)."""
    table = "dc_wire_" + re.sub(r"\W", "_", pooler.label)
    async with Pool(relay.dsn(pooler.dsn()), name="wire-reply", prepared_statements="unnamed",
                    min_size=1, max_size=1, telemetry=False) as pool, pool.acquire() as conn:
        query = "SELECT g AS a, g::text AS b FROM generate_series(1, $1::int) g"
        if ddl is not None:
            query = f"SELECT * FROM {table} WHERE k <= $1"
            await conn.execute(f"DROP TABLE IF EXISTS {table}; CREATE TABLE {table} (k int);"
                               f"INSERT INTO {table} SELECT generate_series(1, 5)")
        await conn.fetch(query, 5)
        key = (query, asyncpg.Record, False)
        description: Description = conn.raw._describe_cache._entries[key]  # type: ignore[attr-defined]
        if ddl is not None:
            await conn.execute(ddl.format(table=table))
        start = len(relay.replies)
        with contextlib.suppress(Exception):
            await conn.fetch(query, 5)
        return description, bytes(relay.replies[start:])


@pytest.mark.parametrize("chunk", [1, 3, 1000])
async def test_wire_forwards_a_matching_reply_unchanged(relay: CountingRelay, pooler: Pooler,
                                                             chunk: int) -> None:
    description, reply = await _reply_of_reuse(relay, pooler, None)
    description.row_message = None  # take the slow path: compare column by column
    inner, verdicts = Recorder(), list[Check]()
    wire = _wire(inner, FakeTransport(), verdicts)
    check = Check(description, ("q", asyncpg.Record, False), replay=True)
    wire.expect(check)
    for pos in range(0, len(reply), chunk):
        wire.data_received(reply[pos:pos + chunk])
    assert check.verdict == MATCH
    assert verdicts == [check]
    assert bytes(inner.received) == reply
    assert sum(m[0] == DATA_ROW for m in _messages(reply)) == 5


@pytest.mark.parametrize("chunk", [1, 5, 1000])
async def test_wire_keeps_the_rows_of_a_changed_reply_to_decode_again(
    relay: CountingRelay, pooler: Pooler, chunk: int
) -> None:
    description, reply = await _reply_of_reuse(
        relay, pooler, "ALTER TABLE {table} ALTER COLUMN k TYPE float4")
    transport = FakeTransport()
    inner = Recorder()
    wire = _wire(inner, transport)
    check = Check(description, ("q", asyncpg.Record, False), replay=True)
    wire.expect(check)
    for pos in range(0, len(reply), chunk):
        wire.data_received(reply[pos:pos + chunk])
    assert check.verdict == CHANGED
    assert check.found == (("k", 700),)  # float4
    messages = _messages(reply)
    assert sum(m[0] == DATA_ROW for m in messages) == 5
    # asyncpg's call gets the reply without rows; every message after the head is recorded.
    assert bytes(inner.received) == _without_data_rows(reply)
    assert bytes(inner.received).endswith(reply[-6:])  # ReadyForQuery went through
    assert b"".join(check.recorded) == (PARSE_COMPLETE_MESSAGE + BIND_COMPLETE_MESSAGE
                                        + b"".join(messages[3:]))
    assert check.bound
    assert not transport.aborted
    wire.data_received(b"after")  # back to forwarding everything
    assert bytes(inner.received).endswith(b"after")


async def test_wire_closes_the_connection_on_a_reply_it_cannot_read(
    relay: CountingRelay, pooler: Pooler
) -> None:
    description, _ = await _reply_of_reuse(relay, pooler, None)
    transport, inner = FakeTransport(), Recorder()
    wire = _wire(inner, transport)
    check = Check(description, ("q", asyncpg.Record, False), replay=True)
    wire.expect(check)
    wire.data_received(b"D\x00\x00\x00\x06\x00\x00")  # a DataRow before any description
    assert check.verdict == UNREADABLE
    assert transport.aborted
    assert inner.received == b""
