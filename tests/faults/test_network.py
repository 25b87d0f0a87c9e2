"""Network faults between the pool and PostgreSQL, injected by a loopback fault proxy.

Whatever the fault, acquire and queries end with a clear error within their timeouts (none
hangs), no slot is lost, and the pool serves again once the network heals. The last tests
check the proxy itself does what each mode promises.
"""

from __future__ import annotations

import asyncio
import gc
import re
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import asyncpg
import pytest

from asyncpool import ConnectError, ConnectionLostError, Pool, PooledConnection, PoolTimeoutError
from asyncpool.testing import PostgresServer
from asyncpool.testing.faultproxy import Direction, FaultMode, FaultProxy
from asyncpool.testing.invariants import full_width, serves_again, settled
from asyncpool.testing.ledger import Ledger

# What a caller sees, by fault and by where it meets the fault: opening a new connection,
# checking an idle one at checkout, or running a query on one it holds. Silence (stall,
# half-open) becomes a timeout; a closed or reset connection becomes a connection error.
MATRIX: dict[FaultMode, dict[str, type[BaseException]]] = {
    "stall": {"new": PoolTimeoutError, "idle": PoolTimeoutError, "held": TimeoutError},
    "half-open": {"new": PoolTimeoutError, "idle": PoolTimeoutError, "held": TimeoutError},
    "drop": {"new": ConnectError, "idle": ConnectError, "held": ConnectionLostError},
    "reset": {"new": ConnectError, "idle": ConnectError, "held": ConnectionLostError},
}
CASES = [(mode, where) for mode in MATRIX for where in ("new", "idle", "held")]

# A login that fails on a closed or reset connection is retried with backoff until
# acquire_timeout. When the retries run out between two logins the caller gets the last
# ConnectError. When the deadline falls during a login (a slow one: a loaded machine), that login
# has no outcome, and the caller gets a PoolTimeoutError, still connecting, that quotes the last
# ConnectError (as HikariCP's timeout carries the last connect failure). Only that one stands in
# for a ConnectError: one quoting silence ("no answer within connect_timeout"), or nothing, is
# not the fault met.
LOGIN_CUT_AFTER_A_CLOSED_ONE = re.compile(
    r"no connection within 0\.8s: still connecting to [^;]*; last error: pool 'netfault' could "
    r"not connect to [^;]*: (ConnectionResetError|ConnectionDoesNotExistError): "
)


def _pool(proxy: FaultProxy, postgres: PostgresServer, **options: Any) -> Pool:
    config: dict[str, Any] = {
        "name": "netfault", "min_size": 1, "max_size": 2, "acquire_timeout": 0.8,
        "connect_timeout": 0.3, "validate_after": 0, "telemetry": False,
        # Statements the network swallows end at the driver's command timeout.
        "connect_kwargs": {"command_timeout": 0.5},
    }
    config.update(options)
    return Pool(proxy.dsn(postgres.dsn()), **config)


@pytest.mark.parametrize(("mode", "where"), CASES, ids=[f"{m}-{w}" for m, w in CASES])
async def test_network_fault_gives_a_clear_error_then_heals(
    proxy_to_postgres: FaultProxy, postgres: PostgresServer, mode: FaultMode, where: str
) -> None:
    proxy = proxy_to_postgres
    expected = MATRIX[mode][where]
    async with _pool(proxy, postgres, min_size=0 if where == "new" else 1) as pool:
        if where == "held":

            async def use_while_faulted() -> None:
                async with pool.acquire() as conn:
                    proxy.set_mode(mode)
                    await conn.fetchval("SELECT 1")

            # After a timeout asyncpg waits for its cancel request to be answered; a silent
            # network never answers. Close it later, as TCP keepalive would, so release() ends.
            timer = asyncio.get_running_loop().call_later(1.5, proxy.set_mode, "drop")
            try:
                with pytest.raises(expected) as info:
                    await use_while_faulted()
            finally:
                timer.cancel()
        else:
            await pool.fetchval("SELECT 1")  # "idle": a connection, used just now
            proxy.set_mode(mode)
            with pytest.raises((expected, PoolTimeoutError)) as info:
                await pool.fetchval("SELECT 1")
        # The caller sees the error of the fault it met, not another one raised over it.
        if expected is ConnectError and type(info.value) is PoolTimeoutError:
            assert LOGIN_CUT_AFTER_A_CLOSED_ONE.search(str(info.value)), repr(info.value)
        else:
            assert type(info.value) is expected, repr(info.value)
        if isinstance(info.value, PoolTimeoutError | ConnectError):
            assert "'netfault'" in str(info.value)
        proxy.set_mode("pass")
        await serves_again(pool, within=10)
        await settled(pool)
        await full_width(pool)


@pytest.mark.parametrize(("direction", "present"), [("replies", True), ("requests", False)])
async def test_commit_lost_in_a_half_open_connection_is_ambiguous_not_duplicated(
    proxy_to_postgres: FaultProxy, postgres: PostgresServer, ledger: Ledger,
    direction: Direction, present: bool,
) -> None:
    """COMMIT sent into a half-open connection: the caller gets a timeout and cannot know the
    outcome. With the replies lost the server did commit; with the requests lost it did not.
    Either way the id is there at most once."""
    proxy = proxy_to_postgres

    async def go_half_open(conn: PooledConnection) -> None:
        proxy.set_mode("half-open", direction=direction)

    async with _pool(proxy, postgres) as pool:
        timer = asyncio.get_running_loop().call_later(1.5, proxy.set_mode, "drop")
        try:
            error = await ledger.write(pool, before_commit=go_half_open)
        finally:
            timer.cancel()
        assert type(error) is TimeoutError
        assert list(ledger.ambiguous) == [1]
        proxy.set_mode("pass")
        await serves_again(pool)
        check = await ledger.verify()
        assert (check.ambiguous_present, check.ambiguous_absent) == (int(present), int(not present))
        await settled(pool)


@pytest.mark.parametrize("mode", ["drop", "reset"])
async def test_connection_lost_after_the_last_statement_is_not_reported_committed(
    proxy_to_postgres: FaultProxy, postgres: PostgresServer, ledger: Ledger, mode: FaultMode
) -> None:
    """The block's statements all succeeded, then the connection died before COMMIT was sent:
    the caller must hear the transaction was not committed."""
    proxy = proxy_to_postgres

    async def cut(conn: PooledConnection) -> None:
        proxy.set_mode(mode)
        async with asyncio.timeout(5):
            while not conn.is_closed():  # until the driver has seen it
                await asyncio.sleep(0.01)

    async with _pool(proxy, postgres) as pool:
        error = await ledger.write(pool, before_commit=cut)
        assert isinstance(error, ConnectionLostError), repr(error)
        assert "not committed" in str(error)
        proxy.set_mode("pass")
        check = await ledger.verify()
        # Raised after the block, the ledger counts it as ambiguous; the row must be absent.
        assert (check.committed, check.ambiguous_absent) == (0, 1)
        await serves_again(pool)
        await settled(pool)


async def _discard(data: bytes) -> None:
    pass


async def _copy_out(pool: Pool) -> object:
    return await pool.copy_from_query("SELECT 1", output=_discard)


async def _copy_in(pool: Pool) -> object:
    return await pool.copy_records_to_table("goodbye", records=[(1,)], columns=["v"])


async def _copy_in_a_block(pool: Pool) -> object:
    async with pool.acquire() as conn:
        return await conn.copy_from_query("SELECT 1", output=_discard)


COPIES: dict[str, Callable[[Pool], Awaitable[object]]] = {
    "copy_from_query": _copy_out, "copy_records_to_table": _copy_in, "block": _copy_in_a_block,
}


async def _copy_out_unscoped(pool: Pool) -> object:
    conn = await pool.acquire()
    try:
        return await conn.copy_from_query("SELECT 1", output=_discard)
    finally:
        await pool.release(conn)


async def _server_says_goodbye(pool: Pool, postgres: PostgresServer) -> None:
    """The server ends the pool's idle connection; with the proxy's `close_delay`, its FATAL
    error arrives and its close does not yet."""
    pid = await pool.fetchval("SELECT pg_backend_pid()")
    admin = await asyncpg.connect(postgres.admin_dsn)
    try:
        assert await admin.fetchval("SELECT pg_terminate_backend($1)", pid)
    finally:
        await admin.close()
    await asyncio.sleep(0.3)


@pytest.mark.parametrize("how", list(COPIES))
async def test_server_goodbye_read_before_the_close_is_a_lost_connection(
    proxy_to_postgres: FaultProxy, postgres: PostgresServer, how: str
) -> None:
    """The server ended an idle connection (pg_terminate_backend; PgBouncer's KILL or shutdown
    does the same): its FATAL ErrorResponse is read, its close (FIN) not yet. asyncpg's protocol
    is then out of step and refuses any statement with InternalClientError ("another operation
    (2) is in progress"); a COPY raises it without closing the connection. The caller must get
    ConnectionLostError, and the connection must not go back to the pool. Found by the soak
    (test_soak.py, seed 3)."""
    proxy = proxy_to_postgres
    proxy.close_delay = 3.0  # the FIN comes late: within it, the next checkout takes the connection
    direct = await asyncpg.connect(postgres.dsn())
    try:
        await direct.execute("DROP TABLE IF EXISTS goodbye; CREATE TABLE goodbye (v int)")
    finally:
        await direct.close()
    async with _pool(proxy, postgres, max_size=1, validate_after=None) as pool:
        await _server_says_goodbye(pool, postgres)
        with pytest.raises(ConnectionLostError) as info:
            await COPIES[how](pool)
        assert isinstance(info.value.__cause__, asyncpg.InternalClientError), repr(info.value)
        # The connection out of step was closed, not lent again: the next caller is served.
        assert await pool.fetchval("SELECT 2") == 2
        assert pool.stats().closed_total == 1
        await settled(pool)


async def test_server_goodbye_after_an_unscoped_acquire_is_not_lent_again(
    proxy_to_postgres: FaultProxy, postgres: PostgresServer
) -> None:
    """As above, with ``conn = await pool.acquire()`` and ``pool.release(conn)``: no block
    translates the error (docs/migration.md), so asyncpg's InternalClientError reaches the
    caller. The return finds asyncpg not ready for another statement, and its reset fails: the
    connection is closed there, not lent again (a guard: this held before the soak's fix)."""
    proxy = proxy_to_postgres
    proxy.close_delay = 3.0
    async with _pool(proxy, postgres, max_size=1, validate_after=None) as pool:
        await _server_says_goodbye(pool, postgres)
        with pytest.raises(asyncpg.InternalClientError):
            await _copy_out_unscoped(pool)
        assert await pool.fetchval("SELECT 2") == 2
        assert pool.stats().closed_total == 1
        await settled(pool)


async def _rows_until_cut(started: asyncio.Event) -> AsyncIterator[bytes]:
    for n in range(500):  # 10 s of rows: past the command timeout
        yield b"%d\n" % n
        started.set()
        await asyncio.sleep(0.02)


@pytest.mark.parametrize("cut", ["reset", "terminated"])
@pytest.mark.parametrize("statements", ["unnamed", "on", "off"])
async def test_a_copy_in_whose_connection_is_lost_leaves_no_unretrieved_future(
    proxy_to_postgres: FaultProxy, postgres: PostgresServer, statements: Any, cut: str
) -> None:
    """A COPY FROM STDIN whose connection is lost (the network resets it, or
    pg_terminate_backend()) sends its rows into the closed transport until its timeout, then
    fails inside asyncpg (``AttributeError: 'NoneType' object has no attribute 'done'``)
    before retrieving its reply future: asyncio logged "Future exception was never
    retrieved". The holder gets ConnectionLostError, as for any lost connection, and nothing is
    logged."""
    proxy = proxy_to_postgres
    table = f"copy_lost_{statements}_{cut}"
    admin = await asyncpg.connect(postgres.dsn())  # (the pool's role: it may end its backends)
    loop = asyncio.get_running_loop()
    logged: list[dict[str, Any]] = []
    handler = loop.get_exception_handler()
    loop.set_exception_handler(lambda _loop, context: logged.append(context))
    try:
        await admin.execute(f"DROP TABLE IF EXISTS {table}; CREATE TABLE {table} (n int)")
        # (Logins get seconds: none meets the fault, and a loaded machine took over 0.3 s.)
        async with _pool(proxy, postgres, max_size=1, prepared_statements=statements,
                         connect_timeout=3, acquire_timeout=6,
                         connect_kwargs={"command_timeout": 1.5}) as pool:
            for scope in ("block", "helper"):
                started = asyncio.Event()
                pid = await pool.fetchval("SELECT pg_backend_pid()")

                async def copy(scope: str = scope, started: asyncio.Event = started) -> object:
                    if scope == "helper":
                        return await pool.copy_to_table(table, source=_rows_until_cut(started))
                    async with pool.acquire() as conn:
                        return await conn.copy_to_table(table, source=_rows_until_cut(started))

                running = asyncio.create_task(copy())
                await asyncio.wait_for(started.wait(), 10)
                if cut == "reset":
                    proxy.set_mode("reset")
                else:
                    assert await admin.fetchval("SELECT pg_terminate_backend($1)", pid)
                with pytest.raises(ConnectionLostError) as info:
                    await asyncio.wait_for(running, 10)
                assert isinstance(info.value.__cause__, asyncpg.ConnectionDoesNotExistError)
                del running, info
                proxy.set_mode("pass")
            gc.collect()  # (an unretrieved future logs when it is collected)
            await asyncio.sleep(0.1)
            assert await pool.fetchval(f"SELECT count(*) FROM {table}") == 0
            await settled(pool)
    finally:
        loop.set_exception_handler(handler)
        await admin.execute(f"DROP TABLE IF EXISTS {table}")
        await admin.close()
    assert [context["message"] for context in logged] == []


# -- the proxy itself ----------------------------------------------------------------------


@pytest.fixture
async def echo() -> AsyncIterator[tuple[int, list[bytes]]]:
    """A loopback server that echoes, and records what it received."""
    received: list[bytes] = []

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while data := await reader.read(1024):
            received.append(data)
            writer.write(data)
            await writer.drain()
        writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    try:
        yield server.sockets[0].getsockname()[1], received
    finally:
        server.close()
        await server.wait_closed()


async def _connect(proxy: FaultProxy) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.open_connection(proxy.host, proxy.port)


async def _silent(reader: asyncio.StreamReader) -> bool:
    try:
        await asyncio.wait_for(reader.read(1), 0.2)
    except TimeoutError:
        return True
    return False


async def test_proxy_passes_and_stalls_and_heals(echo: tuple[int, list[bytes]]) -> None:
    port, received = echo
    async with FaultProxy("127.0.0.1", port) as proxy:
        reader, writer = await _connect(proxy)
        writer.write(b"ping")
        assert await reader.readexactly(4) == b"ping"
        proxy.set_mode("stall")
        writer.write(b"held")
        assert await _silent(reader)
        assert proxy.held == 1
        assert received == [b"ping"]
        proxy.set_mode("pass")
        assert await reader.readexactly(4) == b"held"
        writer.close()


@pytest.mark.parametrize("mode", ["drop", "reset"])
async def test_proxy_drops_and_resets(echo: tuple[int, list[bytes]], mode: FaultMode) -> None:
    port, _ = echo
    async with FaultProxy("127.0.0.1", port) as proxy:
        reader, writer = await _connect(proxy)
        writer.write(b"ping")
        assert await reader.readexactly(4) == b"ping"
        proxy.set_mode(mode)
        if mode == "drop":
            assert await reader.read(1) == b""  # FIN
        else:
            with pytest.raises(ConnectionResetError):
                await reader.read(1)
        # New connections meet the same fate.
        reader2, writer2 = await _connect(proxy)
        try:
            assert await reader2.read(1) == b""
        except ConnectionResetError:
            assert mode == "reset"
        writer.close()
        writer2.close()


@pytest.mark.parametrize("direction", ["replies", "requests"])
async def test_proxy_half_open_stays_deaf(echo: tuple[int, list[bytes]],
                                          direction: Direction) -> None:
    port, received = echo
    async with FaultProxy("127.0.0.1", port) as proxy:
        reader, writer = await _connect(proxy)
        proxy.set_mode("half-open", direction=direction)
        writer.write(b"lost")
        assert await _silent(reader)
        # The server got the request only when the replies are the direction lost.
        assert (b"lost" in b"".join(received)) == (direction == "replies")
        proxy.set_mode("pass")
        writer.write(b"more")
        assert await _silent(reader), "a half-open connection does not come back"
        fresh_reader, fresh_writer = await _connect(proxy)
        fresh_writer.write(b"new")
        assert await fresh_reader.readexactly(3) == b"new"
        writer.close()
        fresh_writer.close()


def test_proxy_refuses_to_forward_off_this_machine() -> None:
    with pytest.raises(ValueError, match="loopback"):
        FaultProxy("10.0.0.1", 5432)
