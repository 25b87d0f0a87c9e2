"""PgBouncer's and PostgreSQL's own lifecycle events, from outside the pool.

What they look like to a caller: each error names its cause and what to do (found by driving the
pool under load while the servers did what they do in production: KILL, idle_session_timeout,
pg_terminate_backend, CONNECTION LIMIT). And, under a steady load in each prepared-statements
mode, server connections replaced under the clients (server_lifetime, server_idle_timeout), RELOAD
changing the pool size, and statements cancelled from the server side (pg_cancel_backend): callers
see nothing (or only the cancelled statement's error), the pools settle, and close() leaves no
client in PgBouncer."""

from __future__ import annotations

import asyncio
import gc
import uuid
from collections.abc import Awaitable, Callable, Iterator
from typing import Any, Literal

import asyncpg
import pytest

from asyncpool import ConnectError, ConnectionLostError, Pool, PoolerExhaustedError, PoolTimeoutError
from asyncpool.testing import PgBouncerServer, PostgresServer, ServerStack
from asyncpool.testing.binaries import current_pgbouncer, system_pgbouncer
from asyncpool.testing.faultproxy import FaultProxy
from asyncpool.testing.invariants import full_width, serves_again, settled
from tests.conftest import Pooler

Mode = Literal["unnamed", "on", "off"]
# Each PgBouncer with the modes it serves: 1.18 has no prepared statements.
KILL_CASES = [("legacy", "unnamed"), ("legacy", "off"), ("current", "unnamed"), ("current", "on")]


@pytest.fixture
def own_pgbouncer(request: pytest.FixtureRequest, fault_stack: ServerStack) -> Iterator[PgBouncerServer]:
    """A PgBouncer of this test's own (`request.param`: legacy or current), so that KILL reaches
    no other test's clients."""
    binary = system_pgbouncer() if request.param == "legacy" else current_pgbouncer()
    with PgBouncerServer(binary, fault_stack.postgres) as bouncer:
        yield bouncer


async def _set_limit(postgres: PostgresServer, database: str, limit: int) -> None:
    admin = await asyncpg.connect(postgres.admin_dsn)
    try:
        await admin.execute(f"ALTER DATABASE {database} CONNECTION LIMIT {limit}")
    finally:
        await admin.close()


@pytest.mark.parametrize(("own_pgbouncer", "mode"), KILL_CASES, indirect=["own_pgbouncer"],
                         ids=[f"{p}-{m}" for p, m in KILL_CASES])
async def test_kill_of_an_idle_connection_names_the_cause(own_pgbouncer: PgBouncerServer,
                                                          mode: Mode) -> None:
    """PgBouncer's KILL ends the pool's idle connection; its FATAL error is read before the
    close (under load the next checkout comes within that window: the chaos run met it 25 times
    in 5 KILLs). asyncpg drops the error's text and refuses the statement with "cannot switch to
    state 12; another operation (2) is in progress": the caller must be told what happened (the
    connection was ended while idle, by whom it may have been) and that the statement was not
    sent. After RESUME the pool serves again."""
    async with FaultProxy(own_pgbouncer.host, own_pgbouncer.port) as proxy:
        proxy.close_delay = 3.0  # the FIN comes late: the goodbye is read first
        async with Pool(proxy.dsn(own_pgbouncer.dsn()), name="killed", min_size=1, max_size=1,
                        acquire_timeout=10, validate_after=None, prepared_statements=mode,
                        telemetry=False) as pool:
            assert await pool.fetchval("SELECT $1::int", 1) == 1
            await own_pgbouncer.admin("KILL app")
            await asyncio.sleep(0.3)  # the goodbye arrives
            with pytest.raises(ConnectionLostError) as info:
                await pool.fetchval("SELECT $1::int", 2)
            message = str(info.value)
            assert "ended this connection while it sat idle" in message, message
            assert "this statement was not sent" in message, message
            assert "KILL" in message, message
            await own_pgbouncer.admin("RESUME app")
            assert await pool.fetchval("SELECT $1::int", 3) == 3
            await settled(pool)


async def test_idle_session_timeout_names_the_cause(proxy_to_postgres: FaultProxy,
                                                    postgres: PostgresServer) -> None:
    """PostgreSQL's idle_session_timeout ends a direct connection used within validate_after
    (so not checked at checkout): as with KILL, its FATAL error read before the close."""
    proxy = proxy_to_postgres
    proxy.close_delay = 3.0
    async with Pool(proxy.dsn(postgres.dsn()), name="idle-session", min_size=1, max_size=1,
                    validate_after=None, server_settings={"idle_session_timeout": "200"},
                    telemetry=False) as pool:
        assert await pool.fetchval("SELECT 1") == 1
        await asyncio.sleep(0.6)  # past idle_session_timeout: the server says goodbye
        with pytest.raises(ConnectionLostError) as info:
            await pool.fetchval("SELECT 2")
        message = str(info.value)
        assert "idle_session_timeout" in message, message
        assert "this statement was not sent" in message, message
        assert await pool.fetchval("SELECT 3") == 3


async def test_server_connection_terminated_under_pgbouncer_names_the_cause(
    pooler: Pooler, postgres: PostgresServer
) -> None:
    """pg_terminate_backend of the server connection PgBouncer gave a running statement:
    PgBouncer closes the client with "server conn crashed?", which must be explained."""
    marker = f"terminated_{uuid.uuid4().hex[:8]}"
    sleep = f"SELECT pg_sleep(20) AS {marker}"
    async with Pool(pooler.dsn(), name="crashed", min_size=1, max_size=1,
                    telemetry=False) as pool:
        task = asyncio.create_task(pool.fetchval(sleep))
        async with asyncio.timeout(10):
            while not await postgres.running_statements(marker):
                await asyncio.sleep(0.05)
        await postgres.end_statements(marker)
        with pytest.raises(ConnectionLostError) as info:
            async with asyncio.timeout(10):
                await task
        message = str(info.value)
        assert "server conn crashed?" in message, message
        assert "PostgreSQL ended the server connection PgBouncer was using" in message, message
        assert await pool.fetchval("SELECT 1") == 1


async def test_database_connection_limit_is_named(postgres: PostgresServer,
                                                  limited_database: str) -> None:
    """A login past the database's own CONNECTION LIMIT (SQLSTATE 53300, as for
    max_connections): the error names that limit and how to raise it, not max_connections."""
    await _set_limit(postgres, limited_database, 1)
    async with Pool(postgres.dsn(database=limited_database), name="limited", min_size=0,
                    max_size=2, acquire_timeout=2, telemetry=False) as pool:
        async with pool.acquire() as held:
            assert await held.fetchval("SELECT 1") == 1
            with pytest.raises(PoolerExhaustedError) as info:
                await pool.fetchval("SELECT 2")
        message = str(info.value)
        assert f"database {limited_database!r} has reached its own connection limit" in message
        assert f"ALTER DATABASE {limited_database} CONNECTION LIMIT" in message, message
        assert "raise the server's max_connections" not in message, message


async def test_role_connection_limit_is_named(postgres: PostgresServer) -> None:
    """The same for a role's CONNECTION LIMIT."""
    role = f"limited_{uuid.uuid4().hex[:8]}"
    password = uuid.uuid4().hex
    admin = await asyncpg.connect(postgres.admin_dsn)
    try:
        await admin.execute(f"CREATE ROLE {role} LOGIN CONNECTION LIMIT 1 PASSWORD '{password}'")
        dsn = f"postgresql://{role}:{password}@{postgres.host}:{postgres.port}/app"
        async with Pool(dsn, name="limited-role", min_size=0, max_size=2, acquire_timeout=2,
                        telemetry=False) as pool, pool.acquire() as held:
            assert await held.fetchval("SELECT 1") == 1
            with pytest.raises(PoolerExhaustedError) as info:
                await pool.fetchval("SELECT 2")
        message = str(info.value)
        assert f"role {role!r} has reached its own connection limit" in message, message
        assert f"ALTER ROLE {role} CONNECTION LIMIT" in message, message
    finally:
        await admin.execute(f"DROP ROLE IF EXISTS {role}")
        await admin.close()


async def test_database_connection_limit_behind_pgbouncer_is_named(
    pooler: Pooler, postgres: PostgresServer, limited_database: str
) -> None:
    """Behind PgBouncer, its server login refused over the database's CONNECTION LIMIT: 1.18
    relays PostgreSQL's text as a protocol violation (08P01), the current one as 53300; both
    reach the caller (here as the last error of PoolTimeoutError, the login retried) with that
    limit named."""
    await _set_limit(postgres, limited_database, 0)
    async with Pool(pooler.dsn(database=limited_database), name="limited-pgbouncer", min_size=0,
                    max_size=1, acquire_timeout=2, telemetry=False) as pool:
        with pytest.raises((PoolerExhaustedError, PoolTimeoutError)) as info:
            await pool.fetchval("SELECT 1")
        message = str(info.value)
        assert f"database {limited_database!r} has reached its own connection limit" in message
        assert f"ALTER DATABASE {limited_database} CONNECTION LIMIT" in message, message


async def test_kill_client_names_the_cause(current: PgBouncerServer, postgres: PostgresServer) -> None:
    """PgBouncer 1.24's KILL_CLIENT of the pool's connection under a statement: PgBouncer's
    "admin forced disconnect" is explained."""
    if current.version < (1, 24):
        pytest.skip("KILL_CLIENT needs PgBouncer 1.24")
    name = f"kill_client_{uuid.uuid4().hex[:8]}"
    sleep = f"SELECT pg_sleep(20) AS {name}"
    async with Pool(current.dsn(application_name=name), name="kill-client", min_size=1,
                    max_size=1, telemetry=False) as pool:
        task = asyncio.create_task(pool.fetchval(sleep))
        try:
            async with asyncio.timeout(10):
                while not await postgres.running_statements(name):
                    await asyncio.sleep(0.05)
            ours = [r for r in await current.admin("SHOW CLIENTS") if r["application_name"] == name]
            assert len(ours) == 1, ours
            await current.admin(f"KILL_CLIENT {ours[0]['id']}")
            with pytest.raises(ConnectionLostError) as info:
                async with asyncio.timeout(10):
                    await task
        finally:
            await postgres.end_statements(name)
        message = str(info.value)
        assert "A PgBouncer admin disconnected this client (KILL_CLIENT)" in message, message
        assert await pool.fetchval("SELECT 1") == 1


@pytest.mark.parametrize("own_pgbouncer", ["legacy", "current"], indirect=True)
async def test_a_session_parameter_the_server_refuses_names_the_cause(
        own_pgbouncer: PgBouncerServer) -> None:
    """PgBouncer accepts any TimeZone at login and gives it to the server connection with a SET
    before the first statement; PostgreSQL refuses a bad one, and PgBouncer closes the client
    with "invalid server parameter" on every transaction. The caller must be told that it is a
    session parameter (where to look) and that nothing ran, not only that a connection was lost;
    the other pool on the same server connections is not affected."""
    async with Pool(own_pgbouncer.dsn(), name="good", min_size=1, max_size=1,
                    telemetry=False) as good:
        async with Pool(own_pgbouncer.dsn(), name="bad", min_size=0, max_size=1, acquire_timeout=5,
                        server_settings={"TimeZone": "Nowhere/Bogus"}, telemetry=False) as bad:
            for _ in range(2):
                with pytest.raises(ConnectionLostError) as info:
                    await bad.fetchval("SELECT 1")
                message = str(info.value)
                assert "invalid server parameter" in message, message
                assert "check server_settings" in message, message
                assert "nothing of this transaction reached the server" in message, message
            assert bad.stats().size <= 1
        assert await good.fetchval("SHOW TimeZone") != "Nowhere/Bogus"


# -- server connections churned under a steady load -----------------------------------------

MODES: dict[str, list[Mode]] = {"legacy": ["unnamed", "off"], "current": ["unnamed", "on"]}
LOAD_SECONDS = 3.0
WORKERS_PER_POOL = 4


class Churn:
    """Pools in each mode the PgBouncer serves, `WORKERS_PER_POOL` workers each, running a mix
    of statements (with short idle gaps) until `stop()`; what callers got is kept."""

    def __init__(self, pooler: PgBouncerServer, modes: list[Mode]) -> None:
        self.pools = [Pool(pooler.dsn(), name=f"churn-{mode}", min_size=1, max_size=3,
                           acquire_timeout=10, command_timeout=10, prepared_statements=mode,
                           telemetry=False) for mode in modes]
        self.errors: list[BaseException] = []
        self.backends: set[int] = set()
        self.done = 0
        self._stopping = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []

    async def start(self) -> Churn:
        for pool in self.pools:
            await pool.open()
        self._tasks = [asyncio.create_task(self._worker(pool, n))
                       for pool in self.pools for n in range(WORKERS_PER_POOL)]
        return self

    async def _worker(self, pool: Pool, n: int) -> None:
        i = 0
        while not self._stopping.is_set():
            i += 1
            try:
                await self._one(pool, i)
                self.done += 1
            except Exception as exc:  # (every caller's error is judged after the run)
                self.errors.append(exc)
            if (i + n) % 5 == 0:
                await asyncio.sleep(0.3)  # idle: PgBouncer's server_idle_timeout may fire

    async def _one(self, pool: Pool, i: int) -> None:
        if i % 3 == 0:
            self.backends.add(await pool.fetchval("SELECT pg_backend_pid()"))
        elif i % 3 == 1:
            async with pool.transaction() as conn:
                assert await conn.fetchval("SELECT $1::int", i) == i
                await conn.execute("SELECT pg_sleep(0.01)")
        else:
            async with pool.acquire() as conn:
                statement = await conn.prepare("SELECT $1::text || 'x'")
                assert await statement.fetchval(str(i)) == f"{i}x"

    async def stop(self) -> None:
        self._stopping.set()
        async with asyncio.timeout(30):
            await asyncio.gather(*self._tasks)

    async def close(self) -> None:
        for pool in self.pools:
            await pool.close(timeout=5)


async def _reloads(pooler: PgBouncerServer, postgres: PostgresServer, until: float) -> int:
    """RELOAD with the server pool's size (and server_lifetime) changed, again and again."""
    sizes = [(1, 1), (5, 3600), (2, 1), (4, 3600)]
    done = 0
    while asyncio.get_running_loop().time() < until:
        await asyncio.sleep(0.6)
        size, lifetime = sizes[done % len(sizes)]
        pooler.settings.update(default_pool_size=str(size), max_db_connections=str(size),
                               server_lifetime=str(lifetime))
        pooler._write_ini()
        await pooler.admin("RELOAD")
        done += 1
    return done


async def _cancels(pooler: PgBouncerServer, postgres: PostgresServer, until: float) -> int:
    """pg_cancel_backend of the app's backends (PgBouncer's server connections), again and again."""
    admin = await asyncpg.connect(postgres.admin_dsn)
    sent = 0
    try:
        while asyncio.get_running_loop().time() < until:
            await asyncio.sleep(0.1)
            sent += len(await admin.fetch(
                "SELECT pg_cancel_backend(pid) FROM pg_stat_activity WHERE usename = 'app' "
                "AND backend_type = 'client backend'"))
    finally:
        await admin.close()
    return sent


async def _wait(pooler: PgBouncerServer, postgres: PostgresServer, until: float) -> int:
    await asyncio.sleep(until - asyncio.get_running_loop().time())
    return 1


def _none(exc: BaseException) -> bool:
    return False


def _cancelled(exc: BaseException) -> bool:
    """A statement cancelled on the server (PostgreSQL's 57014), or the SET by which PgBouncer
    gives a client's session parameters to a server connection whose values differ: PgBouncer
    then closes the client (seen in CI: once in a run), and the caller is told so and that
    nothing reached the server."""
    return isinstance(exc, asyncpg.QueryCanceledError) or (
        isinstance(exc, ConnectionLostError) and "invalid server parameter" in str(exc)
        and "the SET was cancelled (pg_cancel_backend)" in str(exc))


Event = Callable[[PgBouncerServer, PostgresServer, float], Awaitable[int]]
#: Each event: PgBouncer's settings, what runs beside the load, and which errors callers may see.
EVENTS: dict[str, tuple[dict[str, str | int], Event, Callable[[BaseException], bool]]] = {
    # Server connections closed by PgBouncer under its clients, every second.
    "server-lifetime": ({"server_lifetime": 1, "server_idle_timeout": 1, "default_pool_size": 2,
                         "max_db_connections": 2}, _wait, _none),
    "reload-pool-size": ({"default_pool_size": 4, "max_db_connections": 4}, _reloads, _none),
    "pg-cancel-backend": ({"default_pool_size": 4, "max_db_connections": 4}, _cancels, _cancelled),
}


@pytest.mark.parametrize("event", list(EVENTS))
@pytest.mark.parametrize("which", ["legacy", "current"])
async def test_server_connections_churned_under_load(fault_stack: ServerStack, which: str,
                                                     event: str) -> None:
    settings, inject, allowed = EVENTS[event]
    binary = system_pgbouncer() if which == "legacy" else current_pgbouncer()
    loop = asyncio.get_running_loop()
    reported: list[dict[str, Any]] = []
    loop.set_exception_handler(lambda _loop, context: reported.append(context))
    try:
        with PgBouncerServer(binary, fault_stack.postgres, settings) as pooler:
            churn = await Churn(pooler, MODES[which]).start()
            try:
                count = await inject(pooler, fault_stack.postgres, loop.time() + LOAD_SECONDS)
            finally:
                await churn.stop()
            assert count > 0
            odd = [e for e in churn.errors if not allowed(e)]
            assert not odd, f"{len(odd)} unexpected errors, first: {odd[:3]!r}"
            assert churn.done > 50, churn.done
            if event == "server-lifetime":
                # Two server connections at most, replaced every second: more were seen.
                assert len(churn.backends) > 2, churn.backends
            for pool in churn.pools:
                await serves_again(pool)
                await settled(pool, pooler)
                await full_width(pool)
            await churn.close()
            clients = [r for r in await pooler.admin("SHOW CLIENTS") if r["user"] == "app"]
            assert not clients, f"clients left in PgBouncer after close(): {clients}"
    finally:
        loop.set_exception_handler(None)
    assert not reported, reported


# -- a cancel request in flight when the server ends the connection ------------------------


@pytest.mark.parametrize("mode", ["unnamed", "on", "off"])
async def test_cancel_request_survives_the_connection_lost_under_it(
    proxy_to_postgres: FaultProxy, postgres: PostgresServer, mode: Mode
) -> None:
    """A statement timed out, its cancel request not yet taken by the server (a busy pooler),
    and the server ends the connection meanwhile (pg_terminate_backend, a failover; PgBouncer's
    "server conn crashed?"). asyncpg's clean-up of the lost connection cancelled the request's
    task, closing its socket before the server took it: the close that crashes PgBouncer 1.18
    (pgbouncer#801; found by the chaos run: pg_terminate_backend storm plus callers' time
    limits crashed 1.18 within 12 s). The request must be let finish; the caller is told the
    connection was lost, and the pool serves again."""
    proxy = proxy_to_postgres
    proxy.cancel_delay = 1.0  # the server takes the request only after the connection is gone
    async with Pool(proxy.dsn(postgres.dsn()), name="cancel-lost", min_size=1, max_size=1,
                    validate_after=None, prepared_statements=mode, telemetry=False) as pool:
        await _time_out_then_lose(pool, proxy, postgres.terminate_backend)
        await asyncio.sleep(1.5)  # past cancel_delay: the request was taken, or abandoned
        assert proxy.cancels_abandoned == 0, "the cancel request's socket was closed early"
        assert await pool.fetchval("SELECT 1") == 1
        await settled(pool)


# -- a COPY refused on a connection the server has said goodbye to -------------------------


async def _copy_out(conn: Any) -> object:
    async def discard(_chunk: bytes) -> None:
        return None

    return await conn.copy_from_query("SELECT 1", output=discard)


@pytest.mark.parametrize("scoped", [True, False], ids=["async-with", "acquire-release"])
async def test_copy_refused_after_a_goodbye_leaves_no_unretrieved_future(
    proxy_to_postgres: FaultProxy, postgres: PostgresServer, scoped: bool
) -> None:
    """The server ended an idle connection and its FATAL error was read, its close not yet
    (test_network.py's case): asyncpg's COPY makes its reply future, then refuses ("another
    operation (2) is in progress") and leaves that future on the protocol, where closing the
    connection sets its error and nothing retrieves it: asyncio logged "Future exception was
    never retrieved: ConnectionDoesNotExistError" (the chaos run: pg_terminate_backend storm,
    COPY among the statements; there copy_records_to_table, whose copy_in makes its future the
    same way, but here its column lookup meets the refusal first). The pool must not leave
    that behind when it closes such a connection."""
    proxy = proxy_to_postgres
    proxy.close_delay = 3.0
    loop = asyncio.get_running_loop()
    reported: list[dict[str, Any]] = []
    loop.set_exception_handler(lambda _loop, context: reported.append(context))
    try:
        async with Pool(proxy.dsn(postgres.dsn()), name="copy-goodbye", min_size=1, max_size=1,
                        validate_after=None, telemetry=False) as pool:
            pid = await pool.fetchval("SELECT pg_backend_pid()")
            assert await postgres.terminate_backend(pid)
            await asyncio.sleep(0.3)  # the goodbye is read; the close comes late
            if scoped:
                with pytest.raises(ConnectionLostError):
                    async with pool.acquire() as conn:
                        await _copy_out(conn)
            else:
                conn = await pool.acquire()
                try:
                    with pytest.raises(asyncpg.InternalClientError):
                        await _copy_out(conn)
                finally:
                    await pool.release(conn)
            assert await pool.fetchval("SELECT 2") == 2
        gc.collect()
        await asyncio.sleep(0.1)  # (the loop's handler is called from a callback)
    finally:
        loop.set_exception_handler(None)
    assert not reported, [context.get("message") for context in reported]


@pytest.mark.parametrize("own_pgbouncer", ["legacy", "current"], indirect=True)
async def test_disabled_database_is_named(own_pgbouncer: PgBouncerServer) -> None:
    """PgBouncer's DISABLE app: a login is refused ("database "app" is disabled"); the error
    says an admin did it and that ENABLE undoes it, and the pool serves again after ENABLE."""
    async with Pool(own_pgbouncer.dsn(), name="disabled", min_size=0, max_size=1,
                    acquire_timeout=2, telemetry=False) as pool:
        await own_pgbouncer.admin("DISABLE app")
        try:
            with pytest.raises(ConnectError) as info:
                await pool.fetchval("SELECT 1")
        finally:
            await own_pgbouncer.admin("ENABLE app")
        message = str(info.value)
        assert "an admin ran DISABLE on it" in message, message
        assert "ENABLE app" in message, message
        assert await pool.fetchval("SELECT 2") == 2


async def test_database_not_allowing_connections_is_named(postgres: PostgresServer,
                                                          limited_database: str) -> None:
    """ALTER DATABASE ... ALLOW_CONNECTIONS false: the error names that and how to undo it."""
    admin = await asyncpg.connect(postgres.admin_dsn)
    try:
        await admin.execute(f"ALTER DATABASE {limited_database} ALLOW_CONNECTIONS false")
    finally:
        await admin.close()
    async with Pool(postgres.dsn(database=limited_database), name="not-allowed", min_size=0,
                    max_size=1, acquire_timeout=2, telemetry=False) as pool:
        with pytest.raises(ConnectError) as info:
            await pool.fetchval("SELECT 1")
    message = str(info.value)
    assert f"ALTER DATABASE {limited_database} ALLOW_CONNECTIONS true" in message, message


async def test_pool_close_waits_for_a_cancel_request_left_by_a_lost_connection(
    proxy_to_postgres: FaultProxy, postgres: PostgresServer
) -> None:
    """The cancel request kept through a lost connection (above) runs in a task of its own; a
    program that closes its pool and ends (``asyncio.run(main())``, whose end cancels every task
    left) must not cut it short there: close() waits for it, as it waits for the requests of
    the connections it closes itself. Run on a loop of its own, in a thread, as a script's."""
    proxy = proxy_to_postgres
    proxy.cancel_delay = 1.0
    dsn = proxy.dsn(postgres.dsn())
    admin_dsn = postgres.admin_dsn

    async def terminate_backend(pid: int) -> bool:  # (on this program's loop, not the fixture's)
        admin = await asyncpg.connect(admin_dsn)
        try:
            return bool(await admin.fetchval("SELECT pg_terminate_backend($1)", pid))
        finally:
            await admin.close()

    async def main() -> None:
        async with Pool(dsn, name="cancel-lost-close", min_size=1, max_size=1,
                        validate_after=None, telemetry=False) as pool:
            await _time_out_then_lose(pool, proxy, terminate_backend)
        # (asyncio.run cancels what is left here)

    # (the proxy's loop, this one, goes on serving meanwhile)
    await asyncio.to_thread(asyncio.run, main())
    await asyncio.sleep(1.5)  # past cancel_delay: the request was taken, or abandoned
    assert proxy.cancels_abandoned == 0, "the cancel request's socket was closed at the program's end"


async def test_copy_refused_then_the_close_read_leaves_no_unretrieved_future(
    proxy_to_postgres: FaultProxy, postgres: PostgresServer
) -> None:
    """As above, but the connection's close arrives while its holder still holds it (it logs
    the refusal, or goes on with other work, before releasing): closing it then sets the COPY's
    reply future's error before the pool retires the connection, and that future too must not
    be left unretrieved."""
    proxy = proxy_to_postgres
    proxy.close_delay = 1.0
    loop = asyncio.get_running_loop()
    reported: list[dict[str, Any]] = []
    loop.set_exception_handler(lambda _loop, context: reported.append(context))
    try:
        async with Pool(proxy.dsn(postgres.dsn()), name="copy-goodbye-late", min_size=1,
                        max_size=1, validate_after=None, telemetry=False) as pool:
            pid = await pool.fetchval("SELECT pg_backend_pid()")
            assert await postgres.terminate_backend(pid)
            await asyncio.sleep(0.3)  # the goodbye is read; the close comes late
            conn = await pool.acquire()
            try:
                with pytest.raises(asyncpg.InternalClientError):
                    await _copy_out(conn)
                async with asyncio.timeout(10):
                    while not conn.is_closed():  # the close arrives while it is held
                        await asyncio.sleep(0.05)
            finally:
                await pool.release(conn)
            assert await pool.fetchval("SELECT 2") == 2
        gc.collect()
        await asyncio.sleep(0.1)  # (the loop's handler is called from a callback)
    finally:
        loop.set_exception_handler(None)
    assert not reported, [context.get("message") for context in reported]


async def _time_out_then_lose(pool: Pool, proxy: FaultProxy,
                              terminate_backend: Callable[[int], Awaitable[bool]]) -> None:
    """A held connection's statement times out; once its cancel request is in flight (held by
    the proxy), the server ends the connection: the holder is told it was lost (or timed out)."""
    async def timed_out() -> None:
        async with pool.acquire() as conn:
            pid.set_result(conn.get_server_pid())
            await conn.fetchval("SELECT pg_sleep(20)", timeout=0.2)

    pid: asyncio.Future[int] = asyncio.get_running_loop().create_future()
    task = asyncio.create_task(timed_out())
    async with asyncio.timeout(10):
        while proxy.cancels_seen == 0:  # the request is in flight
            await asyncio.sleep(0.01)
    assert await terminate_backend(await pid)
    with pytest.raises((ConnectionLostError, TimeoutError)):
        async with asyncio.timeout(10):
            await task
