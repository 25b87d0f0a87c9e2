"""asyncpg's transactions, prepared statements, cursor factories and the cursors they open,
made through a held connection, bound to the connection's event loop: used from another thread
or loop, asyncpg would send the statement and only then fail waiting for its reply (it ran on the
server while the caller got an error), so they refuse first, as the connection itself does
(`PooledConnection`). Cut off by the pool (their connection given back from another task,
``terminate()``, ``close()`` past its timeout, a leak reclaim), a prepared statement's step or
``explain()``, a cursor's opening or step raises the pool's error, as the connection's own
statements do (`stopped_under`), and so does the next step (`_OnItsLoop._refuse_ended`).
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Awaitable, Callable, Coroutine, Generator
from threading import get_ident
from typing import TYPE_CHECKING, Any, TypeVar

import asyncpg
from asyncpg.cursor import Cursor, CursorFactory, CursorIterator
from asyncpg.prepared_stmt import PreparedStatement
from asyncpg.transaction import Transaction

from asyncpool.connect.failures import (
    broken_connection_error,
    dropped_transport_error,
    stopped_by_pool,
)
from asyncpool.connect.forwarding import LoopView
from asyncpool.errors import PoolError
from asyncpool.options import check_row_count, check_statement_timeout
from asyncpool.pool.lease import ACTIVE, TERMINATED
from asyncpool.pool.record import record_of
from asyncpool.pool.state import OPEN
from asyncpool.pool.unsynced import (
    RUN_PER_ARGUMENT_SET,
    call_with_argument_sets,
    left_unsynced,
)
from asyncpool.pool.unusable import closed_before_commit, unusable
from asyncpool.unnamed.prepared import CheckedPreparedStatement

if TYPE_CHECKING:
    from asyncpool.pool.lease import Lease
    from asyncpool.pool.record import ConnectionRecord

R = TypeVar("R")


def on_its_loop(conn: Any) -> bool:
    """Whether the caller runs on `conn`'s event loop, in its thread (asyncio's loops know
    their thread; uvloop's are asked for the running loop)."""
    loop = conn._loop
    if isinstance(loop, LoopView):  # the login's view of the loop (the auth guard's), kept
        loop = loop.real
    if isinstance(loop, asyncio.BaseEventLoop):
        thread: int | None = loop._thread_id  # type: ignore[attr-defined]
        return thread == get_ident()
    return asyncio._get_running_loop() is loop


def stopped_under(record: ConnectionRecord, lease: Lease | None, exc: Exception
                  ) -> PoolError | None:
    """The pool's error for `exc`, what a statement or cursor of asyncpg's raised while its
    checkout `lease` (of `record`, as the statement started) was active, if the pool ended
    that checkout and closed the connection under it: released from another task,
    ``terminate()``, ``close()`` past its timeout, a leak reclaim (as the held connection's own
    statements say, `PooledConnection`); None for any other error."""
    if lease is None or lease.state is ACTIVE or not stopped_by_pool(exc):
        return None
    return unusable(lease.state, record.owner.name)


async def _said_by_pool(conn: Any, call: Awaitable[R], *, opening: bool = False) -> R:
    """`call`'s result, a step of a cursor (or a cursor opening, ``explain()``) on the pool
    connection `conn`; the pool's error if the pool ends the checkout under it
    (`stopped_under`), and for an `opening` answered after the pool ended it, in place of
    its cursor (one of a checkout that is over).

    Counted as running (`Lease.running`): asyncpg takes no lock for a cursor's step (a MOVE
    is a simple query of its protocol's), so a return meanwhile saw a connection idle in a
    transaction, asyncpg refused its ROLLBACK ("another operation is in progress"), and it
    was closed with no cancel request: the statement ran on at the server. Now the return
    cancels it, then closes the connection (`Slots._retire_busy`)."""
    record = record_of(conn)
    lease = record.lease if record is not None else None
    if lease is not None:
        lease.running += 1
    try:
        result = await call
    except Exception as raised:
        exc = dropped_transport_error(raised, conn)
        if record is not None and (stopped := stopped_under(record, lease, exc)) is not None:
            raise stopped from _statements_own(exc)
        if exc is not raised:
            raise exc from raised
        raise
    finally:
        if lease is not None:
            lease.running -= 1
    if opening and lease is not None and lease.state is not ACTIVE:
        raise unusable(lease.state, lease.record.owner.name)
    return result


def _statements_own(exc: Exception) -> Exception:
    """The statement's own error under `exc`, asyncpg's refusal to clean up after it on the
    closed connection (``explain(analyze=True)`` rolls back its savepoint in a ``finally``:
    "cannot call Transaction.rollback(): the underlying connection is closed")."""
    under = exc.__context__
    if (isinstance(exc, asyncpg.InterfaceError) and isinstance(under, Exception)
            and stopped_by_pool(under)):
        return under
    return exc


class _OnItsLoop:
    """Refuses asyncpg's guarded methods (each checks its connection first) off the loop."""

    __slots__ = ()
    _connection: Any
    _con_release_ctr: int

    def _check_conn_validity(self, meth_name: str) -> None:
        if not meth_name.startswith("get_"):
            self._refuse_elsewhere(meth_name)
            self._refuse_ended(meth_name)
        super()._check_conn_validity(meth_name)  # type: ignore[misc]

    def _refuse_ended(self, meth_name: str) -> None:
        """The pool's error if the pool itself ended the checkout this was made in
        (``terminate()``, ``close()`` past its timeout, a leak reclaim; a return while a
        ``prepare()`` ran, whose statement came after it). The connection stays open until
        the pool's cancel request has gone (`closing.close_connection`), and asyncpg's check
        (closed, or given back since this was made) let the step be sent on it: asyncpg's
        error, or the step ran. Given back since, asyncpg's check refuses it, as in asyncpg."""
        if (ended := ended_by_pool(self)) is not None:
            raise ended

    def _refuse_elsewhere(self, meth_name: str) -> None:
        if not on_its_loop(self._connection):
            kind = next(c.__name__ for c in type(self).__mro__  # asyncpg's class
                        if c.__module__.startswith("asyncpg."))
            raise PoolError(
                f"{kind}.{meth_name}() was called from another thread or event loop than the "
                "one its pool connection belongs to: asyncpg would send the statement and then "
                "fail waiting for the reply. Use it on the loop that made it (submit the work "
                "there with asyncio.run_coroutine_threadsafe)"
            )


def _one_at_a_time(name: str, base: type = PreparedStatement
                   ) -> Callable[..., Coroutine[Any, Any, Any]]:
    """`base`'s (asyncpg's `PreparedStatement`'s) method `name`, run holding the connection's
    statement lock, as asyncpg's own ``Connection._execute`` does (its prepared statements do
    not): a statement still running when the connection is given back is then seen, and the
    connection closed rather than handed on (`Slots._retire_busy`); a second statement at once
    fails at once."""
    original = getattr(base, name)
    many = name in RUN_PER_ARGUMENT_SET

    async def method(self: PooledPreparedStatement, *args: Any, **kwargs: Any) -> Any:
        self._refuse_elsewhere(name)  # before the lock: it is not the other thread's to take
        if kwargs and (timeout := kwargs.get("timeout")) is not None:
            # asyncpg reads it with float() (so "5" and True are 5 and 1 s) or not at all
            # (NaN): refused here, before anything is sent.
            check_statement_timeout(None, f"PreparedStatement.{name}", timeout)
        if many:
            given, args, kwargs = call_with_argument_sets(0, args, kwargs)
            if not given:
                # asyncpg sends nothing for no argument sets, but counts a query, which would
                # hide a Parse its prepare() left without a Sync from the return
                # (asyncpool.pool.unsynced).
                self._check_conn_validity(name)
                return None if name == "executemany" else []
        conn = self._connection
        section = getattr(conn, "_stmt_exclusive_section", None)
        record = record_of(conn)
        lease = record.lease if record is not None else None  # (the pool may end it: below)
        try:
            if section is None:  # an asyncpg without it (asyncpool.connect.driver says so)
                return await original(self, *args, **kwargs)
            with section:
                return await original(self, *args, **kwargs)
        except Exception as exc:
            if record is None:
                raise
            stopped = stopped_under(record, lease, exc)
            if stopped is not None:
                raise stopped from exc
            # Described afresh and not run (unnamed mode, after the schema changed): an
            # argument asyncpg's codec refused.
            if left_unsynced(exc):
                record.note_unsynced_parse()
            raise

    functools.update_wrapper(method, original)
    return method


def _explain(base: type[PreparedStatement[Any]]) -> Callable[..., Coroutine[Any, Any, Any]]:
    """`base`'s (asyncpg's) ``explain()``, saying the pool's error if the pool ends the
    checkout under it (`stopped_under`): its EXPLAIN plans the statement (and with
    ``analyze=True`` runs it) through the connection's own statement, which does not say it."""
    original = base.explain

    async def explain(self: PooledPreparedStatement, *args: Any, analyze: bool = False) -> Any:
        return await _said_by_pool(self._connection, original(self, *args, analyze=analyze))

    functools.update_wrapper(explain, original)
    return explain


def ended_by_pool(resource: Any, *, committing: bool = False) -> PoolError | None:
    """The pool's error if it ended the checkout `resource` (asyncpg's transaction, prepared
    statement or cursor, made on a held connection) belongs to while the holder still held
    it: ``terminate()``, ``close()`` past its timeout, a leak reclaim, the end of a Lambda
    invocation. None while it is held, and after a plain release (asyncpg's own guard refuses
    then: the release counter). `committing`: for a transaction's end, which a closed pool
    says was not committed."""
    conn = resource._connection
    record = record_of(conn)
    if record is None or resource._con_release_ctr != conn._pool_release_ctr:
        return None
    lease = record.lease
    state = lease.state if lease is not None else record.ended
    if state is ACTIVE:
        return None
    name = record.owner.name
    if committing and lease is None:
        if record.owner.state is not OPEN:
            return closed_before_commit(name)
        # (Its lease is let go as the connection is retired: then terminated, at an
        # invocation's end.)
        state = state or TERMINATED
    return unusable(state, name) if state is not None else None


class PooledTransaction(_OnItsLoop, Transaction):
    __slots__ = ()

    def _refuse_ended(self, meth_name: str) -> None:
        if meth_name == "__aexit__":
            return  # (the block's end says it, after the block's own error: below)
        # An explicit commit() as the block's end: the connection is closing (its cancel
        # request first), and the COMMIT got through in between.
        if (ended := ended_by_pool(self, committing=meth_name == "commit")) is not None:
            raise ended

    async def __aexit__(self, extype: Any, ex: Any, tb: Any) -> None:
        if extype is None and (ended := ended_by_pool(self, committing=True)) is not None:
            # The pool closes the connection (a cancel request first: the COMMIT would get
            # through in between); as pool.transaction(), it is not committed.
            raise ended
        try:
            await super().__aexit__(extype, ex, tb)
        except Exception as failed:
            if extype is None or not (broken_connection_error(failed)
                                      and self._connection.is_closed()):
                raise
            # The block's own error (or cancellation) is what the caller must see, as from
            # pool.transaction(). The connection is gone (closed for a statement cut short
            # where no cancel request can be sent, or lost), and the transaction with it.
            self._managed = False


class _Steps:
    """An awaitable of the steps of an ``__await__`` already begun (asyncpg's cursor opening)."""

    __slots__ = ("_steps",)

    def __init__(self, steps: Generator[Any, None, Any]) -> None:
        self._steps = steps

    def __await__(self) -> Generator[Any, None, Any]:
        return self._steps


class PooledCursorFactory(_OnItsLoop, CursorFactory):
    __slots__ = ()

    # The cursors it opens stay bound too: one opened here and used from another loop later.
    def __aiter__(self) -> Any:
        return bind(super().__aiter__())

    def __await__(self) -> Generator[Any, None, Any]:
        # Opening sends the query's Parse and Bind (planned there: it may take a while).
        opening = _said_by_pool(self._connection, _Steps(super().__await__()), opening=True)
        cursor = yield from opening.__await__()
        return bind(cursor)


class PooledCursor(_OnItsLoop, Cursor):
    __slots__ = ()

    if not TYPE_CHECKING:  # (asyncpg's signatures, as type checkers read them)
        async def fetch(self, n, *, timeout=None):
            check_row_count("Cursor.fetch", "n", n)
            return await _said_by_pool(self._connection, super().fetch(n, timeout=timeout))

        async def fetchrow(self, *, timeout=None):
            return await _said_by_pool(self._connection, super().fetchrow(timeout=timeout))

        async def forward(self, n, *, timeout=None):
            check_row_count("Cursor.forward", "n", n)
            return await _said_by_pool(self._connection, super().forward(n, timeout=timeout))

        fetch.__doc__, forward.__doc__ = Cursor.fetch.__doc__, Cursor.forward.__doc__
        fetchrow.__doc__ = Cursor.fetchrow.__doc__


class PooledCursorIterator(_OnItsLoop, CursorIterator):
    __slots__ = ()

    if not TYPE_CHECKING:
        async def __anext__(self):
            return await _said_by_pool(self._connection, super().__anext__())


def _check_cursor_arguments(kwargs: dict[str, Any]) -> None:
    if (timeout := kwargs.get("timeout")) is not None:
        check_statement_timeout(None, "PreparedStatement.cursor", timeout)
    if (prefetch := kwargs.get("prefetch")) is not None:
        check_row_count("PreparedStatement.cursor", "prefetch", prefetch)


class PooledPreparedStatement(_OnItsLoop, PreparedStatement):
    __slots__ = ()

    def cursor(self, *args: Any, **kwargs: Any) -> Any:
        _check_cursor_arguments(kwargs)
        return bind(super().cursor(*args, **kwargs))

    # Not explain() (`_explain`): it runs its statement through the connection's own, which
    # takes the lock. Type checkers see asyncpg's methods, whose signatures these keep
    # (`_one_at_a_time`).
    if not TYPE_CHECKING:
        explain = _explain(PreparedStatement)
        fetch = _one_at_a_time("fetch")
        fetchval = _one_at_a_time("fetchval")
        fetchrow = _one_at_a_time("fetchrow")
        fetchmany = _one_at_a_time("fetchmany")
        executemany = _one_at_a_time("executemany")


class PooledCheckedPreparedStatement(_OnItsLoop, CheckedPreparedStatement):
    """An unnamed ``prepare()``'s statement in "unnamed" mode (`CheckedPreparedStatement`): its
    fetch, fetchrow and fetchval reach its checked path through asyncpg's."""

    __slots__ = ()

    def cursor(self, *args: Any, **kwargs: Any) -> Any:
        _check_cursor_arguments(kwargs)
        return bind(super().cursor(*args, **kwargs))

    if not TYPE_CHECKING:  # (as in PooledPreparedStatement)
        explain = _explain(CheckedPreparedStatement)
        fetch = _one_at_a_time("fetch", CheckedPreparedStatement)
        fetchval = _one_at_a_time("fetchval", CheckedPreparedStatement)
        fetchrow = _one_at_a_time("fetchrow", CheckedPreparedStatement)
        fetchmany = _one_at_a_time("fetchmany", CheckedPreparedStatement)
        executemany = _one_at_a_time("executemany", CheckedPreparedStatement)


_BOUND: dict[type, type] = {Transaction: PooledTransaction, CursorFactory: PooledCursorFactory,
                            PreparedStatement: PooledPreparedStatement, Cursor: PooledCursor,
                            CursorIterator: PooledCursorIterator,
                            CheckedPreparedStatement: PooledCheckedPreparedStatement}


def bind(resource: R) -> R:
    """`resource` (asyncpg's object, as a held connection's method returned it) bound to its
    connection's loop; anything else (a subclass of asyncpg's class, or another object: an
    instrumentation's wrapper) is returned as it is."""
    bound = _BOUND.get(type(resource))
    if bound is not None:
        resource.__class__ = bound
    return resource
