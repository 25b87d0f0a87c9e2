"""Puts a reused statement's typed Parse and Describe on the wire, in place of asyncpg's Parse.

asyncpg sends an "unprepared" statement as two writes: Parse, then Bind/Execute/Sync (or the
Bind/Execute batches of ``executemany``). While armed, this swallows the Parse and sends the
cached typed Parse + Describe in the same write as the Bind, so the whole exchange stays one
round trip. It acts only once asyncpg has checked the connection's state and encoded every
argument, so nothing is sent for a call asyncpg refuses.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterable
from typing import Any

from asyncpool.describe_cache.inspector import Check
from asyncpool.describe_cache.messages import PARSE
from asyncpool.errors import PoolError

Buffer = bytes | bytearray | memoryview


class ParseSwap:
    """Arms the transport's ``write``/``writelines`` for one execution (instance attributes, so
    every other write goes straight to the transport's own methods)."""

    __slots__ = ("_check", "_expect", "_parse_seen", "_prefix", "_transport")

    def __init__(self, transport: asyncio.Transport, expect: Callable[[Check], None]) -> None:
        self._transport: Any = transport
        self._expect = expect  # the inspector's: read the next reply for this check
        self._prefix: bytes | None = None
        self._check: Check | None = None
        self._parse_seen = False

    @staticmethod
    def supported(transport: object) -> bool:
        """Whether `transport`'s methods can be stood in for per instance (not uvloop's)."""
        return hasattr(transport, "__dict__") and hasattr(transport, "set_protocol")

    def arm(self, check: Check) -> None:
        self._prefix = check.description.prefix
        self._check = check
        self._parse_seen = False
        self._transport.write = self._write
        self._transport.writelines = self._writelines

    def disarm(self) -> None:
        """Stand down if asyncpg wrote nothing (it refused the call, or had no rows to send)."""
        if self._prefix is not None:
            self._restore()

    def _restore(self) -> None:
        self._prefix = self._check = None
        transport_vars = vars(self._transport)
        transport_vars.pop("write", None)
        transport_vars.pop("writelines", None)

    def _write(self, data: Buffer) -> None:
        if self._parse_seen:
            self._send((data,))
        elif memoryview(data)[:1] == bytes((PARSE,)):
            self._parse_seen = True  # asyncpg's untyped Parse: the cached typed one replaces it
        else:
            self._unexpected()

    def _writelines(self, chunks: Iterable[Buffer]) -> None:
        if not self._parse_seen:
            self._unexpected()
        self._send(chunks)

    def _unexpected(self) -> None:
        self._restore()
        # Raised inside asyncpg's send: asyncpg fails the call and closes the connection.
        raise PoolError(
            "describe-cache: asyncpg did not send a reused statement as Parse, then Bind; this "
            "asyncpg version behaves differently from the tested ones (0.29 to 0.32)"
        )

    def _send(self, chunks: Iterable[Buffer]) -> None:
        prefix, check = self._prefix, self._check
        assert prefix is not None
        assert check is not None
        self._restore()
        self._expect(check)
        self._transport.write(b"".join((prefix, *chunks)))
