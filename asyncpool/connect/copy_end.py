"""A COPY FROM STDIN from an asynchronous iterable that the server ends before its source does.

The server ends a COPY it is fed (``statement_timeout``, ``pg_cancel_backend()``, a row it
refuses) as it reads the next chunk: it answers with its error and ReadyForQuery, and ignores the
rest of the COPY's messages. asyncpg 0.32's ``copy_in`` does not look at its reply until the source
ends: it goes on reading the source, and

- when its ``timeout=`` comes while it waits for the source, it hands its timeout handler the
  reply future the protocol has already dropped (``AttributeError: 'NoneType' object has no
  attribute 'done'``): the caller gets that, and the server's error is logged as "Future exception
  was never retrieved"; the connection is in step (nothing was left to cancel) and works;
- when the task is cancelled (or the source raises), it asks the server to cancel a statement
  that has already ended and waits for an answer that never comes: the connection is stuck until
  the pool's reset gives up on it (`RELEASE_TIMEOUT`, 5 s) and closes it, and the caller's
  cancellation waits as long.

The pool's connection class (`asyncpool.connect.driver`) hands asyncpg a `WatchedSource` instead
of the caller's iterable: it stops feeding the COPY at the next chunk once the server has ended it,
so that asyncpg ends the COPY as when the source ends and raises the server's error; where asyncpg
fails its own way first, the caller gets the server's error (`copy_in_watched`), and an
interruption asks the server for nothing but a Sync (`settle_cancel`). The caller gets the server's
error rather than its own timeout: the server's is what ended the COPY (no row was written after
it), and it is what the caller gets when the source ends before the timeout.

A COPY fed faster than its front takes it leaves rows in the connection's transport, unsent,
when the server ends it. PostgreSQL reads and drops them; PgBouncer 1.18 stops taking them once
the server has left the COPY (it logs nothing), so a COPY waiting for room to write waits for
good, and whatever is written after them (the Sync above, asyncpg's next statement) never
arrives: the cancellation or the statement waits for the pool's bounded waits (5 s) or forever.
Behind any transaction-mode pooler, rows arriving after the server's ReadyForQuery meet a server
connection the pooler may have given another client. So such a connection is out of step with
its front whatever the front: the COPY's writer is woken once the server has ended it (the COPY
then ends with the server's error), and a COPY FROM STDIN that ends or is interrupted with
unsent bytes closes its connection at once (`out_of_step`); the pool opens a new one.

A source asyncpg reads itself (records not asynchronous, a path, a file object) cannot be
watched so: asyncpg iterates the records, and reads a path or file through its own reader. Fed
faster than PgBouncer 1.18 takes it, such a COPY that the server ended waited in asyncpg's flow
control (``writing_allowed``) for room that never came: until its ``timeout=``, or for good. For
those the pool's connection class puts a `FlowGate` in the place of the protocol's
``writing_allowed`` for the COPY's length: asyncpg waits on it before it writes each chunk, and
once the server has ended the COPY it raises there (`EndedByServer`), waiting or not, and the
caller gets the server's error. asyncpg's own entry points get the caller's own arguments.

Rows that have all left the transport are not counted: a COPY written whole before the server's
error is read (the usual case up to a few MB: the transport hands each chunk to the socket at
once) leaves them in the sockets, and PgBouncer 1.18 often stops reading them for good. So a
COPY FROM STDIN that ends with the server's error keeps its connection only once the front has
answered a query sent after them (`confirm_in_step`); otherwise the connection goes, out of step.
A task cancelled once the server has ended the COPY cannot wait for that answer (nor should
the pool's reset, or its holder's next statement, meet a front stuck behind the rows): its
connection goes at once, out of step, whether asyncpg was waiting for the COPY's reply or for
the source (then after the Sync of `settle_cancel`).

asyncpg's protocol keeps its reply future where Python cannot reach it but through the garbage
collector's references (as `asyncpool.connect.copy_waiter` reads it): read once per COPY, when
the source is first asked for a chunk (or asyncpg first waits to write one), never on a
statement's path.
"""

from __future__ import annotations

import asyncio
import gc
import os
import weakref
from collections.abc import AsyncIterable, AsyncIterator, Callable
from typing import Any, Literal

import asyncpg

#: The reply came before the source was first asked for a chunk (the server refused the COPY).
_ENDED: Any = object()
#: Not watched: the protocol holds no reply future of its own we can tell (it is cancelling).
_UNWATCHED: Any = object()
#: A Sync message: the server answers ReadyForQuery, which ends asyncpg's wait for a cancel.
_SYNC = b"S\x00\x00\x00\x04"
#: The COPY FROM STDIN each connection is running: its watched source or gated flow control,
#: None for one not watched (asyncpg's flow control not found) (`settle_cancel`, `out_of_step`).
_RUNNING: dict[Any, WatchedSource | FlowGate | None] = {}


def _next_in_mro(conn: Any, name: str, override: Callable[..., Any]) -> Any:
    """The `name` method that `override` (set on a class in `conn`'s class's MRO) replaces:
    asyncpg's, or a user's connection class's."""
    classes = type(conn).__mro__
    after = next(i for i, klass in enumerate(classes) if vars(klass).get(name) is override) + 1
    return next(vars(klass)[name] for klass in classes[after:] if name in vars(klass))


def _consume(future: asyncio.Future[Any]) -> None:
    if not future.cancelled():
        future.exception()  # (marks it retrieved; asyncpg, awaiting it, still gets it)


def _reply_future(conn: Any) -> Any:
    """The reply future of the COPY `conn` has just sent (asyncpg's protocol's ``waiter``, its
    only future then), retrieved once done; `_ENDED` if the reply has come already."""
    protocol = getattr(conn, "_protocol", None)
    cancelling = getattr(protocol, "_is_cancelling", None)
    if cancelling is None or cancelling():
        return _UNWATCHED
    futures = [value for value in gc.get_referents(protocol) if isinstance(value, asyncio.Future)]
    if not futures:
        # asyncpg drops the future as it reads the reply (or the connection's end, then closed).
        return _UNWATCHED if conn.is_closed() else _ENDED
    if len(futures) > 1 or futures[0].done():
        return _UNWATCHED
    futures[0].add_done_callback(_consume)
    futures[0].add_done_callback(lambda reply: _wake_writer(protocol, reply))
    return futures[0]


def _wake_writer(protocol: Any, reply: asyncio.Future[Any]) -> None:
    """The server has ended the COPY: a COPY waiting for room in its transport (flow control)
    goes on at once to its source, which then ends (`WatchedSource`), rather than waiting for
    a front that may never take the rest (PgBouncer 1.18: the module's docstring)."""
    if server_error(reply) is not None:
        protocol.resume_writing()  # (asyncio's protocol method: it only sets asyncpg's event)


def server_error(reply: Any) -> BaseException | None:
    """The server's error that ended the COPY whose reply future is `reply`, or None."""
    if reply is None or reply is _UNWATCHED or reply is _ENDED:
        return None
    if not reply.done() or reply.cancelled():
        return None
    error = reply.exception()
    return error if isinstance(error, asyncpg.PostgresError) else None


class WatchedSource:
    """The caller's asynchronous iterable as asyncpg's COPY reads it: it ends as soon as the
    server has ended the COPY (asyncpg then sends CopyDone, which the server ignores, and raises
    the server's error), and finds the COPY's reply future when first asked for a chunk (asyncpg
    has sent the COPY by then)."""

    __slots__ = ("_conn", "_iterator", "_source", "reply")

    def __init__(self, source: AsyncIterable[Any], conn: Any) -> None:
        self._source = source
        self._conn = conn
        self._iterator: AsyncIterator[Any] | None = None
        self.reply: Any = None

    def __aiter__(self) -> WatchedSource:
        self._iterator = self._source.__aiter__()
        return self

    async def __anext__(self) -> Any:
        if self.reply is None:
            self.reply = _reply_future(self._conn)
        if self.reply is _ENDED or server_error(self.reply) is not None:
            raise StopAsyncIteration
        assert self._iterator is not None  # (asyncpg calls __aiter__ first)
        return await self._iterator.__anext__()

    def ended_by_server(self) -> bool:
        """Whether the server has ended the COPY (its error read)."""
        return self.reply is _ENDED or server_error(self.reply) is not None


class EndedByServer(Exception):
    """Raised by a `FlowGate` into asyncpg's COPY: the server has ended it (the caller gets the
    server's error, `_run_watched`)."""


class FlowGate(asyncio.Event):
    """The protocol's ``writing_allowed`` (asyncpg's flow control) during a COPY FROM STDIN whose
    source asyncpg reads itself: asyncpg waits on it before it writes each chunk, the transport
    clears and sets it (``pause_writing``, ``resume_writing``). Once the server has ended the
    COPY it raises `EndedByServer` there, whether asyncpg was waiting for room or not: asyncpg
    then stops reading the source, sends CopyFail and asks for a cancel (`settle_cancel`: a Sync;
    or, rows unsent, the connection closed). Finds the COPY's reply future the first time asyncpg
    waits (it has sent the COPY by then)."""

    def __init__(self, conn: Any, protocol: Any, allowed: asyncio.Event) -> None:
        super().__init__()
        self._conn = conn
        self._protocol = protocol
        self._allowed = allowed
        self.reply: Any = None
        if allowed.is_set():
            self.set()

    @classmethod
    def install(cls, conn: Any) -> FlowGate | None:
        """In `conn`'s protocol, in the place of its ``writing_allowed``; None if this asyncpg
        keeps none there."""
        protocol: Any = getattr(conn, "_protocol", None)
        allowed = getattr(protocol, "writing_allowed", None)
        if type(allowed) is not asyncio.Event:  # (asyncpg's own, not a gate already)
            return None
        gate = cls(conn, protocol, allowed)
        protocol.writing_allowed = gate
        return gate

    def remove(self) -> None:
        """asyncpg's own ``writing_allowed`` back, in the state the transport left the gate."""
        if self._protocol.writing_allowed is self:
            if self.is_set():
                self._allowed.set()
            else:
                self._allowed.clear()
            self._protocol.writing_allowed = self._allowed

    async def wait(self) -> Literal[True]:
        if self.reply is None:
            self.reply = _reply_future(self._conn)  # (wakes this gate: `_wake_writer`)
        if not self.ended_by_server():
            await super().wait()
        if self.ended_by_server():
            raise EndedByServer
        return True

    def ended_by_server(self) -> bool:
        """Whether the server has ended the COPY (its error read). (Its reply cannot have come
        before asyncpg first waits: it has not let the loop run since it sent the COPY.)"""
        return server_error(self.reply) is not None

    def server_error(self) -> BaseException | None:
        """The server's error that ended the COPY, if read."""
        return server_error(self.reply)


def _watchable(source: object) -> bool:
    """Whether asyncpg's ``_copy_in`` takes `source` as an asynchronous iterable (in its order:
    a path, then a file-like object, then an asynchronous iterable)."""
    return (isinstance(source, AsyncIterable)
            and not isinstance(source, (str, bytes, os.PathLike)) and not hasattr(source, "read"))


def unsent(conn: Any) -> int:
    """Bytes written to `conn`'s transport and not yet taken by the kernel (0 without one)."""
    transport = getattr(conn, "_transport", None)  # (`driver.transport_of`, which imports us)
    return int(transport.get_write_buffer_size()) if transport is not None else 0


#: Connections closed by `end_out_of_step`: by asyncpool, not lost (`closed_out_of_step`).
_CLOSED_OUT_OF_STEP: weakref.WeakSet[Any] = weakref.WeakSet()


def closed_out_of_step(conn: Any) -> bool:
    """Whether `conn` was closed because a COPY ended with rows its front had not taken: the
    pool closed it, nothing says the server or the network lost it (nor the others), and the
    COPY's error (the server's) is the caller's, not a lost connection's."""
    return conn in _CLOSED_OUT_OF_STEP


def end_out_of_step(conn: Any, terminate: Callable[[], Any]) -> None:
    """Close `conn`, out of step (`out_of_step`), with `terminate` (now, or soon)."""
    _CLOSED_OUT_OF_STEP.add(conn)
    terminate()


def out_of_step(conn: Any) -> bool:
    """Whether `conn` is running a COPY FROM STDIN (through the pool's connection class) whose
    transport still holds bytes the front has not taken: interrupted now, the COPY would leave
    them to arrive after its end (the module's docstring)."""
    return conn in _RUNNING and not conn.is_closed() and unsent(conn) > 0


#: How long a COPY the server ended waits for the answer to the query that shows its connection
#: in step (`confirm_in_step`) before it closes the connection: a front that reads on answers in
#: a round trip (PostgreSQL drops the rows left over at gigabytes a second), PgBouncer 1.18 stuck
#: behind them never does. Past it, a loaded machine costs one reconnect, not a wrong answer.
IN_STEP_BOUND = 1.0


async def confirm_in_step(conn: Any) -> None:
    """After a COPY FROM STDIN that ended with the server's error: close `conn` (out of step)
    unless its front answers a query within `IN_STEP_BOUND` (its answer or its error: in a
    transaction the COPY's error has aborted, the server refuses it, which is an answer too; a
    connection lost meanwhile is left to the pool, which reports it lost).

    Rows the client had written when the server ended the COPY may still be on their way,
    whatever the client can count: once they have left its transport they wait in the sockets
    (the client's send buffer, the front's receive buffer), several megabytes on loopback.
    PostgreSQL and PgBouncer 1.21+ read and drop them; PgBouncer 1.18, when they arrive after
    the server has left the COPY, may stop reading its client for good (the client's next
    statement then got no answer: until its timeout, then 5 s of the pool's reset, or until
    ``leak_timeout``; the front sometimes passed the rows on to the server, which closed the
    connection). The answer comes after the rows in the stream:
    once it has come, the front has taken them all and the connection is in step; if it does not
    come in time, the connection goes (`closed_out_of_step`)."""
    probe = asyncio.ensure_future(conn.execute("SELECT 1"))
    probe.add_done_callback(_consume)
    try:
        done, _ = await asyncio.wait({probe}, timeout=IN_STEP_BOUND)
    except BaseException:
        if not probe.done():
            end_out_of_step(conn, conn.terminate)  # (its answer unread: it cannot be reused)
        raise
    if not done:
        end_out_of_step(conn, conn.terminate)
        # (the close completes asyncpg's waiter at once; bounded all the same)
        await asyncio.wait({probe}, timeout=IN_STEP_BOUND)
    # (A probe that failed otherwise met a connection lost meanwhile: the pool sees it as such.)


def _rows_after_end(watch: WatchedSource | FlowGate | None) -> bool:
    """Whether the server ended the COPY `watch` watches with its error (not FATAL: that ends
    the connection, lost) once rows were sent (a `WatchedSource`: once it was asked for one)."""
    error = server_error(watch.reply) if watch is not None else None
    return isinstance(error, asyncpg.PostgresError) and not _ends_session(error)


def _ends_session(error: asyncpg.PostgresError) -> bool:
    """Whether the server's `error` ends the connection (FATAL: ``pg_terminate_backend``...),
    which is then lost, not out of step: the pool reports it as lost."""
    severity = getattr(error, "severity_en", None) or getattr(error, "severity", None)
    return severity in ("FATAL", "PANIC")


async def _run_watched(conn: Any, watched: WatchedSource | None,
                       copy: Callable[[], Any]) -> Any:
    """`copy`, asyncpg's COPY FROM STDIN on `conn`, reading `watched`; or, for a source that
    asyncpg reads itself (`watched` None), with its flow control gated (`FlowGate`). Ended by
    the server's error, its connection is kept only once shown in step (`confirm_in_step`)."""
    # (a second COPY at once on the connection, which asyncpg refuses, does not take its place)
    running = conn not in _RUNNING
    try:
        return await _run_gated(conn, watched, copy, running)
    except asyncpg.PostgresError as error:
        if running and not conn.is_closed() and not _ends_session(error):
            await confirm_in_step(conn)
        raise


async def _run_gated(conn: Any, watched: WatchedSource | None, copy: Callable[[], Any],
                     running: bool) -> Any:
    watch: WatchedSource | FlowGate | None = watched
    if running:
        if watch is None:
            watch = FlowGate.install(conn)
        _RUNNING[conn] = watch
    try:
        return await copy()
    except asyncio.CancelledError:
        if running and _rows_after_end(watch) and not conn.is_closed():
            # Cancelled once the server had ended the COPY: its rows may still be in the
            # sockets, as after its error (`confirm_in_step`), but the check would hold the
            # cancelled task up to `IN_STEP_BOUND` (and the pool's reset, or the holder's next
            # statement, meets a stuck PgBouncer 1.18 all the same): the connection goes now.
            end_out_of_step(conn, conn.terminate)
        raise
    except EndedByServer:
        error = watch.server_error() if isinstance(watch, FlowGate) else None
        assert error is not None  # (only a gate raises it, once the server's error is read)
        raise error from None
    except AttributeError:
        # asyncpg's timeout handler given the reply future its protocol dropped as it read the
        # server's error: the server's error is the caller's (the module's docstring).
        error = server_error(watch.reply if watch is not None else None)
        if error is None or conn.is_closed():
            raise  # (a connection closed under the COPY: `dropped_transport_error`)
        raise error from None
    finally:
        if running:
            # Ended (its error, a cancellation, a timeout) with rows unsent: the connection is
            # out of step with its front, and goes now, not at its next statement. (A COPY that
            # completes has had every byte taken: the server answered its CopyDone.)
            if out_of_step(conn):
                end_out_of_step(conn, conn.terminate)
            del _RUNNING[conn]
            if isinstance(watch, FlowGate):
                watch.remove()


async def copy_in_watched(self: Any, copy_stmt: str, source: Any, timeout: Any) -> Any:
    """asyncpg's ``Connection._copy_in`` (``copy_to_table``), an asynchronous iterable source
    watched (`WatchedSource`), any other (a path, a file object, bytes) passed on as given, its
    flow control gated (`FlowGate`)."""
    own = _next_in_mro(self, "_copy_in", copy_in_watched)
    if not _watchable(source):
        return await _run_watched(self, None, lambda: own(self, copy_stmt, source, timeout))
    watched = WatchedSource(source, self)
    return await _run_watched(self, watched, lambda: own(self, copy_stmt, watched, timeout))


async def copy_records_watched(self: Any, table_name: str, *, records: Any, **kwargs: Any) -> Any:
    """asyncpg's ``Connection.copy_records_to_table``, asynchronous iterable records watched
    (`WatchedSource`), others passed on as given, its flow control gated (`FlowGate`)."""
    own = _next_in_mro(self, "copy_records_to_table", copy_records_watched)
    if not isinstance(records, AsyncIterable):
        return await _run_watched(
            self, None, lambda: own(self, table_name, records=records, **kwargs))
    watched = WatchedSource(records, self)
    return await _run_watched(
        self, watched, lambda: own(self, table_name, records=watched, **kwargs))


def settle_cancel(conn: Any, sent: asyncio.Future[Any], transport: Any) -> bool:
    """Called as asyncpg asks to cancel `conn`'s statement (its task cancelled, or its source
    raised): if that statement is a COPY the server has already ended, send no cancel request
    (there is nothing to cancel, and a late one could stop the connection's next statement) but
    a Sync, whose ReadyForQuery is the answer asyncpg waits for before the connection's next
    statement; `sent` (asyncpg's "request sent") is done at once. True if so. (A cancelled
    task's connection then goes all the same, `_run_gated`; a COPY its `FlowGate` stopped ends
    with the server's error, and is checked, `confirm_in_step`.)"""
    watched = _RUNNING.get(conn)
    if (watched is None or transport is None or not watched.ended_by_server()
            or conn.is_closed()):
        return False  # (asyncpg's own way: a closed connection's waiters are completed anyway)
    transport.write(_SYNC)
    if not sent.done():
        sent.set_result(None)
    return True
