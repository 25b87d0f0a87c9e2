"""SQLAlchemy's async engine on an asyncpool pool.

::

    pool = asyncpool.Pool(dsn, prepared_statements="unnamed")   # or "off", or "on"
    engine = create_async_engine(pool)
    Session = async_sessionmaker(engine, expire_on_commit=False)

    async with Session() as session, session.begin():
        session.add(Item(name="x"))

Each SQLAlchemy connection is a checkout of `pool`: SQLAlchemy keeps no connections of its own
(its pool, `LendingPool`, keeps only its bookkeeping between checkouts). A connection goes back
to `pool` when SQLAlchemy returns it, and is discarded, its slot freed, when SQLAlchemy
invalidates it. Statements run as ``conn.fetch()`` does, not through ``prepare()``, so they follow
the pool's ``prepared_statements`` mode: ``"off"`` stays pooler-safe, ``"on"`` uses asyncpg's
statement cache (PgBouncer >= 1.21), and ``"unnamed"`` costs one round trip per repeated
statement. No type codec is set on the pool's connections: JSON is decoded by SQLAlchemy's own
result processing (json inside a record, ``ROW()`` or a composite type, stays JSON text, as
nothing after asyncpg knows a record's field types). asyncpool's errors reach the caller as
the ``__cause__`` (and ``.orig``) of SQLAlchemy's exception. See docs/sqlalchemy.md.

SQLAlchemy 2.0 and 2.1 are supported.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import sys
import weakref
from collections import deque
from collections.abc import Callable
from contextvars import ContextVar
from types import FrameType
from typing import Any, ClassVar

import asyncpg

from asyncpool.connect import driver
from asyncpool.connect.failures import broken_connection_error, lost_connection_hint
from asyncpool.errors import (
    ConnectionLeakedError,
    ConnectionLostError,
    PoolClosedError,
    PoolError,
    missing_dependency,
)
from asyncpool.pool import Pool
from asyncpool.pool.checkout import AcquireContext
from asyncpool.pool.connection import PooledConnection
from asyncpool.pool.leaks import report_dropped
from asyncpool.pool.lease import ACTIVE, Site
from asyncpool.pool.slow_checkout import UNSET

try:
    import sqlalchemy
    from sqlalchemy import event as sa_event
    from sqlalchemy import exc as sa_exc
    from sqlalchemy import pool as sa_pool
    from sqlalchemy.dialects import registry
    from sqlalchemy.dialects.postgresql import asyncpg as sa_asyncpg
    from sqlalchemy.dialects.postgresql import json as pg_json
    from sqlalchemy.dialects.postgresql.base import PGDialect
    from sqlalchemy.ext.asyncio import AsyncEngine
    from sqlalchemy.ext.asyncio import create_async_engine as _sa_create_async_engine
    from sqlalchemy.sql import sqltypes
    from sqlalchemy.util import concurrency
except ModuleNotFoundError as exc:
    raise missing_dependency(exc, __name__, "'asyncpool-pg[sqlalchemy]'") from exc

__all__ = ["AsyncpoolDialect", "LendingPool", "create_async_engine"]

#: SQLAlchemy 2.0 keeps some adapter state under other names than 2.1.
SQLALCHEMY_20 = sqlalchemy.__version__.startswith("2.0.")
_await: Callable[[Any], Any] = getattr(concurrency, "await_", None) or concurrency.await_only

# Frames of these packages are not the application's: a leak report names the first other one.
_LIBRARY_PREFIXES = ("sqlalchemy.", "asyncpool.", "contextlib", "asyncio.", "greenlet",
                     "starlette.", "fastapi.", "anyio.")
_ROWCOUNT = re.compile(r"(?:SELECT|UPDATE|DELETE|MERGE|INSERT \d+) (\d+)")
# SQLSTATEs after which the server has closed the session: connection exceptions (class 08),
# admin_shutdown, crash_shutdown, cannot_connect_now (not 57014, a cancelled statement).
_GONE_CLASSES = ("08",)
_GONE_STATES = ("57P01", "57P02", "57P03")
_OperationalError: type[Exception] = sa_asyncpg.AsyncAdapt_asyncpg_dbapi.OperationalError
_InterfaceError: type[Exception] = sa_asyncpg.AsyncAdapt_asyncpg_dbapi.InterfaceError
# SQLAlchemy's adapter classes, subclassed below, differ between 2.0 and 2.1 (and are partly
# typed in 2.1 only): the code below treats them as untyped.
_CursorBase: Any = sa_asyncpg.AsyncAdapt_asyncpg_cursor
_ConnectionBase: Any = sa_asyncpg.AsyncAdapt_asyncpg_connection
_DBAPIBase: Any = sa_asyncpg.AsyncAdapt_asyncpg_dbapi
_DialectBase: Any = sa_asyncpg.PGDialect_asyncpg


def create_async_engine(pool: Pool, **engine_kwargs: Any) -> AsyncEngine:
    """An `AsyncEngine` whose connections are checkouts of `pool`.

    `engine_kwargs` go to SQLAlchemy's ``create_async_engine`` (``echo``,
    ``isolation_level``, ``json_serializer``, ``execution_options``...). Connection options
    (DSN, credentials, timeouts, statement mode) belong to the pool, and SQLAlchemy's own pool
    options do not apply: passing ``poolclass``, ``pool_size``, ``creator``,
    ``async_creator`` or a non-empty ``connect_args`` raises `sqlalchemy.exc.ArgumentError`,
    which names the pool's option to set instead.

    ``engine.dispose()`` does not close the pool: close it yourself (``await pool.close()``).
    The pool opens on first use if it is not open yet.
    """
    if not isinstance(pool, Pool):
        # (A DSN or URL is the likeliest: say where it goes, without showing it.)
        hint = (": the DSN goes to the pool, create_async_engine(asyncpool.Pool(dsn))"
                if isinstance(pool, (str, sqlalchemy.engine.URL)) else "")
        raise sa_exc.ArgumentError(
            f"create_async_engine() takes an asyncpool.Pool, got {type(pool).__name__}{hint}")
    if engine_kwargs.get("connect_args") == {}:
        del engine_kwargs["connect_args"]  # (nothing to refuse: config code that always passes it)
    taken = sorted(set(engine_kwargs) & _INSTEAD.keys())
    if taken:
        instead = [_INSTEAD[option] for option in taken if option != "connect_args"]
        if "connect_args" in taken:
            arguments = engine_kwargs["connect_args"]
            keys = sorted(arguments) if isinstance(arguments, dict) else []
            instead += [f"connect_args {key!r}: " + _CONNECT_ARGS_INSTEAD.get(
                key, "the asyncpool.Pool's option of that name, or its connect_kwargs")
                for key in keys] or [_INSTEAD["connect_args"]]
        raise sa_exc.ArgumentError(
            f"asyncpool's SQLAlchemy engine: {', '.join(taken)} cannot be set; the pool "
            f"{pool.name!r} owns the connections. Instead: {'; '.join(instead)}")
    if engine_kwargs.get("native_inet_types") is False:
        raise sa_exc.ArgumentError(
            "asyncpool's SQLAlchemy engine: native_inet_types=False needs a text codec for "
            "inet on every connection of the pool; not supported")
    return _sa_create_async_engine(
        "postgresql+asyncpool://", poolclass=LendingPool, asyncpool=pool,
        connect_args={"asyncpool": pool}, **engine_kwargs,
    )


#: What replaces each SQLAlchemy pool option (and asyncpg's ``connect_args``, as SQLAlchemy's
#: asyncpg and PgBouncer recipes set them): what to write, rather than only what not to.
_INSTEAD = {
    "poolclass": "poolclass: nothing (SQLAlchemy keeps no connection between sessions here, as "
                 "with NullPool; pool sizes are the asyncpool.Pool's)",
    "pool": "pool: nothing (the engine's pool is the asyncpool.Pool given)",
    "pool_size": "pool_size: Pool(max_size=...)",
    "max_overflow": "max_overflow: Pool(max_size=...), which has no overflow",
    "pool_timeout": "pool_timeout: Pool(acquire_timeout=...)",
    "pool_recycle": "pool_recycle: Pool(max_lifetime=...)",
    "pool_use_lifo": "pool_use_lifo: nothing (the pool lends its most recently used connection)",
    "creator": "creator: the asyncpool.Pool's DSN and credentials",
    "async_creator": "async_creator: the asyncpool.Pool's DSN and credentials",
    "connect_args": "connect_args: the asyncpool.Pool's options",
}
_STATEMENT_CACHE = ("nothing (SQLAlchemy's prepared-statement cache is off here; statements follow "
                    "Pool(prepared_statements=...), whose default \"unnamed\" is safe behind "
                    "any pooler)")
_CONNECT_ARGS_INSTEAD = {
    "statement_cache_size": _STATEMENT_CACHE,
    "prepared_statement_cache_size": _STATEMENT_CACHE,
    "prepared_statement_name_func": "Pool(prepared_statements=\"on\") behind PgBouncer >= 1.21 "
                                    "(or the default \"unnamed\", behind any pooler)",
    "server_settings": "Pool(server_settings=...), which behind a pooler also sets in each "
                       "transaction the ones the pooler does not keep",
    "command_timeout": "Pool(command_timeout=...)",
    "timeout": "Pool(connect_timeout=...)",
    "ssl": "Pool(ssl=...)",
}


# -- errors -----------------------------------------------------------------------------------

_error_classes: dict[type[PoolError], type[Exception]] = {}


def _dbapi_error(error: PoolError, message: str | None = None) -> Exception:
    """A DB-API error SQLAlchemy wraps (its ``.orig`` and ``__cause__``) that is also an
    instance of `error`'s asyncpool class, with the same message and attributes."""
    kind = type(error)
    cls = _error_classes.get(kind)
    if cls is None:
        base = _InterfaceError if issubclass(kind, ConnectionLeakedError) else _OperationalError
        cls = type(kind.__name__, (base, kind), {"__module__": __name__,
                                                 "__doc__": kind.__doc__})
        _error_classes[kind] = cls
    translated = cls(str(error) if message is None else message)
    translated.__dict__.update(error.__dict__)
    if not SQLALCHEMY_20:
        translated.orig = error  # type: ignore[attr-defined]
    return translated


def _lost(conn: PooledConnection, pool: Pool, error: BaseException) -> Exception:
    message = (
        f"pool {pool.name!r}: the connection to {pool.target} was lost while in use "
        f"({type(error).__name__}: {error}).{lost_connection_hint(error)} An open transaction "
        "was not committed (if it was lost during COMMIT, that commit's outcome is unknown). The "
        "pool replaced the connection; retry if the work is idempotent."
    )
    return _dbapi_error(ConnectionLostError(message))


def _translate(conn: PooledConnection, pool: Pool, error: BaseException) -> Exception | None:
    """asyncpool's error for `error`, as a DB-API error, or None if it is not the pool's."""
    if isinstance(error, PoolError):
        return _dbapi_error(error)
    try:
        raw = conn.raw
    except PoolError as gone:  # reclaimed as a leak, pool closed, or already given back
        return _dbapi_error(gone)
    sqlstate = getattr(error, "sqlstate", None) or ""
    # The holder's own errors and time limits go on, as in the core pool (`end_checkout`).
    if (broken_connection_error(error) and raw.is_closed()) or (
            isinstance(error, asyncpg.PostgresError)
            and (sqlstate[:2] in _GONE_CLASSES or sqlstate in _GONE_STATES)):
        return _lost(conn, pool, error)
    return None


# -- the DB-API adapter -----------------------------------------------------------------------


class _Cursor(_CursorBase):  # type: ignore[misc]
    """Runs each statement as ``conn.fetch()`` does: through the pool's statement mode, with no
    ``prepare()`` round trip (server-side cursors keep SQLAlchemy's own path)."""

    async def _prepare_and_execute(self, operation: str, parameters: Any) -> None:
        adapt: _Connection = self._adapt_connection
        async with adapt._execute_mutex:
            if not adapt._in_transaction():
                await adapt._start_transaction()
            try:
                await adapt._check_type_cache_invalidation(self._invalidate_schema_cache_asof)
                rows, status, attributes = await driver.execute_described(
                    adapt._connection.raw, operation, parameters or ())
            except Exception as error:
                await _settle(adapt._connection, error)
                self._handle_exception(error)
            description = [
                (attr.name, attr.type.oid, None, None, None, None, None) for attr in attributes
            ] or None
            found = _ROWCOUNT.match(status or "")
            rowcount = int(found.group(1)) if found else -1
            if SQLALCHEMY_20:
                self.description = description
                self.rowcount = rowcount
            else:
                self._description = description
                self._rowcount = rowcount
            self._rows = deque(rows)


_ServerSideCursorBase: Any = sa_asyncpg.AsyncAdapt_asyncpg_ss_cursor


class _ServerSideCursor(_ServerSideCursorBase):  # type: ignore[misc]
    """SQLAlchemy's server-side cursor (``stream()``, ``yield_per``), whose fetches' errors go
    through the connection's translation as the other paths' do: a leak reclaim under a stream
    is `ConnectionLeakedError`, not asyncpg's ``QueryCanceledError`` raised bare."""

    def _buffer_rows(self) -> None:
        try:
            super()._buffer_rows()
        except Exception as error:
            self._adapt_connection._handle_exception(error)

    def fetchmany(self, size: int | None = None) -> Any:
        try:
            return super().fetchmany(size)
        except Exception as error:
            self._adapt_connection._handle_exception(error)

    def fetchall(self) -> Any:
        try:
            return super().fetchall()
        except Exception as error:
            self._adapt_connection._handle_exception(error)


async def _settle(conn: PooledConnection, error: Exception) -> None:
    """After a client-side error, give a connection the server is closing a moment to show it.

    When the server ends a session between two statements (pg_terminate_backend, a restart), its
    FATAL error can reach asyncpg before the end of the stream does: the next statement then
    fails with "another operation is in progress" on a connection not yet seen closed. Waiting
    (at most 50 ms, on this error path only) lets it be reported as the lost connection it is.
    """
    if not isinstance(error, asyncpg.InterfaceError | asyncpg.InternalClientError | OSError):
        return
    for _ in range(10):
        try:
            if conn.raw.is_closed():
                return
        except PoolError:
            return
        await asyncio.sleep(0.005)


class _Connection(_ConnectionBase):  # type: ignore[misc]
    """One checkout of the pool, as SQLAlchemy's DB-API connection."""

    _asyncpool: Pool
    _connection: PooledConnection
    #: SQLAlchemy invalidated this connection because a cancellation cut its work short
    #: (`_invalidated`), not because it was lost: `terminate` gives it back to be reset.
    _cut_short: bool
    #: SQLAlchemy terminates this connection because the garbage collector found it not
    #: returned (`_before_terminate`), not because it was lost: `terminate` gives it back.
    _dropped: bool
    #: SQLAlchemy terminates this connection because it was detached from SQLAlchemy's pool
    #: (``Connection.detach()``) and is now closed, not because it was lost: `terminate`
    #: closes it alone.
    _detached: bool

    def __init__(self, dbapi: Any, connection: PooledConnection, pool: Pool) -> None:
        # SQLAlchemy's own statement cache stays off: statements go through the pool's mode.
        super().__init__(dbapi, connection, prepared_statement_cache_size=0)
        self._asyncpool = pool
        self._cut_short = False
        self._dropped = self._detached = False

    def _in_transaction(self) -> bool:
        return bool(self._started) if SQLALCHEMY_20 else self._transaction is not None

    async def _start_transaction(self) -> None:
        """BEGIN, then the pool's `server_settings` that a pooler does not keep from the login
        (set for this transaction, as ``pool.transaction()`` sets them): without them, behind
        PgBouncer, a session's statements ran with the server's ``search_path``."""
        await super()._start_transaction()
        slots = self._asyncpool._slots
        settings = slots.transaction_sql
        if settings is not None and self._in_transaction():
            try:
                await self._connection.raw.execute(settings)
            except Exception as error:
                await _settle(self._connection, error)
                refused = slots.refused_setting(error, "a transaction SQLAlchemy began")
                if isinstance(refused, PoolError):
                    # The connection is sound: the transaction stays, for SQLAlchemy to roll
                    # back (`_handle_exception` would forget it, as for a lost connection).
                    raise _dbapi_error(refused) from error
                self._handle_exception(error)

    def _forget_transaction(self) -> None:
        self._transaction = None
        if SQLALCHEMY_20:
            self._started = False

    def cursor(self, server_side: bool = False) -> Any:
        if server_side:
            return _ServerSideCursor(self)
        return _Cursor(self)

    def _handle_exception(self, error: Exception) -> Any:
        if type(error) in _error_classes.values():
            raise error  # translated already (seen again by a server-side cursor's fetch)
        translated = _translate(self._connection, self._asyncpool, error)
        if translated is not None:
            self._forget_transaction()
            raise translated from error
        super()._handle_exception(error)

    def close(self) -> None:
        """Give the connection back to the pool (a broken one is replaced there)."""
        try:
            self.rollback()
        finally:
            self._forget_transaction()
            _await(self._connection.close())

    def _lend(self, connection: PooledConnection) -> None:
        """Take the next checkout's connection (LendingPool keeps this adapter between them)."""
        self._forget_transaction()
        self._connection = connection
        self._cut_short = self._dropped = self._detached = False

    def _give_back(self) -> None:
        """Return this checkout's connection to the pool; the adapter waits for the next one."""
        self._forget_transaction()
        if concurrency.in_greenlet():
            _await(self._connection.close())
        else:
            _give_back_unawaited(self._asyncpool, self._connection)

    def terminate(self) -> None:
        """Discard the connection: the pool closes it (waiting for a cancel request in flight
        first), frees its slot and checks each idle one before its next checkout, as after a
        lost connection. One invalidated because a cancellation cut it short, and one the
        garbage collector found not given back, are given back to be reset instead; one
        detached from SQLAlchemy's pool is closed alone. What SQLAlchemy calls when it
        invalidates a connection, closes a detached one, and when the garbage collector finds
        one not given back, in whatever thread it runs: off the pool's loop, it is done on
        that loop (the transport and the pool's line of waiters are the loop's alone)."""
        loop = self._asyncpool._slots.loop
        if loop is not None and asyncio._get_running_loop() is not loop:
            if not loop.is_closed():  # (closed: the pool's terminate() ends the connection)
                loop.call_soon_threadsafe(self.terminate)
            return
        self._forget_transaction()
        conn: PooledConnection = self._connection
        lease = conn._lease
        cut_short, self._cut_short = self._cut_short, False
        dropped, self._dropped = self._dropped, False
        detached, self._detached = self._detached, False
        if detached and lease.state is ACTIVE:
            # Detached on purpose (a connection whose session state must not reach another
            # holder): closed, as SQLAlchemy's own pools close it, and nothing more. Nothing
            # says the idle connections were lost with it.
            self._asyncpool._slots.retire(lease.record, "detached from SQLAlchemy's pool",
                                          graceful=True)
            return
        if dropped:
            # The application let go of it without closing it (`conn = await
            # engine.connect()`, an AsyncSession never closed): nothing says it is broken.
            # Closing it cost a login, and checking every idle one as after a lost connection
            # a round trip each. The collector runs wherever an allocation sets it off, in the
            # middle of the pool's own bookkeeping too: given back at the loop's next turn.
            if loop is not None:
                loop.call_soon(_give_back_dropped, self._asyncpool, conn)
            return
        if cut_short:
            # A cancellation (a streaming response whose client left, uvicorn's shutdown,
            # LambdaDeadline) stopped a statement or a rollback: SQLAlchemy cannot tell what
            # state that left, the pool can. Returned as `async with pool.acquire()` returns a
            # connection its holder was cancelled in: the statement cancelled on the server
            # and the transaction rolled back in a task of the pool's, or the connection
            # closed if that fails. Not a login for every client that leaves, nor a check of
            # every idle connection as after a lost one.
            _give_back_unawaited(self._asyncpool, conn)
            return
        if lease.state is ACTIVE:
            # SQLAlchemy invalidates on a lost connection (or a ping that failed): its
            # reconnect, another checkout, must not take an idle one lost with it unchecked.
            self._asyncpool._slots.retire_lost(lease.record, "invalidated by SQLAlchemy")


def _invalidated(dbapi_connection: Any, record: Any, exception: BaseException | None) -> None:
    """SQLAlchemy's ``invalidate`` event, fired before it terminates the connection: note
    whether a cancellation, not a lost connection, is the reason (SQLAlchemy invalidates on any
    exit exception that cuts a statement or a reset short)."""
    if isinstance(dbapi_connection, _Connection):
        dbapi_connection._cut_short = isinstance(exception, asyncio.CancelledError)


def _before_terminate(dbapi_connection: Any, record: Any, reset_state: Any) -> None:
    """SQLAlchemy's ``reset`` event, which says (``terminate_only``) when it will terminate a
    connection that was not lost (it is not fired for one invalidated), and why: with
    ``asyncio_safe`` False, the garbage collector found it not returned (SQLAlchemy 2.0 and
    2.1 document both); else it was detached from SQLAlchemy's pool and is being closed. Noted
    for `_Connection.terminate`, which SQLAlchemy calls next."""
    if reset_state.terminate_only and isinstance(dbapi_connection, _Connection):
        if reset_state.asyncio_safe:
            dbapi_connection._detached = True
        else:
            dbapi_connection._dropped = True


def _give_back_dropped(pool: Pool, conn: PooledConnection) -> None:
    """Take back a connection its SQLAlchemy connection was collected with: reported as a leak,
    and returned as ``raw_connection().close()`` returns one (an open transaction rolled back
    in a task of the pool's, closed if that fails); the other idle connections are left as
    they are. Nothing happens if the pool took it back meanwhile (leak reclaim, close)."""
    report_dropped(pool._slots, conn._lease)
    _give_back_unawaited(pool, conn)


def _give_back_unawaited(pool: Pool, conn: PooledConnection) -> None:
    """Return `conn` where nothing can be awaited (outside SQLAlchemy's greenlet: a plain
    ``engine.raw_connection().close()``, as SQLAlchemy's QueuePool allows): at once if it
    needs no round trip, else reset by a task of the pool's. Off the pool's loop (a session
    collected in another thread) it stays with its checkout, which leak detection reclaims."""
    lease = conn._lease
    slots = pool._slots
    if lease.state is not ACTIVE or asyncio._get_running_loop() is not slots.loop:
        return
    if slots.checkin_nowait(lease):
        slots._spawn(slots.checkin(lease))


def _application_frame(frame: FrameType | None) -> FrameType | None:
    """The innermost frame that is not SQLAlchemy's, asyncpool's or asyncio's: where the
    application asked for the connection (leak reports start there)."""
    first = frame
    while frame is not None:
        module = frame.f_globals.get("__name__", "")
        if not (module + ".").startswith(_LIBRARY_PREFIXES):
            return frame
        frame = frame.f_back
    return first


async def _checkout(pool: Pool) -> PooledConnection:
    await pool.open(wait=False)  # no-op once open
    frame = _application_frame(sys._getframe())
    conn: PooledConnection = await AcquireContext(pool._slots, UNSET, frame)
    if frame is not None:
        # Kept past the function that asked (a session not closed): its frame, and the session
        # in it, must stay collectable for SQLAlchemy to give the connection back.
        conn._lease.frame = Site(frame)
    return conn


class _DBAPI(_DBAPIBase):  # type: ignore[misc]
    def connect(self, *args: Any, **kwargs: Any) -> _Connection:
        pool = kwargs.pop("asyncpool", None)
        if not isinstance(pool, Pool) or args or kwargs:
            raise sa_exc.ArgumentError(
                "the postgresql+asyncpool dialect connects only through "
                "asyncpool.integrations.sqlalchemy.create_async_engine(pool)")
        conn = _LENT.get()
        if conn is None:
            conn = _lend_from(pool)
        else:
            _LENT.set(None)  # (taken: a second connect in this context checks out its own)
        return _Connection(self, conn, pool)


#: A connection `LendingPool._do_get` checked out before making the record that takes it.
_LENT: ContextVar[PooledConnection | None] = ContextVar("asyncpool_lent", default=None)


def _lend_from(pool: Pool) -> PooledConnection:
    try:
        conn: PooledConnection = _await(_checkout(pool))
    except PoolError as error:
        raise _dbapi_error(error) from error
    return conn


class LendingPool(sa_pool.Pool):
    """SQLAlchemy's pool over an asyncpool pool: it keeps SQLAlchemy's connection records and
    their DB-API adapters between checkouts, and lends each checkout a connection of the
    asyncpool pool (given back on return). What SQLAlchemy would otherwise build and tear down
    for every session with ``NullPool`` (a record, an adapter, the connect events) is built once
    per concurrent session.

    A record invalidated by SQLAlchemy (a lost connection) has had its connection discarded;
    its next checkout makes a new adapter through the creator. Records kept: at most the pool's
    ``max_size``. The ``connect`` event fires once per server connection the engine is lent
    (as SQLAlchemy's own pools fire it once per DB-API connection), not per checkout.
    QueuePool's ``size()``, ``checkedin()``, ``checkedout()``, ``overflow()``, ``timeout()`` and
    ``status()`` read the asyncpool pool (docs/sqlalchemy.md).
    """

    def __init__(self, creator: Any, asyncpool: Pool | None = None, **kwargs: Any) -> None:
        # Not keyword-only: create_engine() passes a pool class only the arguments it names.
        if asyncpool is None:
            raise sa_exc.ArgumentError("LendingPool needs the asyncpool.Pool it lends from")
        super().__init__(creator, **kwargs)
        self._asyncpool = asyncpool
        self._spare: list[Any] = []
        # The server connections this engine's `connect` handlers have run on. Their work is
        # the connection's, not the record's (asyncpg codecs set through ``run_async``, as
        # SQLAlchemy's and pgvector's recipes do): a record lent another connection runs them
        # there too.
        self._connected: weakref.WeakSet[asyncpg.Connection[Any]] = weakref.WeakSet()

    def _do_get(self) -> Any:
        if self._spare:
            record = self._spare.pop()
            try:
                conn = _lend_from(self._asyncpool)
            except BaseException:
                self._spare.append(record)
                raise
            try:
                return self._lend(record, conn)
            except BaseException:
                self._spare.append(record)
                raise
        # The connection first: while this waits for one, sessions that end give their records
        # back, and one of those takes it (a record made before the wait, by every waiter, would
        # be closed on its return: a record and its connect events per checkout).
        conn = _lend_from(self._asyncpool)
        if self._spare:
            return self._lend(self._spare.pop(), conn)
        token = _LENT.set(conn)
        try:
            return self._create_connection()
        except BaseException:
            if _LENT.get() is conn:  # not taken by the record: give it back
                _await(conn.close())
            raise
        finally:
            _LENT.reset(token)

    def _lend(self, record: Any, conn: PooledConnection) -> Any:
        adapter = record.dbapi_connection
        if adapter is None:
            # Invalidated: get_connection() makes it a new adapter through the creator, which
            # checks out a connection of its own (and SQLAlchemy runs the connect event on it).
            _await(conn.close())
            return record
        adapter._lend(conn)
        raw = conn.raw
        if raw not in self._connected:
            try:
                self.dispatch.connect(adapter, record)
            except BaseException:
                adapter.terminate()  # set up half-way: not lent again (as SQLAlchemy does)
                raise
            self._connected.add(raw)
        return record

    def _do_return_conn(self, record: Any) -> None:
        adapter = record.dbapi_connection
        if adapter is not None:
            # (A record's first connection: SQLAlchemy ran the connect event on it. PoolError:
            # reclaimed as a leak, or discarded, so not lent again.)
            with contextlib.suppress(PoolError):
                self._connected.add(adapter._connection.raw)
            # If this fails (outside SQLAlchemy's greenlet: a session garbage-collected without
            # being closed), the record is dropped with its checkout, which the pool's leak
            # detection reclaims.
            adapter._give_back()
        if len(self._spare) < self._asyncpool.config.max_size:
            self._spare.append(record)
        else:
            record.close()

    def recreate(self) -> LendingPool:
        pool = self.__class__(
            self._creator, asyncpool=self._asyncpool, recycle=self._recycle, echo=self.echo,
            logging_name=self._orig_logging_name, reset_on_return=self._reset_on_return,
            pre_ping=self._pre_ping, _dispatch=self.dispatch, dialect=self._dialect,
        )
        pool._connected = self._connected  # the same handlers (dispatch): run once per connection
        return pool

    def dispose(self) -> None:
        spare, self._spare = self._spare, []
        for record in spare:
            record.close()

    # -- QueuePool's read-outs (exporters and health checks call them), from the pool's state.
    # They count the asyncpool pool's connections, whoever holds them: the pool is shared by
    # every engine made on it and by its plain users. Each reads one `Pool.stats()` (safe from
    # a metrics thread). Their numbers are those of a QueuePool(pool_size=max_size,
    # max_overflow=0), the QueuePool that behaves as the asyncpool pool does.

    def size(self) -> int:
        """The most connections the pool opens (its ``max_size``); constant, as QueuePool's
        ``size()`` is its ``pool_size``, not the number open."""
        return self._asyncpool.stats().max_size

    def checkedin(self) -> int:
        """Connections open and idle in the pool (``stats().idle``)."""
        return self._asyncpool.stats().idle

    def checkedout(self) -> int:
        """Connections lent, to this engine's sessions or any other user of the pool, counted
        until their reset after return is done (``stats().in_use``)."""
        return self._asyncpool.stats().in_use

    def overflow(self) -> int:
        """Connections open or being opened, less `size()`: never above 0, as the pool opens
        none past ``max_size``; ``-overflow()`` is how many it could still open. QueuePool's
        count, which is negative too until ``pool_size`` connections are open."""
        stats = self._asyncpool.stats()
        return stats.size - stats.max_size

    def timeout(self) -> float:
        """How long a checkout waits for a connection (the pool's ``acquire_timeout``;
        ``inf`` if it waits without limit)."""
        timeout = self._asyncpool.config.acquire_timeout
        return float("inf") if timeout is None else timeout

    def status(self) -> str:
        """QueuePool's status line, from one reading of the pool, with what QueuePool has no
        word for (connections being opened or checked, callers waiting)."""
        stats = self._asyncpool.stats()
        return (
            f"LendingPool over asyncpool pool {stats.name!r}: Pool size: {stats.max_size}  "
            f"Connections in pool: {stats.idle} Current Overflow: {stats.size - stats.max_size} "
            f"Current Checked out connections: {stats.in_use} (connecting: {stats.connecting}, "
            f"waiting: {stats.waiting}; SQLAlchemy records kept: {len(self._spare)})"
        )


# Every LendingPool, those `recreate()` makes too (a listener on the class).
sa_event.listen(LendingPool, "invalidate", _invalidated)
sa_event.listen(LendingPool, "reset", _before_terminate)


# -- JSON: decoded by SQLAlchemy, so the pool's connections keep asyncpg's own codecs ---------


def _json_result(dialect: Any) -> Callable[[Any], Any]:
    loads = dialect._json_deserializer or json.loads

    def process(value: Any) -> Any:
        # A pool whose connections decode JSON themselves (a codec set for every user through
        # the pool's set-up hook) hands over Python objects already.
        if isinstance(value, str | bytes):
            return loads(value)
        return value

    return process


class _JSON(pg_json.JSON):
    def result_processor(self, dialect: Any, coltype: object) -> Any:
        return _json_result(dialect)


class _JSONB(pg_json.JSONB):
    def result_processor(self, dialect: Any, coltype: object) -> Any:
        return _json_result(dialect)


#: PostgreSQL's json and jsonb type OIDs (the type codes of the cursor's description), and
#: those of their arrays.
_JSON_OIDS = frozenset((114, 3802))
_JSON_ARRAY_OIDS = frozenset((199, 3807))


def _json_array_result(dialect: Any) -> Callable[[Any], Any]:
    item = _json_result(dialect)

    def process(value: Any) -> Any:
        if isinstance(value, list):  # (nested: a multidimensional array)
            return [process(v) if isinstance(v, list) else item(v) for v in value]
        return value

    return process


class _ExecutionContext(sa_asyncpg.PGExecutionContext_asyncpg):
    def get_result_processor(self, type_: Any, colname: str, coltype: Any) -> Any:
        # A json/jsonb result with no SQLAlchemy type (text(), func.jsonb_build_object(),
        # exec_driver_sql): decoded as SQLAlchemy's asyncpg dialect decodes it, through its
        # codecs, which this dialect does not set (see `AsyncpoolDialect.on_connect`).
        if type_._type_affinity is sqltypes.NullType:
            if coltype in _JSON_OIDS:
                return _json_result(self.dialect)
            if coltype in _JSON_ARRAY_OIDS:
                return _json_array_result(self.dialect)
        return super().get_result_processor(type_, colname, coltype)


class AsyncpoolDialect(_DialectBase):  # type: ignore[misc]
    """``postgresql+asyncpool``: SQLAlchemy's asyncpg dialect over an asyncpool pool. Made by
    `create_async_engine`; a URL alone cannot say which pool to use."""

    driver = "asyncpool"
    supports_statement_cache = True
    supports_native_json_deserialization = False
    execution_ctx_cls = _ExecutionContext
    colspecs: ClassVar[dict[Any, Any]] = {**_DialectBase.colspecs, sqltypes.JSON: _JSON,
                                          pg_json.JSONB: _JSONB}

    @classmethod
    def import_dbapi(cls) -> Any:
        return _DBAPI(asyncpg)

    @classmethod
    def get_pool_class(cls, url: Any) -> type[sa_pool.Pool]:
        return LendingPool

    def create_connect_args(self, url: Any) -> Any:
        if url.host or url.database or url.username or url.query:
            raise sa_exc.ArgumentError(
                "postgresql+asyncpool:// takes no host, database, user or options: they belong to "
                "the asyncpool.Pool given to create_async_engine(pool)")
        return [], {}

    def on_connect(self) -> Any:
        # SQLAlchemy's asyncpg dialect sets json/jsonb codecs on every connection it gets; on a
        # pool that would reach plain pool users too, cost round trips on every checkout and
        # clear the connection's statement caches. Only PostgreSQL's own set-up is kept.
        return PGDialect.on_connect(self)

    def is_disconnect(self, e: Any, connection: Any, cursor: Any) -> bool:
        if isinstance(e, ConnectionLostError | ConnectionLeakedError | PoolClosedError):
            return True
        if isinstance(e, PoolError):
            return False
        if connection is not None:
            try:
                return bool(connection._connection.raw.is_closed())
            except PoolError:
                return True
        return bool(super().is_disconnect(e, None, cursor))


registry.register("postgresql.asyncpool", __name__, "AsyncpoolDialect")
