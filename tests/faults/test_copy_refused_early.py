"""A bulk COPY FROM STDIN the server refuses at an early row (a duplicate key), fed as fast as
the client can write it, then the next statement on the same pool (``max_size=1``, so the same
connection if it is kept). No proxy: real PostgreSQL, PgBouncer 1.18 and a current one.

The client writes the whole COPY before it reads the server's error: its transport hands each
chunk to the socket at once, so nothing is left unsent to tell it that rows were still on their
way. PostgreSQL and PgBouncer 1.21+ read the rows left over and drop them. PgBouncer 1.18, the
rows arriving after the server has left the COPY, often stops reading the client for good (4 MB:
most runs here); its next statement then got no answer (until the caller's timeout, the pool's
reset then giving up after 5 s; with none, until ``leak_timeout`` reclaimed it, 30 s), or (a path
source) met a server connection PostgreSQL had closed on the rows' bytes. Now a COPY
the server ended keeps its connection only once the front has answered a query sent after the
rows (`asyncpool.connect.copy_end.confirm_in_step`): in a round trip where it reads them, else
the connection is closed within `IN_STEP_BOUND` (1 s) and the next statement runs on a new one.
A task cancelled once the server's error has arrived, before the COPY returned, cannot wait for
that answer: its connection is closed at once (through 1.18 the cancellation used to wait 5 s for
the pool's reset, whose statement got no answer)."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Iterator
from typing import Any

import asyncpg
import pytest

from asyncpool import ConnectionLostError, Pool
from asyncpool.connect import copy_end
from asyncpool.pool.slots import COPY_OUT_OF_STEP
from asyncpool.testing import PgBouncerServer, ServerStack
from asyncpool.testing.binaries import system_pgbouncer
from tests.loop_errors import collected
from tests.pool_watchers import PoolWork

# The COPY's size through PgBouncer 1.18, which stopped reading its client in most runs here at
# this size (and in fewer at 256 KB and 1 MB). Rows of about 1 KB, 64 to a chunk of the source.
TOTAL = 4 * 1024 * 1024
# Through the fronts that read on: what the sockets on the way take whole, so that no row is
# left unsent in the client's transport (a connection that had some is closed at once: 4 MB
# sometimes did), and all of it arrives after the server's error.
TAKEN_WHOLE = 1024 * 1024
ROW_TEXT = "z" * 1000
CHUNK_ROWS = 64
# COPYs through PgBouncer 1.18 until one left its connection out of step (without the fix the
# first such one fails the test). About 8 in 18 did at 4 MB, so 20 all in step would be a chance
# of about 1 in 100,000 (6, the first count here, about 1 in 35).
ATTEMPTS = 20
# The next statement answers within this (without the fix: no answer through a stuck 1.18).
NEXT_BOUND = 1.0
# A refused COPY whose front answers ends within this (a round trip after the server's error).
ANSWERED_BOUND = 1.0
# COPYs through PgBouncer 1.18 until one was cancelled once the server's error had arrived
# (the others returned first): without the fix most such (12 of 16) waited for the pool's reset,
# whose statement got no answer (5 s).
CANCELLED_ATTEMPTS = 8
# A cancelled COPY's task ends within this (without the fix: the pool's reset, 5 s).
CANCEL_BOUND = 0.5
# The refused COPY ends within this: at once, or after `copy_end.IN_STEP_BOUND` (1 s) where its
# front is stuck. Generous, for a loaded machine.
COPY_BOUND = 2.5


async def _rows(total: int) -> AsyncIterator[bytes]:
    """`total` bytes of rows 0, 1 (a duplicate: the server refuses it), ... in chunks, without
    pause."""
    chunk: list[bytes] = []
    for x in range(total // (len(ROW_TEXT) + 8)):
        chunk.append(b"%d\t%s\n" % (x, ROW_TEXT.encode()))
        if len(chunk) == CHUNK_ROWS:
            yield b"".join(chunk)
            chunk = []
    if chunk:
        yield b"".join(chunk)


@pytest.fixture
async def table(stack: ServerStack) -> AsyncIterator[str]:
    """A table holding row 1, so that a COPY from row 0 is refused at its second row."""
    name = f"copy_early_{uuid.uuid4().hex[:10]}"
    admin = await asyncpg.connect(stack.postgres.dsn())
    try:
        await admin.execute(f"CREATE TABLE {name} (x int PRIMARY KEY, t text);"
                            f"INSERT INTO {name} VALUES (1, 'there')")
        yield name
    finally:
        await admin.close()


@pytest.fixture
def bouncer_118(stack: ServerStack) -> Iterator[PgBouncerServer]:
    """A PgBouncer 1.18 of the test's own: a client it stops reading keeps its server connection
    (and a PostgreSQL backend) until PgBouncer stops, so no other test's goes with them."""
    with PgBouncerServer(system_pgbouncer(), stack.postgres) as bouncer:
        yield bouncer


async def _refused_copy(pool: Pool, table: str, total: int) -> float:
    """The COPY, refused at row 1: the server's error, and how long it took."""
    loop = asyncio.get_running_loop()
    started = loop.time()
    with pytest.raises(asyncpg.UniqueViolationError):
        async with asyncio.timeout(COPY_BOUND * 2):
            await pool.copy_to_table(table, source=_rows(total), columns=["x", "t"])
    return loop.time() - started


async def _next_statement(pool: Pool) -> float:
    """The pool's next statement, bounded: how long it took."""
    loop = asyncio.get_running_loop()
    started = loop.time()
    async with asyncio.timeout(NEXT_BOUND):
        assert await pool.fetchval("SELECT 1") == 1
    return loop.time() - started


async def test_pgbouncer_118_stuck_behind_the_rows_closes_the_connection(
        bouncer_118: PgBouncerServer, table: str, loop_errors: list[dict[str, Any]]) -> None:
    """Through PgBouncer 1.18: each refused COPY ends within `COPY_BOUND`, the next statement
    answers at once (without the fix it got no answer: `NEXT_BOUND` fails it), and a
    connection the front stopped reading was closed as out of step, not reused."""
    closes = PoolWork()  # (its `reasons`: why connections left, in order)
    async with Pool(bouncer_118.dsn(), min_size=1, max_size=1, telemetry=False,
                    observers=[closes]) as pool:
        for _ in range(ATTEMPTS):
            took = await _refused_copy(pool, table, TOTAL)
            assert took < COPY_BOUND, f"the COPY took {took:.2f} s to end"
            await _next_statement(pool)
            if closes.reasons:
                break
        assert closes.reasons == [COPY_OUT_OF_STEP], (
            f"no COPY of {ATTEMPTS} left its connection out of step: nothing was tested"
            if not closes.reasons else closes.reasons)
        stats = pool.stats()
        assert (stats.in_use, stats.idle, stats.closed_total) == (0, 1, 1), stats
    # PgBouncer 1.18's next client sees nothing of the rows: the table as it was.
    other = await asyncpg.connect(bouncer_118.dsn(), statement_cache_size=0)
    try:
        async with asyncio.timeout(NEXT_BOUND * 5):
            assert await other.fetchval(f"SELECT count(*) FROM {table}") == 1
    finally:
        await other.close()
    assert bouncer_118.running(), "PgBouncer 1.18 crashed"
    assert await collected(loop_errors) == []


@pytest.mark.parametrize("where", ["direct", "current"], ids=["direct", "pgbouncer-current"])
async def test_a_front_that_reads_on_keeps_the_connection(
        stack: ServerStack, where: str, table: str, loop_errors: list[dict[str, Any]]) -> None:
    """Directly and through a current PgBouncer, which read the rows left over and drop them:
    the connection, shown in step, is kept, and answers the next statement at once."""
    dsn = stack.postgres.dsn() if where == "direct" else stack.current.dsn()
    async with Pool(dsn, min_size=1, max_size=1, telemetry=False) as pool:
        for _ in range(2):
            took = await _refused_copy(pool, table, TAKEN_WHOLE)
            assert took < ANSWERED_BOUND, f"the COPY took {took:.2f} s to end"
            await _next_statement(pool)
        stats = pool.stats()
        assert (stats.in_use, stats.idle, stats.closed_total, stats.created_total) == (
            0, 1, 0, 1), stats
    assert await collected(loop_errors) == []


async def test_a_copy_whose_server_ends_the_connection_is_lost_not_out_of_step(
        stack: ServerStack, table: str, loop_errors: list[dict[str, Any]]) -> None:
    """``pg_terminate_backend`` under a COPY: the server's FATAL error ends the connection, which
    is not checked (nothing would answer) and is reported lost, as before, not out of step."""
    terminated = asyncio.Event()

    async def source() -> AsyncIterator[bytes]:
        yield b"0\tfirst\n"
        await terminated.wait()
        yield b"2\tsecond\n"

    closes = PoolWork()
    admin = await asyncpg.connect(stack.postgres.admin_dsn)
    try:
        async with Pool(stack.postgres.dsn(), min_size=1, max_size=1, telemetry=False,
                        observers=[closes]) as pool:
            copying = asyncio.create_task(
                pool.copy_to_table(table, source=source(), columns=["x", "t"]))
            async with asyncio.timeout(NEXT_BOUND * 5):
                while not await admin.fetchval(
                        "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                        "WHERE query LIKE $1 AND state = 'active'", f"COPY%{table}%"):
                    await asyncio.sleep(0.02)
            terminated.set()
            loop = asyncio.get_running_loop()
            started = loop.time()
            with pytest.raises(ConnectionLostError):
                await asyncio.wait_for(copying, COPY_BOUND)
            assert loop.time() - started < ANSWERED_BOUND
            await _next_statement(pool)
            assert COPY_OUT_OF_STEP not in closes.reasons, closes.reasons
    finally:
        await admin.close()
    assert await collected(loop_errors) == []


async def _rows_then_stall(total: int) -> AsyncIterator[bytes]:
    """`_rows`, then a source that waits (for good) for its next row."""
    async for chunk in _rows(total):
        yield chunk
    await asyncio.Event().wait()


async def _cancelled_once_refused(pool: Pool, table: str, stalls: bool) -> float | None:
    """The COPY refused at row 1, its task cancelled once the server's error has arrived and
    before the call has returned (waiting for the COPY's reply, or for its source if `stalls`:
    asyncpg then sends CopyFail, and the pool a Sync): how long the cancelled task took to end
    (None: the window was missed, the COPY had returned)."""
    source = _rows_then_stall(TOTAL) if stalls else _rows(TOTAL)
    copying = asyncio.create_task(pool.copy_to_table(table, source=source, columns=["x", "t"]))
    async with asyncio.timeout(COPY_BOUND):
        # (the COPY is the only one running in this process: its watched source tells)
        while not any(watch is not None and watch.ended_by_server()
                      for watch in copy_end._RUNNING.values()):
            if copying.done():
                with pytest.raises(asyncpg.UniqueViolationError):
                    copying.result()
                return None
            await asyncio.sleep(0)
    loop = asyncio.get_running_loop()
    started = loop.time()
    copying.cancel()
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(copying, COPY_BOUND * 4)
    return loop.time() - started


@pytest.mark.parametrize("case", ["1.18", "1.18-stalled", "direct", "current-stalled"])
async def test_a_copy_cancelled_after_the_servers_error_closes_its_connection_at_once(
        stack: ServerStack, request: pytest.FixtureRequest, case: str, table: str,
        loop_errors: list[dict[str, Any]]) -> None:
    """A task cancelled after the server ended its COPY, before the call returned: it gets its
    CancelledError at once and the connection is closed as out of step (the check would hold
    the cancelled task; its rows may still be on their way). Through PgBouncer 1.18 the pool's
    reset (or the holder's next statement) otherwise often got no answer: the cancellation
    took 5 s. Directly and through a current PgBouncer it costs one reconnect. ("-stalled":
    the source waits after its rows, asyncpg then cancelling the COPY, the pool sending a Sync.)"""
    where, stalls = case.removesuffix("-stalled"), case.endswith("-stalled")
    bouncer: PgBouncerServer | None = (
        request.getfixturevalue("bouncer_118") if where == "1.18" else None)
    dsn = (bouncer.dsn() if bouncer is not None
           else stack.postgres.dsn() if where == "direct" else stack.current.dsn())
    closes = PoolWork()
    tried = 0
    async with Pool(dsn, min_size=1, max_size=1, telemetry=False, observers=[closes]) as pool:
        for _ in range(CANCELLED_ATTEMPTS if where == "1.18" else 2):
            took = await _cancelled_once_refused(pool, table, stalls)
            if took is not None:
                tried += 1
                assert took < CANCEL_BOUND, f"the cancelled COPY took {took:.2f} s to end"
            try:
                await _next_statement(pool)
            except (TimeoutError, OSError, asyncpg.PostgresError) as exc:
                # (seen twice in about 25 runs, not since: 1.18's port refused connections)
                state = ("" if bouncer is None or bouncer.process is None else
                         f"; PgBouncer 1.18 running: {bouncer.running()}, its log ends:\n"
                         f"{bouncer.process.log_tail(3000)}")
                raise AssertionError(f"the next statement failed after {tried} cancelled "
                                     f"COPYs, closes {closes.reasons}{state}") from exc
            if tried:
                # One is the test; each more is another connection closed mid-COPY, which
                # PgBouncer 1.18 can crash on (docs/faults.md).
                break
        assert tried, "the COPY always returned before its cancellation: nothing was tested"
        assert closes.reasons == [COPY_OUT_OF_STEP] * tried, closes.reasons
    assert bouncer is None or bouncer.running(), "PgBouncer 1.18 crashed"
    assert await collected(loop_errors) == []
