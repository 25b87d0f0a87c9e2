"""A protocol that stands between a transport and another protocol, passing every callback on."""

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
