"""One test per asyncpg internal `asyncpool.connect.driver` relies on, against a real server.

When a new asyncpg renames or changes one of these, the test named after it fails here.
"""

from __future__ import annotations

import ast
import asyncio
import gc
import inspect
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import pytest

from asyncpool.connect import driver
from asyncpool.testing import PostgresServer


@pytest.fixture
async def conn(postgres: PostgresServer) -> AsyncIterator[Any]:
    connection = await asyncpg.connect(postgres.dsn(), statement_cache_size=0)
    try:
        yield connection
    finally:
        await connection.close()


async def _cancelled_query(conn: Any) -> None:
    task = asyncio.ensure_future(conn.execute("SELECT pg_sleep(5)"))
    await asyncio.sleep(0.1)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


def test_the_installed_asyncpg_has_every_internal() -> None:
    assert driver.missing_internals() == []
    assert driver.tested_version(), f"asyncpg {asyncpg.__version__} is outside {driver.TESTED}"


async def test_protocol_is_cancelling_and_wait_for_cancellation(conn: Any) -> None:
    """`_protocol._is_cancelling()` is True while a cancelled query is being cancelled, and
    `_protocol._wait_for_cancellation()` waits for that to end."""
    assert driver.is_cancelling(conn) is False
    await _cancelled_query(conn)
    assert driver.is_cancelling(conn) is True
    assert driver.returned(conn) == driver.NEEDS_RESET
    await asyncio.wait_for(conn._protocol._wait_for_cancellation(), 5)
    assert driver.is_cancelling(conn) is False
    assert await conn.fetchval("SELECT 1") == 1


async def test_protocol_is_in_transaction(conn: Any) -> None:
    await conn.execute("BEGIN")
    assert conn._protocol.is_in_transaction() is True
    assert driver.returned(conn) == driver.NEEDS_RESET
    await driver.reset(conn, 5)
    assert conn._protocol.is_in_transaction() is False


async def test_top_xact_is_kept_when_begin_fails(conn: Any) -> None:
    """asyncpg keeps a Transaction whose BEGIN did not complete as `_top_xact`; reset forgets it
    so the next transaction() is not a SAVEPOINT."""
    tx = conn.transaction()
    start = asyncio.ensure_future(tx.start())
    await asyncio.sleep(0)  # BEGIN sent, its reply not read yet
    start.cancel()
    with pytest.raises(asyncio.CancelledError):
        await start
    await conn._protocol._wait_for_cancellation()
    assert conn._top_xact is tx
    assert driver.returned(conn) == driver.NEEDS_RESET
    await driver.reset(conn, 5)
    assert conn._top_xact is None
    async with conn.transaction():
        assert await conn.fetchval("SELECT count(*) FROM pg_stat_activity WHERE pid = pg_backend_pid()") == 1


async def test_pool_release_ctr_invalidates_statements_cursors_and_transactions(conn: Any) -> None:
    stmt = await conn.prepare("SELECT 1")
    tx = conn.transaction()
    cursor_factory = conn.cursor("SELECT 1")
    assert driver.returned(conn) == driver.CLEAN
    with pytest.raises(asyncpg.InterfaceError, match="released back to the pool"):
        await stmt.fetchval()
    with pytest.raises(asyncpg.InterfaceError, match="released back to the pool"):
        await tx.start()
    with pytest.raises(asyncpg.InterfaceError, match="released back to the pool"):
        await cursor_factory.__aiter__().__anext__()


async def test_stmt_exclusive_section_says_a_statement_is_running(conn: Any) -> None:
    """asyncpg holds `_stmt_exclusive_section` (``_acquired``) for the whole of ``_execute``:
    a return meanwhile is BUSY; once the statement ends, CLEAN."""
    running = asyncio.create_task(conn.fetchval("SELECT pg_sleep($1::float8)", 0.2))
    await asyncio.sleep(0.05)
    assert conn._stmt_exclusive_section._acquired
    assert driver.returned(conn) == driver.BUSY
    await running
    assert not conn._stmt_exclusive_section._acquired
    assert driver.returned(conn) == driver.CLEAN


async def test_aborted_and_is_connected_say_a_connection_is_gone(
        conn: Any, postgres: PostgresServer) -> None:
    """`_aborted` is set by terminate() at once (the socket goes later); the protocol's
    `is_connected()` turns False when the server closes the connection."""
    assert driver.returned(conn) == driver.CLEAN
    other = await asyncpg.connect(postgres.dsn())
    try:
        await other.execute("SELECT pg_terminate_backend($1)", conn.get_server_pid())
        async with asyncio.timeout(5):
            while conn._protocol.is_connected():
                await asyncio.sleep(0.01)
        assert driver.returned(conn) == driver.BROKEN
        assert conn.is_closed()
        assert not other._aborted  # type: ignore[attr-defined]
        other.terminate()
        assert other._aborted  # type: ignore[attr-defined]
        assert driver.returned(other) == driver.BROKEN
    finally:
        other.terminate()


async def test_cleanup_runs_while_the_protocol_still_holds_the_reply_future(
        postgres: PostgresServer) -> None:
    """A connection lost under a statement: asyncpg calls `_cleanup` before it fails the reply
    future its protocol holds, which `_cleanup_retrieving` (the pool's connection class) finds
    there with the garbage collector's references; the statement still gets its error (the
    COPY that never awaits its own: tests/faults/test_network.py)."""
    pending: list[asyncio.Future[Any]] = []

    def cleanup(self: Any) -> None:
        pending.extend(value for value in gc.get_referents(self._protocol)
                       if isinstance(value, asyncio.Future) and not value.done())
        _cleanup_of_pool_class(self)

    pool_class = driver.cancel_aware_class(None, cancels=True)
    _cleanup_of_pool_class = pool_class._cleanup
    watched = type("Watched", (pool_class,), {"__slots__": (), "_cleanup": cleanup})
    conn: Any = await asyncpg.connect(postgres.dsn(), connection_class=watched)
    other = await asyncpg.connect(postgres.dsn())
    try:
        running = asyncio.ensure_future(conn.fetchval("SELECT pg_sleep(10)"))
        await asyncio.sleep(0.2)
        await other.execute("SELECT pg_terminate_backend($1)", conn.get_server_pid())
        with pytest.raises(asyncpg.ConnectionDoesNotExistError):
            await asyncio.wait_for(running, 5)
        assert len(pending) == 1  # the statement's reply
    finally:
        conn.terminate()
        await other.close()


async def test_copy_in_holds_one_reply_future_and_drops_it_at_the_servers_error(
        conn: Any) -> None:
    """What `asyncpool.connect.copy_end` reads of asyncpg's COPY FROM STDIN: once the source is
    first asked for a chunk, the protocol's only future is the COPY's reply, not done; the
    server's error completes it and the protocol drops it (then holds no future) while the
    COPY still waits for its source; a chunk written after that is ignored by the server, whose
    error asyncpg then raises."""
    from asyncpool.connect import copy_end

    await conn.execute("CREATE TEMP TABLE copy_in_reply (x int)")
    seen: list[Any] = []
    ended = asyncio.Event()

    async def source() -> AsyncIterator[bytes]:
        seen.append(copy_end._reply_future(conn))
        yield b"1\n"
        yield b"not a number\n"  # (the server's error: it ends the COPY)
        await ended.wait()
        seen.append([value for value in gc.get_referents(conn._protocol)
                     if isinstance(value, asyncio.Future)])
        yield b"2\n"

    copying = asyncio.ensure_future(conn.copy_to_table("copy_in_reply", source=source()))
    async with asyncio.timeout(5):
        while not (seen and seen[0].done()):
            await asyncio.sleep(0.02)
    assert isinstance(copy_end.server_error(seen[0]), asyncpg.InvalidTextRepresentationError)
    ended.set()
    with pytest.raises(asyncpg.InvalidTextRepresentationError):
        await asyncio.wait_for(copying, 5)
    assert seen[1] == []  # (dropped before the source's last chunk)
    assert await conn.fetchval("SELECT count(*) FROM copy_in_reply") == 0


async def test_the_probe_answers_as_is_closed_and_is_in_transaction(
        conn: Any, postgres: PostgresServer) -> None:
    """`probe` gives the protocol, whose `is_connected()` and `is_in_transaction()` agree with
    the public methods at every step, including at once after terminate() or close()."""
    assert driver.probe(conn) is conn._protocol
    connected, in_transaction = driver.probe(conn).is_connected, driver.probe(conn).is_in_transaction
    assert connected()
    assert not conn.is_closed()
    await conn.execute("BEGIN")
    assert in_transaction()
    assert conn.is_in_transaction()
    await conn.execute("ROLLBACK")
    assert not in_transaction()
    assert not conn.is_in_transaction()
    for end in ("terminate", "close", "server"):
        other = await asyncpg.connect(postgres.dsn())
        other_connected = driver.probe(other).is_connected
        assert other_connected()
        if end == "terminate":
            other.terminate()
        elif end == "close":
            closing = asyncio.ensure_future(other.close())
            await asyncio.sleep(0)  # close() has begun, the socket is not gone yet
            assert not other_connected()
            assert other.is_closed()
            await closing
        else:
            await conn.execute("SELECT pg_terminate_backend($1)", other.get_server_pid())
            async with asyncio.timeout(5):
                while not other.is_closed():
                    await asyncio.sleep(0.01)
        assert not other_connected(), end
        assert other.is_closed(), end
        other.terminate()


async def test_cancellations_hold_the_cancel_request_in_flight(conn: Any) -> None:
    await _cancelled_query(conn)
    pending = driver.pending_cancellations(conn)
    assert pending, "asyncpg sends its CancelRequest from a task kept in Connection._cancellations"
    await asyncio.wait(pending, timeout=5)
    assert driver.pending_cancellations(conn) == []


async def test_a_cancel_request_sent_is_no_longer_in_flight(postgres: PostgresServer) -> None:
    """asyncpg's request task waits, after its socket is done, for the cancelled statement to
    end, which a stopped server process never does: the request is no longer in flight (closing
    the connection cannot cut it short), and waiting on what is in flight ends when it is sent."""
    import os
    import signal

    conn = await asyncpg.connect(
        postgres.dsn(), statement_cache_size=0,
        connection_class=driver.cancel_aware_class(None, cancels=True))
    pid = conn.get_server_pid()
    try:
        os.kill(pid, signal.SIGSTOP)
        query = asyncio.ensure_future(conn.execute("SELECT 1"))
        await asyncio.sleep(0.1)
        query.cancel()
        await asyncio.sleep(0)
        in_flight = driver.pending_cancellations(conn)
        assert in_flight
        await asyncio.wait(in_flight, timeout=5)
        assert all(f.done() for f in in_flight)
        assert driver.pending_cancellations(conn) == []
        assert any(not t.done() for t in conn._cancellations)  # (still waiting for the statement)
    finally:
        os.kill(pid, signal.SIGCONT)
        conn.terminate()


async def test_listeners_are_dropped_and_unlistened(conn: Any, postgres: PostgresServer) -> None:
    seen: list[str] = []
    await conn.add_listener("core_chan", lambda *args: seen.append(args[-1]))
    assert conn._listeners
    assert driver.returned(conn) == driver.NEEDS_RESET
    await driver.reset(conn, 5)
    assert not conn._listeners
    assert driver.returned(conn) == driver.CLEAN
    other = await asyncpg.connect(postgres.dsn())
    try:
        await other.execute("NOTIFY core_chan, 'after release'")
    finally:
        await other.close()
    await asyncio.sleep(0.2)
    assert seen == []
    assert await conn.fetchval("SELECT count(*) FROM pg_listening_channels()") == 0


@pytest.mark.parametrize(
    ("attribute", "add"),
    [
        ("_log_listeners", lambda c: c.add_log_listener(lambda *a: None)),
        ("_termination_listeners", lambda c: c.add_termination_listener(lambda *a: None)),
        ("_query_loggers", lambda c: c.add_query_logger(lambda *a: None)),
    ],
)
async def test_callbacks_a_holder_registered_are_dropped(conn: Any, attribute: str, add: Any) -> None:
    add(conn)
    assert getattr(conn, attribute)
    assert driver.returned(conn) == driver.NEEDS_RESET
    await driver.reset(conn, 5)
    assert not getattr(conn, attribute)
    assert driver.returned(conn) == driver.CLEAN


async def test_execute_described_returns_rows_status_and_columns(conn: Any) -> None:
    """`_check_open`, `_stmt_exclusive_section` and `_Connection__execute(...,
    return_status=True)`: one execution's rows, command tag and result columns."""
    rows, status, attributes = await driver.execute_described(
        conn, "SELECT $1::int + 1 AS n, 'x'::text AS t", (1,))
    assert [tuple(r) for r in rows] == [(2, "x")]
    assert status == "SELECT 1"
    assert [(a.name, a.type.oid) for a in attributes] == [("n", 23), ("t", 25)]
    await conn.execute("CREATE TEMP TABLE described (n int)")
    rows, status, attributes = await driver.execute_described(
        conn, "INSERT INTO described SELECT generate_series(1, $1::int)", (3,))
    assert (rows, status, tuple(attributes)) == ([], "INSERT 0 3", ())
    await conn.close()
    with pytest.raises(asyncpg.InterfaceError):
        await driver.execute_described(conn, "SELECT 1", ())


async def test_backend_key_and_request_cancel(conn: Any) -> None:
    """`_protocol.backend_pid`/`backend_secret` (BackendKeyData) and `_addr`/`_params`: a cancel
    request of ours (leak reclaim) stops the running statement, tracked in `_cancellations`."""
    key = driver.backend_key(conn)
    assert key is not None
    assert key[0] == conn.get_server_pid()
    query = asyncio.ensure_future(conn.execute("SELECT pg_sleep(30)"))
    await asyncio.sleep(0.2)
    task = driver.request_cancel(conn)
    assert task is not None
    assert task in driver.pending_cancellations(conn)
    await asyncio.wait_for(task, 5)
    with pytest.raises(asyncpg.QueryCanceledError):
        await asyncio.wait_for(query, 5)
    assert await conn.fetchval("SELECT 1") == 1


async def test_protocol_queries_count(conn: Any) -> None:
    """`_protocol.queries_count` counts the queries run (what ``max_queries`` compares)."""
    before = driver.queries_count(conn)
    await conn.fetchval("SELECT 1")
    await conn.execute("SELECT 1")
    await conn.fetchval("SELECT $1::int", 1)
    assert driver.queries_count(conn) == before + 3


async def test_connection_proxy_base_makes_pooled_connections_asyncpg_connections(
        postgres: PostgresServer) -> None:
    """`asyncpg.connection._ConnectionProxy`: asyncpg's Connection metaclass counts instances of
    its subclasses as Connections (its own pool's proxies are); PooledConnection is one."""
    import asyncpool

    assert driver.ConnectionProxyBase is asyncpg.connection._ConnectionProxy
    async with asyncpool.Pool(postgres.dsn(), name="proxy-base", max_size=1, telemetry=False) as pool, \
            pool.acquire() as conn:
        assert isinstance(conn, asyncpg.Connection)
        assert isinstance(conn, asyncpool.PooledConnection)


#: asyncpg's fetch, fetchrow, fetchval and execute, as `driver.own_body` says the statement
#: runner and the proxy may run them themselves (docstrings left out).
OWN_BODIES = {
    "fetch": "self._check_open()\n"
             "return await self._execute(query, args, 0, timeout, record_class=record_class)",
    "fetchrow": "self._check_open()\n"
                "data = await self._execute(query, args, 1, timeout, record_class=record_class)\n"
                "if not data:\n    return None\nreturn data[0]",
    "fetchval": "self._check_open()\ndata = await self._execute(query, args, 1, timeout)\n"
                "if not data:\n    return None\nreturn data[0][column]",
    # Without arguments, a simple query: called, not copied.
    "execute": "self._check_open()\nif not args:\n"
               "    if self._query_loggers:\n"
               "        with self._time_and_log(query, args, timeout):\n"
               "            result = await self._protocol.query(query, timeout)\n"
               "    else:\n"
               "        result = await self._protocol.query(query, timeout)\n"
               "    return result\n"
               "_, status, _ = await self._execute(query, args, 0, timeout, return_status=True)\n"
               "return status.decode()",
}


@pytest.mark.parametrize("method", sorted(OWN_BODIES))
def test_own_body_is_what_asyncpg_runs(method: str) -> None:
    """The installed asyncpg's method is the body the statement runner copies: with no keyword
    argument (timeout, record_class None; column 0), ``_execute(query, args, limit, None)`` and
    the rows, the first row or its first value; ``execute`` with arguments, the status."""
    own = driver.own_body(method)
    assert own is not None
    function, limit, shape = own
    assert function is asyncpg.Connection.__dict__[method]
    tree = ast.parse(inspect.cleandoc("\n" + inspect.getsource(function)))
    [definition] = tree.body
    assert isinstance(definition, ast.AsyncFunctionDef)
    body = definition.body[1:] if ast.get_docstring(definition) else definition.body
    assert "\n".join(ast.unparse(statement) for statement in body) == OWN_BODIES[method]
    parameters = inspect.signature(function).parameters
    assert [p.kind for p in parameters.values()][:3] == [
        inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.POSITIONAL_OR_KEYWORD,
        inspect.Parameter.VAR_POSITIONAL]
    assert {name: p.default for name, p in parameters.items() if p.kind is p.KEYWORD_ONLY} == (
        {"column": 0, "timeout": None} if method == "fetchval"
        else {"timeout": None} if method == "execute"
        else {"timeout": None, "record_class": None})
    assert (limit, shape) == {"fetch": (0, driver.ROWS), "fetchrow": (1, driver.FIRST_ROW),
                              "fetchval": (1, driver.FIRST_VALUE),
                              "execute": (0, driver.STATUS)}[method]


#: asyncpg's ``Connection._cancel``: the steps `driver._cancel_as_connected` repeats, with the
#: request sent as the connection was made (direct TLS too), by a task nothing cuts short.
ASYNCPG_CANCEL = (
    "try:\n"
    "    async with compat.timeout(self._config.command_timeout):\n"
    "        try:\n"
    "            await connect_utils._cancel(loop=self._loop, addr=self._addr, "
    "params=self._params, backend_pid=self._protocol.backend_pid, "
    "backend_secret=self._protocol.backend_secret)\n"
    "        except ConnectionResetError:\n"
    "            pass\n"
    "        if not waiter.done():\n"
    "            waiter.set_result(None)\n"
    "        if cancel_waiter is not None:\n"
    "            await asyncio.shield(cancel_waiter)\n"
    "except asyncio.CancelledError:\n"
    "    pass\n"
    "except Exception:\n"
    "    if not self._aborted:\n"
    "        self.terminate()\n"
    "finally:\n"
    "    self._cancellations.discard(asyncio.current_task(self._loop))\n"
    "    if not waiter.done():\n"
    "        waiter.set_result(None)"
)


def test_cancel_is_the_body_direct_tls_requests_repeat() -> None:
    """asyncpg's ``Connection._cancel`` (the request task) is what the connection class repeats
    for direct TLS, but with the request sent over direct TLS; a new asyncpg that changes it
    fails here, for the copy to be looked at."""
    function = asyncpg.Connection.__dict__["_cancel"]
    tree = ast.parse(inspect.cleandoc("\n" + inspect.getsource(function)))
    [definition] = tree.body
    assert isinstance(definition, ast.AsyncFunctionDef)
    assert [a.arg for a in definition.args.args] == ["self", "waiter", "cancel_waiter"]
    assert "\n".join(ast.unparse(statement) for statement in definition.body) == ASYNCPG_CANCEL
    cls = driver.cancel_aware_class(None, cancels=True)
    assert cls._cancel is not asyncpg.Connection._cancel  # type: ignore[attr-defined]


async def test_config_command_timeout_bounds_cancel_requests(postgres: PostgresServer) -> None:
    """``_config.command_timeout``: the bound asyncpg puts on its cancel requests."""
    conn = await asyncpg.connect(postgres.dsn(), command_timeout=7)
    try:
        assert conn._config.command_timeout == 7  # type: ignore[attr-defined]
    finally:
        await conn.close()


def test_own_body_is_none_for_other_methods() -> None:
    assert driver.own_body("executemany") is None
