"""The `async with` objects returned by `Pool.acquire()` and `Pool.transaction()`."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Generator
from types import FrameType, TracebackType
from typing import TYPE_CHECKING, Any, Generic, Protocol, TypeVar

import asyncpg

from asyncpool.config import SetupHook
from asyncpool.connect.copy_end import closed_out_of_step
from asyncpool.connect.driver import CLEAN, returned
from asyncpool.connect.failures import (
    advise_on_prepared_statements,
    broken_connection_error,
    lost_connection_hint,
    protocol_out_of_step,
    stopped_by_pool,
)
from asyncpool.errors import (
    ConnectionLeakedError,
    ConnectionLostError,
    PoolClosedError,
    PoolError,
    TransactionRolledBackError,
)
from asyncpool.pool.commit import commit
from asyncpool.pool.connection import PooledConnection, PoolRecordT_co
from asyncpool.pool.leaks import LEAK_CANCEL_MESSAGE
from asyncpool.pool.lease import ACTIVE, CLOSED, GIVEN_BACK, LEAKED, RELEASED, TERMINATED, Lease, LeaseState
from asyncpool.pool.record import IDLE
from asyncpool.pool.resets import reset_timeout
from asyncpool.pool.unusable import closed_before_commit

if TYPE_CHECKING:
    from collections import deque

    from asyncpool.pool.record import ConnectionRecord
    from asyncpool.pool.state import PoolState

    _T = TypeVar("_T")

    class _Blank(Protocol):
        def __call__(self, cls: type[_T], /) -> _T: ...

logger: logging.Logger = logging.getLogger("asyncpool.pool")

#: Builds an object of a class with __slots__ without a call to its __init__: the checkout path
#: builds its lease, proxy and context this way (tests/unit/test_lease.py checks every slot).
blank: _Blank = object.__new__


class Checkouts(Protocol):
    """What the acquire contexts and `PooledConnection` need from a pool, and all they use.

    `asyncpool.pool.slots.Slots` provides it. A checkout tries `checkout_nowait` (no coroutine,
    the common case) and falls back to `checkout`; a return calls `checkin_nowait`, and awaits
    `checkin` only when that says a reset (a rollback, a cancel finishing) is needed.
    """

    name: str
    #: Open, closing, closed... (`asyncpool.pool.state`).
    state: PoolState
    #: Awaited with the connection at each checkout (asyncpg's ``setup``), or None.
    setup: SetupHook | None
    # What the clean end of an ``async with pool.acquire()`` block reads and writes itself, as
    # `Slots.checkin_nowait` would (`AcquireContext.__aexit__`).
    idle: deque[ConnectionRecord]
    #: The pool's clock (its loop's); the ``setup`` hook's share of a timeout is read by it too.
    clock: Callable[[], float]
    fast_statements: bool
    validate_after: float
    _may_retire: bool
    on_released: Callable[[float], None] | None
    #: The loop the pool was opened on (None before open() and after close()), and whether it
    #: tells the thread running it (``_thread_id``: asyncio's loops, not uvloop's).
    loop: asyncio.AbstractEventLoop | None
    loop_has_thread_id: bool

    @property
    def statement_mode(self) -> str:
        """The pool's ``prepared_statements``."""

    def refuse_other_loop(self) -> None: ...

    @property
    def target(self) -> str: ...

    def checkout_nowait(self, frame: FrameType | None) -> Lease | None: ...

    async def checkout(self, timeout: float | None, frame: FrameType | None) -> Lease: ...

    def checkin_nowait(self, lease: Lease) -> bool: ...

    async def checkin(self, lease: Lease, timeout: float | None = None) -> None: ...

    # (It may point `conn` at a new checkout: a SnapStart snapshot closed the first under it.)
    async def set_up(self, conn: PooledConnection, timeout: float | None,
                     started: float) -> None: ...

    def discard(self, lease: Lease, reason: str, *, state: LeaseState = ...,
                lost: bool = ...) -> None: ...

    @property
    def transaction_sql(self) -> str | None: ...

    def refused_setting(self, exc: BaseException) -> Exception | None: ...


class AcquireContext(Generic[PoolRecordT_co]):
    """``async with pool.acquire() as conn`` / ``conn = await pool.acquire()``."""

    # _conn: the proxy handed out by `__aenter__` (None by `await`): its block's clean end
    # points it at `GIVEN_BACK` when the lease goes to the record as its spare.
    __slots__ = ("_conn", "_frame", "_lease", "_owner", "_timeout")

    def __init__(self, owner: Checkouts, timeout: float | None, frame: FrameType | None) -> None:
        self._owner = owner
        self._timeout = timeout
        self._frame = frame
        self._lease: Lease | None = None
        self._conn: PooledConnection[PoolRecordT_co] | None = None

    async def __aenter__(self) -> PooledConnection[PoolRecordT_co]:
        owner = self._owner
        if self._lease is not None:
            raise _used_twice(owner)
        # The setup hook counts in the acquire's timeout (as in asyncpg).
        started = owner.clock() if owner.setup is not None else 0.0
        lease = owner.checkout_nowait(self._frame) or await owner.checkout(self._timeout, self._frame)
        lease.scoped = True
        # What a reclaim's cancellation is told apart from the holder's own by (`_raise_leaked`).
        task = lease.task
        lease.cancel_requests = task.cancelling() if task is not None else None
        self._frame = None
        self._lease = lease
        conn: PooledConnection[PoolRecordT_co]
        # PooledConnection(lease, owner) (or the subclass its connection class needs), no __init__
        conn = self._conn = blank(lease.record.proxy_class)
        conn._lease = lease
        conn._owner = owner
        if owner.setup is not None:
            try:
                await owner.set_up(conn, self._timeout, started)
            except BaseException as exc:
                lease = conn._lease
                if lease.state is LEAKED:  # the hook ran past leak_timeout: reclaimed under it
                    _raise_leaked(owner.name, lease, exc)
                raise
            if conn._lease is not lease:  # a new checkout: a snapshot closed the first (set_up)
                self._lease = lease = conn._lease
                lease.scoped = True
                task = lease.task
                lease.cancel_requests = task.cancelling() if task is not None else None
        return conn

    def __await__(self) -> Generator[Any, None, PooledConnection[PoolRecordT_co]]:
        return self._acquire_unscoped().__await__()

    if not TYPE_CHECKING:  # mistakes that type checkers already report: a clear error at run time
        def __enter__(self):
            raise TypeError(f"pool {self._owner.name!r}: {_ASYNC_ONLY}")

        def __exit__(self, *exc_info):
            return None

        # No __getattr__ for a method called on the un-awaited context: a class with one is not
        # specialized by Python 3.11's attribute caches, and every checkout would read its own
        # attributes the slow way (bench_cycle.py: +0.1 to +0.2 µs).

    async def _acquire_unscoped(self) -> PooledConnection[PoolRecordT_co]:
        # No block will end this checkout: a leak reclaim must not cancel the holder's task.
        owner = self._owner
        if self._lease is not None:
            raise _used_twice(owner)
        started = owner.clock() if owner.setup is not None else 0.0
        lease = owner.checkout_nowait(self._frame) or await owner.checkout(self._timeout, self._frame)
        self._frame = None
        self._lease = lease  # (not ended by this object: no block)
        conn: PooledConnection[PoolRecordT_co] = lease.record.proxy_class(lease, owner)
        if owner.setup is not None:
            await owner.set_up(conn, self._timeout, started)
            self._lease = conn._lease  # (a new one if a snapshot closed the first: set_up)
        return conn

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        lease = self._lease
        if lease is None:
            return
        if exc is None and lease.state is ACTIVE:  # the common case: a clean return
            owner = self._owner
            record = lease.record
            conn = record.conn
            now = owner.clock()
            expires_at = record.expires_at
            proxy = self._conn
            # `checkin_nowait`'s common case written out, as the statement runner writes its
            # own (a call on this path costs several times what it costs in a loop: the I/O in
            # between leaves the caches cold); anything else goes its way.
            if (proxy is not None and owner.fast_statements and not lease.reported
                    and not lease.running and now < expires_at and not record.stale
                    and not record.sync_after
                    and not (owner._may_retire and conn.retire_reason)
                    and returned(conn) == CLEAN):
                lease.state = RELEASED
                lease.frame = None
                lease.task = lease.user = None  # (a finished task keeps its result)
                lease.cancel_requests = None  # (a query helper may take it next: none counted)
                lease.context = None
                # The lease stays with the record for the next checkout to take (no allocation:
                # `Slots.checkout_nowait`); the proxy, which the holder may keep, and this
                # context (exited again, it must not end the next holder's checkout) are pointed
                # at a released lease of no connection, so they stay refused, or do nothing,
                # whoever holds the connection next.
                proxy._lease = GIVEN_BACK
                self._lease = GIVEN_BACK
                record.spare = lease
                if owner.on_released is not None:
                    owner.on_released(now - lease.acquired_at)
                record.lease = None
                record.last_used = now
                check_at = now + owner.validate_after
                record.check_at = check_at if check_at < expires_at else expires_at
                record.place = IDLE
                owner.idle.append(record)
                return
            if owner.checkin_nowait(lease):
                await owner.checkin(lease)
            return
        await end_checkout(self._owner, lease, exc)


_ASYNC_ONLY = ("pool.acquire() is asynchronous: write `async with pool.acquire() as conn:`, or "
               "`conn = await pool.acquire()` and later `await pool.release(conn)`")


def _not_a_connection(name: str) -> property:
    """A connection's attribute read on the context itself (``conn = pool.acquire()``, the
    `await` forgotten): an AttributeError that says what to write, not just that
    'AcquireContext' has no attribute `name` (so `hasattr()` stays False)."""
    def refuse(context: AcquireContext[Any]) -> Any:
        made = "pool.transaction()" if isinstance(context, TransactionContext) else "pool.acquire()"
        written = ("`async with pool.transaction() as conn:`" if made == "pool.transaction()"
                   else "`async with pool.acquire() as conn:` or `conn = await pool.acquire()`")
        raise AttributeError(
            f"pool {context._owner.name!r}: {made} gives a connection, it is not one (no .{name}): "
            f"write {written}, then conn.{name}", name=name, obj=context)
    return property(refuse, doc=f"Refused: ``{name}`` is the connection's (await it first).")


if not TYPE_CHECKING:  # type checkers already report these (AcquireContext has no such member)
    # Properties, not a __getattr__ (see AcquireContext: that would slow every checkout).
    for _name in (n for n in dir(asyncpg.Connection) if not n.startswith("_")):
        if not hasattr(AcquireContext, _name):
            setattr(AcquireContext, _name, _not_a_connection(_name))
    del _name


def _used_twice(owner: Checkouts) -> PoolError:
    # asyncpg refuses it too: entered again, the context would lose the first checkout (never
    # returned, then reclaimed as a leak by cancelling whatever the task is doing by then).
    return PoolError(
        f"pool {owner.name!r}: this pool.acquire() (or pool.transaction()) object was already "
        "used; each one gives one connection: call pool.acquire() again for another"
    )


async def end_checkout(owner: Checkouts, lease: Lease, exc: BaseException | None) -> None:
    """Give back the connection of a checkout whose block (or single statement) ended with `exc`,
    or found its lease no longer active; raise what the holder must see instead, if anything.

    Returning means: let `exc` (if any) go on. The end of ``async with pool.acquire()`` and of
    the query helpers (``pool.fetchval()``...), which take the clean return inline.
    """
    if lease.state is LEAKED:
        _raise_leaked(owner.name, lease, exc)
        return
    if exc is not None:
        advise_on_prepared_statements(exc, owner.statement_mode)
        if lease.state is ACTIVE and isinstance(exc, asyncio.CancelledError | TimeoutError):
            # Cut short, maybe while asyncpg described a statement (the helpers', or one of
            # asyncpg's own calls the proxy does not see: a statement's explain(), LISTEN).
            lease.record.note_unsynced_parse()
    # Only the driver's own failure becomes ConnectionLostError: the holder's exception (an HTTP
    # 404 raised in the block), a time limit, or a cancellation go on as they are, even if the
    # connection died meanwhile; so does the server's error that ended a COPY whose connection
    # its class then closed, out of step with its front (`asyncpool.connect.copy_end`).
    lost = (exc is not None and lease.state is ACTIVE and broken_connection_error(exc)
            and lease.record.conn.is_closed() and not closed_out_of_step(lease.record.conn))
    if exc is not None and not lost and lease.state is ACTIVE and protocol_out_of_step(exc):
        # asyncpg's protocol is out of step with the server, and refuses every statement from
        # now on: it read a message it had not asked for, such as the FATAL error a server or
        # pooler sends an idle connection before closing it (pg_terminate_backend, PgBouncer's
        # KILL), read before the close. Its COPY methods raise that without closing the
        # connection. (Its other InternalClientErrors, such as a value it has no decoder for,
        # leave the connection working: they go on as they are, as from asyncpg's pool.)
        owner.discard(lease, "protocol out of step", lost=True)
        lost = True
    if owner.checkin_nowait(lease):
        await owner.checkin(lease)
    if lease.state is CLOSED and exc is not None and stopped_by_pool(exc):
        # The pool closed it under the statement (close() past its timeout, terminate()).
        raise PoolClosedError(
            f"pool {owner.name!r} was closed while this connection was in use "
            f"({type(exc).__name__}: {exc}); an open transaction was not committed (if it was "
            "closed during COMMIT, that commit's outcome is unknown)"
        ) from exc
    if lost:
        assert exc is not None
        raise ConnectionLostError(
            f"pool {owner.name!r}: the connection to {owner.target} was lost while "
            f"in use ({type(exc).__name__}: {exc}).{lost_connection_hint(exc)} An open "
            "transaction was not committed "
            "(if it was lost during COMMIT, that commit's outcome is unknown). The pool "
            "replaced the connection; retry if the work is idempotent."
        ) from exc


def _raise_leaked(pool_name: str, lease: Lease, exc: BaseException | None) -> None:
    """Turn the cancellation the leak reclaim caused into `ConnectionLeakedError`.

    The reclaim's cancel request is withdrawn exactly once, wherever it surfaced (in the block,
    or in the ROLLBACK `pool.transaction()` sends on the way out), so none is left on the task.
    """
    task = asyncio.current_task()
    before = lease.holder_cancelled
    if before is not None and task is lease.task and task is not None and task.cancelling():
        lease.holder_cancelled = None
        task.uncancel()
        # The holder's own cancellation goes on (as from asyncpg.Pool or psycopg_pool, which
        # never reclaim) when requests are left that were made since its block took the
        # connection: a caller's cancel or time limit, even if the block caught it and was
        # still cleaning up when the reclaim came. That is how `asyncio.timeout()` tells its own
        # cancellation from another's (Python 3.12+): by the count when it was entered, so a
        # request left over from earlier code (a cancel swallowed without uncancel(), a
        # TaskGroup on Python < 3.13) is not taken for one.
        entered = lease.cancel_requests
        left = task.cancelling()
        if entered is not None:
            theirs = left > min(entered, before)
        else:
            # Not counted for this task (a query helper's statement, where no code of the
            # holder's runs; a block driven by another task than the one that entered it):
            # a request made after the reclaim's, or one before it whose CancelledError the
            # block is still handling.
            theirs = left > before or (left == before > 0 and _cancelled_before_reclaim(exc))
        if isinstance(exc, asyncio.CancelledError) and theirs:
            return  # somebody else cancelled this task too: their cancellation goes on
    raise ConnectionLeakedError(
        f"pool {pool_name!r}: the connection was held past leak_timeout and reclaimed (holder "
        "cancelled, connection closed); release connections promptly or raise leak_timeout"
    ) from None


def _cancelled_before_reclaim(exc: BaseException | None) -> bool:
    """`exc`, or an exception it was raised while handling, is a cancellation that is not the
    leak reclaim's (whose CancelledError carries `LEAK_CANCEL_MESSAGE`) and is not over."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, asyncio.CancelledError) and LEAK_CANCEL_MESSAGE not in current.args:
            return True
        handled = current.__context__
        if isinstance(current, TimeoutError) and isinstance(handled, asyncio.CancelledError):
            # asyncio.timeout() or wait_for() ended that cancellation as this TimeoutError
            # (its request withdrawn): over, though the block may still be handling it.
            handled = handled.__context__
        current = handled
    return False


def _not_committed(owner: Checkouts, lease: Lease | None) -> PoolError:
    if lease is not None and lease.state is CLOSED:
        return closed_before_commit(owner.name)
    if lease is not None and lease.state is TERMINATED:
        return PoolError(
            f"pool {owner.name!r}: the connection was terminated inside pool.transaction(): "
            "the transaction was not committed"
        )
    if lease is not None and lease.state is RELEASED and not lease.record.conn.is_closed():
        return PoolError(
            f"pool {owner.name!r}: the connection was released (conn.close()) inside "
            "pool.transaction(): the transaction was rolled back, not committed"
        )
    # asyncpg drops the error a pooler or server sends an idle connection before closing it
    # (PgBouncer's "idle transaction timeout"): the likely cause is named, not asserted.
    return ConnectionLostError(
        f"pool {owner.name!r}: the connection to {owner.target} was lost before COMMIT: the "
        "transaction was not committed. It was closed while the block ran; if the block spent "
        "time between statements, a limit on idle transactions is the likely cause (PgBouncer's "
        "idle_transaction_timeout, PostgreSQL's idle_in_transaction_session_timeout): do not "
        "wait on other work inside a transaction. The pool replaced the connection; retry if "
        "the work is idempotent."
    )


class TransactionContext(AcquireContext[PoolRecordT_co]):
    """``async with pool.transaction() as conn``: commit on success, roll back on error."""

    __slots__ = ("_options", "_tx")

    def __init__(self, owner: Checkouts, timeout: float | None, frame: FrameType | None,
                 **options: Any) -> None:
        super().__init__(owner, timeout, frame)
        self._options = options
        self._tx: Any = None

    async def __aenter__(self) -> PooledConnection[PoolRecordT_co]:
        conn = await super().__aenter__()
        try:
            self._tx = conn.raw.transaction(**self._options)
            await self._tx.start()
            settings = self._owner.transaction_sql
            if settings is not None:
                # server_settings a pooler would not keep, for this transaction (SET LOCAL).
                try:
                    await conn.raw.execute(settings)
                except Exception as exc:  # (the server's refusal: `refused_setting`)
                    if (refused := self._owner.refused_setting(exc)) is None:
                        raise
                    raise refused from exc
        except BaseException as exc:
            await super().__aexit__(type(exc), exc, exc.__traceback__)
            raise
        return conn

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        lease = self._lease
        if lease is GIVEN_BACK:  # exited before, committed: a second exit changes nothing
            return
        usable = lease is not None and lease.active and not lease.record.conn.is_closed()
        if not usable or self._tx is None:
            await super().__aexit__(exc_type, exc, tb)
            if exc is None and self._tx is not None:
                # The block ended well but its connection is gone: COMMIT was never sent.
                raise _not_committed(self._owner, lease)
            return
        if exc is not None:
            try:
                # Within the time a reset has: cut short by a Lambda deadline on a server that
                # no longer answers (the network gone), this ROLLBACK waited until the leak
                # timeout, past the deadline; the reset after it then closes the connection.
                async with asyncio.timeout(reset_timeout(asyncio.get_running_loop())):
                    await self._tx.rollback()
            except Exception:  # noqa: S110
                # The block's own error (or cancellation) is what the caller must see; a failed
                # rollback leaves the transaction open, and release() resets or drops it.
                pass
            finally:
                await super().__aexit__(exc_type, exc, tb)
            return
        if lease is not None and not lease.record.conn.is_in_transaction():
            # Ended inside the block by a COMMIT or ROLLBACK sent as a statement: asyncpg's
            # COMMIT below only draws the server's "no transaction in progress" warning.
            logger.warning(
                "pool %r: a pool.transaction() block's transaction was ended inside it (a COMMIT "
                "or ROLLBACK sent as a statement): what ran after that was not in it but "
                "committed statement by statement (behind a transaction-mode pooler, perhaps on "
                "other server connections). Let the block's end commit, or raise to roll back",
                self._owner.name)
        try:
            committed = await commit(self._tx)
        except BaseException as commit_error:
            await super().__aexit__(type(commit_error), commit_error, commit_error.__traceback__)
            raise
        await super().__aexit__(None, None, None)
        if not committed:
            raise TransactionRolledBackError(
                f"pool {self._owner.name!r}: the transaction was rolled back, not committed: a "
                "statement in the pool.transaction() block failed and its error was caught "
                "inside the block (PostgreSQL then refuses every statement up to the end and "
                "answers COMMIT with ROLLBACK). Let the error leave the block, or catch it in a "
                "nested `async with conn.transaction():` (a savepoint) to go on without it")
