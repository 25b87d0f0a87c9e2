"""What a caller holds: the asyncpg connection, usable only while its lease is active."""

from __future__ import annotations

import contextlib
import functools
import inspect
import weakref
from asyncio import CancelledError, get_running_loop
from collections.abc import AsyncIterable, Callable, Iterable, Iterator, Sequence
from threading import get_ident
from types import MethodType
from typing import TYPE_CHECKING, Any, Generic, TypeVar, Unpack, cast, overload

import asyncpg

from asyncpool.connect import driver
from asyncpool.connect.driver import BY_NAME, FIRST_ROW, ROWS, STATUS, ConnectionProxyBase
from asyncpool.connect.failures import (
    advise_on_prepared_statements,
    dropped_transport_error,
)
from asyncpool.errors import PoolError
from asyncpool.options import (
    GIVEN_BACK,
    check_row_count,
    check_statement_timeout,
    check_transaction_options,
    in_seconds,
    timeout_error,
)
from asyncpool.pool.lease import ACTIVE, INHERITED, LEAKED, TERMINATED, Lease, task_of
from asyncpool.pool.loop_bound import bind, stopped_under
from asyncpool.pool.stale_rows import stale_rows_error
from asyncpool.pool.unsynced import (
    RUN_PER_ARGUMENT_SET,
    call_with_argument_sets,
    left_unsynced,
)
from asyncpool.pool.unusable import unusable

if TYPE_CHECKING:
    from asyncpg.cursor import CursorFactory
    from asyncpg.prepared_stmt import PreparedStatement
    from asyncpg.transaction import Transaction

    from asyncpool.pool.checkout import Checkouts
    from asyncpool.pool.copy_options import (
        CopyFormatOptions,
        CopyFromTableOptions,
        CopyRecordsOptions,
        CopyToTableOptions,
    )
    from asyncpool.unnamed import DescribeCacheStats

    #: A ``record_class=`` given to one call (the pool's query helpers take it too).
    RecordT = TypeVar("RecordT", bound=asyncpg.Record)
    # PEP 696's default (typing's own from Python 3.13): a bare ``Pool`` or ``PooledConnection``
    # in user code means asyncpg's Record, and strict mypy asks for no type argument.
    from typing_extensions import TypeVar as DefaultedTypeVar

    #: The class of the rows a pool's connections return (its ``record_class=``): asyncpg's
    #: Record unless given. Covariant: a pool or connection of a Record subclass is one of
    #: Records, so code written for a bare ``Pool`` takes it.
    PoolRecordT_co = DefaultedTypeVar("PoolRecordT_co", bound=asyncpg.Record,
                                      default=asyncpg.Record, covariant=True)
else:
    PoolRecordT_co = TypeVar("PoolRecordT_co", bound=asyncpg.Record, covariant=True)


# The proxy's plain methods whose result runs statements on the connection: refused outside the
# pool's loop, as its coroutine methods are (`_statement`).
_STARTS_STATEMENTS = frozenset({"transaction", "cursor"})


def _forward(name: str) -> Callable[..., Any]:
    """The proxy's method `name`: calls the held connection's if the lease is active when it
    runs (for a coroutine method, when awaited: `_statement`).

    A method of the proxy rather than the connection's own bound method handed out: a reference
    kept past release (``run = conn.fetchval``) must not run a statement on a connection that
    another task now holds, as asyncpg's proxy refuses it. Every method of asyncpg's Connection
    is one, a class attribute of `PooledConnection` (`_forward_statically`); those of a
    subclass's own are made on first use (`_forwarded`, `AnyAttributeConnection`). Each looks
    like asyncpg's method: name, docstring, signature, and a coroutine function where asyncpg's
    is one (for ``inspect``, ``asyncio.iscoroutinefunction`` and ``mock.create_autospec``).
    """
    original = getattr(asyncpg.Connection, name, None)
    if inspect.iscoroutinefunction(original):
        return _statement(name)

    if name in _STARTS_STATEMENTS:
        def method(self: PooledConnection, /, *args: Any, **kwargs: Any) -> Any:
            lease = self._lease
            if lease.state is not ACTIVE:
                raise self._unusable()
            self._owner.refuse_other_loop()
            return bind(getattr(lease.record.conn, name)(*args, **kwargs))
    else:
        def method(self: PooledConnection, /, *args: Any, **kwargs: Any) -> Any:
            lease = self._lease  # self.raw, inline
            if lease.state is ACTIVE:
                return getattr(lease.record.conn, name)(*args, **kwargs)
            raise self._unusable()

    if original is None:
        method.__name__ = name
    else:
        functools.update_wrapper(method, original)
    method.__qualname__ = f"PooledConnection.{name}"
    return method


def _statement(name: str) -> Callable[..., Any]:  # noqa: PLR0915 - one closure, read top down
    """The proxy's coroutine method `name` (``execute``, ``fetchval``, ``copy_to_table``...).

    A coroutine function of the proxy's own, so that the lease is checked when the statement
    starts: ``coro = conn.execute(...)`` made inside the block and awaited after it is refused
    and sends nothing (the connection may be another holder's by then). While it runs, a
    return of the connection closes it (`Slots._retire_busy`), and if the pool closes it under
    the statement (``close()``, ``terminate()``, a leak reclaim) the holder gets the pool's
    error. ``fetch``, ``fetchrow``, ``fetchval``, and ``execute`` with arguments, run asyncpg's
    own body of the method while the held connection's class has it (`driver.own_body`) and no
    keyword is given, as the pool's statement runners do: no call and copy of the arguments
    through asyncpg's method. A subclass's override or an instrumentation's wrapper
    (installed at any time) is called instead."""
    original = getattr(asyncpg.Connection, name)
    body = driver.own_body(name)
    own, limit, shape = body if body is not None else (None, 0, ROWS)
    # The shape as flags: one read each where the statement ends.
    rows, first_row, status = shape is ROWS, shape is FIRST_ROW, shape is STATUS
    # A COPY is a simple query, answered with ReadyForQuery, but asyncpg does not count it in
    # its query count: one that succeeds tells the return there is no Parse left unsynced.
    synced = name.startswith("copy_")

    async def method(self: PooledConnection, query: Any = BY_NAME, /, *args: Any,  # noqa: PLR0912
                     **kwargs: Any) -> Any:
        lease = self._lease
        if lease.state is not ACTIVE:
            raise self._unusable()
        record = lease.record
        # (Not `self._owner`: on `AnyAttributeConnection`, a class with a __getattr__, every
        # read of the proxy's attributes takes the generic lookup; the record's is a slot read.)
        owner = record.owner
        loop = owner.loop
        # From another thread or loop, asyncpg would send the statement, then fail waiting for
        # its reply: it would run on the server while the caller gets an error (and retries).
        if not (loop._thread_id == get_ident() if owner.loop_has_thread_id  # type: ignore[union-attr]
                else get_running_loop() is loop):
            owner.refuse_other_loop()
        # Who uses the connection, for a leak reclaim to cancel: not always the task that took
        # it (a block in an async generator, driven by another task since: `Lease.holder`).
        lease.user = task_of(loop)
        conn = record.conn
        try:
            # (Without a body of asyncpg's to run, `own` is None: never the class's method.)
            if (kwargs or query is BY_NAME or getattr(type(conn), name) is not own
                    or (status and not args)):
                if kwargs and (timeout := kwargs.get("timeout")) is not None:
                    check_statement_timeout(owner.name, name, timeout)  # before it is sent
                call = getattr(conn, name)
                # Counted: a simple query (or a COPY) holds no lock of asyncpg's that the return
                # could see.
                lease.running += 1
                try:
                    outcome = await (call(*args, **kwargs) if query is BY_NAME
                                     else call(query, *args, **kwargs))
                finally:
                    lease.running -= 1
                if synced:
                    record.sync_after = 0
                return outcome
            if not record.probe.is_connected():
                conn._check_open()  # asyncpg's own error for a closed connection
            if status:
                return (await conn._execute(query, args, 0, None, return_status=True)
                        )[1].decode()
            result = await conn._execute(query, args, limit, None)
        except Exception as raised:
            exc = (dropped_transport_error(raised, conn) if synced
                   else stale_rows_error(raised, owner.name, query) or raised)
            if (stopped := stopped_under(record, lease, exc)) is not None:
                # The pool closed it under the statement (close() past its timeout,
                # terminate(), a leak reclaim): its error, not the driver's.
                raise stopped from exc
            if lease.state is ACTIVE and left_unsynced(exc):
                # Described and not run: an argument asyncpg's codec refused, its `timeout=`
                # (asyncpg's cancel, below).
                record.note_unsynced_parse()
            advise_on_prepared_statements(exc, owner.statement_mode)
            if exc is not raised:
                raise exc from raised
            raise
        except CancelledError:
            # Cancelled while asyncpg described a statement (Parse, Describe, Flush: no Sync).
            record.note_unsynced_parse()
            raise
        if rows:
            return result
        return (result[0] if first_row else result[0][0]) if result else None

    functools.update_wrapper(method, own if own is not None else original)
    method.__qualname__ = f"PooledConnection.{name}"
    return _with_argument_sets(method) if name in RUN_PER_ARGUMENT_SET else method


def _with_argument_sets(method: Callable[..., Any]) -> Callable[..., Any]:
    """`method` (``executemany`` or ``fetchmany``: its second argument, or ``args=``, holds the
    argument sets) noting, when it is given none,
    the Parse asyncpg then leaves without a Sync (`asyncpool.pool.unsynced`)."""

    async def many(self: PooledConnection, /, *args: Any, **kwargs: Any) -> Any:
        given, args, kwargs = call_with_argument_sets(1, args, kwargs)
        result = await method(self, *args, **kwargs)
        if not given and self._lease.state is ACTIVE:
            self._lease.record.note_unsynced_parse()
        return result

    functools.update_wrapper(many, method)
    return many


def _on_behalf_of(proxy: PooledConnection, callback: Callable[..., Any]) -> Callable[..., Any]:
    """A callback for asyncpg that calls `callback` with `proxy` as its connection; a coroutine
    function if `callback` is one (asyncpg runs those as tasks)."""
    if inspect.iscoroutinefunction(callback):
        async def relay_async(_conn: object, *args: Any) -> Any:
            return await callback(proxy, *args)

        return relay_async

    def relay(_conn: object, *args: Any) -> Any:
        return callback(proxy, *args)

    return relay


_FORWARDED: dict[str, Callable[..., Any]] = {}


def _forwarded(name: str) -> Callable[..., Any]:
    method = _FORWARDED.get(name)
    if method is None:
        method = _FORWARDED[name] = _forward(name)
    return method


if TYPE_CHECKING:
    # What it is at run time too (`isinstance(conn, asyncpg.Connection)`): a function or hook
    # written against asyncpg's Connection takes it.
    _Base = asyncpg.Connection
else:
    _Base = ConnectionProxyBase


class PooledConnection(_Base, Generic[PoolRecordT_co]):
    """Forwards every attribute to the asyncpg connection while the lease is active.

    After release it refuses use, so a stray reference (to it, or to one of its methods) cannot
    run a query on a connection that another task now holds; after a leak reclaim it raises
    `ConnectionLeakedError`. Prepared statements, cursors and transactions obtained through it
    stop working on release too (asyncpg raises `InterfaceError`; one still running when the
    pool ends the checkout gets the pool's error, as the connection's statements do), and
    listeners it added are removed.

    It has asyncpg's `Connection` API, typed with asyncpg's signatures (a misspelt method or a
    wrong argument fails type checking), and ``isinstance(conn, asyncpg.Connection)`` is true,
    as for the connections asyncpg's own pool hands out. `close()` gives it back to the pool.
    """

    # _relays: the callbacks given to add_listener() & co., by what asyncpg was given instead;
    # set on first use only (a checkout builds the proxy without __init__).
    __slots__ = ("_lease", "_owner", "_relays")
    _relays: dict[tuple[object, ...], Callable[..., object]]

    if TYPE_CHECKING:
        # asyncpg's Connection API with its signatures (asyncpg 0.32), for type checkers;
        # at run time each is a method of the proxy that calls the held connection's own while
        # the lease is active (`_forward`, the listener relays and __getattr__ below). Rows are
        # of the pool's record class (`PoolRecordT_co`), where asyncpg's types, for the bare
        # asyncpg.Connection this is (so a function taking one takes it), say Record: hence
        # the override ignores on the methods that return lists or statements of rows.
        async def execute(self, query: str, *args: object, timeout: float | None = None) -> str: ...
        async def executemany(self, command: str, args: Iterable[Sequence[object]], *,
                              timeout: float | None = None) -> None: ...
        @overload  # type: ignore[override]  # (rows of the pool's record class)
        async def fetch(self, query: str, *args: object, timeout: float | None = None,
                        record_class: None = None) -> list[PoolRecordT_co]: ...
        @overload
        async def fetch(self, query: str, *args: object, timeout: float | None = None,
                        record_class: type[RecordT]) -> list[RecordT]: ...
        @overload
        async def fetch(self, query: str, *args: object, timeout: float | None = None,
                        record_class: type[RecordT] | None) -> list[PoolRecordT_co] | list[RecordT]: ...
        async def fetch(self, query: str, *args: object, timeout: float | None = None,
                        record_class: type[Any] | None = None) -> Any: ...
        async def fetchval(self, query: str, *args: object, column: int | str = 0,
                           timeout: float | None = None) -> Any: ...
        @overload
        async def fetchrow(self, query: str, *args: object, timeout: float | None = None,
                           record_class: None = None) -> PoolRecordT_co | None: ...
        @overload
        async def fetchrow(self, query: str, *args: object, timeout: float | None = None,
                           record_class: type[RecordT]) -> RecordT | None: ...
        @overload
        async def fetchrow(self, query: str, *args: object, timeout: float | None = None,
                           record_class: type[RecordT] | None) -> PoolRecordT_co | RecordT | None: ...
        async def fetchrow(self, query: str, *args: object, timeout: float | None = None,
                           record_class: type[Any] | None = None) -> Any: ...
        @overload  # type: ignore[override]  # (rows of the pool's record class)
        async def fetchmany(self, query: str, args: Iterable[Sequence[object]], *,
                            timeout: float | None = None,
                            record_class: None = None) -> list[PoolRecordT_co]: ...
        @overload
        async def fetchmany(self, query: str, args: Iterable[Sequence[object]], *,
                            timeout: float | None = None,
                            record_class: type[RecordT]) -> list[RecordT]: ...
        @overload
        async def fetchmany(self, query: str, args: Iterable[Sequence[object]], *,
                            timeout: float | None = None, record_class: type[RecordT] | None
                            ) -> list[PoolRecordT_co] | list[RecordT]: ...
        async def fetchmany(self, query: str, args: Iterable[Sequence[object]], *,
                            timeout: float | None = None,
                            record_class: type[Any] | None = None) -> Any: ...
        @overload  # type: ignore[override]  # (rows of the pool's record class)
        async def prepare(self, query: str, *, name: str | None = None,
                          timeout: float | None = None,
                          record_class: None = None) -> PreparedStatement[PoolRecordT_co]: ...
        @overload
        async def prepare(self, query: str, *, name: str | None = None,
                          timeout: float | None = None,
                          record_class: type[RecordT]) -> PreparedStatement[RecordT]: ...
        @overload
        async def prepare(self, query: str, *, name: str | None = None,
                          timeout: float | None = None, record_class: type[RecordT] | None
                          ) -> PreparedStatement[PoolRecordT_co] | PreparedStatement[RecordT]: ...
        async def prepare(self, query: str, *, name: str | None = None,
                          timeout: float | None = None,
                          record_class: type[Any] | None = None) -> Any: ...
        def transaction(self, *, isolation: str | None = None, readonly: bool = False,
                        deferrable: bool = False) -> Transaction: ...
        @overload  # type: ignore[override]  # (rows of the pool's record class)
        def cursor(self, query: str, *args: object, prefetch: int | None = None,
                   timeout: float | None = None,
                   record_class: None = None) -> CursorFactory[PoolRecordT_co]: ...
        @overload
        def cursor(self, query: str, *args: object, prefetch: int | None = None,
                   timeout: float | None = None,
                   record_class: type[RecordT]) -> CursorFactory[RecordT]: ...
        @overload
        def cursor(self, query: str, *args: object, prefetch: int | None = None,
                   timeout: float | None = None, record_class: type[RecordT] | None
                   ) -> CursorFactory[PoolRecordT_co] | CursorFactory[RecordT]: ...
        def cursor(self, query: str, *args: object, prefetch: int | None = None,
                   timeout: float | None = None, record_class: type[Any] | None = None) -> Any: ...
        # The COPY options as asyncpg reads them (its published types allow a few it refuses,
        # such as force_null=True, and leave out header="match").
        async def copy_from_query(  # type: ignore[override]
                self, query: str, *args: object, output: Any,
                                  **options: Unpack[CopyFormatOptions]) -> str: ...
        async def copy_from_table(  # type: ignore[override]
                self, table_name: str, *, output: Any,
                                  **options: Unpack[CopyFromTableOptions]) -> str: ...
        async def copy_records_to_table(self, table_name: str, *,
                                        records: Iterable[Sequence[object]]
                                        | AsyncIterable[Sequence[object]],
                                        **options: Unpack[CopyRecordsOptions]) -> str: ...
        async def copy_to_table(  # type: ignore[override]
                self, table_name: str, *, source: Any,
                                **options: Unpack[CopyToTableOptions]) -> str: ...
        async def add_listener(self, channel: str,
                               callback: Callable[..., object]) -> None: ...
        async def remove_listener(self, channel: str,
                                  callback: Callable[..., object]) -> None: ...
        def add_log_listener(self, callback: Callable[..., object]) -> None: ...
        def remove_log_listener(self, callback: Callable[..., object]) -> None: ...
        def add_termination_listener(self, callback: Callable[..., object]) -> None: ...
        def remove_termination_listener(self, callback: Callable[..., object]) -> None: ...
        def add_query_logger(self, callback: Callable[..., object]) -> None: ...
        def remove_query_logger(self, callback: Callable[..., object]) -> None: ...
        def get_server_pid(self) -> int: ...
        def get_reset_query(self) -> str: ...
        def is_in_transaction(self) -> bool: ...
        async def reset(self, *, timeout: float | None = None) -> None: ...
        async def reload_schema_state(self) -> None: ...
        async def set_type_codec(self, typename: str, *, schema: str = "public",
                                 encoder: Callable[..., object], decoder: Callable[..., object],
                                 format: str = "text") -> None: ...
        async def set_builtin_type_codec(self, typename: str, *, schema: str = "public",
                                         codec_name: str, format: str | None = None) -> None: ...
        async def reset_type_codec(self, typename: str, *, schema: str = "public") -> None: ...
        # prepared_statements="unnamed" only (AttributeError in the other modes).
        def describe_cache_stats(self) -> DescribeCacheStats: ...
    else:
        execute = _forward("execute")
        executemany = _forward("executemany")
        fetch = _forward("fetch")
        fetchval = _forward("fetchval")
        fetchrow = _forward("fetchrow")
        fetchmany = _forward("fetchmany")
        _prepare_unbound = _forward("prepare")  # (asyncpg's own `_prepare` stays reachable)

        async def prepare(self, query: str, *, name: str | None = None,
                          timeout: float | None = None,
                          record_class: type[asyncpg.Record] | None = None) -> Any:
            lease = self._lease
            if timeout is not None:
                check_statement_timeout(self._owner.name, "prepare", timeout)
            if lease.state is ACTIVE:  # (else refused below)
                # Noted before it is sent: cancelled, it leaves the server waiting as well.
                lease.record.note_unsynced_parse()
            return bind(await self._prepare_unbound(query, name=name, timeout=timeout,
                                                    record_class=record_class))

        _transaction_unbound = _forward("transaction")

        def transaction(self, *, isolation: str | None = None, readonly: bool = False,
                        deferrable: bool = False) -> Any:
            # As pool.transaction() checks them: asyncpg takes readonly="no" for True, and
            # made a READ ONLY transaction of it without a word.
            check_transaction_options(self._owner.name, isolation, readonly, deferrable)
            return self._transaction_unbound(isolation=isolation, readonly=readonly,
                                             deferrable=deferrable)
        _cursor_unbound = _forward("cursor")

        def cursor(self, *args: Any, **kwargs: Any) -> Any:
            if (timeout := kwargs.get("timeout")) is not None:
                check_statement_timeout(self._owner.name, "cursor", timeout)
            if (prefetch := kwargs.get("prefetch")) is not None:
                check_row_count("cursor", "prefetch", prefetch)
            factory = self._cursor_unbound(*args, **kwargs)
            # Outside a transaction asyncpg refuses the cursor after sending its Parse.
            self._lease.record.note_unsynced_parse()
            return factory

        # asyncpg's pool hands listener callbacks its proxy, not the connection: a callback that
        # keeps it must not reach the next holder's connection after release.
        async def add_listener(self, channel: str, callback: Callable[..., object]) -> None:
            raw = self._on_loop()  # LISTEN is a statement (see `_statement`)
            try:
                await raw.add_listener(channel, self._relay(("notify", channel), callback))
            except BaseException:
                # Cancelled once its LISTEN was sent, the server listens all the same: the
                # return must UNLISTEN, though asyncpg registered no callback.
                driver.listen_cut_short(raw, channel)
                raise

        async def remove_listener(self, channel: str, callback: Callable[..., object]) -> None:
            raw = self._on_loop()
            await raw.remove_listener(channel, self._unrelay(("notify", channel), callback))

        # The callbacks below are kept in sets asyncpg walks on the connection's loop: changed
        # from another thread, one could be skipped, or the walk fail (set changed size).
        def add_log_listener(self, callback: Callable[..., object]) -> None:
            self._on_loop().add_log_listener(self._relay(("log",), callback))

        def remove_log_listener(self, callback: Callable[..., object]) -> None:
            self._on_loop().remove_log_listener(self._unrelay(("log",), callback))

        def add_termination_listener(self, callback: Callable[..., object]) -> None:
            self._on_loop().add_termination_listener(self._relay(("terminate",), callback))

        def remove_termination_listener(self, callback: Callable[..., object]) -> None:
            self._on_loop().remove_termination_listener(self._unrelay(("terminate",), callback))

        def add_query_logger(self, callback: Callable[..., object]) -> None:
            self._on_loop().add_query_logger(callback)

        def remove_query_logger(self, callback: Callable[..., object]) -> None:
            self._on_loop().remove_query_logger(callback)

        @contextlib.contextmanager
        def query_logger(self, callback: Callable[..., object]) -> Iterator[None]:
            # The proxy's own, not asyncpg's (bound to the connection): one made in a block
            # and entered after it would add the logger to the next holder's connection, and
            # show it that holder's statements.
            self.add_query_logger(callback)
            try:
                yield
            finally:
                # Given back inside the `with`: the return has dropped the logger already.
                if self._lease.state is ACTIVE:
                    self.remove_query_logger(callback)

    def __init__(self, lease: Lease, owner: Checkouts) -> None:
        self._lease = lease
        self._owner = owner

    def _relay(self, kind: tuple[str, ...], callback: Callable[..., object]
               ) -> Callable[..., object]:
        """`callback` as asyncpg is to call it: with this proxy in place of the connection.
        (Called for the argument of ``self.raw.add_...()``, whose ``self.raw`` has already
        refused a released connection.)"""
        try:
            relays = self._relays
        except AttributeError:
            relays = self._relays = {}
        key = (*kind, callback)
        relay = relays.get(key)
        if relay is None:
            relay = relays[key] = _on_behalf_of(self, callback)
        return relay

    def _unrelay(self, kind: tuple[str, ...], callback: Callable[..., object]
                 ) -> Callable[..., object]:
        try:
            return self._relays.pop((*kind, callback), callback)
        except AttributeError:
            return callback

    def _on_loop(self) -> asyncpg.Connection[PoolRecordT_co]:
        """The held connection (`raw`), refused outside the pool's loop and thread."""
        raw = self.raw
        self._owner.refuse_other_loop()
        return raw

    @property
    def _pool_name(self) -> str:
        return self._owner.name

    def is_closed(self) -> bool:
        # (asyncpg's help text, below.) Answered once the checkout ended with its connection
        # closed too (the one a failing setup= hook was given, a terminated one): a closed
        # connection has no next holder whose session this would reveal, and asyncpg's pool
        # answers True to the setup hook's. Refused once given back open, as asyncpg refuses
        # it, and once reclaimed as a leak or inherited across a fork.
        lease = self._lease
        record = lease.record
        if lease.state is ACTIVE or (
                record is not None and lease.state is not LEAKED and lease.state is not INHERITED
                and record.conn.is_closed()):
            return bool(record.conn.is_closed())
        raise self._unusable()

    async def close(self, *, timeout: float | None = None) -> None:
        """Give the connection back to the pool, as `pool.release(conn)` does.

        The server connection stays open for the next holder: the pool alone decides when a
        connection goes (code written for asyncpg's pool, or SQLAlchemy's ``NullPool`` with an
        ``async_creator``, calls close() to give a connection back). A no-op once released.
        `timeout` bounds the reset, as in `pool.release()` (a bad one is raised once the
        connection is back).
        """
        lease = self._lease
        if lease.state is not ACTIVE:
            return
        owner = self._owner
        owner.refuse_other_loop()
        error = None
        if timeout is not None:
            from asyncpool.pool.slots import RELEASE_TIMEOUT  # slots imports this module

            error = timeout_error(owner.name, "conn.close(timeout=...)", timeout,
                                  f"the pool's {RELEASE_TIMEOUT:g} s", GIVEN_BACK)
            timeout = None if error is not None else in_seconds(timeout)
        if owner.checkin_nowait(lease):
            await owner.checkin(lease, timeout)
        if error is not None:
            raise error

    def terminate(self) -> None:
        """Close the server connection now, and free its place in the pool at once (as
        asyncpg's pool does): the next ``acquire()`` need not wait for a release. Refused once
        released, as every method is; the connection is refused afterwards, and its release (or
        its block's end) does nothing."""
        lease = self._lease
        if lease.state is not ACTIVE:
            raise self._unusable()
        self._owner.refuse_other_loop()
        self._owner.discard(lease, "terminated by its holder", state=TERMINATED)

    def _unusable(self) -> PoolError:
        return unusable(self._lease.state, self._pool_name)

    @property
    def raw(self) -> asyncpg.Connection[PoolRecordT_co]:
        """The underlying asyncpg connection, while held (refused afterwards).

        The pool's connection itself, not one per checkout: nothing refuses a reference to it
        kept past the block, whose statements then run in the next holder's session. Use it
        inside the block only."""
        lease = self._lease
        if lease.state is ACTIVE:
            # Opened with the pool's record_class: its rows are this proxy's.
            return cast("asyncpg.Connection[PoolRecordT_co]", lease.record.conn)
        raise self._unusable()

    def __repr__(self) -> str:
        return f"<PooledConnection pool={self._pool_name!r} {self._lease.state.value}>"


# The listener methods, prepare(), transaction() and is_closed() are the proxy's own: asyncpg's
# help text.
for _name in ("prepare", "transaction", "add_listener", "remove_listener", "add_log_listener",
              "remove_log_listener",
              "add_termination_listener", "remove_termination_listener", "add_query_logger",
              "remove_query_logger", "query_logger", "is_closed"):
    getattr(PooledConnection, _name).__doc__ = getattr(asyncpg.Connection, _name).__doc__
del _name


def _is_dunder(name: str) -> bool:
    return name.startswith("__") and name.endswith("__")


def _read_through(name: str) -> property:
    """The held connection's attribute `name` that is not a method (one of asyncpg's slots,
    ``conn._protocol``...), read while the lease is active, as the connection's methods are
    called (`raw` refuses it afterwards)."""

    def read(self: PooledConnection[Any]) -> Any:
        return getattr(self.raw, name)

    read.__name__ = read.__qualname__ = name
    return property(read)


def _forward_statically(proxy: type, conn_class: type) -> None:
    """Give `proxy` every attribute of `conn_class` it does not have (dunders aside): its
    methods as the proxy's (`_forwarded`), the rest read through (`_read_through`).

    Class attributes, not a ``__getattr__``: Python 3.11 specializes no attribute read on a
    class that has one (``conn.fetchval`` in the holder's code, ``self._lease`` in the proxy's
    statement), which cost about 1,000 instructions per acquire + ``conn.fetchval``
    (benchmarks/README.md, stop 55)."""
    for name in dir(conn_class):
        if _is_dunder(name) or hasattr(proxy, name):
            continue
        value = inspect.getattr_static(conn_class, name)
        setattr(proxy, name, _forwarded(name) if inspect.isfunction(value) else _read_through(name))


_forward_statically(PooledConnection, asyncpg.Connection)

#: What a `PooledConnection` answers (tests/unit/test_proxy_class.py checks it against asyncpg's
#: Connection): a connection class with nothing else can have it as its proxy.
_ANSWERED = frozenset(name for name in dir(PooledConnection) if not _is_dunder(name))


class AnyAttributeConnection(PooledConnection[PoolRecordT_co]):
    """The proxy of a connection whose instances may have any attribute (a ``connection_class``
    without ``__slots__``, which gives them a ``__dict__``), or whose class turns one of asyncpg's
    methods into something else: forwards what it does not have by ``__getattr__``, while the
    lease is active. Chosen by `proxy_class_for` only for such classes: on Python 3.11 a class
    with a ``__getattr__`` costs every attribute read on it the generic lookup."""

    __slots__ = ()

    if not TYPE_CHECKING:
        def __getattr__(self, name: str) -> Any:
            raw = self.raw
            value = getattr(raw, name)
            if isinstance(value, MethodType) and value.__self__ is raw:
                return MethodType(_forwarded(name), self)
            return value


_PROXY_CLASSES: weakref.WeakKeyDictionary[type, type[PooledConnection[Any]]] = (
    weakref.WeakKeyDictionary())


def proxy_class_for(conn_class: type) -> type[PooledConnection[Any]]:
    """The proxy class for connections of `conn_class`, decided once per class:

    - `PooledConnection` when it answers every attribute they have: asyncpg's Connection and
      its subclasses with ``__slots__`` that add nothing (asyncpool's cancel-aware class);
    - a subclass of it (also named ``PooledConnection``) forwarding the attributes a subclass
      with ``__slots__`` adds the same way (the "unnamed" mode's `describe_cache_stats`, a
      ``connection_class``'s own methods), made once per class;
    - `AnyAttributeConnection` for the others (instances with a ``__dict__``, a class that is
      not asyncpg's, one of asyncpg's methods made something else).
    """
    chosen = _PROXY_CLASSES.get(conn_class)
    if chosen is None:
        chosen = _choose_proxy_class(conn_class)
        _PROXY_CLASSES[conn_class] = chosen
    return chosen


def _choose_proxy_class(conn_class: type) -> type[PooledConnection[Any]]:
    if getattr(conn_class, "__dictoffset__", 0) or not issubclass(conn_class, asyncpg.Connection):
        return AnyAttributeConnection
    adds = False
    for name in dir(conn_class):
        # (_asyncpool_*: markers asyncpool puts on the classes it makes, no API.)
        if _is_dunder(name) or name.startswith("_asyncpool_"):
            continue
        if name not in _ANSWERED:
            adds = True
        elif name in _ASYNCPG_NAMES and inspect.isfunction(
                inspect.getattr_static(conn_class, name)) != _ASYNCPG_NAMES[name]:
            return AnyAttributeConnection  # (a method forwarded as a method would be wrong)
    if not adds:
        return PooledConnection
    proxy: type[PooledConnection[Any]] = type("PooledConnection", (PooledConnection,),
                                              {"__slots__": ()})
    _forward_statically(proxy, conn_class)
    return proxy


#: asyncpg's Connection's attributes (dunders aside), by whether each is a method.
_ASYNCPG_NAMES = {name: inspect.isfunction(inspect.getattr_static(asyncpg.Connection, name))
                  for name in dir(asyncpg.Connection) if not _is_dunder(name)}
