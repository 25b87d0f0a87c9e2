"""Cancel requests over direct TLS, on the event loop.

asyncpg sends every cancel request (a statement's ``timeout=``, a task cancelled during a query)
through ``connect_utils._cancel``, which negotiates TLS with an SSLRequest whatever the connection
itself did. A connection made with direct TLS (``sslnegotiation=direct``, PostgreSQL 17) may be
to a server or front that takes TLS only from the first byte: it hangs up on the SSLRequest, and
the statement runs on. `send` makes the request's connection as asyncpg makes such a connection
(TLS from the first byte, with the connection's context and the host dialled as the server
name, so verified as the connection was), then waits for the server to close it (closing it
first crashes PgBouncer 1.18, pgbouncer#801). `asyncpool.connect.driver` decides when.
"""

from __future__ import annotations

import asyncio
import ssl
import struct

#: The protocol's CancelRequest code.
CANCEL_CODE = 80877102


def cancel_message(key: tuple[int, int]) -> bytes:
    """The CancelRequest for BackendKeyData `key` (pid, secret)."""
    return struct.pack("!llll", 16, CANCEL_CODE, key[0], key[1])


class _Request(asyncio.Protocol):
    def __init__(self, closed: asyncio.Future[None]) -> None:
        self.closed = closed

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.closed.done():
            self.closed.set_result(None)


async def send(addr: tuple[str, int], context: ssl.SSLContext, key: tuple[int, int]) -> None:
    """Send a cancel request for `key` to `addr` over TLS from the first byte, verified with
    `context` for the host of `addr`, and return once the server has closed the connection.
    Raises OSError (ssl.SSLError among them) when it cannot be sent."""
    loop = asyncio.get_running_loop()
    closed: asyncio.Future[None] = loop.create_future()
    host, port = addr[0], addr[1]
    transport, _ = await loop.create_connection(lambda: _Request(closed), host, port,
                                                ssl=context, server_hostname=host)
    try:
        transport.write(cancel_message(key))
        await closed
    finally:
        transport.close()
