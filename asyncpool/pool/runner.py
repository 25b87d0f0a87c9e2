"""The query helpers' statement runners: ``pool.fetchval()`` and the rest, one statement on a
connection of the pool, with the checkout and the return written out for the common case."""

from __future__ import annotations

import inspect
from asyncio import get_running_loop
from collections.abc import Callable, Coroutine
from contextvars import copy_context
from threading import get_ident
from typing import TYPE_CHECKING, Any

import asyncpg

from asyncpool.connect import driver
from asyncpool.connect.driver import BY_NAME, FIRST_ROW, ROWS, STATUS
from asyncpool.connect.failures import dropped_transport_error
from asyncpool.options import check_statement_timeout
from asyncpool.pool.checkout import AcquireContext, end_checkout
from asyncpool.pool.lease import ACTIVE, RELEASED, STATEMENT_RUNNERS, spare_lease, task_of
from asyncpool.pool.record import IDLE, LEASED
from asyncpool.pool.slots import UNSET
from asyncpool.pool.stale_rows import stale_rows_error
from asyncpool.pool.unsynced import left_unsynced

if TYPE_CHECKING:
    from asyncpool.pool.slots import Slots


def statement_runner(method: str) -> Callable[..., Coroutine[Any, Any, Any]]:  # noqa: PLR0915
    """The statement runner for asyncpg's `method`: ``run(slots, query, *args, **kwargs)``
    runs one statement, ``conn.<method>(query, *args, **kwargs)``, on a connection of the pool
    (``pool.fetchval()`` and the other query helpers: each pool binds them as methods of its
    `Slots`, so no frame of the pool's comes between the caller and this one, and no
    ``functools.partial``, whose subclasses Python 3.11 calls through ``tp_call``: 2,600
    instructions per query, benchmarks/README.md).

    It does what ``async with pool.acquire() as conn: return await conn.<method>(...)`` does
    (the same leak report, errors and cancellation handling: `end_checkout`) without the
    context and proxy objects: the statement never leaves this frame, so nothing can use the
    connection after its return, and nothing can have obtained a statement, cursor,
    transaction or listener through it. No frame is kept: while the statement runs, its
    caller is in the holding task's chain, where a leak report finds it (`Lease.acquire_site`).

    The common case of `checkout_nowait` and `checkin_nowait` is written out here rather
    than called: measured against a server, each call on this path costs several times what
    it costs in a loop (the I/O in between leaves the caches cold), and the two calls with
    the ones they make came to 5 of the pool's 7 µs per query (benchmarks/README.md). For
    the same reason the lease is built without a call to its ``__init__`` and the connection
    is asked through the record's probe (compiled methods of asyncpg's protocol) rather
    than its Python methods: about 1.8 µs per query less. A lease that ended cleanly here is
    kept on its record (`ConnectionRecord.spare`: nothing else can hold it) and the next
    statement or acquire block on that connection takes it again, setting only what changes:
    1,300 instructions per query less, and fewer simulated cache misses with 150 pools, than a
    new one each time (benchmarks/README.md). Anything else goes the general way, an acquire
    context and its proxy (someone in line, a check due, a ``setup`` hook, ``max_queries``),
    written after the common case so that the code run on every query spans fewer cache
    lines (-0.3 µs per query, benchmarks/README.md). ``fetch``,
    ``fetchrow`` and ``fetchval`` without keyword arguments, and ``execute`` with arguments and
    no keyword, run asyncpg's own body of the method here while the connection's class still
    has asyncpg's function (`driver.own_body`; a subclass's override or an instrumentation's
    wrapper is called).
    """

    own, limit, shape = driver.own_body(method) or (None, 0, ROWS)
    # Apart, so that a read's common case tests one name and execute's comes after it.
    own_read, own_execute = (None, own) if shape is STATUS else (own, None)
    # The name of the statement's parameter (``query``, ``command``, ``table_name``).
    first = list(inspect.signature(getattr(asyncpg.Connection, method)).parameters)[1]
    copy = method.startswith("copy_")  # (its connection closed under it: `dropped_transport_error`)

    async def one(self: Slots, query: str = BY_NAME, /, *args: Any,  # noqa: PLR0912, PLR0915
                  **kwargs: Any) -> Any:  # written out: see the docstring
        if query is BY_NAME:  # given by name, as asyncpg's methods allow (``query=``...)
            query = _statement_by_name(kwargs, first, method)
        idle = self.idle
        loop = self.loop
        # A local: `self.clock()` would be a method call on an attribute, which Python 3.11 does
        # not specialize (`driver.probe`).
        clock = self.clock
        if (self.fast_statements and idle and (now := clock()) < (record := idle[-1]).check_at
                and (loop._thread_id == get_ident() if self.loop_has_thread_id  # type: ignore[union-attr]
                     else get_running_loop() is loop)
                and record.probe.is_connected()):
            # The common case, first and alone: the rare ones are out of the way (below, and in
            # functions of their own), so the code run on every query spans fewer cache lines.
            idle.pop()
            lease = record.spare  # the last one here, if it ended cleanly (see the docstring)
            if lease is None:
                lease = record.spare = spare_lease(record)
            lease.acquired_at = now
            lease.task = task_of(loop)
            lease.context = copy_context() if self.track_leaks else None
            lease.state = ACTIVE
            record.place = LEASED
            record.lease = lease
            if self.leak_timer_unarmed:
                self.leaks.arm(now)
            self.acquired_total += 1
            if self.on_acquired is not None:
                self.on_acquired(0.0)
            conn = record.conn
            try:
                # Open: asked just above (`is_connected()` is false from the moment of a
                # terminate() or close(), or a lost socket noticed), and nothing that could close
                # it has run since.
                if not kwargs and own_read is not None and getattr(type(conn), method) is own_read:
                    # asyncpg's own body of the method, run here (`driver.own_body`): one
                    # coroutine and one copy of the arguments less, about 3,600 instructions per
                    # query.
                    result = await conn._execute(query, args, limit, None)
                    if shape is not ROWS:
                        result = ((result[0] if shape is FIRST_ROW else result[0][0]) if result
                                  else None)
                elif (args and not kwargs and own_execute is not None
                      and getattr(type(conn), method) is own_execute):
                    result = (await conn._execute(query, args, 0, None, return_status=True)
                              )[1].decode()
                elif kwargs:
                    if (timeout := kwargs.get("timeout")) is not None:
                        # Here, not before the checkout: no cost to a call without keywords.
                        # Refused before anything is sent; the return takes it back as it was.
                        check_statement_timeout(self.name, method, timeout)
                    result = await getattr(conn, method)(query, *args, **kwargs)
                else:
                    result = await getattr(conn, method)(query, *args)
            except BaseException as raised:
                record.spare = None  # the lease may be kept (a leak report, an error's holder)
                exc = (dropped_transport_error(raised, conn) if copy and isinstance(raised, Exception)
                       else stale_rows_error(raised, self.name, query) or raised)
                if lease.state is ACTIVE and left_unsynced(exc):
                    record.note_unsynced_parse()  # (an argument asyncpg's codec refused...)
                await end_checkout(self, lease, exc)
                if exc is not raised:
                    raise exc from raised
                raise
            # The clean return. Only a transaction the statement opened (``execute("BEGIN")``)
            # needs a reset; only the pool (closing, a leak reclaim) can have changed the lease.
            # A statement that succeeded leaves the connection open; if it is lost just after,
            # the next checkout finds it closed and retires it.
            # The clock is read again: a statement's end, not its start, is when the connection
            # was last used. From the start, every statement longer than `validate_after` (a
            # pooler's queue under load is enough) would make the next checkout validate: one
            # more round trip per query when the server is busiest (tried, benchmarks/README.md).
            now = clock()
            on_released = self.on_released
            expires_at = record.expires_at
            if (lease.state is ACTIVE and self.fast_statements and not lease.reported
                    and not (self._may_retire and conn.retire_reason) and now < expires_at
                    and not record.probe.is_in_transaction() and not record.stale):
                lease.state = RELEASED  # (its frame is None: none was kept)
                # Kept as the record's spare: not the holder's task and context (a finished task
                # keeps its result).
                lease.task = None
                lease.context = None
                if on_released is not None:
                    on_released(now - lease.acquired_at)
                record.lease = None
                record.last_used = now
                check_at = now + self.validate_after
                record.check_at = check_at if check_at < expires_at else expires_at
                record.place = IDLE
                idle.append(record)
                return result
            record.spare = None
            await end_checkout(self, lease, None)
            return result
        # The general way (someone in line, a check due, a `setup` hook, `max_queries`, another
        # loop...): what ``async with pool.acquire() as conn: return await conn.<method>(...)``
        # does, `setup` given the proxy. A bad `timeout=` is refused before a connection is
        # taken (or logged in for).
        if kwargs and (timeout := kwargs.get("timeout")) is not None:
            check_statement_timeout(self.name, method, timeout)
        async with AcquireContext(self, UNSET, None) as proxy:
            return await getattr(proxy, method)(query, *args, **kwargs)

    return one


def _statement_by_name(kwargs: dict[str, Any], first: str, method: str) -> Any:
    """The statement given by name (``pool.fetchval(query=...)``), taken out of `kwargs`."""
    query = kwargs.pop(first, BY_NAME)
    if query is BY_NAME:
        raise TypeError(f"{method}() missing its first argument, the statement ({first}=)")
    return query


#: One statement runner per query helper; they share one code object (`STATEMENT_RUNNERS`).
#: The first four are bound to each pool (`Pool.__init__`); the rest, rarer, are called
#: through `Pool`'s methods of the same names.
QUERY_METHODS = ("execute", "fetch", "fetchrow", "fetchval", "executemany", "fetchmany",
                 "copy_from_query", "copy_from_table", "copy_records_to_table", "copy_to_table")
RUNNERS = {name: statement_runner(name) for name in QUERY_METHODS}
STATEMENT_RUNNERS.add(RUNNERS["fetchval"].__code__)
