"""Ask a server how it wants to authenticate, without logging in.

Sends PostgreSQL's SSLRequest and StartupMessage and reads the first answer: the
authentication request names the method (SCRAM-SHA-256, md5, password, trust...). Works
the same against PostgreSQL, PgBouncer and other poolers that speak the protocol.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
import struct
from dataclasses import dataclass

_SSL_REQUEST = struct.pack("!ii", 8, 80877103)
_PROTOCOL_3 = 196608
_TERMINATE = b"X" + struct.pack("!i", 4)
_AUTH_METHODS = {0: "trust", 2: "kerberos", 3: "password", 5: "md5", 7: "gss", 9: "sspi"}
_SASL = 10


@dataclass(frozen=True)
class StartupProbe:
    """What the server said before any password was sent."""

    tls_offered: bool | None  #: None when TLS was not asked for (sslmode=disable)
    auth_method: str | None  #: "SCRAM-SHA-256", "md5", "password", "trust"...; None if unknown
    sasl_mechanisms: tuple[str, ...] = ()
    error: str | None = None  #: the server's refusal, if it refused before asking for a password


async def probe_startup(host: str, port: int, user: str, database: str, *, ask_tls: bool,
                        timeout: float) -> StartupProbe:
    async with asyncio.timeout(timeout):
        reader, writer = await asyncio.open_connection(host, port)
        try:
            return await _converse(reader, writer, user, database, ask_tls)
        finally:
            writer.close()
            with contextlib.suppress(OSError, ssl.SSLError):
                await writer.wait_closed()


async def _converse(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, user: str,
                    database: str, ask_tls: bool) -> StartupProbe:
    tls_offered: bool | None = None
    if ask_tls:
        writer.write(_SSL_REQUEST)
        await writer.drain()
        answer = await reader.readexactly(1)
        tls_offered = answer == b"S"
        if tls_offered:
            # Only the server's authentication request is read over this channel and no secret
            # is sent, so the certificate is not checked here; the real login (asyncpg) checks
            # it as the DSN's sslmode says.
            context = ssl.create_default_context()
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
            await writer.start_tls(context)
    params = b"".join(
        key + b"\0" + value.encode() + b"\0"
        for key, value in ((b"user", user), (b"database", database))
    ) + b"\0"
    writer.write(struct.pack("!ii", len(params) + 8, _PROTOCOL_3) + params)
    await writer.drain()
    while True:
        kind = await reader.readexactly(1)
        (length,) = struct.unpack("!i", await reader.readexactly(4))
        body = await reader.readexactly(length - 4)
        if kind == b"R":
            (code,) = struct.unpack("!i", body[:4])
            if code == 0:
                writer.write(_TERMINATE)  # trust: we are logged in; say goodbye properly
                await writer.drain()
            if code == _SASL:
                mechanisms = tuple(m.decode() for m in body[4:].split(b"\0") if m)
                method = "SCRAM-SHA-256" if "SCRAM-SHA-256" in mechanisms else "SASL"
                return StartupProbe(tls_offered, method, mechanisms)
            return StartupProbe(tls_offered, _AUTH_METHODS.get(code, f"method {code}"))
        if kind == b"E":
            return StartupProbe(tls_offered, None, error=_error_text(body))
        # NegotiateProtocolVersion or a notice: keep reading.


def _error_text(body: bytes) -> str:
    fields = {}
    for part in body.split(b"\0"):
        if part:
            fields[chr(part[0])] = part[1:].decode(errors="replace")
    message = fields.get("M", "error")
    code = fields.get("C")
    return f"{message} ({code})" if code else message
