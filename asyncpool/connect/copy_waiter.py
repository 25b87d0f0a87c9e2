"""The reply future of a COPY FROM STDIN that the pool cuts off (asyncpg's ``copy_in``) or
whose connection is lost, or of a COPY that asyncpg refused and left on its protocol, retrieved
so that asyncio does not log "Future exception was never retrieved" for it.

asyncpg's ``Protocol.copy_in`` waits for the server's reply on a future (its ``waiter``) that
only the coroutine holds. Once its connection is closed under it (released or terminated from
another task, the pool's ``terminate()``, ``close()`` past its timeout, a leak reclaim), the
future gets the connection's error, and the COPY then fails writing to the transport its
protocol dropped (``AttributeError``, `dropped_transport_error`) on its way to the line that would
retrieve it. Neither the coroutine's locals nor the protocol's ``waiter`` are reachable from
Python but through the garbage collector's references: so they are read here, on a connection
the pool is closing under a holder, never on a statement's path.

A connection lost under the COPY (the network, ``pg_terminate_backend()``) fails the future
while the protocol still holds it, and the COPY goes on sending its rows into the closed
transport; when its timeout (``command_timeout``, ``timeout=``) comes before their end, asyncpg
hands its ``_on_timeout`` the waiter the protocol has dropped (``AttributeError: 'NoneType'
object has no attribute 'done'``) on its way to the line that would retrieve its own. That one
is retrieved from the protocol as the connection is found lost (`retrieve_protocol_waiters`,
from the pool's connection class: `asyncpool.connect.driver`)."""

from __future__ import annotations

import asyncio
import gc
from typing import Any

import asyncpg.connection

# A coroutine chain deeper than this is not walked.
_MAX_DEPTH = 200


def _consume(future: asyncio.Future[Any]) -> None:
    if not future.cancelled():
        future.exception()  # (marks it retrieved; whoever awaits it still gets it)


def _copy_in_coroutines(task: asyncio.Task[Any]) -> list[Any]:
    """asyncpg's ``copy_in`` coroutines `task` awaits (compiled: not in its chain of frames)."""
    found: list[Any] = []
    coro: Any = task.get_coro()
    for _ in range(_MAX_DEPTH):
        if coro is None:
            break
        awaited = getattr(coro, "cr_await", None) or getattr(coro, "gi_yieldfrom", None)
        code = getattr(coro, "cr_code", None)
        if (awaited is not None and code is not None
                and code.co_filename == asyncpg.connection.__file__):
            # asyncpg's Connection awaiting its protocol's coroutine (through Cython's wrapper).
            found += [inner for inner in gc.get_referents(awaited)
                      if hasattr(inner, "cr_await")
                      and getattr(inner, "__qualname__", None) == "BaseProtocol.copy_in"]
        coro = awaited
    return found


def retrieve_copy_waiters(tasks: list[asyncio.Task[Any] | None]) -> None:
    """Have the reply future of each asyncpg COPY FROM STDIN that one of `tasks` is running
    retrieved once it is done: called as the pool closes their connection under them."""
    for task in {task for task in tasks if task is not None and not task.done()}:
        for coroutine in _copy_in_coroutines(task):
            for scope in gc.get_referents(coroutine):  # its locals: Cython's closure
                if isinstance(scope, type):
                    continue
                for value in gc.get_referents(scope):
                    if isinstance(value, asyncio.Future):
                        value.add_done_callback(_consume)


def retrieve_protocol_waiters(conn: Any) -> None:
    """Have every reply future `conn`'s protocol still holds retrieved once done (whoever awaits
    one still gets its error): called when a held connection's COPY is refused (the protocol
    drops the future once the close is read, which may come before the release), as the pool
    closes a connection that was in use, and as asyncpg finds a connection lost, before its
    protocol fails and drops them. asyncpg's COPY (``copy_in`` and ``copy_out``) makes its reply
    future, then switches the protocol's state, which a protocol out of step refuses (the FATAL
    error a server or pooler sends an idle connection, read before its close: "another operation
    (2) is in progress"); the COPY raises that and leaves the future on the protocol, where
    closing the connection sets its error and nothing awaits it. The protocol's fields are not
    reachable from Python but through the garbage collector's references."""
    protocol = getattr(conn, "_protocol", None)
    if protocol is None:
        return
    for value in gc.get_referents(protocol):
        if isinstance(value, asyncio.Future) and not value.done():
            value.add_done_callback(_consume)
