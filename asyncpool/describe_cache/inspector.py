"""Reads the head of a reusing execution's reply before asyncpg decodes any row of it.

The inspector sits between the transport and asyncpg's protocol. It forwards bytes untouched,
except while a reused statement's reply starts: then it reads ParseComplete, the
ParameterDescription and the RowDescription (or NoData) that the Describe sent ahead of the
Bind asked for, compares them with the cached description and only then lets the reply through.
If the statement changed shape, every DataRow of that reply is dropped, so asyncpg never decodes
a value with the codec of a column that no longer has that type.
"""

from __future__ import annotations

import asyncio
import enum
import struct
from collections.abc import Callable
from typing import Any

from asyncpool.describe_cache.entries import Description, Key
from asyncpool.describe_cache.messages import (
    ASYNCHRONOUS,
    DATA_ROW,
    ERROR_RESPONSE,
    NO_DATA,
    PARAMETER_DESCRIPTION,
    PARSE_COMPLETE,
    READY_FOR_QUERY,
    ROW_DESCRIPTION,
    Column,
    error_sqlstate,
    message_header,
    row_columns,
)

# The reply's head, in order: ParseComplete, ParameterDescription, RowDescription or NoData.
_HEAD = ((PARSE_COMPLETE,), (PARAMETER_DESCRIPTION,), (ROW_DESCRIPTION, NO_DATA))


class Verdict(enum.Enum):
    MATCH = "match"
    CHANGED = "changed"  # described differently now: the reply's rows were dropped
    REJECTED = "rejected"  # the server refused to parse the statement: nothing ran
    UNREADABLE = "unreadable"  # not the reply the protocol promises: the connection was closed


class Check:
    """One reuse of a cached description, and what its reply turned out to say."""

    __slots__ = ("description", "found", "key", "sqlstate", "verdict")

    def __init__(self, description: Description, key: Key) -> None:
        self.description = description
        self.key = key
        self.verdict: Verdict | None = None
        self.found: tuple[Column, ...] | None = None  # the server's columns, when they differ
        self.sqlstate: str | None = None  # of the server's refusal, when REJECTED


class ReplyInspector(asyncio.Protocol):
    """The transport's protocol in place of asyncpg's, to which it forwards everything."""

    def __init__(self, inner: Any, transport: asyncio.Transport,
                 on_verdict: Callable[[Check], None]) -> None:
        self._inner = inner
        self._forward: Callable[[bytes], None] = inner.data_received
        self._transport = transport
        self._on_verdict = on_verdict
        self._check: Check | None = None
        self._stage = 0  # index in _HEAD of the message expected next
        self._held = bytearray()  # bytes not yet forwarded
        self._pos = 0  # where the first unread message starts in _held
        self._dropping = False  # forwarding all but DataRows until ReadyForQuery

    def expect(self, check: Check) -> None:
        """The next reply answers `check`'s statement; called just before its bytes are sent."""
        self._check = check
        self._stage = 0
        self._pos = 0

    # -- asyncio protocol callbacks ------------------------------------------------------------

    def data_received(self, data: bytes) -> None:
        if self._check is not None:
            self._inspect(data)
        elif self._dropping:
            self._drop_rows(data)
        else:
            self._forward(data)

    def connection_lost(self, exc: Exception | None) -> None:
        self._check = None
        self._dropping = False
        self._held.clear()
        self._inner.connection_lost(exc)

    def eof_received(self) -> bool | None:
        result: bool | None = self._inner.eof_received()
        return result

    def pause_writing(self) -> None:
        self._inner.pause_writing()

    def resume_writing(self) -> None:
        self._inner.resume_writing()

    # -- reading a reply's head ----------------------------------------------------------------

    def _inspect(self, data: bytes) -> None:
        check = self._check
        assert check is not None
        held = self._held
        if held:
            held += data
        buf: bytes | bytearray = held if held else data
        pos = self._pos
        verdict: Verdict | None = None
        while verdict is None:
            try:
                head = message_header(buf, pos)
            except ValueError:
                verdict = Verdict.UNREADABLE
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
        self._held = bytearray()
        self._pos = 0
        self._decide(check, verdict, bytes(buf) if buf is held else data, pos)

    def _read(self, check: Check, kind: int, buf: bytes | bytearray, pos: int,
              end: int) -> Verdict | None:
        """Take one message of the reply's head; a verdict once the head says enough."""
        if kind in ASYNCHRONOUS:
            return None
        if kind == ERROR_RESPONSE:
            check.sqlstate = error_sqlstate(buf[pos:end])
            return Verdict.REJECTED
        if kind not in _HEAD[self._stage]:
            return Verdict.UNREADABLE
        self._stage += 1
        try:
            return _judge(check, kind, bytes(buf[pos:end]))
        except (ValueError, struct.error):  # a malformed RowDescription
            return Verdict.UNREADABLE

    def _decide(self, check: Check, verdict: Verdict, buf: bytes, pos: int) -> None:
        check.verdict = verdict
        self._on_verdict(check)
        if verdict is Verdict.UNREADABLE:
            # Framing can no longer be trusted, so neither can any row: end the connection.
            self._transport.abort()
        elif verdict is Verdict.CHANGED:
            self._forward(buf[:pos])
            self._dropping = True
            if pos < len(buf):
                self._drop_rows(buf[pos:])
        else:
            self._forward(buf)

    def _drop_rows(self, data: bytes) -> None:
        """Forward the reply without its DataRows, up to and including ReadyForQuery."""
        held = self._held
        held += data
        kept: list[bytes] = []
        pos = 0
        while True:
            try:
                head = message_header(held, pos)
            except ValueError:
                held.clear()
                self._dropping = False
                self._transport.abort()
                return
            if head is None:
                break
            kind, end = head
            if kind != DATA_ROW:
                kept.append(bytes(held[pos:end]))
            pos = end
            if kind == READY_FOR_QUERY:
                self._dropping = False
                kept.append(bytes(held[pos:]))
                pos = len(held)
                break
        del held[:pos]
        if kept:
            self._forward(b"".join(kept))


def _judge(check: Check, kind: int, message: bytes) -> Verdict | None:
    description = check.description
    if kind == PARAMETER_DESCRIPTION:
        return None if message == description.param_message else Verdict.CHANGED
    if kind == NO_DATA:
        return _compare(check, (), None)
    if kind == ROW_DESCRIPTION:
        if message == description.row_message:
            return Verdict.MATCH
        return _compare(check, row_columns(message), message)
    return None  # ParseComplete


def _compare(check: Check, found: tuple[Column, ...], message: bytes | None) -> Verdict:
    description = check.description
    if found == description.columns:
        if message is not None:
            description.row_message = message
        return Verdict.MATCH
    check.found = found
    return Verdict.CHANGED
