"""Stand-ins that pass everything on: a protocol between a transport and another protocol, and
an event loop given to `asyncpg.connect` in place of the running one."""

from __future__ import annotations

import asyncio
from typing import Any


class ForwardingProtocol(asyncio.Protocol):
    """Passes each asyncio protocol callback to `inner` unchanged.

    A subclass sets `inner` and overrides the callbacks it needs to see (say, data_received).
    """

    inner: Any

    def connection_made(self, transport: Any) -> None:
        self.inner.connection_made(transport)

    def data_received(self, data: bytes) -> None:
        self.inner.data_received(data)

    def eof_received(self) -> bool | None:
        # The answer matters: a true one keeps the transport open for writing.
        result: bool | None = self.inner.eof_received()
        return result

    def connection_lost(self, exc: Exception | None) -> None:
        self.inner.connection_lost(exc)

    def pause_writing(self) -> None:
        self.inner.pause_writing()

    def resume_writing(self) -> None:
        self.inner.resume_writing()


class LoopView:
    """The running loop with some methods replaced by a subclass (``create_connection``...):
    every other attribute is `real`'s.

    asyncpg keeps the loop it connected with for the connection's life and its protocol calls
    ``create_future``/``call_later`` on every query, so bound methods are cached on first use:
    later lookups are one instance-dict read, as on the loop itself.
    """

    def __init__(self, loop: Any) -> None:
        self.real = loop

    def __getattr__(self, name: str) -> Any:
        value = getattr(self.real, name)
        if callable(value):
            setattr(self, name, value)
        return value
