"""A fake asyncpg driver, so pool logic can be tested without a server, in milliseconds.

`FakeServer` stands for PostgreSQL (or the pooler) and its faults: logins that are refused, fail
authentication or hang; connections that die, loudly or silently. `FakeConnection` has the parts
of `asyncpg.Connection` the pool and its users touch, including the private ones
`asyncpool.connect.driver` reads, and it behaves like asyncpg where the pool depends on it: one
operation at a time, a cancelled or timed-out query is cancelled with a request of its own that
takes a round trip (the next operation waits for it), or where no request can arrive (no cancel
key, as from RDS Proxy, or ``cancel_requests="off"``: `FakeServer.cancel_key`) its connection is
closed, a Transaction whose BEGIN failed stays `_top_xact`, statements and transactions stop
working after `_pool_release_ctr` moves (asyncpg's own `ConnectionResource` check).

Use `install(monkeypatch)` (or `patched()`), then give the pool ``connect_kwargs={"fake_server":
server}``. Every await takes virtual time under `VirtualClockLoop`, so tests run instantly.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import math
import re
import selectors
import weakref
from collections.abc import Callable, Iterator
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any, cast

import asyncpg
from asyncpg.connresource import ConnectionResource

import asyncpool.pool.pool
from asyncpool.config import PoolConfig
from asyncpool.connect import driver
from asyncpool.connect.dsn import Target
from asyncpool.connect.failures import translate
from asyncpool.connect.startup import StartupPlan
from asyncpool.connect.tls import TlsSetting
from asyncpool.errors import AuthenticationError, ConnectError, PoolerExhaustedError
from asyncpool.observer import PoolObserver

if TYPE_CHECKING:
    import pytest

# asyncpg's resource check, with the private members the fakes use (not in asyncpg's types).
_Resource: Any = ConnectionResource

FAKE_TARGET = Target(host="fake", port=5432, user="app", database="app")


class FakeServer:
    """The database side: what logins do and which connections exist."""

    def __init__(self, *, latency: float = 0.001, login_latency: float = 0.003,
                 requests_outlive: bool = False) -> None:
        self.latency = latency
        self.login_latency = login_latency
        #: Connections as the real Connector's (`driver.cancel_aware_class`): every cancel
        #: request is sent from a task of its own (`driver._send_request`, through
        #: `fake_cancel_request`) that closing the connection does not cut short, and the
        #: pool's own requests (`driver.request_cancel`) reach the server. Off: asyncpg's
        #: plain class, whose request task a close cancels (`cancels_cut`).
        self.requests_outlive = requests_outlive
        #: How long a cancel request takes to be taken (None: `latency`; math.inf: never, a
        #: pooler that does not answer: the request ends by its own bound).
        self.cancel_latency: float | None = None
        #: cancel requests taken by the server (`requests_outlive` connections)
        self.cancels_taken = 0
        #: What a connection gets for cancelling: "sent" (BackendKeyData, as PostgreSQL and
        #: PgBouncer send it), "absent" (none: RDS Proxy; `backend_key` finds none), "off" (the
        #: key, but the pool's ``cancel_requests="off"``: the real Connector's class says so,
        #: `_asyncpool_cancels`). Without a deliverable key the real Connector's connections
        #: send no request and close themselves instead (`driver._cancel_or_terminate`);
        #: asyncpg's plain class (``requests_outlive=False``, what an untested asyncpg keeps)
        #: knows no "off", and sends its request with the key it has (pid 0 when absent),
        #: which the server ignores: it never reaches the fake server either way.
        self.cancel_key = "sent"
        #: "ok", "refuse" (transient ConnectError), "auth" (AuthenticationError), "hang"
        self.login_mode = "ok"
        #: logins are refused (PoolerExhaustedError, transient) while this many are open
        self.max_connections: int | None = None
        self.connections: list[FakeConnection] = []
        self.logins = 0
        #: cancel requests cut short by closing their connection (pgbouncer#801 crashes on it)
        self.cancels_cut = 0
        self._ids = itertools.count(1)

    def open_connections(self) -> list[FakeConnection]:
        return [c for c in self.connections if not c.is_closed()]

    async def login(self) -> FakeConnection:
        self.logins += 1
        await asyncio.sleep(self.login_latency)
        mode = self.login_mode
        if mode == "hang":
            await asyncio.get_running_loop().create_future()  # until cancelled
        if mode == "refuse":
            raise ConnectError(f"could not connect to {FAKE_TARGET}: the fake server refused the login")
        if mode == "auth":
            raise AuthenticationError(f"could not connect to {FAKE_TARGET}: authentication failed")
        if self.max_connections is not None and len(self.open_connections()) >= self.max_connections:
            raise PoolerExhaustedError(
                f"could not connect to {FAKE_TARGET}: no more connections allowed (max_client_conn)"
            )
        cls: type[FakeConnection] = FakeConnection
        if self.requests_outlive:
            cls = UncancellingFakeConnection if self.cancel_key == "off" else OutlivingFakeConnection
        conn = cls(self, next(self._ids))
        if self.cancel_key == "absent":  # (asyncpg keeps 0 for a key the server never sent)
            conn._protocol.backend_pid = conn._protocol.backend_secret = 0
        self.connections.append(conn)
        return conn

    async def take_cancel(self, pid: int) -> None:
        """A cancel request for the connection whose backend pid is `pid`: the statement it
        runs, if any, ends with QueryCanceledError once the request is taken."""
        delay = self.latency if self.cancel_latency is None else self.cancel_latency
        if math.isinf(delay):
            await asyncio.get_running_loop().create_future()  # never taken: until its bound
        await asyncio.sleep(delay)
        self.cancels_taken += 1
        for conn in self.connections:
            if conn._protocol.backend_pid == pid and not conn.is_closed():
                conn._cancelled_by_request()


class FakeConnector:
    """Stands in for `asyncpool.connect.connector.Connector`: same constructor, same surface."""

    def __init__(self, config: PoolConfig, observer: PoolObserver, *,
                 totals: Any = None) -> None:
        self.config = config
        self.observer = observer
        self.server: FakeServer = config.connect_kwargs["fake_server"]
        self.target = FAKE_TARGET
        self.credentials: Any = config.connect_kwargs.get("fake_credentials")
        self.statement_cache = None
        self.retire_reasons = False  # fake connections have no retire_reason
        self.startup = StartupPlan({})
        self.tls = TlsSetting("disable", "the fake driver")
        self.logged_in = False

    async def connect(self, cut_short: object = None) -> FakeConnection:
        if self.credentials is not None:  # read first, as the real connector does
            await self.credentials.password(self.target)
        return await self.server.login()

    def timed_out(self, exc: TimeoutError, cut_short: object) -> ConnectError:
        """The error for a login `connect_timeout` stopped (one host: no tries to name)."""
        return translate(exc, self.target, self.config.name, self.config.connect_timeout,
                         direct_tls=self.tls.direct_source, direct_tls_worked=self.logged_in)


class FakeCredentials:
    """A credentials provider that counts its calls."""

    requires_tls = False

    def __init__(self) -> None:
        self.warmed = 0
        self.closed = 0

    async def password(self, target: Target) -> str:
        return "fake"

    async def refresh(self, target: Target) -> bool:
        return False

    async def warm(self, target: Target) -> None:
        self.warmed += 1

    async def close(self) -> None:
        self.closed += 1


def install(monkeypatch: Any) -> None:
    """Make pools opened during the test use `FakeConnector`."""
    monkeypatch.setattr(asyncpool.pool.pool, "Connector", FakeConnector)


@contextlib.contextmanager
def patched() -> Iterator[None]:
    module: Any = asyncpool.pool.pool
    saved = module.Connector
    module.Connector = FakeConnector
    try:
        yield
    finally:
        module.Connector = saved


class _FakeProtocol:
    def __init__(self, conn: FakeConnection) -> None:
        self._conn = conn
        # BackendKeyData (a test sets both to 0 for a pooler that sends none, like RDS Proxy).
        self.backend_pid = 1000 + conn.ident
        self.backend_secret = 4242
        #: asyncpg's count of the queries sent (what ``max_queries`` compares with)
        self.queries_count = 0

    def _is_cancelling(self) -> bool:
        return self._conn._cancel_waiter is not None

    async def _wait_for_cancellation(self) -> None:
        waiter = self._conn._cancel_waiter
        if waiter is not None:
            await asyncio.shield(waiter)

    def is_in_transaction(self) -> bool:
        return self._conn._in_tx

    def is_connected(self) -> bool:
        return not self._conn._closed


class _ExclusiveSection:
    """asyncpg's ``_stmt_exclusive_section`` (an ``_Atomic``): `_acquired` while a statement
    runs (asyncpg holds it through ``_execute``; here, through every operation)."""

    def __init__(self, conn: FakeConnection) -> None:
        self._conn = conn

    @property
    def _acquired(self) -> int:
        return int(self._conn._op is not None)


class FakeConnection:
    """The parts of `asyncpg.Connection` the pool and its users touch."""

    def __init__(self, server: FakeServer, ident: int) -> None:
        self._server = server
        self.ident = ident
        self._loop = asyncio.get_running_loop()
        self._protocol = _FakeProtocol(self)
        self._top_xact: Any = None
        self._stmt_exclusive_section = _ExclusiveSection(self)
        self._pool_release_ctr = 0
        self._cancellations: set[asyncio.Task[Any]] = set()
        self._listeners: dict[str, set[Callable[..., Any]]] = {}
        self._log_listeners: set[Callable[..., Any]] = set()
        self._termination_listeners: set[Callable[..., Any]] = set()
        self._query_loggers: set[Callable[..., Any]] = set()
        self._closed = False
        self._in_tx = False
        self._op: asyncio.Future[None] | None = None
        self._cancel_waiter: asyncio.Future[None] | None = None
        self._silently_dead = False
        self._vanished = False
        self._goodbye = False
        #: a statement in the current transaction failed: COMMIT is answered ROLLBACK
        self._tx_failed = False
        self.queries: list[str] = []
        self.closed_how: str | None = None
        self.closing = False  # close() under way

    def __repr__(self) -> str:
        return f"<FakeConnection #{self.ident}{' closed' if self._closed else ''}>"

    # -- faults -------------------------------------------------------------------------------

    def die(self) -> None:
        """The server end went away and the driver noticed (socket closed)."""
        self._close("died")

    def die_silently(self) -> None:
        """The server end went away unnoticed: the next operation fails."""
        self._silently_dead = True

    def goodbye(self) -> None:
        """The server said goodbye (a FATAL such as ``terminating connection due to
        administrator command``) and closed the connection: a statement running gets the
        server's error, not a lost connection's."""
        self._goodbye = True
        self._close("goodbye")

    def vanish(self) -> None:
        """The path to the server went away without a word (a NAT or proxy forgot it): nothing
        is ever answered, and nothing says so; an operation ends only by its timeout."""
        self._vanished = True

    # -- lifecycle ----------------------------------------------------------------------------

    def is_closed(self) -> bool:
        return self._closed

    @property
    def _aborted(self) -> bool:  # asyncpg's flag set by terminate() (and by the faults here)
        return self._closed

    def terminate(self) -> None:
        self._close("terminated")

    async def close(self, *, timeout: float | None = None) -> None:
        if self._closed:
            return
        self.closing = True
        await asyncio.sleep(self._server.latency)  # Terminate message, socket close
        self._close("closed")

    def _close(self, how: str) -> None:
        if self._closed:
            return
        self._closed = True
        self.closed_how = how
        if self._op is not None and not self._op.done():
            self._op.set_exception(
                asyncpg.AdminShutdownError("terminating connection due to administrator command")
                if self._goodbye else
                asyncpg.ConnectionDoesNotExistError("connection was closed in the middle of operation")
            )
        for task in self._cancellations:
            if not task.done():
                if not driver.requests_outlive_close(self):
                    self._server.cancels_cut += 1
                task.cancel()
        if self._cancel_waiter is not None and not self._cancel_waiter.done():
            self._cancel_waiter.set_result(None)
        self._cancel_waiter = None
        for callback in list(self._termination_listeners):
            callback(self)
        self._listeners.clear()
        # As asyncpg's ``_cleanup`` in the real Connector's class (`driver._cleanup_retrieving`):
        # closed, terminated, or found lost.
        driver.cleaned_up(self)

    # -- queries ------------------------------------------------------------------------------

    async def _run(self, query: str, timeout: float | None = None) -> str:
        if self._closed:
            raise asyncpg.InterfaceError("cannot perform operation: connection is closed")
        if self._cancel_waiter is not None:
            timeout = await self._cancellation_done(timeout)
            if self._closed:  # (no key: the cancel closed it)
                raise asyncpg.InterfaceError("cannot perform operation: connection is closed")
        if self._op is not None:
            raise asyncpg.InterfaceError("cannot perform operation: another operation is in progress")
        loop = self._loop
        op: asyncio.Future[None] = loop.create_future()
        self._op = op
        self._protocol.queries_count += 1
        # "SELECT pg_sleep(s)" takes s seconds more, as on a server.
        slept = _SLEEP.match(query)
        delay = self._server.latency + (float(slept.group(1)) if slept else 0.0)
        timer = None if self._vanished else loop.call_later(delay, _resolve, op)
        try:
            async with asyncio.timeout(timeout):
                await op
        except (asyncio.CancelledError, TimeoutError):
            if timer is not None:
                timer.cancel()
            if not self._closed:
                self._start_cancel()
            raise
        finally:
            self._op = None
        if self._silently_dead:
            self._close("died")
            raise asyncpg.ConnectionDoesNotExistError("connection was closed in the middle of operation")
        self.queries.append(query)
        for logger in list(self._query_loggers):
            logger(query)
        return self._answer(query)

    def _answer(self, query: str) -> str:
        """The server's answer to `query` (its command tag), and what it does to the session."""
        word = query.split(None, 1)[0].upper() if query.strip() else ""
        if word in ("BEGIN", "START"):
            self._in_tx = True
            self._tx_failed = False
        elif word in ("COMMIT", "ROLLBACK", "END", "ABORT"):
            failed, self._tx_failed = self._tx_failed, False
            if self._in_tx and failed and word in ("COMMIT", "END"):
                self._in_tx = False
                return "ROLLBACK"  # (as a server answers the COMMIT of a failed transaction)
            self._in_tx = False
        elif query == FAILING_QUERY:
            self._tx_failed = self._in_tx
            raise asyncpg.DivisionByZeroError("division by zero")
        elif word == "UNLISTEN":
            self.queries.append("(unlistened)")
        return word or "EMPTY"

    async def _cancellation_done(self, timeout: float | None) -> float | None:
        """asyncpg's (0.32) before every operation: wait for a cancellation under way, within
        the operation's `timeout` (what is left of it is returned); one not over by then
        terminates the connection (the old statement may still run)."""
        loop = self._loop
        started = loop.time()
        try:
            async with asyncio.timeout(timeout):
                while (waiter := self._cancel_waiter) is not None:
                    if waiter.done():
                        await asyncio.sleep(0)  # (its done callbacks clear it)
                    else:
                        await asyncio.shield(waiter)
        except TimeoutError:
            self.terminate()
            raise
        if timeout is not None:
            timeout -= loop.time() - started
            if timeout <= 0:
                raise TimeoutError
        return timeout

    def _start_cancel(self) -> None:
        """asyncpg sends a CancelRequest on a connection of its own and waits for the reply."""
        loop = self._loop
        waiter: asyncio.Future[None] = loop.create_future()
        self._cancel_waiter = waiter

        async def cancel_request() -> None:
            await asyncio.sleep(self._server.latency)
            if not waiter.done():
                waiter.set_result(None)
            if self._cancel_waiter is waiter:
                self._cancel_waiter = None

        task = loop.create_task(cancel_request())
        self._cancellations.add(task)
        task.add_done_callback(self._cancellations.discard)

    def _cancelled_by_request(self) -> None:
        """The server took a cancel request: the statement running ends with its error."""
        op = self._op
        if op is not None and not op.done():
            op.set_exception(asyncpg.QueryCanceledError("canceling statement due to user request"))

    def is_in_transaction(self) -> bool:
        return self._in_tx

    async def execute(self, query: str, *args: Any, timeout: float | None = None) -> str:
        return await self._run(query, timeout)

    async def executemany(self, query: str, args: Any, *, timeout: float | None = None) -> None:
        await self._run(query, timeout)

    async def fetch(self, query: str, *args: Any, timeout: float | None = None,
                    record_class: type | None = None) -> list[Any]:
        await self._run(query, timeout)
        return [args]

    async def fetchrow(self, query: str, *args: Any, timeout: float | None = None,
                       record_class: type | None = None) -> Any:
        await self._run(query, timeout)
        return args

    async def fetchval(self, query: str, *args: Any, column: int = 0,
                       timeout: float | None = None) -> Any:
        await self._run(query, timeout)
        return args[column] if args else 1

    async def fetchmany(self, query: str, args: Any, *, timeout: float | None = None,
                        record_class: type | None = None) -> list[Any]:
        await self._run(query, timeout)
        return list(args)

    async def _copy(self, what: str, timeout: float | None) -> str:
        await self._run(f"COPY {what}", timeout)
        return "COPY 1"

    async def copy_from_query(self, query: str, *args: Any, output: Any,
                              timeout: float | None = None, **options: Any) -> str:
        return await self._copy(query, timeout)

    async def copy_from_table(self, table_name: str, *, output: Any,
                              timeout: float | None = None, **options: Any) -> str:
        return await self._copy(table_name, timeout)

    async def copy_to_table(self, table_name: str, *, source: Any,
                            timeout: float | None = None, **options: Any) -> str:
        return await self._copy(table_name, timeout)

    async def copy_records_to_table(self, table_name: str, *, records: Any,
                                    timeout: float | None = None, **options: Any) -> str:
        return await self._copy(table_name, timeout)

    def transaction(self, *, isolation: str | None = None, readonly: bool = False,
                    deferrable: bool = False) -> FakeTransaction:
        return FakeTransaction(self)

    async def prepare(self, query: str, **kwargs: Any) -> FakeStatement:
        await self._run(f"PARSE {query}")
        return FakeStatement(self, query)

    def cursor(self, query: str, *args: Any, **kwargs: Any) -> Any:
        raise NotImplementedError("the fake driver has no cursors")

    async def add_listener(self, channel: str, callback: Callable[..., Any]) -> None:
        self._listeners.setdefault(channel, set()).add(callback)
        await self._run(f"LISTEN {channel}")

    def add_log_listener(self, callback: Callable[..., Any]) -> None:
        self._log_listeners.add(callback)

    def add_query_logger(self, callback: Callable[..., Any]) -> None:
        self._query_loggers.add(callback)

    def remove_query_logger(self, callback: Callable[..., Any]) -> None:
        self._query_loggers.discard(callback)

    @contextlib.contextmanager
    def query_logger(self, callback: Callable[..., Any]) -> Iterator[None]:
        """asyncpg's: bound to this connection, whoever holds it when it is entered."""
        self.add_query_logger(callback)
        try:
            yield
        finally:
            self.remove_query_logger(callback)

    def add_termination_listener(self, callback: Callable[..., Any]) -> None:
        self._termination_listeners.add(callback)

    def notify(self, channel: str, payload: str) -> int:
        """The server delivers a notification; returns how many callbacks saw it."""
        callbacks = list(self._listeners.get(channel, ()))
        for callback in callbacks:
            callback(self, 0, channel, payload)
        return len(callbacks)


_SLEEP = re.compile(r"SELECT pg_sleep\(([0-9.]+)\)")
#: A statement the fake server fails (DivisionByZeroError); in a transaction, it fails it.
FAILING_QUERY = "SELECT 1/0"


class OutlivingFakeConnection(FakeConnection):
    """A fake connection as the real Connector makes them (`driver.cancel_aware_class`): its
    cancel requests (asyncpg's for a timed-out or cancelled statement, and the pool's own,
    `driver.request_cancel`) are sent by `driver._send_request` from tasks of their own, which
    a close does not cut short, through `fake_cancel_request` (install with
    `patched_cancel_requests`)."""

    # What `driver.requests_outlive_close` reads: the real class's request body.
    _cancel = driver._cancel_as_connected

    def __init__(self, server: FakeServer, ident: int) -> None:
        super().__init__(server, ident)
        # Where `driver._send_request` sends the request: the fake server's, by this key.
        self._addr = f"/nonexistent/asyncpool-fake-{id(server)}/.s.PGSQL.5432"
        self._params = SimpleNamespace(ssl=None, sslmode=None)
        self._config = SimpleNamespace(command_timeout=None)
        _SERVERS[self._addr] = server

    def _start_cancel(self) -> None:
        """asyncpg's protocol asking to cancel (``_request_cancel``), through the real class's
        `driver._cancel_or_terminate`: where a request can arrive, the request task
        (`driver._cancel_as_connected`, tracked with its waiter); where none can (no
        BackendKeyData, ``cancel_requests="off"``), none is sent and the connection is
        terminated on the next turn of the loop. Until then it is still cancelling: asyncpg's
        ``cancel_waiter`` waits for the statement's end, which only the close brings."""
        loop = self._loop
        sent: asyncio.Future[None] = loop.create_future()
        if driver.cancel_deliverable(self):
            self._cancel_waiter = sent

            def taken(_: object) -> None:
                if self._cancel_waiter is sent:
                    self._cancel_waiter = None

            sent.add_done_callback(taken)
        else:
            self._cancel_waiter = loop.create_future()  # (completed by `_close`)
        driver._cancel_or_terminate(self, sent)


class UncancellingFakeConnection(OutlivingFakeConnection):
    """The real Connector's class for ``cancel_requests="off"``: it has BackendKeyData but never
    sends a cancel request (`driver.cancel_deliverable`)."""

    _asyncpool_cancels = False


_SERVERS: weakref.WeakValueDictionary[str, FakeServer] = weakref.WeakValueDictionary()


async def fake_cancel_request(*, loop: Any, addr: Any, params: Any, backend_pid: int,
                              backend_secret: int) -> None:
    """asyncpg's ``connect_utils._cancel`` for fake connections: the fake server takes it."""
    server = _SERVERS.get(addr)
    if server is None:
        raise ConnectionRefusedError(f"no fake server at {addr}")
    await server.take_cancel(backend_pid)


@contextlib.contextmanager
def patched_cancel_requests() -> Iterator[None]:
    """Send `OutlivingFakeConnection`'s cancel requests to its fake server."""
    from asyncpg import connect_utils

    module: Any = connect_utils
    saved = module._cancel
    module._cancel = fake_cancel_request
    try:
        yield
    finally:
        module._cancel = saved


def _resolve(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)


class FakeTransaction(_Resource):  # type: ignore[misc]
    """Like asyncpg's Transaction: BEGIN is tracked before it runs; released -> InterfaceError."""

    __slots__ = ("_top",)

    def __init__(self, conn: FakeConnection) -> None:
        super().__init__(cast(Any, conn))
        self._top = False

    async def start(self) -> None:
        self._check_conn_validity("start")
        conn: FakeConnection = self._connection
        if conn._top_xact is None:
            self._top = True
            conn._top_xact = self  # kept if BEGIN fails, as asyncpg does
            await conn._run("BEGIN")
        else:
            await conn._run("SAVEPOINT sp")

    async def commit(self) -> None:
        self._check_conn_validity("commit")
        conn: FakeConnection = self._connection
        # Through execute(), as asyncpg's: the pool reads the command tag there (`commit`).
        await conn.execute("COMMIT" if self._top else "RELEASE SAVEPOINT sp")
        if self._top:
            conn._top_xact = None

    async def rollback(self) -> None:
        self._check_conn_validity("rollback")
        conn: FakeConnection = self._connection
        await conn._run("ROLLBACK" if self._top else "ROLLBACK TO SAVEPOINT sp")
        if self._top:
            conn._top_xact = None


class FakeStatement(_Resource):  # type: ignore[misc]
    __slots__ = ("_query",)

    def __init__(self, conn: FakeConnection, query: str) -> None:
        super().__init__(cast(Any, conn))
        self._query = query

    async def fetchval(self, *args: Any) -> Any:
        self._check_conn_validity("fetchval")
        await self._connection._run(f"EXECUTE {self._query}")
        return args[0] if args else 1


# -- a virtual clock ----------------------------------------------------------------------------


class _VirtualSelector(selectors.SelectSelector):
    """Never sleeps: when the loop would wait for its next timer, the clock jumps to it."""

    def __init__(self) -> None:
        super().__init__()
        self.loop: VirtualClockLoop | None = None

    def select(self, timeout: float | None = None) -> list[tuple[selectors.SelectorKey, int]]:
        ready = super().select(0)
        if ready:
            return ready
        if timeout is None:
            raise RuntimeError("virtual clock: nothing is scheduled and nothing is ready: every "
                               "task waits forever")
        if timeout > 0 and self.loop is not None:
            self.loop.now += timeout
        return []


class VirtualClockLoop(asyncio.SelectorEventLoop):
    """An event loop whose clock advances only when every task waits for a timer."""

    def __init__(self) -> None:
        self.now = 0.0
        selector = _VirtualSelector()
        super().__init__(selector)
        selector.loop = self
        self.errors: list[dict[str, Any]] = []
        self.set_exception_handler(lambda loop, context: self.errors.append(context))

    def time(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        """Run every task until the clock has moved `seconds` on."""
        self.run_until_complete(asyncio.sleep(seconds))

    def settle(self, rounds: int = 200) -> None:
        """Run what is ready now, without moving the clock."""

        async def drain() -> None:
            for _ in range(rounds):
                await asyncio.sleep(0)
                if not self._ready:  # type: ignore[attr-defined]
                    return

        self.run_until_complete(drain())


def run(coro: Any, *, loop: VirtualClockLoop | None = None) -> Any:
    """Run `coro` to completion on a fresh virtual-clock loop (closed afterwards)."""
    own = loop is None
    loop = loop or VirtualClockLoop()
    try:
        return loop.run_until_complete(coro)
    finally:
        if own:
            loop.run_until_complete(loop.shutdown_asyncgens())
            loop.close()


def fake_pool(server: FakeServer, **options: Any) -> asyncpool.pool.pool.Pool:
    """A pool on `server` (call `install` or `patched` first); telemetry off unless asked."""
    options.setdefault("name", "unit")
    options.setdefault("telemetry", False)
    kwargs = dict(options.pop("connect_kwargs", {}))
    kwargs["fake_server"] = server
    return asyncpool.pool.pool.Pool(connect_kwargs=kwargs, **options)


def leak_report(caplog: pytest.LogCaptureFixture, coro: Any) -> tuple[str, list[str]]:
    """Run `coro` (on a fresh virtual-clock loop) with the leak reports captured, and return
    `leak_site` of the first one."""
    with caplog.at_level(logging.WARNING, logger="asyncpool.leaks"):
        run(coro)
    return leak_site(caplog.records)


def leak_site(records: list[logging.LogRecord]) -> tuple[str, list[str]]:
    """The acquire site of the first leak report among `records`, and the function names of its
    frames, outermost first."""
    record = next(r for r in records if "Acquired at" in r.getMessage())
    site: str = record.__dict__["asyncpool_acquire_site"]
    names = [line.split(" in ")[-1] for line in site.splitlines() if line.startswith("  File")]
    return site, names
