"""The asyncpg internals asyncpool relies on, in this one module (one exception, below), gated on
asyncpg's version.

asyncpg has no public way to ask whether a cancelled query is still being cancelled, to forget a
Transaction whose BEGIN failed, to invalidate the statements, cursors and transactions a previous
holder obtained (its own pool bumps ``_pool_release_ctr``), or to drop the listeners a holder left.
Every private name used for that is read here and nowhere else, with one exception: the statement
runner (`asyncpool.pool.slots`) and the connection proxy do what `own_body` describes inline, on
every query (calling ``_check_open`` and ``_execute``), and only when `own_body` found them all.
`tests/test_driver.py` has one test per name against a real server, so a new asyncpg that renames
one fails there, loudly, not in production. Outside the tested versions the names are checked on
the class at import: a missing one is warned about and the function that needs it falls back to
doing nothing (or to a round trip).
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import itertools
import os
import re
import secrets
import ssl
import warnings
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol, cast

import asyncpg
import asyncpg.connection
import asyncpg.protocol

from asyncpool.connect import copy_end, direct_cancel
from asyncpool.connect.copy_waiter import retrieve_protocol_waiters

#: asyncpg versions the test suite runs against ([low, high)); pyproject pins the same range.
TESTED = ((0, 29), (0, 33))
VERSION: tuple[int, ...] = tuple(int(n) for n in re.findall(r"\d+", asyncpg.__version__)[:2])

#: Connection attributes read or written here, and what each is for.
CONNECTION_INTERNALS = {
    "_protocol": "the wire protocol object (cancellation state, transaction status)",
    "_top_xact": "the Transaction asyncpg tracks, kept even when its BEGIN failed",
    "_pool_release_ctr": "bumped on release: statements, cursors, transactions of the holder fail",
    "_cancellations": "cancel requests in flight (their sockets must not be closed early)",
    "_listeners": "LISTEN callbacks a holder added",
    "_log_listeners": "server log message callbacks",
    "_termination_listeners": "callbacks run when the connection closes",
    "_query_loggers": "callbacks that see every query",
    "_stmt_exclusive_section": "one operation at a time (execute_described)",
    "_addr": "the address a cancel request goes to (request_cancel)",
    "_params": "the connection parameters (TLS) a cancel request uses (request_cancel)",
    "_config": "command_timeout, the bound asyncpg puts on its cancel requests (direct TLS)",
    "_aborted": "set by terminate() and fatal errors, before the socket is gone (returned)",
}
#: Protocol methods called here.
PROTOCOL_INTERNALS = ("_is_cancelling", "_wait_for_cancellation", "is_in_transaction",
                      "queries_count", "is_connected")
#: Protocol attributes read here: BackendKeyData's two fields (0 until the server sends them).
KEY_INTERNALS = ("backend_pid", "backend_secret")
#: Connection methods called here (execute_described) or, per `own_body`, by the statement runner.
METHOD_INTERNALS = ("_check_open", "_execute", "_Connection__execute", "_cancel_current_command",
                    "_cancel", "_cleanup", "_copy_in")


if TYPE_CHECKING:
    from ssl import SSLContext

    class DriverConnection(asyncpg.Connection):
        """A connection as the pool holds it, for type checkers: asyncpg's, with the private
        members read on the query path (`own_body`) and the attribute of the "unnamed" mode's
        class (`Connector.retire_reasons`)."""

        retire_reason: str | None
        _top_xact: Any

        def _check_open(self) -> None: ...

        async def _execute(self, query: str, args: Sequence[object], limit: int,
                           timeout: float | None, *, return_status: bool = False) -> Any: ...
else:
    DriverConnection = asyncpg.Connection


def _proxy_base() -> type:
    """asyncpg's base class of its pool's connection proxies: ``isinstance(x, asyncpg.Connection)``
    is true for instances of its subclasses (``ConnectionMeta.__instancecheck__``)."""
    base = getattr(asyncpg.connection, "_ConnectionProxy", None)
    if isinstance(base, type) and base.__dict__.get("__slots__") == ():
        return base
    return object


#: The base class of `PooledConnection` (object if asyncpg no longer has it).
ConnectionProxyBase: type = _proxy_base()


def _slots(cls: type) -> set[str]:
    names: set[str] = set()
    for klass in cls.__mro__:
        slots = klass.__dict__.get("__slots__", ())
        names.update((slots,) if isinstance(slots, str) else slots)
    return names


def missing_internals() -> list[str]:
    """The internals above that the installed asyncpg lacks (empty when all are there)."""
    have = _slots(asyncpg.Connection)
    missing = [name for name in CONNECTION_INTERNALS if name not in have]
    proto = asyncpg.protocol.Protocol
    missing += [f"Protocol.{name}" for name in (*PROTOCOL_INTERNALS, *KEY_INTERNALS)
                if not hasattr(proto, name)]
    missing += [f"Connection.{name}" for name in METHOD_INTERNALS
                if not hasattr(asyncpg.Connection, name)]
    return missing


_MISSING = missing_internals()
if _MISSING:
    warnings.warn(
        f"asyncpg {asyncpg.__version__}: asyncpool did not find {', '.join(_MISSING)} (it is tested "
        f"with asyncpg {TESTED[0][0]}.{TESTED[0][1]} to <{TESTED[1][0]}.{TESTED[1][1]}); returned "
        "connections are rolled back with a round trip and held statements are not invalidated",
        RuntimeWarning,
        stacklevel=2,
    )


def tested_version() -> bool:
    return TESTED[0] <= VERSION < TESTED[1]


#: What a returned connection needs before the next holder (`returned`).
CLEAN, BROKEN, NEEDS_RESET, BUSY = 0, 1, 2, 3


def _returned(conn: Any) -> int:
    """Make the statements, cursors and transactions the holder obtained through `conn` raise
    `asyncpg.InterfaceError` ("released back to the pool", as asyncpg's pool does), and say what
    the connection needs: nothing (CLEAN), to go (BROKEN: closed), or `reset` (NEEDS_RESET: a
    query still being cancelled, a transaction left open or a failed BEGIN asyncpg still tracks,
    callbacks the holder registered); BUSY: one of its statements is still running (two at once
    on one connection, ``asyncio.gather``: the block ended with the other's error).

    One call for what every return asks, with ``conn.is_closed()`` read inline: between round
    trips each Python call on this path costs several times what it costs in a loop."""
    conn._pool_release_ctr += 1
    proto = conn._protocol
    if conn._aborted or not proto.is_connected():
        return BROKEN
    if conn._stmt_exclusive_section._acquired:  # held for the whole of asyncpg's `_execute`
        return BUSY
    if (proto._is_cancelling() or proto.is_in_transaction() or conn._top_xact is not None
            or conn._listeners):
        return NEEDS_RESET
    if ((conn._log_listeners or conn._termination_listeners or conn._query_loggers)
            and not _only_kept_callbacks(conn)):
        return NEEDS_RESET
    return CLEAN


#: Callbacks that stay at each reset, by connection: those `init=` registered (`keep_callbacks`).
_KEPT: weakref.WeakKeyDictionary[Any, dict[str, frozenset[Any]]] = weakref.WeakKeyDictionary()
#: The kinds a reset keeps the `init=` hook's of (its notification listeners go, as asyncpg's
#: pool drops them with an ``UNLISTEN *``).
_KEPT_KINDS = ("_log_listeners", "_termination_listeners", "_query_loggers")


def keep_callbacks(conn: Any) -> None:
    """Keep the callbacks registered on `conn` so far (by the `init=` hook: they belong to the
    connection, as asyncpg's pool keeps its query loggers and termination listeners) through
    every reset; those a holder registers later are dropped when it gives the connection back."""
    kept = {name: frozenset(getattr(conn, name, ())) for name in _KEPT_KINDS}
    if any(kept.values()):
        _KEPT[conn] = kept


def _only_kept_callbacks(conn: Any) -> bool:
    """Whether every log listener, termination listener and query logger of `conn` is one
    `keep_callbacks` kept (a holder added none, nor removed one)."""
    kept = _KEPT.get(conn)
    return kept is not None and all(getattr(conn, name) == kept[name] for name in _KEPT_KINDS)


def _returned_fallback(conn: Any) -> int:
    """`returned` for an asyncpg without every internal: what its public API and the names it
    still has can tell."""
    if hasattr(conn, "_pool_release_ctr"):
        conn._pool_release_ctr += 1
    if conn.is_closed():
        return BROKEN
    proto = getattr(conn, "_protocol", None)
    cancelling = getattr(proto, "_is_cancelling", None)
    if ((cancelling is not None and cancelling()) or conn.is_in_transaction()
            or getattr(conn, "_top_xact", None) is not None or getattr(conn, "_listeners", None)):
        return NEEDS_RESET
    return CLEAN


# Chosen once, at import: the hot path (every return) runs the direct version.
returned: Callable[[Any], int] = _returned_fallback if _MISSING else _returned


class Probe(Protocol):
    """What the checkout fast path asks of a connection on every query."""

    def is_connected(self) -> bool:
        """False from the moment it is closed, terminated, aborted or found lost."""

    def is_in_transaction(self) -> bool:
        """A transaction is open."""


class _PublicProbe:
    """`Probe` through the connection's public methods (an asyncpg without the internals)."""

    __slots__ = ("_conn",)

    def __init__(self, conn: Any) -> None:
        self._conn = conn

    def is_connected(self) -> bool:
        return not self._conn.is_closed()

    def is_in_transaction(self) -> bool:
        return bool(self._conn.is_in_transaction())


def probe(conn: Any) -> Probe:
    """The object to ask, once per connection: asyncpg's protocol itself.

    Its methods are compiled; ``conn.is_closed()`` and ``conn.is_in_transaction()`` are Python
    methods around the same calls, and between round trips each Python call costs about 0.7 µs
    (benchmarks/README.md). Kept as the object rather than as its two bound methods: Python
    3.11 specializes ``record.probe.is_connected()`` (a method of the object's class) but not a
    call of a bound method kept in an attribute (``record.connected()``, as before). The protocol's
    ``is_connected()`` turns false as soon as the connection is closed, terminated or aborted
    (it checks ``closing``, which ``abort()`` and ``close()`` set first), and the protocol stays
    the same object for the connection's life.
    """
    proto = getattr(conn, "_protocol", None)
    if _MISSING or proto is None:
        return _PublicProbe(conn)
    return cast(Probe, proto)


#: What `own_body`'s methods return: all rows, the first row, the first row's first value, the
#: status of the statement (``execute``).
ROWS, FIRST_ROW, FIRST_VALUE, STATUS = 0, 1, 2, 3
#: A statement's first parameter when it was given by name (``fetchval(query=...)``), for the
#: pool's statement runners and the proxy's methods, which take it positionally only.
BY_NAME: Any = object()
_OWN_BODIES = {"fetch": (0, ROWS), "fetchrow": (1, FIRST_ROW), "fetchval": (1, FIRST_VALUE),
               "execute": (0, STATUS)}


def own_body(method: str) -> tuple[Callable[..., Any], int, int] | None:
    """asyncpg's own ``Connection.fetch``, ``fetchrow``, ``fetchval`` or ``execute`` (unwrapped,
    should an instrumentation have wrapped it before asyncpool was imported), the row limit it
    passes to ``_execute`` and the shape of what it returns; None for any other method, or if
    the installed asyncpg lacks an internal.

    Called without keyword arguments, each read is ``self._check_open()``, then
    ``self._execute(query, args, limit, None)``, then the rows, the first row or its first value
    (None when there is none); ``execute`` with arguments is ``self._check_open()``, then
    ``self._execute(query, args, 0, None, return_status=True)``, then the status decoded
    (without arguments it runs a simple query, and is called). `tests/test_driver.py` checks
    those bodies against the installed asyncpg. The pool's statement runner and the connection
    proxy do the same themselves while a connection's class still has this very function, which
    saves a coroutine and a copy of the arguments on every statement; a subclass's override or
    an instrumentation's wrapper (installed at any time) replaces it, and is called.
    """
    if _MISSING or method not in _OWN_BODIES:
        return None
    limit, shape = _OWN_BODIES[method]
    own = inspect.unwrap(asyncpg.Connection.__dict__[method])
    if (getattr(own, "__module__", None), getattr(own, "__qualname__", None)) != (
            "asyncpg.connection", f"Connection.{method}"):
        return None  # replaced before asyncpool was imported, by a function we cannot see past
    return own, limit, shape


def is_cancelling(conn: Any) -> bool:
    """True while asyncpg is still finishing a query whose task was cancelled."""
    check = getattr(getattr(conn, "_protocol", None), "_is_cancelling", None)
    return bool(check()) if check is not None else False


async def reset(conn: Any, timeout: float, *, unsynced: bool = False) -> None:
    """Make a returned connection clean for the next holder (bounded by `timeout`): wait for a
    cancelled query to finish, forget a Transaction whose BEGIN failed, roll back, end a Parse
    of the holder's left without a Sync (`unsynced`: a ``prepare()``, a refused cursor, a
    statement cancelled while described, with no statement since) or that a cancel may have cut
    short (behind a transaction-mode pooler the server connection stays this client's until the
    server has answered a Sync), and drop the callbacks the holder registered (``UNLISTEN *``
    only if it listened)."""
    async with asyncio.timeout(timeout):
        cancelled = is_cancelling(conn)
        if cancelled:
            await conn._protocol._wait_for_cancellation()
        # asyncpg keeps a Transaction whose BEGIN failed (timed out, cancelled) as the open one,
        # so every later transaction() on this connection would be a SAVEPOINT.
        if hasattr(conn, "_top_xact"):
            conn._top_xact = None
        if conn.is_in_transaction():
            await conn.execute("ROLLBACK")
        elif cancelled or unsynced:
            # A statement cancelled while asyncpg described it (no Sync follows then), or a
            # Parse with none since: a simple query ends it, answered with ReadyForQuery.
            await conn.execute("SELECT 1")
        listened = bool(getattr(conn, "_listeners", None))
        kept = _KEPT.get(conn, {})
        for name in ("_listeners", "_log_listeners", "_termination_listeners", "_query_loggers"):
            callbacks = getattr(conn, name, None)
            if callbacks:
                callbacks.clear()
            if kept.get(name):  # the init hook's, which a holder may have removed
                getattr(conn, name).update(kept[name])
        if listened:
            await conn.execute("UNLISTEN *")


#: A key of asyncpg's notification listeners that no channel name equals (`listen_cut_short`).
_CUT_SHORT = object()


def listen_cut_short(conn: Any, channel: str) -> None:
    """``conn.add_listener(channel, ...)`` ended in an error or a cancellation: its ``LISTEN``
    may have run on the server all the same (cancelled after it was sent, its cancel request
    arrives too late), with no callback asyncpg keeps for it, so nothing would ``UNLISTEN`` at
    the return. An entry under a key no channel has makes the return reset the connection
    (`returned`) and send ``UNLISTEN *`` (`reset`); asyncpg looks notifications up by channel
    name, so the entry receives none."""
    listeners = getattr(conn, "_listeners", None)
    if listeners is not None and channel not in listeners:
        listeners[_CUT_SHORT] = set()


def queries_count(conn: Any) -> int:
    """How many queries `conn` has run (what asyncpg's pool compares with ``max_queries``)."""
    return int(getattr(getattr(conn, "_protocol", None), "queries_count", 0))


def pending_cancellations(conn: Any) -> list[asyncio.Future[Any]]:
    """Cancel requests still in flight on `conn`, as futures done once each request is: closing
    the connection cancels them, and closing a cancel request's socket early crashes PgBouncer
    1.18 (pgbouncer#801). One whose socket is done is not counted, though asyncpg's task for it
    still waits for the cancelled statement to end (which a closed connection ends, and which
    may never come by itself): for asyncpg's requests, the future is the one asyncpg completes
    when the socket is done, not that task."""
    # Requests sent from a task of their own (`_send_request`) first, while nothing of ours
    # closed the connection: asyncpg cancels and forgets the request task of a connection the
    # server ended (a timed-out statement's request, then pg_terminate_backend), not the
    # request, which a close then waits for as for any other. One we closed (terminate(), a
    # close past its grace) leaves its request to go on alone (`requests_outlive_close`).
    pending: list[asyncio.Future[Any]] = [] if getattr(conn, "_aborted", True) else [
        task for task in _SENDING.get(conn, ()) if not task.done()]
    for task in getattr(conn, "_cancellations", ()):
        if task.done():
            continue
        sent = _REQUEST_WAITERS.get(task)
        if sent is None:
            pending.append(task)
        elif not sent.done():
            pending.append(sent)
    return pending


#: asyncpg's cancel request tasks, each with the future asyncpg completes once the request's
#: socket is closed (`Connection._cancel`'s `waiter`).
_REQUEST_WAITERS: weakref.WeakKeyDictionary[asyncio.Task[Any], asyncio.Future[Any]] = (
    weakref.WeakKeyDictionary())


async def execute_described(conn: Any, query: str, args: Any,
                            timeout: float | None = None) -> tuple[list[Any], str | None, Any]:
    """Run `query` with `args` as ``conn.fetch()`` does (through the connection's statement
    cache, or the one-round-trip path of ``prepared_statements="unnamed"``) and return its rows,
    its command tag (``"INSERT 0 1"``) and its result columns (asyncpg ``Attribute`` objects).

    What a DB-API cursor needs from one execution; asyncpg's public API gives the tag and the
    columns only through ``prepare()``, which costs a round trip of its own on every call when
    statements are not kept (``"off"``, ``"unnamed"``).
    """
    conn._check_open()
    with conn._stmt_exclusive_section:
        (rows, status, _completed), statement = await conn._Connection__execute(
            query, args, 0, timeout, return_status=True)
    return rows, status.decode() if status else None, statement._get_attributes()


# -- cancel requests ---------------------------------------------------------------------------
#
# asyncpg sends a CancelRequest (a new TCP connection carrying the backend's pid and secret key,
# from BackendKeyData) whenever a query times out or its task is cancelled, then waits for the
# query to end. Where no cancel can arrive (RDS Proxy sends no BackendKeyData; a PgBouncer fleet
# on one port without peering hands the request to a process that does not know the key), that
# wait lasts until the statement ends by itself. The connection class below sends no request
# there: it closes the connection instead.



def backend_key(conn: Any) -> tuple[int, int] | None:
    """The (pid, secret key) the server sent in BackendKeyData, or None if it sent none."""
    proto = getattr(conn, "_protocol", None)
    pid = getattr(proto, "backend_pid", 0)
    secret = getattr(proto, "backend_secret", 0)
    if not pid and not secret:
        return None
    return int(pid), int(secret)


def cancel_deliverable(conn: Any) -> bool:
    """True when a cancel request for `conn` can reach its statement: the pool did not turn
    cancel requests off (``cancel_requests="off"``) and the server sent BackendKeyData."""
    if not getattr(conn, "_asyncpool_cancels", True):
        return False
    return backend_key(conn) is not None


def _cancel_or_terminate(self: Any, waiter: Any, cancel_waiter: Any = None) -> None:
    if copy_end.out_of_step(self):
        # A COPY FROM STDIN cut short with rows its front has not taken: a cancel request (or
        # the Sync below) would queue behind them, and PgBouncer 1.18 takes no more of them once
        # the server has left the COPY. The connection goes, at once (`asyncpool.connect.copy_end`).
        copy_end.end_out_of_step(self, lambda: _terminate_soon(self, waiter))
        return
    if copy_end.settle_cancel(self, waiter, transport_of(self)):
        return  # a COPY the server had already ended: nothing to cancel (`asyncpool.connect.copy_end`)
    if cancel_deliverable(self):
        before = set(self._cancellations)
        _ORIGINAL_CANCEL(self, waiter, cancel_waiter)
        # asyncpg's request task removes itself with `current_task(self._loop)`, which finds
        # nothing when `_loop` is the pool's view of the loop (`GuardedLoop`): every finished
        # request stayed in the set for the connection's life (a task, its coroutine and
        # context per cancelled statement). Removed when done, as `request_cancel` does.
        for task in self._cancellations - before:
            task.add_done_callback(self._cancellations.discard)
            _REQUEST_WAITERS[task] = waiter
        return
    # No request can arrive: close the connection instead.
    _CLOSED_UNCANCELLED.add(self)
    _terminate_soon(self, waiter)


def _terminate_soon(conn: Any, waiter: Any) -> None:
    """Close `conn` instead of cancelling its statement: on the next loop iteration (asyncpg is
    still updating the protocol's state around `_cancel_or_terminate`); closing completes the
    other waiters."""
    if not waiter.done():
        waiter.set_result(None)
    conn._loop.call_soon(conn.terminate)


#: Connections `_cancel_or_terminate` closed (or is about to) for a statement cut short where no
#: cancel request can arrive: closed by asyncpool, not lost (`closed_uncancelled`).
_CLOSED_UNCANCELLED: weakref.WeakSet[Any] = weakref.WeakSet()


def closed_uncancelled(conn: Any) -> bool:
    """True when `conn` was closed by its own connection class because a statement of its was
    cut short where no cancel request can arrive (`cancel_deliverable`): the pool closed it,
    so nothing says the server or the network lost it (or the others)."""
    return conn in _CLOSED_UNCANCELLED


_ORIGINAL_CANCEL: Callable[..., None] = cast(Any, asyncpg.Connection)._cancel_current_command


async def _cancel_as_connected(self: Any, waiter: Any, cancel_waiter: Any = None) -> None:
    """asyncpg's ``Connection._cancel`` (the task `_cancel_current_command` starts), with two
    changes. The request is sent as the connection was made: with TLS from the first byte for a
    connection made with direct TLS (asyncpg's sends an SSLRequest first, which a server or
    front that takes direct TLS only hangs up on, and the statement runs on). And the request
    is sent by a task of its own that nothing but its own bound cuts short: asyncpg cancels this
    task when the connection is terminated or lost (a server ending the connection while the
    request is in flight: pg_terminate_backend, a failover, PgBouncer's "server conn
    crashed?"), which closed the request's socket before the server had taken it, the close
    that crashes PgBouncer 1.18 (pgbouncer#801). Its steps are asyncpg 0.32's: `waiter` done
    once the request's socket is, then wait for the statement to end (`cancel_waiter`); a
    request that fails closes the connection, whose state is then unknown; all within
    ``command_timeout`` (`tests/test_driver.py` holds asyncpg's body to them)."""
    try:
        async with asyncio.timeout(self._config.command_timeout):
            with contextlib.suppress(ConnectionResetError):  # (some servers reset it)
                await asyncio.shield(_send_request(self))
            if not waiter.done():
                waiter.set_result(None)
            if cancel_waiter is not None:
                await asyncio.shield(cancel_waiter)
    except asyncio.CancelledError:
        pass  # closing the connection cancels it; its waiters are completed below
    except Exception:
        if not self._aborted:
            self.terminate()
    finally:
        self._cancellations.discard(asyncio.current_task())
        if not waiter.done():
            waiter.set_result(None)


def requests_outlive_close(conn: Any) -> bool:
    """Whether closing `conn` leaves its cancel requests in flight to finish by themselves: each
    is sent by a task of its own (`_send_request`; asyncpg's through `_cancel_as_connected`,
    the pool's through `request_cancel`), so the connection may be closed before the pooler has
    taken them. False for a connection class with a ``_cancel`` of its own (or an untested
    asyncpg): closing it would close a request's socket early, which crashes PgBouncer 1.18."""
    return getattr(type(conn), "_cancel", None) is _cancel_as_connected


#: Cancel requests being sent (`_send_request`), kept referenced until they end.
_REQUESTS_IN_FLIGHT: set[asyncio.Task[None]] = set()
#: The same, by connection: `pending_cancellations` counts them, so that closing the connection
#: (and so closing its pool) waits for them even once asyncpg has dropped the request task
#: that awaited one (a connection lost under it), and no loop shutdown cuts one short.
_SENDING: weakref.WeakKeyDictionary[Any, set[asyncio.Task[None]]] = weakref.WeakKeyDictionary()


def _send_request(conn: Any) -> asyncio.Task[None]:
    """A task sending `conn`'s cancel request and waiting until the server has taken it (it
    closes the request's connection), within `_CANCEL_REQUEST_TIMEOUT`: as asyncpg's, or with
    TLS from the first byte for a connection made with direct TLS."""
    from asyncpg import connect_utils

    context = direct_tls_context(conn)
    key = (conn._protocol.backend_pid, conn._protocol.backend_secret)

    async def send() -> None:
        async with asyncio.timeout(_CANCEL_REQUEST_TIMEOUT):
            if context is not None:
                await direct_cancel.send(conn._addr, context, key)
            else:
                await cast(Any, connect_utils)._cancel(
                    loop=conn._loop, addr=conn._addr, params=conn._params,
                    backend_pid=key[0], backend_secret=key[1])

    task = asyncio.get_running_loop().create_task(send())
    _REQUESTS_IN_FLIGHT.add(task)
    sending = _SENDING.setdefault(conn, set())
    sending.add(task)
    task.add_done_callback(sending.discard)
    task.add_done_callback(_request_sent)
    return task


def _request_sent(task: asyncio.Task[None]) -> None:
    _REQUESTS_IN_FLIGHT.discard(task)
    if not task.cancelled():
        task.exception()  # (retrieved: the request task awaiting it may have ended first)


_ORIGINAL_REQUEST: Callable[..., Any] = cast(Any, asyncpg.Connection)._cancel


def cancel_aware_class(base: type[Any] | None, *, cancels: bool) -> type[Any]:
    """An asyncpg ``connection_class`` (a subclass of `base`, asyncpg.Connection by default) whose
    connections send a cancel request only where it can be delivered (`cancel_deliverable`) and
    are closed instead otherwise, and send it as the connection was made (direct TLS too); lost,
    they leave no reply future unretrieved (`_cleanup_retrieving`); a COPY FROM STDIN from an
    asynchronous iterable stops once the server has ended it, and a COPY FROM STDIN that ends
    with rows its front has not taken closes its connection (`asyncpool.connect.copy_end`).
    `cancels=False`: never send one (``cancel_requests="off"``).

    One class per (`base`, `cancels`) for the process, not one per pool: CPython's caches of
    attribute lookups and its specialized bytecode are keyed by class, so hundreds of pools in a
    process, each with a class of its own, made asyncpg's own code take the slow lookups on every
    query (7,700 instructions per query more with 200 pools, benchmarks/README.md)."""
    base = base or asyncpg.Connection
    if not hasattr(asyncpg.Connection, "_cancel_current_command") or not hasattr(
            asyncpg.Connection, "_cancel") or not hasattr(asyncpg.protocol.Protocol, "backend_pid"):
        return base  # an untested asyncpg: keep its own behaviour
    attrs: dict[str, Any] = {
        "__slots__": (),
        "_asyncpool_cancels": cancels,
        "_cancel_current_command": _cancel_or_terminate,
    }
    if base._cancel is _ORIGINAL_REQUEST:  # (a class's own override is kept, and called)
        attrs["_cancel"] = _cancel_as_connected
    if hasattr(asyncpg.Connection, "_get_unique_id"):
        attrs["_get_unique_id"] = _unique_id
    if hasattr(asyncpg.Connection, "_cleanup"):
        attrs["_cleanup"] = _cleanup_retrieving
    if hasattr(asyncpg.Connection, "_copy_in"):
        attrs["_copy_in"] = copy_end.copy_in_watched
        attrs["copy_records_to_table"] = copy_end.copy_records_watched
    return shared_subclass(base.__name__, (base,), attrs)


def _cleanup_retrieving(self: Any) -> None:
    """asyncpg's ``Connection._cleanup`` (run as the connection closes, and as its protocol
    finds it lost, before it fails the reply future the statement waits on), first having
    that future retrieved once it fails (`retrieve_protocol_waiters`): a COPY FROM STDIN whose
    connection the network lost (or ``pg_terminate_backend()``) never awaits its own when its
    timeout comes before its rows end."""
    retrieve_protocol_waiters(self)
    # Then the next class's own, after the one that set this (asyncpg's, or a user class's).
    classes = type(self).__mro__
    after = next(i for i, klass in enumerate(classes)
                 if vars(klass).get("_cleanup") is _cleanup_retrieving) + 1
    next(vars(klass)["_cleanup"] for klass in classes[after:] if "_cleanup" in vars(klass))(self)
    cleaned_up(self)


#: Told of each connection of a `cancel_aware_class` as asyncpg cleans it up: closed or
#: terminated by its owner, or found lost by its protocol (the server, the pooler or the network
#: closed it). The pool's (`asyncpool.pool.lost_idle`) retires an idle one at once. Each listener
#: is called on the thread that cleaned it up, inside asyncpg's protocol callback: it must not
#: raise, and should only schedule its work.
CLEANUP_LISTENERS: list[Callable[[Any], None]] = []


def cleaned_up(conn: Any) -> None:
    """Tell `CLEANUP_LISTENERS` that `conn` is closed (asyncpg's ``_cleanup`` has run)."""
    for listener in CLEANUP_LISTENERS:
        listener(conn)


# asyncpg names its prepared statements (cursors, prepare()) and portals __asyncpg_stmt_<n>__,
# counting from 1 in every process. Behind a pooler that does not track them (PgBouncer before
# 1.21, transaction mode) a statement left prepared on a server connection (asyncpg closes one
# only when it next prepares, maybe on another server connection) then meets the same name
# from the next process there: DuplicatePreparedStatementError. A token per process (new in a
# forked child) keeps the names apart.
_NAME_TOKEN = [secrets.token_hex(4)]
_NAME_NUMBERS = itertools.count(1)


def _unique_id(self: Any, prefix: str) -> str:
    return f"__asyncpg_{prefix}_{_NAME_TOKEN[0]}_{next(_NAME_NUMBERS):x}__"


def _new_name_token() -> None:
    _NAME_TOKEN[0] = secrets.token_hex(4)


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_new_name_token)


def shared_subclass(name: str, bases: tuple[type[Any], ...], attrs: dict[str, Any]) -> type[Any]:
    """``type(name, bases, attrs)``, made once for the process and shared while anything uses it
    (the connection classes given to asyncpg: one per kind, never one per pool). `attrs` values
    must be hashable."""
    # By the bases' ids: while the class made from them lives, so do they (no id is reused).
    key = (name, tuple(map(id, bases)), tuple(attrs.items()))
    made = _SUBCLASSES.get(key)
    if made is None:
        made = type(name, bases, attrs)
        _SUBCLASSES[key] = made
    return made


#: `shared_subclass`'s classes, each kept while a pool (or connection) uses it.
_SUBCLASSES: weakref.WeakValueDictionary[tuple[Any, ...], type[Any]] = weakref.WeakValueDictionary()


def transport_of(conn: Any) -> Any:
    """The transport asyncpg writes `conn`'s messages to (``Connection._transport``, asyncpg
    0.32), or None if this asyncpg keeps none there."""
    return getattr(conn, "_transport", None)


def is_wire_protocol(protocol: object) -> bool:
    """True for asyncpg's PostgreSQL protocol (what reads the server's messages), False for the
    one-byte TLS negotiation protocol asyncpg connects with first (`asyncpool.connect.authguard`
    reads the former's Authentication messages)."""
    return isinstance(protocol, asyncpg.protocol.Protocol)


def retrieve_negotiation_error(protocol: object) -> None:
    """Mark as seen the error asyncpg's TLS negotiation protocol keeps when its connection is
    lost after the login stopped waiting for it (cancelled as the TCP connection came up: the
    future was never awaited). asyncio would log "Future exception was never retrieved" for each
    such login at garbage collection (about one in four logins cancelled in their first
    milliseconds); nobody can retrieve it but the protocol's wrapper."""
    waiting = getattr(protocol, "on_data", None)
    if isinstance(waiting, asyncio.Future) and waiting.done() and not waiting.cancelled():
        waiting.exception()


def request_cancel(conn: Any) -> asyncio.Task[Any] | None:
    """Send a cancel request for whatever `conn` is running, if one can be delivered; None if
    not. The task ends once the server (or pooler) has taken the request; it is tracked with
    asyncpg's own requests, so `pending_cancellations` sees it and a close waits for it while
    it has time (leak reclaim: the statement is cancelled before the connection goes). The
    request itself is sent by a task of its own (`_send_request`), which closing the connection
    does not cut short: its socket closed before PgBouncer 1.18 has forwarded it crashes
    PgBouncer (pgbouncer#801), while the connection closed first does not (docs/faults.md)."""
    key = backend_key(conn)
    if key is None or not cancel_deliverable(conn) or conn.is_closed():
        return None
    cancellations = getattr(conn, "_cancellations", None)
    if cancellations is None or not hasattr(conn, "_addr") or not hasattr(conn, "_params"):
        return None
    sent = _send_request(conn)

    async def cancel() -> None:
        # Cancelled (the connection closed under it): the request goes on, detached.
        with contextlib.suppress(OSError, TimeoutError, asyncio.CancelledError):
            await asyncio.shield(sent)

    task: asyncio.Task[Any] = asyncio.get_running_loop().create_task(cancel())
    cancellations.add(task)
    task.add_done_callback(cancellations.discard)
    return task


#: How long a cancel request of ours may take to be taken (connect, send, server closes).
_CANCEL_REQUEST_TIMEOUT = 5.0


def cancel_target(conn: Any) -> CancelTarget | None:
    """Where and how a cancel request for `conn` goes, for a sender that does not use the event
    loop (`asyncpool.connect.blocking_cancel`); None if none can be delivered."""
    key = backend_key(conn)
    addr = getattr(conn, "_addr", None)
    params = getattr(conn, "_params", None)
    if key is None or not cancel_deliverable(conn) or addr is None or params is None:
        return None
    from asyncpg.connect_utils import SSLMode

    # As asyncpg's own requests: plain on a Unix socket (a server answers an SSLRequest there
    # with "N", which sslmode=require would take as a refusal) and with sslmode=allow.
    tls = bool(params.ssl) and params.sslmode != SSLMode.allow and not isinstance(addr, str)
    return CancelTarget(addr, key, params.ssl if tls else None, params.sslmode == SSLMode.prefer,
                        tls and direct_tls_context(conn) is not None)


def direct_tls_context(conn: Any) -> SSLContext | None:
    """The TLS context `conn` was made with if it was made with direct TLS over TCP
    (``sslnegotiation=direct``), else None: its cancel requests must then start TLS at the
    first byte too (as libpq's do), since the server or front may take TLS no other way."""
    from asyncpg import connect_utils

    params = getattr(conn, "_params", None)
    direct = getattr(connect_utils, "SSLNegotiation", None)
    if (params is None or direct is None or isinstance(getattr(conn, "_addr", None), str)
            or getattr(params, "ssl_negotiation", None) is not direct.direct):
        return None
    context = params.ssl
    # asyncpg refuses direct TLS below sslmode=require, and turns every mode into a context.
    return context if isinstance(context, ssl.SSLContext) else None


@dataclass(frozen=True, slots=True)
class CancelTarget:
    """A cancel request's address (``(host, port)`` or a Unix socket path), BackendKeyData
    (pid, secret: kept out of the repr), and TLS: the context to negotiate it with (None:
    plain), whether a server refusing TLS may get the request in plain text
    (``sslmode=prefer``), as asyncpg sends it, and whether TLS starts at the first byte
    (direct TLS) rather than after an SSLRequest."""

    addr: str | tuple[str, int]
    key: tuple[int, int] = field(repr=False)
    ssl: SSLContext | None
    advisory: bool
    direct: bool = False
