"""asyncpg's TLS negotiation, watched for the error it keeps when a login is cancelled as its
TCP connection comes up (asyncpg#1211).

asyncpg asks the server for TLS through a one-byte protocol of its own, whose future holds
``ConnectionError('unexpected connection_lost() call')`` when the connection closes before the
answer: a login cancelled inside ``create_connection`` closes it there, and nobody awaits the
future, so asyncio logs "Future exception was never retrieved" at garbage collection. The pool's
other loop views (`asyncpool.connect.authguard`, `asyncpool.unnamed.wire`) mark it seen on the
way; `NegotiationLoop` does only that, for the logins that need neither (a verified server with
every authentication method allowed, outside the ``"unnamed"`` mode).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from asyncpool.connect import driver
from asyncpool.connect.forwarding import ForwardingProtocol, LoopView


class NegotiationLoop(LoopView):
    """The running loop, as `asyncpg.connect` sees it: the TLS negotiation's protocol it
    connects marks its own error seen when its connection is lost."""

    async def create_connection(self, factory: Callable[[], Any], *args: Any,
                                **kwargs: Any) -> tuple[Any, Any]:
        transport, protocol = await self.real.create_connection(lambda: _watched(factory()),
                                                                *args, **kwargs)
        return transport, protocol.inner if isinstance(protocol, _Negotiation) else protocol


def _watched(protocol: Any) -> Any:
    # asyncpg's PostgreSQL protocol (no TLS asked for, or direct TLS) is given as it is.
    return protocol if driver.is_wire_protocol(protocol) else _Negotiation(protocol)


class _Negotiation(ForwardingProtocol):
    """In front of the negotiation's protocol until asyncpg sets its own on the transport (or
    the TLS upgrade does)."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner

    def connection_lost(self, exc: Exception | None) -> None:
        self.inner.connection_lost(exc)
        driver.retrieve_negotiation_error(self.inner)
