"""Misuse against real PostgreSQL: what a holder kept past its checkout, or used from another
thread or loop, must not reach the connection another holder has now."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import uuid
from collections.abc import AsyncIterator, Callable, Coroutine
from typing import Any

import asyncpg
import pytest

import asyncpool
from asyncpool import Pool
from asyncpool.connect import driver
from asyncpool.testing import PostgresServer
from tests.conftest import Pooler


@pytest.mark.parametrize("mode", ["unnamed", "on", "off"])
async def test_a_query_logger_made_in_a_block_and_entered_after_it_sees_nothing(
        postgres: PostgresServer, mode: Any) -> None:
    """asyncpg's ``conn.query_logger(cb)`` is bound to the connection: made in a block and
    entered after it, it added `cb` to the next holder's connection, which then showed it that
    holder's statements. The proxy's own is refused once released, and one given back inside
    its ``with`` leaves nothing behind (the return dropped it)."""
    seen: list[str] = []
    async with Pool(postgres.dsn(), max_size=1, prepared_statements=mode,
                    telemetry=False) as pool:
        async with pool.acquire() as conn:
            kept = conn.query_logger(lambda query: seen.append(query.query))
            first = conn.raw
        async with pool.acquire() as other:
            assert other.raw is first  # the same server connection, another holder's now
            with pytest.raises(asyncpool.PoolError, match="released back to the pool"), kept:
                pass
            await other.fetchval("SELECT 'the next holder''s'")
            await other.fetchval("SELECT $1::text", "the next holder's too")
            assert not first._query_loggers  # type: ignore[attr-defined]
        await asyncio.sleep(0)  # (asyncpg calls the loggers soon after each statement)
        assert seen == []
        conn = await pool.acquire()
        with conn.query_logger(lambda query: seen.append(query.query)):
            await conn.fetchval("SELECT 'mine'")
            await pool.release(conn)  # inside the `with`: its end has nothing left to remove
        await asyncio.sleep(0)
        assert seen == ["SELECT 'mine'"]
        assert not first._query_loggers  # type: ignore[attr-defined]


@pytest.mark.parametrize("pool_loop", ["asyncio", "uvloop"])
def test_a_held_connections_callbacks_are_not_changed_from_another_thread(
        postgres: PostgresServer, pool_loop: str) -> None:
    """asyncpg keeps log listeners, termination listeners and query loggers in sets it walks
    on the connection's loop; added from another thread they were taken as they were (the
    other thread changed them under the loop). Refused there, as the statements are."""
    async def main() -> None:
        async with Pool(postgres.dsn(), max_size=1, telemetry=False) as pool, pool.acquire() as conn:
            def callback(*args: object) -> None:
                pass

            def from_another_thread() -> list[str]:
                errors = []
                for name in ("add_log_listener", "remove_log_listener",
                             "add_termination_listener", "remove_termination_listener",
                             "add_query_logger", "remove_query_logger"):
                    with pytest.raises(asyncpool.PoolError, match="comes from thread"):
                        getattr(conn, name)(callback)
                    errors.append(name)
                with pytest.raises(asyncpool.PoolError, match="comes from thread"), \
                        conn.query_logger(callback):
                    pass
                return errors

            assert len(await asyncio.to_thread(from_another_thread)) == 6
            raw: asyncpg.Connection = conn.raw
            state = (raw._log_listeners, raw._termination_listeners,  # type: ignore[attr-defined]
                     raw._query_loggers)  # type: ignore[attr-defined]
            assert not any(state)
            conn.add_log_listener(callback)  # on its own loop: taken
            assert raw._log_listeners  # type: ignore[attr-defined]

    if pool_loop == "uvloop":
        pytest.importorskip("uvloop").run(main())
    else:
        asyncio.run(main())


def test_set_connect_args_from_another_thread_while_the_loop_runs_is_refused(
        postgres: PostgresServer) -> None:
    """It swaps the config and the connector that logins on the pool's loop read (one there
    could take one without the other): refused from another thread while that loop runs, as
    terminate() is, with the way to call it there, and nothing changed; on the loop it takes."""
    async def main() -> Pool:
        async with Pool(postgres.dsn(), max_size=1, telemetry=False) as pool:
            before = pool.config

            def from_another_thread() -> str:
                with pytest.raises(asyncpool.PoolError) as info:
                    pool.set_connect_args(postgres.dsn(), command_timeout=7)
                return str(info.value)

            message = await asyncio.to_thread(from_another_thread)
            assert "set_connect_args() was called from thread" in message
            assert "asyncio.run_coroutine_threadsafe(" in message
            assert pool.config is before
            pool.set_connect_args(postgres.dsn(), command_timeout=7)
            await pool.expire_connections()
            async with pool.acquire() as conn:
                assert conn.raw._config.command_timeout == 7  # type: ignore[attr-defined]
        return pool

    pool = asyncio.run(main())
    pool.set_connect_args(postgres.dsn(), command_timeout=8)  # its loop has ended: any thread
    assert pool.config.command_timeout == 8


async def _slow_source(started: asyncio.Event, rows: int = 500) -> AsyncIterator[bytes]:
    for n in range(rows):  # 10 s of rows by default: cut off long before its end
        yield b"%d\n" % n
        started.set()
        await asyncio.sleep(0.02)


async def _slow_records(started: asyncio.Event) -> AsyncIterator[tuple[int]]:
    # Fewer: asyncpg buffers small records, and finds its connection closed when it next
    # writes, at the end of these.
    async for line in _slow_source(started, rows=25):
        yield (int(line),)


def _copies(table: str, started: asyncio.Event
            ) -> dict[str, Callable[[Any], Coroutine[Any, Any, object]]]:
    """COPYs that go on until cut off, each with `started` set once data flows."""
    async def slow_output(data: bytes) -> None:
        started.set()
        await asyncio.sleep(0.05)

    return {
        "copy_to_table": lambda on: on.copy_to_table(table, source=_slow_source(started)),
        "copy_records_to_table": lambda on: on.copy_records_to_table(
            table, records=_slow_records(started)),
        "copy_from_query": lambda on: on.copy_from_query(
            "SELECT g FROM generate_series(1, 2000000) g", output=slow_output),
    }


@pytest.mark.parametrize("mode", ["unnamed", "on", "off"])
async def test_a_copy_cut_off_by_its_connections_release_or_the_pools_terminate_says_so(
        pooler: Pooler, mode: Any) -> None:
    """A COPY still running (in another task) when its connection is given back, or when the
    pool is terminated, failed inside asyncpg with ``AttributeError: 'NoneType' object has no
    attribute 'write'`` (``'resume_reading'`` for a COPY out): asyncpg's COPY goes on with the
    transport its closed connection dropped. It gets the pool's error for it, as any other
    statement does: released, or the pool closed (for the query helpers too). Nor does asyncio
    log "Future exception was never retrieved" for asyncpg's reply future of each COPY in."""
    loop = asyncio.get_running_loop()
    logged: list[dict[str, Any]] = []
    handler = loop.get_exception_handler()
    loop.set_exception_handler(lambda _loop, context: logged.append(context))
    try:
        await _cut_off_copies(pooler, mode)
        gc.collect()  # (an unretrieved future logs when it is collected)
        await asyncio.sleep(0.1)
    finally:
        loop.set_exception_handler(handler)
    assert [context["message"] for context in logged] == []


async def _cut_off_copies(pooler: Pooler, mode: Any) -> None:
    table = f"copy_cut_{mode}"
    async with Pool(pooler.dsn(), max_size=1, telemetry=False, prepared_statements=mode) as pool:
        await pool.execute(f"DROP TABLE IF EXISTS {table}; CREATE TABLE {table} (n int)")
        started = asyncio.Event()
        for name, copy in _copies(table, started).items():
            started.clear()
            conn = await pool.acquire()
            running = asyncio.create_task(copy(conn))
            await asyncio.wait_for(started.wait(), 10)
            await pool.release(conn)  # while its COPY runs: closed, not handed on
            with pytest.raises(asyncpool.PoolError, match="released back to the pool") as info:
                await running
            # (Or the QueryCanceledError of the pool's cancel request, as for terminate() below:
            # seen once through PgBouncer 1.18 with two other runs beside it, 2026-12-07.)
            assert type(info.value.__cause__) in (asyncpg.ConnectionDoesNotExistError,
                                                  asyncpg.QueryCanceledError), name
            assert pool.stats().in_use == 0
        assert await pool.fetchval(f"SELECT count(*) FROM {table}") == 0  # nothing committed
    for by_helper in (False, True):
        for name, copy in _copies(table, started).items():
            started.clear()
            pool = Pool(pooler.dsn(), max_size=1, telemetry=False, prepared_statements=mode)
            await pool.open()
            held = None if by_helper else await pool.acquire()
            running = asyncio.create_task(copy(held or pool))
            await asyncio.wait_for(started.wait(), 10)
            pool.terminate()
            with pytest.raises(asyncpool.PoolClosedError, match="was closed while this "
                               "connection was") as closed:
                await running
            # (Or the QueryCanceledError of the pool's cancel request, when the server's answer
            # to it comes before the connection's close, which waits for the request to go: as
            # for the statements and cursors below; seen once, with four other pytest workers
            # running, 2026-12-07.)
            assert isinstance(closed.value.__cause__, (asyncpg.ConnectionDoesNotExistError,
                                                       asyncpg.QueryCanceledError)), name
            if held is not None:
                await pool.release(held)  # (a no-op now)
    async with Pool(pooler.dsn(), max_size=1, telemetry=False) as pool:
        assert await pool.fetchval(f"SELECT count(*) FROM {table}") == 0
        await pool.execute(f"DROP TABLE {table}")


@pytest.mark.parametrize("mode", ["unnamed", "on", "off"])
async def test_a_held_connections_transaction_refuses_what_pool_transaction_refuses(
        pooler: Pooler, mode: Any) -> None:
    """``conn.transaction(readonly="no")`` made a READ ONLY transaction (asyncpg takes any
    non-empty string for True), where ``pool.transaction(readonly="no")`` is refused: refused
    here too, before anything is sent; what asyncpg reads as meant still works."""
    async with Pool(pooler.dsn(), max_size=1, telemetry=False, prepared_statements=mode
                    ) as pool, pool.acquire() as conn:
        for options in ({"readonly": "no"}, {"deferrable": "false"}, {"readonly": b""}):
            with pytest.raises(asyncpool.PoolConfigError, match=r"transaction\((readonly|"
                               r"deferrable)=.*: must be True or False"):
                conn.transaction(**options)
        with pytest.raises(asyncpool.PoolConfigError, match=r"transaction\(isolation='READ "
                           r"COMMITTED'\): must be one of 'read_committed'"):
            conn.transaction(isolation="READ COMMITTED")
        assert not conn.is_in_transaction()
        async with conn.transaction(readonly=False):
            assert await conn.fetchval("SHOW transaction_read_only") == "off"
        async with conn.transaction(readonly=True, isolation="serializable"):
            assert await conn.fetchval("SHOW transaction_read_only") == "on"
            assert await conn.fetchval("SHOW transaction_isolation") == "serializable"


@pytest.mark.parametrize("mode", ["unnamed", "on", "off"])
async def test_a_cursors_row_count_that_is_no_count_is_refused_before_it_is_sent(
        pooler: Pooler, mode: Any) -> None:
    """asyncpg took True and 1.5 as counts, failed "5", None and NaN with a bare TypeError or
    ValueError, and past 32 bits a prefetch closed the connection (its transaction with it)
    and a forward() sent a MOVE the server refused, which aborted the transaction. Each is a
    PoolConfigError before anything is sent: the transaction and the cursor go on."""
    bad: list[Any] = [0, -1, True, 1.5, "5", float("nan"), 2**31, 10**400]
    query = "SELECT n FROM generate_series(1, 5) AS n"
    async with Pool(pooler.dsn(), max_size=1, telemetry=False, prepared_statements=mode
                    ) as pool, pool.transaction() as conn:
        cursor = await conn.cursor(query)
        statement = await conn.prepare(query)
        count = r"must be a whole number of rows from 1 to 2147483647"
        for value in bad:
            with pytest.raises(asyncpool.PoolConfigError, match=rf"^cursor\(prefetch=.*{count}"):
                conn.cursor(query, prefetch=value)
            with pytest.raises(asyncpool.PoolConfigError,
                               match=rf"PreparedStatement.cursor\(prefetch=.*{count}"):
                statement.cursor(prefetch=value)
            with pytest.raises(asyncpool.PoolConfigError, match=rf"Cursor.fetch\(n=.*{count}"):
                await cursor.fetch(value)
            with pytest.raises(asyncpool.PoolConfigError, match=rf"Cursor.forward\(n=.*{count}"):
                await cursor.forward(value)
        assert conn.is_in_transaction()
        assert await conn.fetchval("SELECT 7") == 7  # not aborted
        assert await cursor.fetch(2) == [(1,), (2,)]  # nothing moved it
        assert await cursor.forward(2) == 2
        assert [row async for row in conn.cursor(query, prefetch=2)] == [(n,) for n in range(1, 6)]
        assert [row async for row in statement.cursor(prefetch=2**31 - 1)][-1] == (5,)


def _statements_and_cursors(conn: Any, tag: str
                            ) -> dict[str, Callable[[], Coroutine[Any, Any, object]]]:
    """A prepared statement's and a cursor's steps that run until cut off (10 s a row), each
    made through the held `conn` (in a transaction: cursors need one, and a transaction pooler
    keeps a prepared statement only there). Their queries name `tag`: a sleep, or the function
    ``tag(n)`` (`_planned_sleep`), which the server calls as it plans the query (for a cursor,
    as it is opened: its Bind)."""
    sleep = f"SELECT pg_sleep(10) /* {tag} */ FROM generate_series(1, 2)"
    planned, planned_with = f"SELECT {tag}(1)", f"SELECT {tag}($1::int)"

    async def prepared() -> object:
        return await (await conn.prepare(sleep)).fetch()

    async def cursor_fetch() -> object:
        return await (await conn.cursor(sleep)).fetch(1)

    async def cursor_iterator() -> object:
        async for row in conn.cursor(sleep, prefetch=1):
            return row
        return None

    async def cursor_forward() -> object:
        return await (await conn.cursor(sleep)).forward(1)

    async def prepared_cursor() -> object:
        return await (await (await conn.prepare(sleep)).cursor()).fetchrow()

    async def cursor_opening() -> object:
        return await conn.cursor(planned)

    async def cursor_iterator_opening() -> object:
        async for row in conn.cursor(planned, prefetch=1):
            return row
        return None

    async def prepared_cursor_opening() -> object:
        return await (await conn.prepare(planned_with)).cursor(1)

    async def explain() -> object:
        return await (await conn.prepare(planned_with)).explain(1)

    async def prepared_fetchmany() -> object:
        return await (await conn.prepare(planned_with)).fetchmany([(1,)])

    async def prepared_executemany() -> object:
        return await (await conn.prepare(planned_with)).executemany([(1,)])

    async def explain_analyze() -> object:
        return await (await conn.prepare(sleep)).explain(analyze=True)

    return {"prepared": prepared, "cursor_fetch": cursor_fetch,
            "cursor_iterator": cursor_iterator, "cursor_forward": cursor_forward,
            "prepared_cursor": prepared_cursor, "cursor_opening": cursor_opening,
            "cursor_iterator_opening": cursor_iterator_opening,
            "prepared_cursor_opening": prepared_cursor_opening, "explain": explain,
            "explain_analyze": explain_analyze, "prepared_fetchmany": prepared_fetchmany,
            "prepared_executemany": prepared_executemany}


async def _sleeping(dsn: str, running: asyncio.Task[object], pid: int) -> None:
    """Until `running`'s statement sleeps on the server (in the backend `pid`: not by its
    query's text, which a cursor's MOVE does not repeat, and which a statement of an earlier
    case, left sleeping, had too), or has ended."""
    watch = await asyncpg.connect(dsn, statement_cache_size=0)
    try:
        for _ in range(200):  # 10 s
            if running.done() or await watch.fetchval(
                    "SELECT count(*) FROM pg_stat_activity WHERE pid = $1 "
                    "AND wait_event = 'PgSleep'", pid):
                return
            await asyncio.sleep(0.05)
    finally:
        await watch.close()


@contextlib.asynccontextmanager
async def _planned_sleep(dsn: str) -> AsyncIterator[str]:
    """The name of a function, made for the block, that sleeps 10 s and returns its argument;
    immutable, so that the server calls it as it plans a query that calls it with a constant."""
    name = f"cut_off_{uuid.uuid4().hex[:12]}"
    admin = await asyncpg.connect(dsn, statement_cache_size=0)
    try:
        await admin.execute(f"CREATE FUNCTION {name}(n int) RETURNS int IMMUTABLE "
                            "LANGUAGE plpgsql AS $$BEGIN PERFORM pg_sleep(10); RETURN n; END$$")
        yield name
    finally:
        await admin.execute(f"DROP FUNCTION IF EXISTS {name}(int)")
        await admin.close()


async def _cut_off_statements_and_cursors(dsn: str, mode: Any) -> None:
    """A prepared statement or a cursor still running (in another task) when its connection is
    given back, the pool terminated, or the checkout reclaimed as a leak got asyncpg's
    ConnectionDoesNotExistError (or the QueryCanceledError of the pool's cancel request), where
    the held connection's own statements get the pool's error: now they get it too. So do a
    cursor cut off as it is opened (``await conn.cursor(...)``, a prepared statement's) and a
    prepared statement's ``explain()``, which asyncpg runs through the connection itself (and
    ``explain(analyze=True)`` failed rolling back its savepoint: InterfaceError)."""
    async with _planned_sleep(dsn) as tag:
        names = list(_statements_and_cursors(None, tag))
        for end in ("release", "terminate"):
            for name in names:
                await _cut_off(dsn, mode, tag, end, name)
        # Each leak case waits out its pool's leak_timeout: a few at once (each pool has its own
        # connection, and a PgBouncer of the harness only 10 server connections to share).
        at_once = asyncio.Semaphore(4)

        async def leaked(name: str) -> None:
            async with at_once:
                await _cut_off(dsn, mode, tag, "leak", name)

        async with asyncio.TaskGroup() as group:
            for name in names:
                group.create_task(leaked(name))


_ENDS: dict[str, tuple[type[asyncpool.PoolError], str]] = {
    "release": (asyncpool.PoolError, "released back to the pool"),
    "terminate": (asyncpool.PoolClosedError, "was closed while this connection was held"),
    "leak": (asyncpool.ConnectionLeakedError, "held past leak_timeout"),
}


async def _cut_off(dsn: str, mode: Any, tag: str, end: str, name: str) -> None:
    """Statement or cursor `name` running in another task when the pool ends its checkout
    (`end`): it gets the pool's error, with asyncpg's as the cause."""
    error, message = _ENDS[end]
    pool = Pool(dsn, max_size=1, telemetry=False, prepared_statements=mode,
                leak_timeout=1.5 if end == "leak" else None)
    await pool.open()
    conn = await pool.acquire()
    transaction = conn.transaction()
    await transaction.start()
    pid = await conn.fetchval("SELECT pg_backend_pid()")  # (the pooler's server, for the transaction)
    running = asyncio.create_task(_statements_and_cursors(conn, tag)[name]())
    await _sleeping(dsn, running, pid)
    assert end == "leak" or not running.done(), name
    if end == "release":
        await pool.release(conn)
    elif end == "terminate":
        pool.terminate()
    with pytest.raises(error, match=message) as info:
        await asyncio.wait_for(running, 10)  # (the leak reclaim: within its timeout)
    assert isinstance(info.value.__cause__, (asyncpg.ConnectionDoesNotExistError,
                                             asyncpg.QueryCanceledError)), (end, name)
    await pool.release(conn)  # (a no-op now)
    if end == "terminate":
        return
    assert pool.stats().in_use == 0, (end, name)
    await pool.close()


@pytest.mark.parametrize("mode", ["unnamed", "on", "off"])
async def test_a_prepared_statement_or_cursor_cut_off_by_the_pool_says_so(
        postgres: PostgresServer, mode: Any) -> None:
    await _cut_off_statements_and_cursors(postgres.dsn(), mode)


@pytest.mark.parametrize("mode", ["unnamed", "on", "off"])
async def test_a_prepared_statement_or_cursor_cut_off_by_the_pool_says_so_behind_pgbouncer(
        pooler: Pooler, mode: Any) -> None:
    await _cut_off_statements_and_cursors(pooler.dsn(), mode)


@pytest.mark.parametrize("end", ["terminate", "leak"])
@pytest.mark.parametrize("mode", ["unnamed", "on", "off"])
async def test_a_cursor_or_prepared_statement_used_after_the_pool_ended_its_checkout_is_refused(
        pooler: Pooler, mode: Any, end: str) -> None:
    """The pool terminated, a held connection stays open until the cancel request the pool
    sends for it has been taken: asyncpg's own check (a connection closed, or given back)
    let a cursor's or prepared statement's next step through then, sent on the connection the
    pool was closing, and it got asyncpg's ConnectionDoesNotExistError (or the cancel's
    QueryCanceledError), or even ran. Now the pool's error, and nothing is sent; after a leak
    reclaim too (and once the connection is closed: asyncpg's InterfaceError before)."""
    error, message = _ENDS[end]
    pool = Pool(pooler.dsn(), min_size=0, max_size=1, prepared_statements=mode,
                telemetry=False, leak_timeout=0.5 if end == "leak" else None)
    await pool.open()
    conn = await pool.acquire()
    await conn.transaction().start()
    query = "SELECT generate_series(1, 5) AS x"
    statement = await conn.prepare(query)
    cursor = await conn.cursor(query)
    unopened, unread = conn.cursor(query), conn.cursor(query, prefetch=1)
    raw = conn.raw
    if end == "terminate":
        pool.terminate()
        assert not raw.is_closed()  # (closed once its cancel request has gone)
    else:
        for _ in range(200):  # 10 s
            if "leaked" in repr(conn):
                break
            await asyncio.sleep(0.05)
    closed, sent = raw.is_closed(), driver.queries_count(raw)

    async def iterate() -> object:
        return [row async for row in unread]

    async def opening() -> object:
        return await unopened

    async def prepared_cursor() -> object:
        return await statement.cursor()

    steps: dict[str, Callable[[], Coroutine[Any, Any, object]]] = {
        "forward": lambda: cursor.forward(1), "fetch": lambda: cursor.fetch(1),
        "fetchrow": cursor.fetchrow, "iterator": iterate, "opening": opening,
        "prepared": statement.fetch, "explain": statement.explain,
        "prepared_cursor": prepared_cursor}
    for name, step in steps.items():
        with pytest.raises(error, match=message):
            await step()
        assert driver.queries_count(raw) == sent, name
        assert raw.is_closed() is closed, name
    if end == "leak":
        await pool.close()


@pytest.mark.parametrize("mode", ["unnamed", "on", "off"])
async def test_a_cursor_step_running_when_its_connection_is_given_back_is_cancelled(
        pooler: Pooler, mode: Any) -> None:
    """asyncpg takes no lock of the connection's for a cursor's step (``forward()`` is a MOVE,
    a simple query of the protocol's own): given back while one ran (from another task), the
    connection looked idle in a transaction, its ROLLBACK was refused ("another operation is
    in progress"), and it was closed with no cancel request: the statement ran on at the server
    (the backend went on sleeping, 30 s here). Now it is cancelled before the connection goes,
    as a statement of the connection's own is; the step gets the pool's error."""
    dsn = pooler.dsn()
    query = "SELECT pg_sleep(30) FROM generate_series(1, 2)"
    steps: dict[str, Callable[[Any], Coroutine[Any, Any, object]]] = {
        "forward": lambda cursor: cursor.forward(1), "fetch": lambda cursor: cursor.fetch(1),
        "fetchrow": lambda cursor: cursor.fetchrow()}
    watch = await asyncpg.connect(dsn, statement_cache_size=0)
    try:
        for name, step in steps.items():
            async with Pool(dsn, max_size=1, prepared_statements=mode,
                            telemetry=False) as pool:
                conn = await pool.acquire()
                await conn.transaction().start()
                pid = await conn.fetchval("SELECT pg_backend_pid()")
                running = asyncio.create_task(step(await conn.cursor(query)))
                await _sleeping(dsn, running, pid)
                assert not running.done(), name
                await pool.release(conn)
                with pytest.raises(asyncpool.PoolError, match="released back to the pool") as info:
                    await asyncio.wait_for(running, 10)
                assert isinstance(info.value.__cause__, (asyncpg.QueryCanceledError,
                                                         asyncpg.ConnectionDoesNotExistError)), name
                assert pool.stats().in_use == 0
            # The cancel request is taken in milliseconds; 10 s stays well under the 30 s the
            # statement would sleep on without it, on a loaded machine too.
            for _ in range(100):
                if not await watch.fetchval("SELECT count(*) FROM pg_stat_activity WHERE pid = $1 "
                                            "AND wait_event = 'PgSleep'", pid):
                    break
                await asyncio.sleep(0.1)
            else:
                pytest.fail(f"{name}: the statement still runs on the server")
    finally:
        await watch.close()


@pytest.mark.parametrize("end", ["release", "terminate"])
async def test_a_cursor_opening_answered_after_the_pool_ended_its_checkout_says_so(
        postgres: PostgresServer, end: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """A cursor's opening (``await conn.cursor(...)``, in another task) whose Bind was
    answered just as the pool ended the checkout returned the cursor of a checkout that was
    over: its first step then failed with asyncpg's InterfaceError (after a release) or was
    sent on the connection the pool was closing. Now the opening gets the pool's error."""
    bound, go = asyncio.Event(), asyncio.Event()
    original = asyncpg.cursor.BaseCursor._bind  # type: ignore[attr-defined]

    async def bind_then_wait(self: Any, timeout: float | None) -> Any:
        reply = await original(self, timeout)
        bound.set()
        await go.wait()  # (the pool ends the checkout now)
        return reply

    monkeypatch.setattr(asyncpg.cursor.BaseCursor, "_bind", bind_then_wait)
    error, message = _ENDS[end]
    pool = Pool(postgres.dsn(), min_size=0, max_size=1, telemetry=False)
    await pool.open()
    conn = await pool.acquire()
    await conn.transaction().start()

    async def opening() -> object:
        return await conn.cursor("SELECT 1")

    running = asyncio.create_task(opening())
    await asyncio.wait_for(bound.wait(), 10)
    if end == "release":
        await pool.release(conn)
    else:
        pool.terminate()
    go.set()
    with pytest.raises(error, match=message):
        await running
    if end == "release":
        await pool.close()


@pytest.mark.parametrize("mode", ["unnamed", "on", "off"])
async def test_a_cursor_whose_last_rows_came_as_the_pool_closed_it_says_so(
        postgres: PostgresServer, mode: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """The pool terminated as a cursor's last fetch came back (a race the cancellation hunt
    met): asyncpg then asks the dropped protocol whether it is in a transaction before closing
    the portal, an ``AttributeError`` that said nothing of the pool."""
    pool = Pool(postgres.dsn(), min_size=0, max_size=1, prepared_statements=mode,
                telemetry=False)
    await pool.open()
    original = asyncpg.cursor.BaseCursor._exec  # type: ignore[attr-defined]

    async def exec_then_terminate(self: Any, n: int, timeout: float | None) -> Any:
        rows = await original(self, n, timeout)
        if self._exhausted:
            # The last fetch's rows came in as the pool ended the checkout and closed the
            # connection (close() past its timeout terminates one running a statement).
            pool.terminate()
            self._connection.terminate()
        return rows

    monkeypatch.setattr(asyncpg.cursor.BaseCursor, "_exec", exec_then_terminate)
    got: list[int] = []
    with pytest.raises(asyncpool.PoolClosedError) as info:
        async with pool.acquire() as conn, conn.transaction():
            async for row in conn.cursor("SELECT generate_series(1, 2) AS x", prefetch=2):
                got.append(row["x"])
    assert got == [1, 2]
    # asyncpg's own word for a closed connection (or, in the on mode, its closed statement).
    assert isinstance(info.value.__cause__,
                      asyncpg.ConnectionDoesNotExistError | asyncpg.InterfaceError)


@pytest.mark.parametrize("mode", ["unnamed", "on", "off"])
async def test_a_transaction_block_of_a_held_connection_is_not_committed_after_terminate(
        postgres: PostgresServer, mode: Any) -> None:
    """As pool.transaction(): a pool terminated inside ``async with conn.transaction():`` does
    not let the block's COMMIT through while the connection waits for its cancel request to go
    (it committed, and the block ended without an error)."""
    other = await asyncpg.connect(postgres.dsn())
    try:
        await other.execute("DROP TABLE IF EXISTS kept_tx; CREATE TABLE kept_tx (x int)")
        pool = Pool(postgres.dsn(), min_size=0, max_size=1, prepared_statements=mode,
                    telemetry=False)
        await pool.open()
        with pytest.raises(asyncpool.PoolClosedError, match="it was not committed"):
            async with pool.acquire() as conn, conn.transaction():
                await conn.execute("INSERT INTO kept_tx VALUES (1)")
                pool.terminate()
        assert await other.fetch("SELECT x FROM kept_tx") == []
        # A block that ends with an error is still rolled back, and says its own error.
        pool = Pool(postgres.dsn(), min_size=0, max_size=1, prepared_statements=mode,
                    telemetry=False)
        await pool.open()
        with pytest.raises(ZeroDivisionError):
            async with pool.acquire() as conn, conn.transaction():
                await conn.execute("INSERT INTO kept_tx VALUES (2)")
                pool.terminate()
                1 / 0  # noqa: B018
        assert await other.fetch("SELECT x FROM kept_tx") == []
    finally:
        await other.execute("DROP TABLE IF EXISTS kept_tx")
        await other.close()


@pytest.mark.parametrize("mode", ["unnamed", "on", "off"])
@pytest.mark.parametrize("nested", [False, True], ids=["transaction", "savepoint"])
async def test_an_explicit_commit_after_terminate_is_refused(
        postgres: PostgresServer, mode: Any, nested: bool) -> None:
    """``await tr.commit()`` (no block) after ``terminate()``: its COMMIT (or RELEASE SAVEPOINT)
    was sent while the connection waited for its cancel request, and committed. Now the block's
    error, nothing sent; an explicit rollback() then gets the pool's error, not asyncpg's."""
    other = await asyncpg.connect(postgres.dsn())
    table = f"kept_{uuid.uuid4().hex[:12]}"
    try:
        await other.execute(f"CREATE TABLE {table} (x int)")
        pool = Pool(postgres.dsn(), min_size=0, max_size=1, prepared_statements=mode,
                    telemetry=False)
        await pool.open()
        conn = await pool.acquire()
        outer = conn.transaction()
        await outer.start()
        tr = conn.transaction() if nested else outer
        if nested:
            await tr.start()
        await conn.execute(f"INSERT INTO {table} VALUES (1)")
        pool.terminate()
        with pytest.raises(asyncpool.PoolClosedError, match="it was not committed"):
            await tr.commit()
        with pytest.raises(asyncpool.PoolClosedError, match="was closed"):
            await outer.rollback()
        if nested:
            with pytest.raises(asyncpool.PoolClosedError, match="it was not committed"):
                await outer.commit()
        assert await other.fetch(f"SELECT x FROM {table}") == []
    finally:
        await other.execute(f"DROP TABLE IF EXISTS {table}")
        await other.close()
