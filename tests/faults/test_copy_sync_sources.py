"""A COPY FROM STDIN from a source asyncpg reads itself (a list of records, a path, a file
object) that the server ends (a row it refuses, ``pg_cancel_backend()``) while the client still
has rows backed up in its transport: PgBouncer 1.18 stops taking them once the server has ended
the COPY (it logs nothing), and asyncpg 0.32 waited in its flow control for room to write them,
until the call's ``timeout=`` or for good. Now the COPY ends with the server's error at once, its
connection (out of step) is closed when rows were unsent and kept when not, and the pool serves
the next statement (asyncpool.connect.copy_end's `FlowGate`), on real PostgreSQL and through
both PgBouncers, through ``pool.copy_*`` and an acquired connection.

The backlog is deterministic: a trigger holds the COPY at its first row on an advisory lock the
test holds (the server reads no more, the client backs up), and a proxy forwards the COPY's first
bytes only (the second row, which the server refuses, among them), so nothing the client has
written past them drains, whatever the front, until the test lets it."""

from __future__ import annotations

import asyncio
import gc
import uuid
import zlib
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any, Literal, cast

import asyncpg
import pytest

from asyncpool import Pool
from asyncpool.connect import copy_end, driver
from asyncpool.testing import PgBouncerServer, ServerStack
from asyncpool.testing.binaries import system_pgbouncer
from asyncpool.testing.faultproxy import FaultProxy
from tests.faults.copy_support import assert_closed_and_replaced
from tests.loop_errors import collected

Kind = Literal["records", "path", "file"]
End = Literal["refused", "cancelled"]
FRONTS = ["direct", "legacy", "current"]
PROXIED_FRONTS = ["direct", "current"]
KINDS: list[Kind] = ["records", "path", "file"]
# A large row: a few of them fill every buffer between the client and a server that reads none.
BIG = "y" * 600_000
# Rows after the first two: about 29 MB, far more than the sockets on the way hold.
BIG_ROWS = 48
# The COPY's first bytes the proxy forwards: its statement (and the records' prepared
# statement), and the start of its first chunk (512 KB: asyncpg's), rows 0 and 1 in it; less
# than what the sockets between the proxy and a server that reads none take.
FORWARDED = 700 * 1024
# Each wait for the server ends well within this.
SERVER_BOUND = 5.0
# The COPY ends this soon after the server has ended it (without the fix: its `timeout=`, or
# never). Generous, for a loaded machine; far under `TIMEOUT`.
END_BOUND = 2.5
# Polls (20 ms apart) the client's transport keeps its size before the test ends the COPY.
SETTLED = 5
# The call's own timeout, when it has one.
TIMEOUT = 30.0


def _dsn(stack: ServerStack, where: str) -> str:
    return stack.postgres.dsn() if where == "direct" else str(getattr(stack, where).dsn())


@pytest.fixture(params=FRONTS, ids=["direct", "pgbouncer-1.18", "pgbouncer-current"])
def front(request: pytest.FixtureRequest, stack: ServerStack) -> str:
    return _dsn(stack, request.param)


@pytest.fixture(params=PROXIED_FRONTS, ids=["direct", "pgbouncer-current"])
def proxied_front(request: pytest.FixtureRequest, stack: ServerStack) -> str:
    """Where the proxy that stops taking rows leads. Not PgBouncer 1.18: the proxy cuts the
    COPY part-way through a CopyData message and lets the rest through after the pool closed
    the connection, and 1.18 then crashed (a libevent abort, "event_queue_remove_active: ...
    not on queue 8") in 3 of 8 runs of this module, every later 1.18 test failing with it. The
    proxy plays 1.18's part in front of the others; 1.18 itself has its own test below."""
    return _dsn(stack, request.param)


class Table:
    """A table whose trigger holds a COPY at row ``x = 0`` until `release` (an advisory lock the
    test holds), and whose CHECK refuses a row with ``x < 0``."""

    def __init__(self, admin: asyncpg.Connection, name: str) -> None:
        self.admin = admin
        self.name = name
        self.key = zlib.crc32(name.encode())

    @classmethod
    async def make(cls, dsn: str) -> Table:
        name = f"copy_sync_{uuid.uuid4().hex[:10]}"
        admin = await asyncpg.connect(dsn)  # (the same database: advisory locks are per database)
        table = cls(admin, name)
        await admin.execute(f"""
            CREATE TABLE {name} (x int CHECK (x >= 0), t text);
            CREATE FUNCTION {name}_hold() RETURNS trigger LANGUAGE plpgsql AS $$
            BEGIN
                IF NEW.x = 0 THEN PERFORM pg_advisory_xact_lock({table.key}); END IF;
                RETURN NEW;
            END $$;
            CREATE TRIGGER hold BEFORE INSERT ON {name}
                FOR EACH ROW EXECUTE FUNCTION {name}_hold();""")
        await admin.execute("SELECT pg_advisory_lock($1)", table.key)
        return table

    async def held_pid(self) -> int | None:
        """The backend whose COPY waits at row 0, if one does."""
        pid: int | None = await self.admin.fetchval(
            "SELECT pid FROM pg_locks WHERE locktype = 'advisory' AND NOT granted "
            "AND objid = $1::bigint::oid", self.key)
        return pid

    async def release(self) -> None:
        await self.admin.execute("SELECT pg_advisory_unlock($1)", self.key)

    async def count(self) -> int:
        rows: int = await self.admin.fetchval(f"SELECT count(*) FROM {self.name}")
        return rows

    async def close(self) -> None:
        await self.admin.close()


@pytest.fixture
async def table(stack: ServerStack) -> AsyncIterator[Table]:
    made = await Table.make(stack.postgres.dsn())
    try:
        yield made
    finally:
        await made.close()


def _rows(big_rows: int) -> list[tuple[int, str]]:
    """Row 0 (held by the trigger), row 1 (refused), then `big_rows` large rows."""
    return [(0, "a"), (-1, "b"), *((k, BIG) for k in range(2, 2 + big_rows))]


def _copier(kind: Kind, table: Table, rows: list[tuple[int, str]], where: Path,
            timeout: float | None) -> Callable[[Any], Awaitable[Any]]:
    """The COPY of `rows` into `table` from a source of `kind`, on a pool or a connection."""
    path = where / "rows.txt"
    if kind != "records":
        path.write_text("".join(f"{x}\t{t}\n" for x, t in rows))

    async def copy(target: Any) -> Any:
        if kind == "records":
            return await target.copy_records_to_table(
                table.name, records=rows, columns=["x", "t"], timeout=timeout)
        if kind == "path":
            return await target.copy_to_table(
                table.name, source=str(path), columns=["x", "t"], timeout=timeout)
        with path.open("rb") as file:
            return await target.copy_to_table(
                table.name, source=file, columns=["x", "t"], timeout=timeout)

    return copy


async def _run(pool: Pool, via: str, copy: Callable[[Any], Awaitable[Any]],
               seen: dict[str, Any]) -> Any:
    """The COPY through `pool.copy_*`, or on an acquired connection (then, in the block, what the
    same connection answers next: `seen["next"]`)."""
    if via == "pool":
        return await copy(pool)
    async with pool.acquire() as conn:
        try:
            return await copy(conn)
        finally:
            try:
                seen["next"] = await asyncio.wait_for(conn.fetchval("SELECT 7"), SERVER_BOUND)
            except BaseException as exc:  # (reported by the assertion)
                seen["next"] = exc


def _running_copy() -> Any:
    """The connection running a COPY through the pool's connection class, if one is."""
    return next(iter(copy_end._RUNNING), None)


def _paused(conn: Any) -> bool:
    """Whether asyncpg's COPY on `conn` waits for room to write (its flow control)."""
    return not conn._protocol.writing_allowed.is_set()


def _reply_of(conn: Any) -> asyncio.Future[Any]:
    """The reply future of the COPY `conn` runs (asyncpg's protocol's only future then)."""
    futures = [value for value in gc.get_referents(conn._protocol)
               if isinstance(value, asyncio.Future) and not value.done()]
    assert len(futures) == 1, futures
    return futures[0]


async def _held(table: Table, backed_up: Callable[[Any], bool], bound: float = SERVER_BOUND
                ) -> tuple[Any, int]:
    """Until the COPY waits at row 0 on the server, `backed_up(conn)`, and the client's
    transport has settled (its size unchanged for `SETTLED` polls: the sockets on the way take
    what they hold for a while after the proxy stops reading): its connection and backend."""
    sizes: list[int] = []
    async with asyncio.timeout(bound):
        while True:
            conn = _running_copy()
            pid = await table.held_pid()
            if conn is not None and pid is not None and backed_up(conn):
                sizes.append(driver.transport_of(conn).get_write_buffer_size())
                if sizes[-SETTLED:] == [sizes[-1]] * SETTLED:
                    return conn, pid
            else:
                sizes.clear()
            await asyncio.sleep(0.02)


async def _end(table: Table, end: End, pid: int) -> type[BaseException]:
    """End the COPY the server holds at row 0: release it (it then refuses row 1), or cancel
    it; the error the caller should get."""
    if end == "refused":
        await table.release()
        return asyncpg.CheckViolationError
    assert await table.admin.fetchval("SELECT pg_cancel_backend($1)", pid)
    return asyncpg.QueryCanceledError


def _timeout(via: str, end: End) -> float | None:
    """The call's `timeout=`: each way and each end both with one and without."""
    return TIMEOUT if (via == "pool") == (end == "refused") else None


async def _outcome(copying: asyncio.Task[Any]) -> tuple[BaseException | None, float]:
    """What the COPY raised, and how long it took, bounded (the test fails past the bound)."""
    loop = asyncio.get_running_loop()
    started = loop.time()
    try:
        await asyncio.wait_for(asyncio.shield(copying), SERVER_BOUND * 2)
    except BaseException as exc:  # (what the caller gets is the subject)
        return exc, loop.time() - started
    return None, loop.time() - started


async def _stop(copying: asyncio.Task[Any]) -> None:
    if not copying.done():
        copying.cancel()
        await asyncio.gather(copying, return_exceptions=True)


@pytest.mark.parametrize("way", [f"{kind}-{via}-{end}" for kind in KINDS
                                 for via in ("pool", "acquire") for end in ("refused", "cancelled")])
async def test_backed_up_rows_end_the_copy_and_its_connection(
        proxied_front: str, way: str, table: Table, tmp_path: Path,
        loop_errors: list[dict[str, Any]]) -> None:
    """Rows backed up in the client's transport when the server ends the COPY: without the fix
    asyncpg waited for room to write them (for good: the proxy, like PgBouncer 1.18, takes no
    more); now the caller gets the server's error at once, the connection (its rows would reach
    the front after the COPY's end) is closed, and the pool opens another."""
    kind, via, end = cast(tuple[Kind, str, End], tuple(way.split("-")))
    copy = _copier(kind, table, _rows(BIG_ROWS), tmp_path, _timeout(via, end))
    seen: dict[str, Any] = {}
    front = proxied_front
    async with FaultProxy.to_dsn(front) as proxy, Pool(
            proxy.dsn(front), min_size=1, max_size=1, telemetry=False) as pool:
        proxy.hold_requests(after=FORWARDED)
        copying = asyncio.create_task(_run(pool, via, copy, seen))
        try:
            # Backed up: the proxy forwards no more, and asyncpg waits for room to write.
            conn, pid = await _held(
                table, lambda conn: proxy._request_budget == 0 and _paused(conn))
            transport = driver.transport_of(conn)
            _reply_of(conn).add_done_callback(
                lambda _: seen.setdefault("unsent", transport.get_write_buffer_size()))
            expected = await _end(table, end, pid)
            raised, took = await _outcome(copying)
        finally:
            proxy.release_requests()  # (what the proxy held reaches the front now)
            await _stop(copying)
        assert seen.get("unsent", 0) > 0, "the rows were all taken: nothing was tested"
        assert isinstance(raised, expected), repr(raised)
        assert took < END_BOUND, f"the COPY took {took:.2f} s to end"
        await assert_closed_and_replaced(pool, via, seen, SERVER_BOUND)
    assert await table.count() == 0
    assert await collected(loop_errors) == []


@pytest.mark.parametrize("kind", KINDS)
async def test_rows_all_taken_keep_the_connection(
        front: str, kind: Kind, table: Table, tmp_path: Path,
        loop_errors: list[dict[str, Any]]) -> None:
    """A source the front has taken whole when the server ends the COPY: the caller gets the
    server's error at once, and the connection, in step, is kept and answers next."""
    end: End = "cancelled" if kind == "path" else "refused"
    copy = _copier(kind, table, _rows(2), tmp_path, None)
    seen: dict[str, Any] = {}
    async with Pool(front, min_size=1, max_size=1, telemetry=False) as pool:
        copying = asyncio.create_task(_run(pool, "acquire", copy, seen))
        try:
            _, pid = await _held(
                table, lambda conn: driver.transport_of(conn).get_write_buffer_size() == 0)
            expected = await _end(table, end, pid)
            raised, took = await _outcome(copying)
        finally:
            await _stop(copying)
        assert isinstance(raised, expected), repr(raised)
        assert took < END_BOUND, f"the COPY took {took:.2f} s to end"
        assert seen["next"] == 7, repr(seen["next"])
        stats = pool.stats()
        assert (stats.in_use, stats.idle, stats.closed_total, stats.created_total) == (
            0, 1, 0, 1), stats
        assert await pool.fetchval("SELECT 8") == 8
    assert await table.count() == 0
    assert await collected(loop_errors) == []


@pytest.mark.parametrize("kind", KINDS)
async def test_pgbouncer_118_itself_stops_taking_the_rows(
        stack: ServerStack, kind: Kind, table: Table, tmp_path: Path,
        loop_errors: list[dict[str, Any]]) -> None:
    """No proxy: the rows back up behind a COPY the server holds, then the server refuses a row;
    PgBouncer 1.18 takes no more of them (it logs nothing). Without the fix the COPY waited for
    good (its writer paused); now it raises the server's error, and the pool serves.

    Not always at once: when the client's transport had handed all it held to its socket as the
    COPY ended (its writer reading the file's next chunk), nothing is unsent, and the COPY ends
    once its connection has failed to answer a query behind rows PgBouncer 1.18 never reads
    (`copy_end.IN_STEP_BOUND`), closed. (Before, it was kept, and its next statement waited for
    the release's reset to give up, 5 s: 1 run of 2 for a path here.)"""
    copy = _copier(kind, table, _rows(2 * BIG_ROWS), tmp_path, None)
    # A PgBouncer 1.18 of its own: should it crash (above), no other test's goes with it.
    with PgBouncerServer(system_pgbouncer(), stack.postgres) as bouncer:
        await _copy_through_118(bouncer, copy, table)
    assert await table.count() == 0
    assert await collected(loop_errors) == []


async def _copy_through_118(bouncer: PgBouncerServer, copy: Callable[[Any], Awaitable[Any]],
                            table: Table) -> None:
    async with Pool(bouncer.dsn(), min_size=1, max_size=1, telemetry=False) as pool:
        copying = asyncio.create_task(_run(pool, "pool", copy, {}))
        try:
            # (A loaded machine fills the sockets on the way more slowly: a wider bound.)
            conn, pid = await _held(table, _paused, bound=3 * SERVER_BOUND)
            unsent = driver.transport_of(conn).get_write_buffer_size()
            expected = await _end(table, "refused", pid)
            raised, took = await _outcome(copying)
        finally:
            await _stop(copying)
        assert unsent > 0, "the rows were all taken: nothing was tested"
        assert isinstance(raised, expected), repr(raised)
        assert took < END_BOUND + copy_end.IN_STEP_BOUND, f"the COPY took {took:.2f} s to end"
        async with asyncio.timeout(SERVER_BOUND):
            assert await pool.fetchval("SELECT 8") == 8
        assert pool.stats().in_use == 0
        assert bouncer.running(), "PgBouncer 1.18 crashed"


@pytest.fixture(autouse=True)
def _pgbouncer_118_log(stack: ServerStack) -> Iterator[None]:
    """PgBouncer 1.18's log of the test, printed when it logged a FATAL error or ended (it
    crashes on some closes: docs/faults.md), so that a failure says why."""
    process = stack.legacy.process
    assert process is not None
    start = len(process.log_tail(10**9))
    yield
    log = process.log_tail(10**9)[start:]
    if "FATAL" in log or "bad client" in log or not process.running():
        print(f"PgBouncer 1.18 (running: {process.running()}) logged:\n{log[-6000:]}")
