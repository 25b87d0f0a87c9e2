"""The pool: hands out asyncpg connections, takes them back, keeps them healthy.

`Pool` is the public face; the slots, their connections and every way a connection leaves are
owned by `asyncpool.pool.slots.Slots`, which the checkout contexts talk to through the small
`Checkouts` interface.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import inspect
import sys
import warnings
from collections.abc import AsyncIterable, Awaitable, Callable, Generator, Iterable, Sequence
from types import MethodType
from typing import TYPE_CHECKING, Any, ClassVar, Generic, Self, Unpack, overload

from asyncpool.config import InitHook, PoolConfig, as_number, opened_by_open
from asyncpool.connect.connector import Connector
from asyncpool.errors import PoolClosedError, PoolConfigError, PoolError, config_errors_without_frames
from asyncpool.observer import GuardedObserver, ObserverGroup, PoolObserver
from asyncpool.options import (
    GIVEN_BACK,
    NOT_GIVEN,
    Isolation,
    Keep,
    PoolOptionsWithoutRecordClass,
    PoolOptionsWithoutRows,
    check_timeout,
    check_transaction_options,
    in_seconds,
    resolve,
    timeout_error,
    with_connect_args,
    with_record_class,
)
from asyncpool.pool import (
    declared_rows,
    forks,
    given_loop,
    housekeeping,
    lifecycle,
    logins,
    misuse,
    pool_stats,
)
from asyncpool.pool.checkout import AcquireContext, TransactionContext, blank
from asyncpool.pool.connection import PooledConnection, PoolRecordT_co
from asyncpool.pool.lease import ACTIVE, HELPER_METHODS
from asyncpool.pool.resets import RELEASE_TIMEOUT
from asyncpool.pool.runner import QUERY_METHODS, RUNNERS
from asyncpool.pool.slots import Slots
from asyncpool.pool.slow_checkout import UNSET
from asyncpool.pool.state import CLOSED_STATE, CLOSING, NEW, OPEN
from asyncpool.pool.unsynced import argument_sets
from asyncpool.stats import PoolStats

#: How long `Pool.close()` waits for held connections by default.
CLOSE_TIMEOUT = 10.0

if TYPE_CHECKING:
    import asyncpg

    from asyncpool.credentials.provider import CredentialProvider
    from asyncpool.pool.connection import RecordT
    from asyncpool.pool.copy_options import (
        CopyFormatOptions,
        CopyFromTableOptions,
        CopyRecordsOptions,
        CopyToTableOptions,
    )


class Pool(Generic[PoolRecordT_co]):
    """An asyncio pool of asyncpg connections, safe behind transaction-mode poolers.

    Give options as keyword arguments (see `PoolConfig` for each one; asyncpg's pool and
    connect options are taken with asyncpg's meaning, see docs/migration.md) or a whole
    `config`. Without `config`, the ``ASYNCPOOL_*`` environment variables give the defaults
    (``ASYNCPOOL_DSN`` the DSN when `dsn` is None) and arguments win.
    Use ``await pool.open()`` (or ``await pool``) or ``async with Pool(...) as pool``;
    `create_pool` returns one.

    Typed by the class of its rows: ``Pool(dsn, record_class=Row)`` is a ``Pool[Row]``, whose
    ``fetch()`` (and its connections') returns ``list[Row]``; a bare ``Pool`` is a
    ``Pool[asyncpg.Record]``, and takes a ``Pool[Row]``. A subclass naming its rows
    (``class RowPool(Pool[Row])``) must be made with ``record_class=Row`` (`PoolConfigError`).

    `loop` (asyncpg's) is taken when it is the loop that opens the pool: `open()` refuses
    another one. A pool uses the event loop it is opened on.
    """

    # Two signatures, each naming what the pool is: without `record_class` a Pool[Record],
    # whatever the caller's annotation asks for (a type variable solved from a default let mypy
    # take ``pool: Pool[Row] = Pool(dsn)`` at its word); with it, a Pool of that class.
    @overload
    def __init__(
        self: Pool[asyncpg.Record],
        dsn: str | None = None,
        *,
        config: PoolConfig | None = None,
        observers: list[PoolObserver] | None = None,
        loop: asyncio.AbstractEventLoop | None = None,
        init: Callable[[asyncpg.Connection[asyncpg.Record]], Awaitable[object]] | None = None,
        setup: Callable[[PooledConnection[asyncpg.Record]], Awaitable[object]] | None = None,
        **options: Unpack[PoolOptionsWithoutRows],
    ) -> None: ...
    @overload
    def __init__(
        self,
        dsn: str | None = None,
        *,
        config: PoolConfig | None = None,
        observers: list[PoolObserver] | None = None,
        loop: asyncio.AbstractEventLoop | None = None,
        record_class: type[PoolRecordT_co],
        init: Callable[[asyncpg.Connection[PoolRecordT_co]], Awaitable[object]] | InitHook | None = None,
        setup: Callable[[PooledConnection[PoolRecordT_co]], Awaitable[object]] | None = None,
        **options: Unpack[PoolOptionsWithoutRows],
    ) -> None: ...
    # (Takes the hooks of any rows, as PoolConfig does: the signatures above type them.)
    @config_errors_without_frames  # type: ignore[misc]
    def __init__(
        self,
        dsn: str | None = None,
        *,
        config: PoolConfig | None = None,
        observers: list[PoolObserver] | None = None,
        loop: asyncio.AbstractEventLoop | None = None,
        record_class: type[PoolRecordT_co] = NOT_GIVEN,
        **options: Unpack[PoolOptionsWithoutRecordClass],
    ) -> None:
        if config is not None and not isinstance(config, PoolConfig):
            raise PoolConfigError(f"config={config!r}: must be a PoolConfig (or None: options "
                                  "from the arguments and the ASYNCPOOL_* variables)")
        if not isinstance(observers, list | tuple | None):
            raise PoolConfigError(f"observers={observers!r}: must be a list of PoolObserver")
        # asyncpg's loop=: only checked, at open() (`given_loop`); not a PoolConfig option.
        self._given_loop = given_loop.checked(loop)
        config = resolve(dsn, config, with_record_class(options, record_class))
        if type(self) is not Pool:
            declared_rows.refuse_other_rows(type(self), self._declared_rows, config.connect_kwargs)
        self.config: PoolConfig = config
        self.name: str = config.name
        self._extra_observers = list(observers or [])
        self._slots = slots = Slots(config.name, config)
        # The query helpers, bound straight to the slot owner: ``pool.fetchval(...)`` makes the
        # statement's coroutine with no Python frame of the pool's in between (about 0.8 µs per
        # query between round trips, benchmarks/README.md), as a bound method (the cheapest
        # call there is; `statement_runner`). The methods below stay for type checkers and
        # documentation, for ``Pool.fetchval(pool, ...)``, and for subclasses that override one
        # (it is not shadowed then).
        cls = type(self)
        if cls.acquire is Pool.acquire:  # (else the helpers go through it: `__init_subclass__`)
            for name in QUERY_HELPERS:
                if getattr(cls, name) is getattr(Pool, name):
                    setattr(self, name, MethodType(RUNNERS[name], slots))

    #: The rows a subclass declares (``class RowPool(Pool[Row])``), held to its record class
    #: when it is made (`declared_rows`); None: none declared.
    _declared_rows: ClassVar[object] = None

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        cls._declared_rows = declared_rows.of(cls, Pool)
        if cls.acquire is not Pool.acquire:
            # A subclass's acquire() (asyncpg's pool helpers take their connection from it, and
            # such subclasses set up or tag each checkout there): every helper it does not
            # override goes through it. On the class, not bound to each instance, which would
            # refer to itself and outlive its last reference (an unclosed pool's finalizer).
            for name in QUERY_METHODS:
                if getattr(cls, name) is getattr(Pool, name):
                    setattr(cls, name, THROUGH_ACQUIRE[name])

    def __repr__(self) -> str:
        if "_slots" not in self.__dict__:  # its __init__ raised (a traceback's locals show it)
            return "<asyncpool.Pool (not made)>"
        s = self.stats()
        return (
            f"<asyncpool.Pool {self.name!r} {self._slots.state.value} size={s.size} idle={s.idle} "
            f"in_use={s.in_use} waiting={s.waiting} max_size={s.max_size}>"
        )

    def __del__(self, _warn: Any = warnings.warn) -> None:
        # A pool dropped without close(): say so, as asyncio and asyncpg do, and let go of its
        # server connections (its background task holds only a weak reference to it).
        slots = self.__dict__.get("_slots")
        if slots is None or slots.state is NEW or slots.state is CLOSED_STATE:
            return
        _warn(f"unclosed pool {self.name!r}: close it with 'await pool.close()' or "
              "'async with'", ResourceWarning, source=self)
        with contextlib.suppress(Exception):  # a finalizer must not raise; its loop may be gone
            loop = slots.loop
            try:
                misuse.refuse_running_elsewhere(slots, "terminate()")
            except PoolError:  # collected in another thread: terminate on the loop's own
                assert loop is not None
                loop.call_soon_threadsafe(lifecycle.terminate, slots)
                return
            lifecycle.terminate(slots)

    # -- lifecycle ----------------------------------------------------------------------------

    async def open(self, wait: bool = True) -> Self:
        """Start the pool and open `min_size` connections.

        With `wait` (default) the first connections are opened now, so a wrong DSN or password
        fails here rather than on the first query. An open() that fails or is cancelled (the
        credentials provider's first read, a login, `init`, a time limit around it) closes what
        it opened and leaves the pool as new: call open() again. Tasks calling open() meanwhile
        get the same outcome, except a cancellation: then one of them opens the pool. Given
        ``loop=``, a pool opened on another loop is a `PoolConfigError`, before anything opens.
        """
        slots = self._slots
        if slots.state is OPEN or (slots.opening is not None and not slots.opening.done()):
            # Open (or opening) elsewhere: returned as open, the pool refused every use there
            # (and another thread waited on the opening loop's future).
            if forks.inherited(slots):
                raise forks.forked_error(slots)
            slots.refuse_other_loop()
        while (opening := slots.opening) is not None and not opening.done():
            # Another task's open() is under way (or being undone): this one ends as it does,
            # unless that one was cancelled: then this one opens the pool itself.
            if await asyncio.shield(opening):
                return self
        if slots.state is CLOSING or slots.state is CLOSED_STATE:
            raise PoolClosedError(f"pool {self.name!r} is {slots.state.value}; create a new pool")
        if slots.state is OPEN:
            return self
        # (Here, not first: a pool open, or opening, elsewhere says where; a closed one, closed.)
        given_loop.refuse_another(self.name, self._given_loop)
        observer = self._build_observer()
        await lifecycle.open(slots, observer, Connector(self.config, observer), wait)
        return self

    def _build_observer(self) -> PoolObserver:
        # The caller's observers run guarded: one that raises must not stop a checkout half way
        # (the pool's own telemetry observer, which does not raise, is not wrapped).
        builtin = getattr(sys.modules.get("asyncpool.telemetry.telemetry_observer"),
                          "TelemetryObserver", None)
        observers: list[PoolObserver] = [
            obs if type(obs) is builtin else GuardedObserver(obs) for obs in self._extra_observers]
        if self.config.telemetry:
            from asyncpool.telemetry import TelemetryObserver

            observers.insert(0, TelemetryObserver(self.config))
        if not observers:
            return PoolObserver()
        return observers[0] if len(observers) == 1 else ObserverGroup(observers)

    def __await__(self) -> Generator[Any, None, Self]:
        """``await pool`` opens it, as `open()` does: ``pool = await create_pool(...)``, and
        asyncpg's ``pool = create_pool(...)`` then ``await pool``."""
        return self.open().__await__()

    async def __aenter__(self) -> Self:
        return await self.open()

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self, timeout: float | None = CLOSE_TIMEOUT) -> None:
        """Stop handing out connections, wait up to `timeout` for held ones, then terminate.

        Waiters and logins under way get `PoolClosedError`. Idle connections are closed at once.
        A connection still held after `timeout` is terminated and its holder gets
        `PoolClosedError` on next use; so is, at once and with a warning, one held by the task
        calling close() itself (it could not be given back while close() waits). After
        `timeout`, closes under way (a goodbye to the server, a cancel request for what a held
        connection runs) get as long again as `timeout` (0.1 s to 1 s), then their connections
        are closed at once: close() ends within about twice `timeout` even when the pooler
        answers nothing (PgBouncer SUSPENDed); a cancel request not yet taken goes on by itself,
        within 5 s. Cancelled part-way, close() terminates what is left. Call it on the event
        loop the pool was opened on. A bad `timeout` is a `PoolConfigError`, raised once the
        pool is closed with the default.
        """
        error = timeout_error(self.name, "close(timeout=...)", timeout,
                              done=f"; the pool was closed with the default {CLOSE_TIMEOUT:g} s")
        await lifecycle.close(self._slots, CLOSE_TIMEOUT if error else in_seconds(timeout))
        if error is not None:
            raise error

    def terminate(self, *, cancel_within: float = 0.0) -> None:
        """Close every connection now, without waiting (for shutdown paths that cannot await).

        A statement running on a held connection would go on running on the server (or behind
        the pooler) after its socket closes. On the loop, a cancel request is sent for it by a
        task, which runs only if the loop does again. For a process about to end (a signal
        handler), pass `cancel_within` (seconds): the requests are then sent from this thread,
        blocking until the servers take them, at most that long.

        On the pool's loop's thread, or in any thread while that loop is not running; from
        another thread while it runs, `PoolError` (use ``loop.call_soon_threadsafe``). A bad
        `cancel_within` is a `PoolConfigError`, raised once the pool is terminated without
        cancel requests (a typo in a shutdown path must not leave the connections open)."""
        misuse.refuse_running_elsewhere(self._slots, "terminate()")
        seconds = as_number(cancel_within)
        bad = seconds is None or not seconds >= 0  # (NaN is not)
        self._slots.undoing_open = False  # (while a failed open() is undone: closed, not new)
        lifecycle.terminate(self._slots, 0.0 if bad or seconds is None else seconds)
        if bad:
            raise PoolConfigError(
                f"pool {self.name!r}: terminate(cancel_within={cancel_within!r}): must be a "
                "number of seconds >= 0 (0: no cancel requests); the pool was terminated "
                "without them")

    def expire_all(self) -> None:
        """Retire every connection: idle ones now, held ones when returned, logins under way
        when they complete (after a migration, a credentials rotation, or a failover). From
        another thread while the pool's loop runs: `PoolError`, as `terminate()`."""
        misuse.refuse_running_elsewhere(self._slots, "expire_all()")
        housekeeping.expire_all(self._slots)

    def mark_stale(self) -> None:
        """Check every connection with a round trip before its next checkout, whatever the clock
        says: after a freeze or a snapshot restore the monotonic clock cannot be trusted to show
        how long a connection sat idle. One in use is checked after its return, by its next
        holder (a caller waiting in line included) before that one gets it. Called on the pool's
        loop (`LambdaRunner` does, as each invocation starts), it also gives up the pool's own
        logins under way (min_size refills): one begun before the pause may wait on a socket that
        died meanwhile, in the slot a caller needs; that caller logs in itself (not the first
        time after a SnapStart restore: those began after it). From another
        thread (a snapshot-restore hook) it only marks the connections."""
        housekeeping.mark_stale(self._slots)
        with contextlib.suppress(RuntimeError):  # (no running loop: another thread)
            if asyncio.get_running_loop() is self._slots.loop:
                logins.give_up_fills(self._slots)

    def invalidate_statement_cache(self) -> None:
        """Forget cached statement descriptions (``prepared_statements="unnamed"``), e.g.
        after a migration: every connection describes each statement afresh on its next use.
        Applies to every pool in this process."""
        from asyncpool.unnamed import invalidate_all

        invalidate_all()

    # -- checkout -----------------------------------------------------------------------------

    def acquire(self, timeout: float | None = UNSET) -> AcquireContext[PoolRecordT_co]:
        """``async with pool.acquire() as conn:`` a connection, returned when the block ends.

        `timeout` overrides `acquire_timeout` for this call. Also ``conn = await
        pool.acquire()`` followed by ``await pool.release(conn)``.
        """
        if timeout is not UNSET:
            timeout = check_timeout(self.name, "acquire(timeout=...)", timeout)
        # AcquireContext(self._slots, timeout, frame) without the call to its __init__: 540
        # instructions less per checkout (benchmarks/README.md); tests/unit/test_lease.py
        # checks that every slot is set.
        context: AcquireContext[PoolRecordT_co] = blank(AcquireContext)
        context._owner = self._slots
        context._timeout = timeout
        context._frame = sys._getframe(1)
        context._lease = None
        context._conn = None
        return context

    def transaction(
        self,
        timeout: float | None = UNSET,
        *,
        isolation: Isolation | None = None,
        readonly: bool = False,
        deferrable: bool = False,
    ) -> TransactionContext[PoolRecordT_co]:
        """``async with pool.transaction() as conn:`` commits on success, rolls back on error.

        `isolation` is one of asyncpg's names (``"serializable"``, ``"repeatable_read"``,
        ``"read_committed"``, ``"read_uncommitted"``; None: the server's default); `readonly`
        and `deferrable` are True or False (PostgreSQL applies DEFERRABLE to a serializable
        read-only transaction only). Another isolation name, or a string for `readonly` or
        `deferrable` (asyncpg would take ``"no"`` for True), raises `PoolConfigError` before
        anything is taken."""
        if timeout is not UNSET:
            timeout = check_timeout(self.name, "transaction(timeout=...)", timeout)
        check_transaction_options(self.name, isolation, readonly, deferrable)
        return TransactionContext(
            self._slots, timeout, sys._getframe(1), isolation=isolation, readonly=readonly,
            deferrable=deferrable,
        )

    async def release(self, connection: PooledConnection, *, timeout: float | None = None) -> None:
        """Return a connection taken with ``await pool.acquire()``.

        A connection left in a transaction (or listening) is reset first, within `timeout`
        (default 5 s); one whose reset fails or takes longer is closed, not reused, and its slot
        freed: release() itself does not fail for it. A bad `timeout` is a `PoolConfigError`,
        raised once the connection is back (with the default).
        """
        if not isinstance(connection, PooledConnection):
            raise PoolError(f"pool {self.name!r}: release() takes the connection acquire() gave")
        error = timeout_error(self.name, "release(timeout=...)", timeout,
                              f"the pool's {RELEASE_TIMEOUT:g} s", GIVEN_BACK)
        timeout = None if error is not None else in_seconds(timeout)
        lease = connection._lease
        slots = self._slots
        if connection._owner is not slots:
            owner = connection._owner.name
            # Two pools left with the default name would read "pool 'asyncpool' ... of pool
            # 'asyncpool'", which looks like the same pool: say it is another one.
            which = (f"another pool, also named {owner!r} (give each pool its own name=)"
                     if owner == self.name else f"pool {owner!r}")
            raise PoolError(
                f"pool {self.name!r}: release() was given a connection of {which}; release it "
                "to the pool it came from"
            )
        if lease.state is ACTIVE:  # (a no-op otherwise: a fork's child gives back nothing)
            slots.refuse_other_loop()  # it stays held: released from its loop, it goes back
        if slots.checkin_nowait(lease):
            await slots.checkin(lease, timeout)
        if error is not None:
            raise error

    # The query helpers: each instance has them bound to its statement runners (see __init__);
    # these are what type checkers and the documentation read, and what runs through the class.

    async def execute(self, query: str, *args: Any, timeout: float | None = None) -> str:
        """Run a statement on a connection of the pool (``asyncpg.Connection.execute``)."""
        status: str = await RUNNERS["execute"](self._slots, query, *args, timeout=timeout)
        return status

    async def executemany(self, command: str, args: Iterable[Sequence[object]], *,
                          timeout: float | None = None) -> None:
        """Run a statement once per argument tuple (``asyncpg.Connection.executemany``)."""
        given, args = argument_sets(args)
        if not given:  # only described: the return must end its Parse (asyncpool.pool.unsynced)
            async with self.acquire() as conn:
                await conn.executemany(command, args, timeout=timeout)
            return
        await RUNNERS["executemany"](self._slots, command, args, timeout=timeout)

    @overload
    async def fetch(self, query: str, *args: Any, timeout: float | None = None,
                    record_class: None = None) -> list[PoolRecordT_co]: ...
    @overload
    async def fetch(self, query: str, *args: Any, timeout: float | None = None,
                    record_class: type[RecordT]) -> list[RecordT]: ...
    @overload
    async def fetch(self, query: str, *args: Any, timeout: float | None = None,
                    record_class: type[RecordT] | None) -> list[PoolRecordT_co] | list[RecordT]: ...

    async def fetch(self, query: str, *args: Any, timeout: float | None = None,
                    record_class: type[Any] | None = None) -> list[Any]:
        """The rows of a query (``asyncpg.Connection.fetch``); of `record_class` if given."""
        rows: list[Any] = await RUNNERS["fetch"](self._slots, query, *args, timeout=timeout,
                                                 record_class=record_class)
        return rows

    @overload
    async def fetchrow(self, query: str, *args: Any, timeout: float | None = None,
                       record_class: None = None) -> PoolRecordT_co | None: ...
    @overload
    async def fetchrow(self, query: str, *args: Any, timeout: float | None = None,
                       record_class: type[RecordT]) -> RecordT | None: ...
    @overload
    async def fetchrow(self, query: str, *args: Any, timeout: float | None = None,
                       record_class: type[RecordT] | None) -> PoolRecordT_co | RecordT | None: ...

    async def fetchrow(self, query: str, *args: Any, timeout: float | None = None,
                       record_class: type[Any] | None = None) -> Any:
        """The first row of a query, or None (``asyncpg.Connection.fetchrow``)."""
        row: Any = await RUNNERS["fetchrow"](
            self._slots, query, *args, timeout=timeout, record_class=record_class)
        return row

    async def fetchval(self, query: str, *args: Any, column: int | str = 0,
                       timeout: float | None = None) -> Any:
        """One value of the first row, or None (``asyncpg.Connection.fetchval``)."""
        return await RUNNERS["fetchval"](self._slots, query, *args, column=column, timeout=timeout)

    # asyncpg.Pool's rarer helpers, through the class: one Python call more than the bound ones
    # above, nothing beside a COPY.

    @overload
    async def fetchmany(self, query: str, args: Iterable[Sequence[object]], *,
                        timeout: float | None = None,
                        record_class: None = None) -> list[PoolRecordT_co]: ...
    @overload
    async def fetchmany(self, query: str, args: Iterable[Sequence[object]], *,
                        timeout: float | None = None, record_class: type[RecordT]) -> list[RecordT]: ...
    @overload
    async def fetchmany(self, query: str, args: Iterable[Sequence[object]], *,
                        timeout: float | None = None, record_class: type[RecordT] | None
                        ) -> list[PoolRecordT_co] | list[RecordT]: ...

    async def fetchmany(self, query: str, args: Iterable[Sequence[object]], *,
                        timeout: float | None = None,
                        record_class: type[Any] | None = None) -> list[Any]:
        """The rows a statement returns, run once per argument tuple
        (``asyncpg.Connection.fetchmany``, asyncpg >= 0.30)."""
        given, args = argument_sets(args)
        if not given:  # only described: the return must end its Parse (asyncpool.pool.unsynced)
            async with self.acquire() as conn:
                return await conn.fetchmany(query, args, timeout=timeout,
                                            record_class=record_class)
        rows: list[Any] = await RUNNERS["fetchmany"](self._slots, query, args, timeout=timeout,
                                                     record_class=record_class)
        return rows

    async def copy_from_query(self, query: str, *args: object, output: Any,
                              **options: Unpack[CopyFormatOptions]) -> str:
        """Copy a query's result to `output`, a file, path or coroutine function
        (``asyncpg.Connection.copy_from_query``); returns the status, e.g. ``"COPY 3"``."""
        status: str = await RUNNERS["copy_from_query"](self._slots, query, *args, output=output,
                                                       **options)
        return status

    async def copy_from_table(self, table_name: str, *, output: Any,
                              **options: Unpack[CopyFromTableOptions]) -> str:
        """Copy a table's rows to `output` (``asyncpg.Connection.copy_from_table``)."""
        status: str = await RUNNERS["copy_from_table"](self._slots, table_name, output=output,
                                                       **options)
        return status

    async def copy_records_to_table(self, table_name: str, *,
                                    records: Iterable[Sequence[object]]
                                    | AsyncIterable[Sequence[object]],
                                    **options: Unpack[CopyRecordsOptions]) -> str:
        """Insert `records` with ``COPY ... FROM STDIN`` in binary
        (``asyncpg.Connection.copy_records_to_table``)."""
        status: str = await RUNNERS["copy_records_to_table"](self._slots, table_name,
                                                             records=records, **options)
        return status

    async def copy_to_table(self, table_name: str, *, source: Any,
                            **options: Unpack[CopyToTableOptions]) -> str:
        """Copy `source`, a file, path or async iterable of bytes, into a table
        (``asyncpg.Connection.copy_to_table``)."""
        status: str = await RUNNERS["copy_to_table"](self._slots, table_name, source=source,
                                                     **options)
        return status

    # -- asyncpg.Pool's introspection and upkeep, under its names -----------------------------

    def get_size(self) -> int:
        """Connections open or being opened (``stats().size``)."""
        return self._slots.size()

    def get_idle_size(self) -> int:
        """Connections open and waiting in the pool (``stats().idle``)."""
        return len(self._slots.idle)

    def get_init_size(self) -> int:
        """Connections `open()` opens: `init_size`, or `min_size` without it (as asyncpg 0.32)."""
        return opened_by_open(self.config)

    def get_min_size(self) -> int:
        return self.config.min_size

    def get_max_size(self) -> int:
        return self.config.max_size

    def is_closing(self) -> bool:
        """True once `close()` or `terminate()` has begun (``closed``)."""
        return self.closed

    async def expire_connections(self) -> None:
        """`expire_all()`, under asyncpg's name (asyncpg's is a coroutine too)."""
        self.expire_all()

    @config_errors_without_frames
    def set_connect_args(self, dsn: str | None = None, *,
                         credentials: CredentialProvider | Keep | None = Keep.KEEP,
                         **connect_kwargs: Any) -> None:
        """Connect with these arguments from now on, as asyncpg's pool does: the DSN and
        asyncpg's ``connect()`` arguments (``host``, ``user``, ``password``, ``database``,
        ``ssl``, ``server_settings``, ``command_timeout``...) replace every one given before;
        the pool's own options stay. Connections open now stay until they expire:
        ``await pool.expire_connections()`` replaces each at its next checkout. Checked here:
        a bad argument raises `PoolConfigError` and changes nothing.

        `credentials`: a new provider for the logins from now on (None: none, the password
        given logs in); not given, the pool's stays. A replaced provider is closed once no
        login under way uses it (at once if none does), unless given back before. A password
        given while a provider is in use would be ignored, so it is refused. For a password or
        token that rotates, a provider awaited at every login is the better fit
        (docs/credentials-and-tls.md).

        Call it on the pool's loop: from another thread while that loop runs it raises
        `PoolError` (logins under way there would see half of the change).
        """
        misuse.refuse_running_elsewhere(self._slots, "set_connect_args()", _SET_ON_LOOP)
        config = with_connect_args(self.config, dsn, connect_kwargs, credentials)
        slots = self._slots
        current = slots.connector
        # Built (and so checked: DSN, target, TLS and credential rules) before anything changes.
        connector = Connector(config, slots.observer,
                              totals=current.statement_cache if current is not None else None)
        if current is not None and slots.state is OPEN:
            lifecycle.use_connector(slots, connector)
        else:  # not open yet (open() builds its connector from the config), or closed
            slots.config = config
        self.config = config

    # -- introspection ------------------------------------------------------------------------

    def stats(self) -> PoolStats:
        """Current sizes and running totals. Safe to call from another thread (an OpenTelemetry
        metric reader's): no lock, and each field is read once."""
        return pool_stats.stats(self._slots)

    @property
    def closed(self) -> bool:
        state = self._slots.state
        return state is CLOSING or state is CLOSED_STATE

    @property
    def target(self) -> str:
        """``user@host:port/database`` this pool connects to (no secrets)."""
        return self._slots.target


#: The helpers bound to each pool (the common ones); the others run through `Pool`'s methods.
QUERY_HELPERS = ("execute", "fetch", "fetchrow", "fetchval")
HELPER_METHODS.update(getattr(Pool, name).__code__ for name in QUERY_METHODS)


def _present(runner: Callable[..., Any], method: Callable[..., Any]) -> None:
    """Make `runner` look like the `Pool` method it stands for on an instance (to ``inspect``,
    ``unittest.mock``, editors and reprs): its name, docstring and signature."""
    for attribute in ("__name__", "__qualname__", "__doc__", "__module__"):
        setattr(runner, attribute, getattr(method, attribute))
    runner.__signature__ = inspect.signature(method)  # type: ignore[attr-defined]


for _name in QUERY_HELPERS:
    _present(RUNNERS[_name], getattr(Pool, _name))


def _through_acquire(name: str) -> Callable[..., Any]:
    """The query helper `name` as asyncpg's pool runs it: ``async with self.acquire() as
    conn: return await conn.<name>(...)`` (for a subclass that overrides ``acquire()``)."""

    async def helper(self: Pool, /, *args: Any, **kwargs: Any) -> Any:
        async with self.acquire() as conn:
            return await getattr(conn, name)(*args, **kwargs)

    functools.update_wrapper(helper, getattr(Pool, name))
    return helper


THROUGH_ACQUIRE = {name: _through_acquire(name) for name in QUERY_METHODS}


#: How to call `set_connect_args` from another thread: a coroutine on the pool's loop, whose
#: future's result() raises its PoolConfigError there (call_soon_threadsafe would only log it).
_SET_ON_LOOP = ("asyncio.run_coroutine_threadsafe(set_args(), loop).result() with "
                "`async def set_args(): pool.set_connect_args(...)`")


@overload
def create_pool(
    dsn: str | None = None,
    *,
    config: PoolConfig | None = None,
    observers: list[PoolObserver] | None = None,
    loop: asyncio.AbstractEventLoop | None = None,
    init: Callable[[asyncpg.Connection[asyncpg.Record]], Awaitable[object]] | None = None,
    setup: Callable[[PooledConnection[asyncpg.Record]], Awaitable[object]] | None = None,
    **options: Unpack[PoolOptionsWithoutRows],
) -> Pool[asyncpg.Record]: ...
@overload
def create_pool(
    dsn: str | None = None,
    *,
    config: PoolConfig | None = None,
    observers: list[PoolObserver] | None = None,
    loop: asyncio.AbstractEventLoop | None = None,
    record_class: type[RecordT],
    init: Callable[[asyncpg.Connection[RecordT]], Awaitable[object]] | InitHook | None = None,
    setup: Callable[[PooledConnection[RecordT]], Awaitable[object]] | None = None,
    **options: Unpack[PoolOptionsWithoutRows],
) -> Pool[RecordT]: ...
@config_errors_without_frames  # type: ignore[misc]  # (hooks of any rows: the overloads type them)
def create_pool(
    dsn: str | None = None,
    *,
    config: PoolConfig | None = None,
    observers: list[PoolObserver] | None = None,
    loop: asyncio.AbstractEventLoop | None = None,
    record_class: type[PoolRecordT_co] = NOT_GIVEN,
    **options: Unpack[PoolOptionsWithoutRecordClass],
) -> Pool[PoolRecordT_co]:
    """A pool, opened when awaited: ``pool = await asyncpool.create_pool(dsn, max_size=5)``, or
    ``async with asyncpool.create_pool(dsn) as pool:`` (closed when the block ends), as with
    ``asyncpg.create_pool``.

    Takes what `Pool` takes, and checks it here; with no `dsn`, ``ASYNCPOOL_DSN`` (and the other
    ``ASYNCPOOL_*`` variables) configure it. Like asyncpg's, it returns the pool (awaitable),
    not a coroutine: ``asyncio.ensure_future(create_pool(...))`` makes a task of it."""
    return Pool(dsn, config=config, observers=observers, loop=loop, record_class=record_class,
                **options)
