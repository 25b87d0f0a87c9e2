"""Where the one-round-trip path meets the socket: asyncpg's writes and the server's replies.

asyncpg's protocol writes to a transport and is fed by one; this mode needs to put the cached
typed Parse in place of asyncpg's own and read a reply's head before asyncpg decodes rows. Both
are done with objects asyncpg is *given* when it connects, not by patching the loop's transport,
so they work on every event loop (uvloop's transports cannot be patched per instance):

* `InterceptingLoop` is passed as ``asyncpg.connect(loop=...)``: it forwards everything to the
  running loop, except that the connections it opens put a `Wire` between the real transport and
  the protocol asyncpg built (TLS upgrades included).
* `Wire` is both the transport's protocol (the server's bytes reach asyncpg through it) and, via
  `WireTransport`, the transport asyncpg writes to.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

from asyncpool.connect import driver
from asyncpool.connect.forwarding import ForwardingProtocol, LoopView
from asyncpool.errors import PoolError
from asyncpool.unnamed.messages import (
    ASYNCHRONOUS,
    BIND_COMPLETE,
    BIND_COMPLETE_MESSAGE,
    DATA_ROW,
    DESCRIBE_UNNAMED_PORTAL,
    ERROR_RESPONSE,
    FLUSH_MESSAGE,
    NO_DATA,
    PARSE,
    PARSE_COMPLETE,
    PARSE_COMPLETE_MESSAGE,
    READY_FOR_QUERY,
    ROW_DESCRIPTION,
    bind_result_codes,
    bind_with_text_params,
    error_is_fatal,
    error_sqlstate,
    message_header,
)

if TYPE_CHECKING:
    from asyncpool.unnamed.check import Check
    from asyncpool.unnamed.connection import Policy

Buffer = bytes | bytearray | memoryview

# The reply's head, in order: ParseComplete, BindComplete, RowDescription or NoData.
_HEAD = ((PARSE_COMPLETE,), (BIND_COMPLETE,), (ROW_DESCRIPTION, NO_DATA))
# SQLSTATEs (classes) of a Bind refused because the cached types no longer fit: undefined or
# mismatched types and operators (42), binary data the type cannot read (22P03), format and
# message mismatches (08), a type OID that no longer exists ("cache lookup failed", XX).
_REFUSALS = frozenset(("42", "08", "XX", "22P03"))
# Classes of an error at Parse that say nothing about the cached description: the statement
# was cancelled or timed out (57: statement_timeout, a cancel; 55: lock_timeout, often a
# migration's lock), lost a deadlock or serialization (40), ran out of a resource (53), or came
# in a failed transaction (25). Described afresh and run again, it would wait the whole time a
# second time.
_NOT_REFUSALS = frozenset(("57", "55", "40", "53", "25"))


class InterceptingLoop(LoopView):
    """The running loop, as `asyncpg.connect` sees it: connections it opens get a `Wire`, and
    the pool's description-cache `policy` (the connection class is shared by every pool).

    Only ``create_connection``, ``create_unix_connection`` and ``start_tls`` differ.
    """

    def __init__(self, loop: Any, policy: Policy | None = None) -> None:
        super().__init__(loop)
        self.policy = policy

    async def create_connection(self, factory: Callable[[], Any], *args: Any,
                                **kwargs: Any) -> tuple[WireTransport, Any]:
        return await self._open(self.real.create_connection, factory, *args, **kwargs)

    async def create_unix_connection(self, factory: Callable[[], Any], *args: Any,
                                     **kwargs: Any) -> tuple[WireTransport, Any]:
        return await self._open(self.real.create_unix_connection, factory, *args, **kwargs)

    @staticmethod
    async def _open(opener: Any, factory: Callable[[], Any], *args: Any,
                    **kwargs: Any) -> tuple[WireTransport, Any]:
        _, wire = await opener(lambda: Wire(factory()), *args, **kwargs)
        assert wire.transport is not None
        return wire.transport, wire.inner

    async def start_tls(self, transport: Any, protocol: Any, *args: Any,
                        **kwargs: Any) -> WireTransport | None:
        real = transport.real if isinstance(transport, WireTransport) else transport
        upgraded = await self.real.start_tls(real, protocol, *args, **kwargs)
        if upgraded is None:
            return None
        # asyncpg calls set_protocol(its protocol) on what we return: the Wire goes in between.
        wire = Wire(protocol)
        return wire.attach(upgraded)


class WireTransport:
    """The transport asyncpg's protocol writes to; everything but writing goes to the real one."""

    __slots__ = ("real", "wire", "write", "writelines")

    def __init__(self, real: asyncio.BaseTransport, wire: Wire) -> None:
        self.real: Any = real
        self.wire: Wire = wire
        self.write: Callable[[Buffer], None] = wire.write
        self.writelines: Callable[[Iterable[Buffer]], None] = wire.writelines

    def set_protocol(self, protocol: Any) -> None:
        if protocol is not self.wire:
            self.wire.inner = protocol
            self.wire.forward = protocol.data_received
        self.real.set_protocol(self.wire)

    def get_protocol(self) -> Any:
        return self.wire.inner

    def __getattr__(self, name: str) -> Any:
        return getattr(self.real, name)


class Wire(ForwardingProtocol):
    """Between one connection's transport and asyncpg's protocol.

    Write side: armed with a `Check`, it drops asyncpg's next Parse and sends the cached typed
    Parse + Describe in the same write as asyncpg's Bind/Execute/Sync. While `swallowing`, it
    records asyncpg's writes instead of sending them (a reply already received is being decoded
    again). Read side: for a checked reply it reads the head (ParseComplete,
    ParameterDescription, RowDescription/NoData) before asyncpg sees any of it, and when the
    description changed it keeps every DataRow from asyncpg (asyncpg's call completes without
    rows) while recording the whole reply so that it can be decoded again with the new one.
    Its own requests (`side`: a Sync, values for the server to turn) are answered to it alone.
    """

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.forward: Callable[[bytes], None] = inner.data_received
        self.real: Any = None
        self.transport: WireTransport | None = None
        self.on_verdict: Callable[[Check], None] | None = None
        # write side
        self._armed: Check | None = None
        self._parse_seen = False
        # asyncpg's Parse of an unprepared statement, written alone, not sent until its Bind is
        # (`_write_unarmed`).
        self._lone_parse: bytes | None = None
        self.swallowing = False
        self.swallowed: list[bytes] = []
        # The last write ended with Flush (asyncpg's describe: Parse, Describe, Flush): the
        # server holds what its Parse locked, and a transaction pooler its server connection,
        # until a Sync (`DescribeCacheConnection._end_describe`).
        self.flushed = False
        # read side
        self._check: Check | None = None  # reading this check's reply head
        self._stage = 0
        self._held = bytearray()
        self._pos = 0
        self._holding: Check | None = None  # replaying: rows kept from asyncpg until ReadyForQuery
        # Requests of the Wire's own (`side`): their replies, up to each one's ReadyForQuery,
        # are taken off the stream before asyncpg sees anything after them.
        self._side: deque[tuple[asyncio.Future[list[bytes]], list[bytes]]] = deque()
        self._side_held = bytearray()

    # -- asyncio protocol callbacks (the real transport calls these) ---------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.attach(transport)
        self.inner.connection_made(self.transport)

    def attach(self, transport: asyncio.BaseTransport) -> WireTransport:
        self.real = transport
        self.transport = WireTransport(transport, self)
        return self.transport

    def data_received(self, data: bytes) -> None:
        if self._side:
            data = self._take_side(data)
            if not data:
                return
        if self._check is not None:
            self._inspect(data)
        elif self._holding is not None:
            self._hold(data)
        else:
            self.forward(data)

    def connection_lost(self, exc: Exception | None) -> None:
        self._check = self._holding = self._armed = self._lone_parse = None
        self._held.clear()
        self._side_held.clear()
        while self._side:
            waiter, _ = self._side.popleft()
            if not waiter.done():
                waiter.set_exception(ConnectionResetError("the connection was lost"))
        self.inner.connection_lost(exc)
        driver.retrieve_negotiation_error(self.inner)

    # -- write side ----------------------------------------------------------------------------

    def arm(self, check: Check) -> None:
        self._armed = check
        self._parse_seen = False
        self._lone_parse = None  # a new statement: a Parse held until now had no Bind

    def disarm(self) -> None:
        self._armed = None

    def write(self, data: Buffer) -> None:
        check = self._armed
        if check is None:
            if self.swallowing:
                self.swallowed.append(bytes(data))
            elif self._lone_parse is None and memoryview(data)[:1] != _PARSE_BYTE:
                self.flushed = False
                self.real.write(data)
            else:
                self._write_unarmed(data)
        elif self._parse_seen:
            self._send(check, (data,))
        elif memoryview(data)[:1] == bytes((PARSE,)):
            self._parse_seen = True  # asyncpg's untyped Parse: the cached typed one replaces it
        else:
            self._unexpected()

    def writelines(self, chunks: Iterable[Buffer]) -> None:
        check = self._armed
        if check is None:
            if self.swallowing:
                self.swallowed.append(b"".join(chunks))
            elif self._lone_parse is None:
                self.flushed = False
                self.real.writelines(chunks)
            else:
                self._write_unarmed(b"".join(chunks))
        elif self._parse_seen:
            self._send(check, chunks)
        else:
            self._unexpected()

    def _write_unarmed(self, data: Buffer) -> None:
        """Send asyncpg's write, holding back a Parse written alone until its Bind comes.

        asyncpg writes an unprepared statement's Parse on its own, then its Bind(s) and Sync;
        an ``executemany`` (or ``fetchmany``) of no rows writes the Parse and nothing after it.
        Sent, that Parse's ParseComplete would arrive at the head of the next statement's reply
        (the server answers it at that statement's Sync), and for a reused statement the Wire
        would read a reply the protocol does not promise and close the connection. Behind a
        transaction pooler it would also keep the server connection assigned until that Sync.
        Held, it goes out in one write with its Bind, or never when something else follows.
        """
        lone, self._lone_parse = self._lone_parse, None
        if lone is not None and memoryview(data)[:1] == _BIND_BYTE:
            data = lone + bytes(data)
        elif memoryview(data)[:1] == _PARSE_BYTE and _one_message(data):
            self._lone_parse = bytes(data)
            return
        self.flushed = memoryview(data)[-5:] == FLUSH_MESSAGE  # asyncpg's describe
        self.real.write(data)

    def _unexpected(self) -> None:
        self._armed = None
        # Raised inside asyncpg's send: asyncpg fails the call and closes the connection.
        raise PoolError(
            "one-round-trip path: asyncpg did not send a reused statement as Parse, then Bind; "
            "this asyncpg version behaves differently from the tested ones"
        )

    def _send(self, check: Check, chunks: Iterable[Buffer]) -> None:
        self._armed = None
        self.flushed = False
        description = check.description
        data = b"".join(chunks)
        head = message_header(data, 0)
        if head is None or head[0] != ord("B"):
            # executemany whose arguments failed to encode before a Bind was written: asyncpg
            # ends its pipeline (a ROLLBACK then Sync, or in a transaction block a Sync) and
            # reads no ParseComplete. Nothing of the statement goes: `check.sent` stays None, so
            # the call is described afresh and run, as when its first arguments fail.
            self.real.write(data)
            return
        bind = data[:head[1]]
        if description.per_column_formats is None:
            description.per_column_formats = len(bind_result_codes(bind)) > 1
        if description.text_params:
            bind = _text_params(bind, description)
        data = b"".join((description.prefix, bind, DESCRIBE_UNNAMED_PORTAL, data[head[1]:]))
        check.sent = data
        self.expect(check)
        self.real.write(data)

    def expect(self, check: Check) -> None:
        """The next reply answers `check`'s statement: read its head before asyncpg does."""
        self._check = check
        self._stage = 0
        self._pos = 0

    def side(self, data: bytes) -> asyncio.Future[list[bytes]]:
        """Send a request of the Wire's own (whole messages ending with Sync), while asyncpg
        waits for no reply: a future of its reply's messages, up to ReadyForQuery, none of which
        reaches asyncpg (asynchronous ones do). It fails if the connection is lost.

        Await it before asyncpg writes again: the reply is taken off the stream whenever it
        comes, but PgBouncer 1.18 lost the reply to a describe written before it came back.
        """
        waiter: asyncio.Future[list[bytes]] = asyncio.get_running_loop().create_future()
        # Seen, so that a loss after its caller stopped waiting (timeout) is not logged at GC.
        waiter.add_done_callback(_retrieve)
        self._side.append((waiter, []))
        self.flushed = False
        self.real.write(data)
        return waiter

    def _take_side(self, data: bytes) -> bytes:
        """Take the replies to `side` requests off `data`; what follows them, for asyncpg."""
        held = self._side_held
        held += data
        pos = 0
        while self._side:
            try:
                head = message_header(held, pos)
            except ValueError:
                self.real.abort()  # framing lost: connection_lost fails the waiters
                held.clear()
                return b""
            if head is None:
                del held[:pos]
                return b""
            kind, end = head
            message = bytes(held[pos:end])
            pos = end
            if kind in ASYNCHRONOUS:
                self.forward(message)
                continue
            waiter, reply = self._side[0]
            reply.append(message)
            if kind == READY_FOR_QUERY:
                self._side.popleft()
                if not waiter.done():
                    waiter.set_result(reply)
        rest = bytes(held[pos:])
        held.clear()
        return rest

    # -- read side -----------------------------------------------------------------------------

    def feed(self, data: bytes) -> None:
        """Give asyncpg a reply that was already received (its writes are being swallowed)."""
        self.forward(data)

    def _inspect(self, data: bytes) -> None:
        check = self._check
        assert check is not None
        held = self._held
        if held:
            held += data
        buf: bytes | bytearray = held if held else data
        pos = self._pos
        verdict: str | None = None
        while verdict is None:
            try:
                head = message_header(buf, pos)
            except ValueError:
                verdict = "unreadable"
                break
            if head is None:
                if buf is data:
                    held += data
                self._pos = pos
                return
            kind, end = head
            verdict = self._read(check, kind, buf, pos, end)
            pos = end
        self._check = None
        rest = bytes(buf) if buf is held else data
        self._held = bytearray()
        self._pos = 0
        check.verdict = verdict
        if self.on_verdict is not None:
            self.on_verdict(check)
        if verdict == "unreadable":
            # Framing can no longer be trusted, so neither can any row: end the connection.
            self.real.abort()
        elif verdict == "changed" and check.replay:
            check.recorded = [PARSE_COMPLETE_MESSAGE, BIND_COMPLETE_MESSAGE]
            self.forward(rest[:pos])
            self._holding = check
            if pos < len(rest):
                self._hold(rest[pos:])
        else:
            self.forward(rest)

    def _read(self, check: Check, kind: int, buf: bytes | bytearray, pos: int,
              end: int) -> str | None:
        """Take one message of the reply's head; a verdict once the head says enough."""
        if kind in ASYNCHRONOUS:
            return None
        if kind == ERROR_RESPONSE:
            return self._error_verdict(check, buf[pos:end])
        if kind not in _HEAD[self._stage]:
            return "unreadable"
        self._stage += 1
        message = bytes(buf[pos:end])
        try:
            return check.judge(kind, message)
        except (ValueError, IndexError):  # a malformed RowDescription
            return "unreadable"

    def _error_verdict(self, check: Check, message: bytes | bytearray) -> str:
        """An ErrorResponse in the reply's head: the server refused the statement before it ran
        ("rejected": its description may be stale), or not ("failed")."""
        sqlstate = check.sqlstate = error_sqlstate(message) or ""
        if error_is_fatal(message):
            # The session ends: a pooler's own FATAL error (PgBouncer's query_timeout or
            # query_wait_timeout, 08P01) comes first, where a refusal would, though the
            # statement may have run. Taken for a refusal, it was "described afresh" on the
            # closed connection and the caller told only "connection is closed".
            return "failed"
        # At Parse, only a schema change can refuse a statement that parsed before (unless
        # it was cancelled or timed out there: `_NOT_REFUSALS`); at Bind an argument can
        # fail too (a division by zero folded into the plan): that is the caller's error,
        # not a stale description.
        if ((self._stage == 0 and sqlstate[:2] not in _NOT_REFUSALS)
                or sqlstate[:2] in _REFUSALS or sqlstate in _REFUSALS):
            return "rejected"
        return "failed"

    def _hold(self, data: bytes) -> None:
        """Forward the reply without its DataRows, up to and including ReadyForQuery, and
        record all of it for `check` (to decode again once the new description is known)."""
        check = self._holding
        assert check is not None
        held = self._held
        held += data
        kept: list[bytes] = []
        recorded = check.recorded
        pos = 0
        while True:
            try:
                head = message_header(held, pos)
            except ValueError:
                held.clear()
                self._holding = None
                self.real.abort()
                return
            if head is None:
                break
            kind, end = head
            message = bytes(held[pos:end])
            pos = end
            if kind in ASYNCHRONOUS:
                kept.append(message)
                continue
            recorded.append(message)
            if kind != DATA_ROW:
                kept.append(message)
            if kind == READY_FOR_QUERY:
                self._holding = None
                if pos < len(held):
                    kept.append(bytes(held[pos:]))
                pos = len(held)
                break
        del held[:pos]
        if kept:
            self.forward(b"".join(kept))


_PARSE_BYTE = bytes((PARSE,))
_BIND_BYTE = b"B"


def _retrieve(future: asyncio.Future[Any]) -> None:
    if not future.cancelled():
        future.exception()


def _one_message(data: Buffer) -> bool:
    """Whether `data` is exactly one whole message."""
    buf = data if isinstance(data, bytes | bytearray) else bytes(data)
    try:
        head = message_header(buf, 0)
    except ValueError:
        return False
    return head is not None and head[1] == len(buf)


def _text_params(bind: bytes, description: Any) -> bytes:
    """asyncpg's Bind with the description's enum parameters sent as text."""
    params = len(description.param_message) - 7 >> 2
    return bind_with_text_params(bind, params, description.text_params)


def drive(coro: Any, deliver: Callable[[], None]) -> Any:
    """Run an asyncpg protocol operation whose writes are being swallowed, without yielding to
    the event loop: when it waits for its reply, `deliver()` feeds the reply it needs.

    Nothing else can run on the connection meanwhile, and a cancellation of the calling task
    cannot land half-way.
    """
    try:
        waiter = coro.send(None)
    except StopIteration as stop:
        return stop.value
    deliver()
    if waiter is None or not waiter.done():
        coro.close()
        raise PoolError("one-round-trip path: asyncpg waited for something other than its reply")
    waiter._asyncio_future_blocking = False
    try:
        coro.send(None)
    except StopIteration as stop:
        return stop.value
    coro.close()
    raise PoolError("one-round-trip path: asyncpg waited twice for one reply")


__all__ = ["InterceptingLoop", "Wire", "WireTransport", "drive"]
