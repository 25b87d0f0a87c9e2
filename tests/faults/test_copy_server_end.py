"""A COPY FROM STDIN from an asynchronous iterable that the server ends (here
``pg_cancel_backend()``; ``statement_timeout`` ends it the same way) before its source ends, on
real PostgreSQL and through both PgBouncers, in every ``prepared_statements`` mode they allow:
the caller gets the server's error (or its own cancellation), nothing reaches the loop's
exception handler ("Future exception was never retrieved"), and the connection, in step, is
kept and answers its next statement; a COPY whose front had not taken all its rows when the
server ended it ends at once all the same, and its connection, out of step, is replaced
(asyncpool.connect.copy_end)."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, Literal

import asyncpg
import pytest

from asyncpool import Pool
from asyncpool.connect import copy_end, driver
from asyncpool.testing import ServerStack
from asyncpool.testing.faultproxy import FaultProxy
from tests.faults.copy_support import assert_closed_and_replaced
from tests.loop_errors import collected

Mode = Literal["off", "on", "unnamed"]
# Every front, and each connection class the modes give (the unnamed mode's; asyncpg's, which
# "off" and "on" share: a COPY is a simple query in both), not every pair: the module's cases
# take about 2.5 s each.
CASES: list[tuple[str, Mode]] = [
    ("direct", "unnamed"), ("direct", "off"),
    ("legacy", "unnamed"),
    ("current", "unnamed"), ("current", "on"),
]
# Rows the steady source has: far more than the COPY takes once the server has ended it.
STEADY_CHUNKS = 40
# Each wait for the server (its cancel, its answer) ends well within this.
SERVER_BOUND = 5.0
# Without the fix a cancelled COPY the server had ended waits for the pool's reset to give up on
# asyncpg's cancel (5 s) and loses its connection; with it, it ends at once. Generous (a loaded
# machine), and still half the defect's wait.
CANCEL_BOUND = 2.5
# A chunk larger than what the sockets between the client and a front that stopped reading
# hold (the client's send buffer grows to 4 MB here, the proxy's receive buffer stays small when
# it does not read): most of it stays in the client's transport, unsent.
BACKED_UP = 16 * 1024 * 1024
# The CopyData message of the row the server ends the COPY on: type, length, data; the data of
# a text row ("1\n"), or of binary COPY's header (signature, flags, extension length) and one
# record (field count, then length and value of an int4 and of `Feed.row`'s text).
ROW_MESSAGE = {False: 1 + 4 + 2, True: 1 + 4 + (11 + 4 + 4) + 2 + (4 + 4) + (4 + 600_000)}


class Feed:
    """The COPY's source: what it has handed out, and when the server's cancel has landed."""

    def __init__(self) -> None:
        self.taken = 0
        #: Bytes of row data handed out (what the server has read once it waits for more).
        self.handed_out = 0
        self.cancelled_on_server = asyncio.Event()
        #: Set as `backed_up` hands out its large chunk.
        self.backing_up = asyncio.Event()

    def row(self, k: int, records: bool) -> Any:
        self.taken += 1
        self.handed_out += 600_000 if records else len(b"%d\n" % k)
        return (k, "y" * 600_000) if records else b"%d\n" % k  # (a record fills asyncpg's buffer)

    async def stalled(self, records: bool = False) -> AsyncIterator[Any]:
        """A row; once the server has been told to cancel, the row it ends the COPY on (it
        reads the cancel as it reads data); then a stall longer than the test."""
        yield self.row(0, records)
        await self.cancelled_on_server.wait()
        yield self.row(1, records)
        await asyncio.sleep(60)
        yield self.row(2, records)

    async def backed_up(self, records: bool = False) -> AsyncIterator[Any]:
        """Once the server has been told to cancel, the row it ends the COPY on, then at once a
        chunk the front will not take (`BACKED_UP`), then rows without pause (each one waits
        for room to be written), then a stall longer than the test."""
        await self.cancelled_on_server.wait()
        yield self.row(1, records)
        self.backing_up.set()
        yield (2, "y" * BACKED_UP) if records else b"2\n" * (BACKED_UP // 2)
        for k in range(3, STEADY_CHUNKS):
            yield self.row(k, records)
        await asyncio.sleep(60)
        yield self.row(STEADY_CHUNKS, records)

    async def steady(self, records: bool = False) -> AsyncIterator[Any]:
        """A row every 50 ms, many more than the COPY needs once the server has ended it."""
        for k in range(STEADY_CHUNKS):
            yield self.row(k, records)
            await asyncio.sleep(0.05)


@pytest.fixture(params=CASES, ids=[f"{front}-{mode}" for front, mode in CASES])
def front(request: pytest.FixtureRequest, stack: ServerStack) -> tuple[str, Mode]:
    where, mode = request.param
    dsn = stack.postgres.dsn() if where == "direct" else getattr(stack, where).dsn()
    return dsn, mode


@pytest.fixture
async def table(stack: ServerStack) -> str:
    name = f"copy_end_{uuid.uuid4().hex[:10]}"
    setup = await asyncpg.connect(stack.postgres.dsn())
    try:
        await setup.execute(f"CREATE TABLE {name} (x int, t text)")
    finally:
        await setup.close()
    return name


# The backend running a COPY ($1: its text) that has read $2 bytes of rows and waits for more.
_READING = ("FROM pg_stat_activity a JOIN pg_stat_progress_copy p ON p.pid = a.pid "
            "WHERE a.state = 'active' AND a.query LIKE $1 "
            "AND a.wait_event = 'ClientRead' AND p.bytes_processed >= $2")


async def _cancel_on_server(stack: ServerStack, table: str, feed: Feed,
                            then: Callable[[], None] | None = None) -> None:
    """pg_cancel_backend() of the backend running the COPY into `table` once it has read all
    `feed` has handed out and waits for more (so it ends the COPY on the next row, which it
    reads whole, not on one it had already read, leaving the next row to a front that may no
    longer take it), then `then`, then `feed` told."""
    admin = await asyncpg.connect(stack.postgres.admin_dsn)
    try:
        async with asyncio.timeout(SERVER_BOUND):
            while not await admin.fetchval(
                    f"SELECT count(pg_cancel_backend(a.pid)) {_READING}",
                    f"COPY%{table}%", feed.handed_out):
                await asyncio.sleep(0.02)
        if then is not None:
            then()
        feed.cancelled_on_server.set()
        # Ended once the backend is no longer running the COPY (it read the next row).
        async with asyncio.timeout(SERVER_BOUND):
            while await admin.fetchval(
                    "SELECT count(*) FROM pg_stat_activity WHERE state = 'active' "
                    "AND query LIKE $1", f"COPY%{table}%"):
                await asyncio.sleep(0.02)
    finally:
        await admin.close()


def _copy(target: Any, table: str, source: Any, records: bool, timeout: float | None
          ) -> Awaitable[Any]:
    copy: Awaitable[Any] = (
        target.copy_records_to_table(table, records=source, columns=["x", "t"], timeout=timeout)
        if records else target.copy_to_table(table, source=source, columns=["x"], timeout=timeout))
    return copy


async def _run(pool: Pool, via: str, copy: Callable[[Any], Awaitable[Any]]) -> tuple[Any, str]:
    """The COPY through `pool.copy_*` or `conn.copy_*` in an acquire block: what it raised, and
    (in the block) what the same connection answers next."""
    if via == "pool":
        try:
            await copy(pool)
        except BaseException as exc:  # (what the caller gets is the subject)
            return exc, ""
        return None, ""
    raised: BaseException | None = None
    async with pool.acquire() as conn:
        try:
            await copy(conn)
        except BaseException as exc:  # (the same)
            raised = exc
        try:
            after = repr(await asyncio.wait_for(conn.fetchval("SELECT 7"), SERVER_BOUND))
        except Exception as exc:  # (reported by the assertion)
            after = f"{type(exc).__name__}: {exc}"
    return raised, after


async def _check_kept(pool: Pool, after: str, via: str) -> None:
    """The connection was kept, idle, and the pool's next statement runs on it."""
    if via != "pool":
        assert after == "7", f"the COPY's connection then answered {after}"
    stats = pool.stats()
    assert (stats.in_use, stats.idle, stats.closed_total, stats.created_total) == (0, 1, 0, 1), stats
    assert await pool.fetchval("SELECT 8") == 8


async def _check_closed(pool: Pool, after: str, via: str) -> None:
    """The connection was closed at once (out of step), and the pool's next statement runs on a
    new one."""
    if via != "pool":
        assert after.startswith("InterfaceError"), f"the COPY's connection then answered {after}"
    stats = pool.stats()
    assert (stats.in_use, stats.closed_total) == (0, 1), stats
    assert await pool.fetchval("SELECT 8") == 8


@pytest.mark.parametrize("via", ["pool", "acquire"])
async def test_server_ends_the_copy_then_its_timeout_runs_out(
        front: tuple[str, Mode], via: str, table: str, stack: ServerStack,
        loop_errors: list[dict[str, Any]]) -> None:
    """The server ends the COPY, then the caller's ``timeout=`` runs out while the source stalls:
    asyncpg 0.32 raised its own AttributeError and left the server's error unretrieved."""
    dsn, mode = front
    feed = Feed()
    async with Pool(dsn, prepared_statements=mode, min_size=1, max_size=1,
                    telemetry=False) as pool:
        copying = asyncio.create_task(
            _run(pool, via, lambda target: _copy(target, table, feed.stalled(), False, 2.0)))
        await _cancel_on_server(stack, table, feed)
        raised, after = await asyncio.wait_for(copying, SERVER_BOUND)
        assert isinstance(raised, asyncpg.QueryCanceledError), repr(raised)
        assert feed.taken == 2
        await _check_kept(pool, after, via)
    assert await collected(loop_errors) == []


@pytest.mark.parametrize("way", ["pool", "acquire", "acquire-records"])
async def test_server_ends_the_copy_then_its_task_is_cancelled(
        front: tuple[str, Mode], way: str, table: str, stack: ServerStack,
        loop_errors: list[dict[str, Any]]) -> None:
    """The server ends the COPY, then the caller's task is cancelled while the source stalls:
    asyncpg asked the server to cancel the ended statement and waited for an answer that never
    came, so the cancellation waited for the pool's reset to give up and the connection was
    closed. Now the cancellation is at once, and the connection is closed at once: rows written
    before the server's error may still be on their way, which the cancelled task cannot wait
    to check (`test_copy_refused_early.py`)."""
    dsn, mode = front
    via, records = way.removesuffix("-records"), way.endswith("-records")
    feed = Feed()
    async with Pool(dsn, prepared_statements=mode, min_size=1, max_size=1,
                    telemetry=False) as pool:
        copying = asyncio.create_task(
            _run(pool, via, lambda target: _copy(target, table, feed.stalled(records), records,
                                                 None)))
        await _cancel_on_server(stack, table, feed)
        await asyncio.sleep(0.2)  # (the server's error read by the client)
        copying.cancel()
        loop = asyncio.get_running_loop()
        started = loop.time()
        # (`_run` hands back what the COPY raised, its cancellation too)
        raised, after = await asyncio.wait_for(copying, SERVER_BOUND * 2)
        assert isinstance(raised, asyncio.CancelledError), repr(raised)
        assert loop.time() - started < CANCEL_BOUND
        await _check_closed(pool, after, via)
    assert await collected(loop_errors) == []


@pytest.mark.parametrize("way", ["pool", "acquire-records"])
async def test_a_copy_the_server_ended_stops_taking_its_source(
        front: tuple[str, Mode], way: str, table: str, stack: ServerStack,
        loop_errors: list[dict[str, Any]]) -> None:
    """A source that keeps producing: the COPY stops at the next row once the server has ended
    it, and the caller gets the server's error then (asyncpg 0.32 read the source to its end)."""
    dsn, mode = front
    via, records = way.removesuffix("-records"), way.endswith("-records")
    feed = Feed()
    feed.cancelled_on_server.set()  # (not used by the steady source)
    async with Pool(dsn, prepared_statements=mode, min_size=1, max_size=1,
                    telemetry=False) as pool:
        copying = asyncio.create_task(
            _run(pool, via, lambda target: _copy(target, table, feed.steady(records), records,
                                                 None)))
        await _cancel_on_server(stack, table, feed)
        raised, after = await asyncio.wait_for(copying, SERVER_BOUND)
        assert isinstance(raised, asyncpg.QueryCanceledError), repr(raised)
        assert feed.taken < STEADY_CHUNKS // 2, f"{feed.taken} rows of {STEADY_CHUNKS} taken"
        await _check_kept(pool, after, via)
        assert await pool.fetchval(f"SELECT count(*) FROM {table}") == 0
    assert await collected(loop_errors) == []


@pytest.mark.parametrize("via", ["pool", "acquire"])
async def test_its_own_timeout_first_is_a_timeout(
        front: tuple[str, Mode], via: str, table: str, loop_errors: list[dict[str, Any]]) -> None:
    """The caller's ``timeout=`` runs out before the server ends anything: TimeoutError, as
    before, and the connection is kept (the COPY was cancelled and answered)."""
    dsn, mode = front
    feed = Feed()
    async with Pool(dsn, prepared_statements=mode, min_size=1, max_size=1,
                    telemetry=False) as pool:
        raised, after = await asyncio.wait_for(
            _run(pool, via, lambda target: _copy(target, table, feed.stalled(), False, 0.5)),
            SERVER_BOUND)
        assert isinstance(raised, TimeoutError), repr(raised)
        await _check_kept(pool, after, via)
    assert await collected(loop_errors) == []


async def test_statement_timeout_ends_the_copy(
        front: tuple[str, Mode], table: str, loop_errors: list[dict[str, Any]]) -> None:
    """``statement_timeout`` (``SET LOCAL``, behind a pooler too) ends the COPY as the server
    reads its next chunk; the caller's ``timeout=`` then runs out while the source stalls."""
    dsn, mode = front
    feed = Feed()
    feed.cancelled_on_server.set()  # (the timeout is the server's own: the next row ends it)

    async def copy(conn: Any) -> None:
        async with conn.transaction():
            await conn.execute("SET LOCAL statement_timeout = 300")
            await conn.copy_to_table(table, source=_until_stall(feed), columns=["x"], timeout=2.0)

    async with Pool(dsn, prepared_statements=mode, min_size=1, max_size=1,
                    telemetry=False) as pool:
        raised, after = await asyncio.wait_for(_run(pool, "acquire", copy), SERVER_BOUND)
        assert isinstance(raised, asyncpg.QueryCanceledError), repr(raised)
        assert "statement timeout" in str(raised)
        await _check_kept(pool, after, "acquire")
    assert await collected(loop_errors) == []


async def _until_stall(feed: Feed) -> AsyncIterator[bytes]:
    """Rows every 50 ms past the server's 300 ms, then a stall longer than the test."""
    for k in range(12):
        yield feed.row(k, records=False)
        await asyncio.sleep(0.05)
    await asyncio.sleep(60)
    yield feed.row(12, records=False)



def _copying(source: Any) -> tuple[Any, copy_end.WatchedSource]:
    """The connection running the COPY that reads `source`, and asyncpool's watch of it."""
    return next((conn, watched) for conn, watched in copy_end._RUNNING.items()
                if isinstance(watched, copy_end.WatchedSource) and watched._source is source)


async def _copy_reading(stack: ServerStack, table: str, feed: Feed) -> None:
    """Until the backend running the COPY into `table` has read all `feed` handed out and waits
    for more."""
    admin = await asyncpg.connect(stack.postgres.admin_dsn)
    try:
        async with asyncio.timeout(SERVER_BOUND):
            while not await admin.fetchval(
                    f"SELECT count(*) {_READING}", f"COPY%{table}%", feed.handed_out):
                await asyncio.sleep(0.02)
    finally:
        await admin.close()


@pytest.mark.parametrize("way", [
    *(f"{via}-{landing}" for via in ("pool", "acquire")
      for landing in ("error", "cancelled", "cancelled-first")),
    "pool-records-error", "acquire-records-cancelled", "acquire-records-cancelled-first"])
async def test_a_copy_with_rows_unsent_ends_its_connection(
        front: tuple[str, Mode], way: str, table: str, stack: ServerStack,
        loop_errors: list[dict[str, Any]]) -> None:
    """A source fed without pause, its rows backing up in the client's transport: a proxy stops
    taking them, deterministically (behind PgBouncer 1.18 the front itself stops once the
    server has left the COPY, logging nothing). ``error``: the server ends the COPY on the row
    before them; the COPY waited for room to write for good (the reply had come); now it ends
    with the server's error at once. ``cancelled``: the task is cancelled as the client reads
    the server's error; its Sync queued behind the rows, and the next statement (or the pool's
    reset: 5 s) waited for it. ``cancelled-first``: the task is cancelled before the server has
    ended anything; asyncpg's cancel request (which a server waiting for the rest of the COPY
    does not act on) and its CopyFail waited the same. Each time the connection, out of step
    with its front (the rows would reach it after the COPY's end, where a transaction-mode
    pooler may have given the server connection to another client), is closed at once and
    replaced; the proxy then lets the rows through (to a real PgBouncer 1.18 too)."""
    dsn, mode = front
    via, _, landing = way.partition("-")
    records = landing.startswith("records-")
    landing = landing.removeprefix("records-")
    feed = Feed()
    source = feed.backed_up(records)
    seen: dict[str, Any] = {}
    async with FaultProxy.to_dsn(dsn) as proxy, Pool(
            proxy.dsn(dsn), prepared_statements=mode, min_size=1, max_size=1,
            telemetry=False) as pool:

        async def copy() -> Any:
            if via == "pool":
                return await _copy(pool, table, source, records, None)
            async with pool.acquire() as conn:
                try:
                    return await _copy(conn, table, source, records, None)
                finally:
                    # The same connection's next statement: at once, whatever it answers.
                    try:
                        seen["next"] = await asyncio.wait_for(conn.fetchval("SELECT 7"),
                                                              SERVER_BOUND)
                    except BaseException as exc:  # (reported by the assertion)
                        seen["next"] = exc

        copying = asyncio.create_task(copy())
        loop = asyncio.get_running_loop()
        if landing == "cancelled-first":
            await _copy_reading(stack, table, feed)
            proxy.hold_requests()
            feed.cancelled_on_server.set()  # (not cancelled: the source goes on all the same)
            await feed.backing_up.wait()  # (the COPY has written the chunk by then)
            conn, _ = _copying(source)
            seen["unsent"] = driver.transport_of(conn).get_write_buffer_size()
            copying.cancel()
        else:

            def on_reply(reply: asyncio.Future[Any]) -> None:
                conn, _ = _copying(source)
                seen["unsent"] = driver.transport_of(conn).get_write_buffer_size()
                if landing == "cancelled":
                    copying.cancel()

            def hold() -> None:
                # The row the server ends the COPY on goes on; nothing after it.
                proxy.hold_requests(after=ROW_MESSAGE[records])
                _, watched = _copying(source)
                watched.reply.add_done_callback(on_reply)

            await _cancel_on_server(stack, table, feed, then=hold)
        started = loop.time()
        try:
            await asyncio.wait_for(asyncio.shield(copying), SERVER_BOUND * 2)
        except BaseException as exc:  # (what the caller gets is the subject)
            raised: BaseException | None = exc
        else:
            raised = None
        took = loop.time() - started
        proxy.release_requests()  # (the rows held reach the front now)
        if not copying.done():
            copying.cancel()
            await asyncio.gather(copying, return_exceptions=True)
        assert seen.get("unsent", 0) > 0, "the rows were all taken: nothing was tested"
        expected = asyncpg.QueryCanceledError if landing == "error" else asyncio.CancelledError
        assert isinstance(raised, expected), repr(raised)
        assert took < CANCEL_BOUND, f"the COPY took {took:.2f} s to end"
        await assert_closed_and_replaced(pool, via, seen, SERVER_BOUND)
        assert await pool.fetchval(f"SELECT count(*) FROM {table}") == 0
    assert await collected(loop_errors) == []
