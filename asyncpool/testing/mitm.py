"""A fake PostgreSQL server that plays a man in the middle, and records what it was sent.

It listens on 127.0.0.1 (a free port), answers TLS negotiation as told (refuse it, or accept it
with a certificate of its own), reads the startup message, asks for a cleartext password (or an
MD5 hash), records whatever the client answers, then refuses the login as a wrong password would
be (SQLSTATE 28P01), so a client that retries after a refused login shows it.

    async with FakeServer(tls="self-signed") as fake:
        ...dial fake.port...
    assert fake.received == []
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
import struct
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from cryptography.hazmat.primitives import serialization

from asyncpool.testing.self_signed import self_signed

_SSL_REQUEST = 80877103
_GSSENC_REQUEST = 80877104
_CANCEL_REQUEST = 80877102

TlsBehaviour = Literal["refuse", "self-signed", "certificate"]
AuthRequest = Literal["password", "md5"]


@dataclass
class Login:
    """One connection the fake server took: how, and what it was sent."""

    tls: bool
    user: str | None = None
    #: The payload of each PasswordMessage ('p'): the password itself for a cleartext request.
    sent: list[bytes] = field(default_factory=list, repr=False)


class FakeServer:
    """See the module. `tls`: ``"refuse"`` answers TLS requests with N; ``"self-signed"``
    accepts them with a self-signed certificate for localhost/127.0.0.1; ``"certificate"`` with
    `certfile`/`keyfile` (say, one a test CA signed). `auth`: what it asks for."""

    def __init__(self, *, tls: TlsBehaviour = "refuse", auth: AuthRequest = "password",
                 certfile: str | Path | None = None, keyfile: str | Path | None = None) -> None:
        self.tls = tls
        self.auth = auth
        self.logins: list[Login] = []
        self.port: int = 0
        self._server: asyncio.Server | None = None
        self._tmp: tempfile.TemporaryDirectory[str] | None = None
        self._context: ssl.SSLContext | None = None
        self._handlers: set[asyncio.Task[None]] = set()
        if tls == "certificate":
            if certfile is None or keyfile is None:
                raise ValueError("tls='certificate' needs certfile and keyfile")
            self._context = _server_context(Path(certfile), Path(keyfile))
        elif tls == "self-signed":
            self._tmp = tempfile.TemporaryDirectory(prefix="asyncpool-mitm-")
            cert, key = write_self_signed(Path(self._tmp.name))
            self._context = _server_context(cert, key)

    @property
    def received(self) -> list[str]:
        """Every password message the server was sent, decoded (empty: nothing secret came)."""
        return [p.rstrip(b"\0").decode("utf-8", "replace") for login in self.logins
                for p in login.sent]

    @property
    def raw_bytes_received(self) -> bytes:
        return b"".join(p for login in self.logins for p in login.sent)

    async def start(self) -> FakeServer:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def close(self) -> None:
        for task in list(self._handlers):
            task.cancel()
        if self._handlers:
            await asyncio.wait(self._handlers, timeout=5)
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 5)
            self._server = None
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None

    async def __aenter__(self) -> FakeServer:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._handlers.add(task)
        try:
            await asyncio.wait_for(self._login(reader, writer), 10)
        except (OSError, EOFError, asyncio.IncompleteReadError, TimeoutError, ssl.SSLError,
                asyncio.CancelledError):
            pass
        finally:
            self._handlers.discard(task)
            writer.close()
            with contextlib.suppress(Exception, asyncio.CancelledError):
                await writer.wait_closed()

    async def _login(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        tls = False
        while True:
            length, code = struct.unpack("!ii", await reader.readexactly(8))
            body = await reader.readexactly(length - 8)
            if code in (_SSL_REQUEST, _GSSENC_REQUEST) and not tls:
                if code == _SSL_REQUEST and self._context is not None:
                    writer.write(b"S")
                    await writer.drain()
                    await writer.start_tls(self._context)
                    tls = True
                else:
                    writer.write(b"N")
                    await writer.drain()
                continue
            if code == _CANCEL_REQUEST:
                return
            break
        login = Login(tls=tls, user=_startup_user(body))
        self.logins.append(login)
        if self.auth == "md5":
            writer.write(b"R" + struct.pack("!ii", 12, 5) + b"salt")
        else:
            writer.write(b"R" + struct.pack("!ii", 8, 3))
        await writer.drain()
        kind = await reader.readexactly(1)
        (length,) = struct.unpack("!i", await reader.readexactly(4))
        payload = await reader.readexactly(length - 4)
        if kind == b"p":
            login.sent.append(payload)
        fields = (b"SFATAL\0VFATAL\0C28P01\0Mpassword authentication failed for user "
                  + (login.user or "").encode() + b"\0\0")
        writer.write(b"E" + struct.pack("!i", 4 + len(fields)) + fields)
        await writer.drain()


def _startup_user(body: bytes) -> str | None:
    parts = body.split(b"\0")
    for key, value in zip(parts[::2], parts[1::2], strict=False):
        if key == b"user":
            return value.decode("utf-8", "replace")
    return None


def _server_context(cert: Path, key: Path) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(str(cert), str(key))
    return context


def write_self_signed(directory: Path, name: str = "localhost") -> tuple[Path, Path]:
    """A self-signed certificate for `name` and 127.0.0.1, and its key, written to `directory`."""
    key, cert = self_signed(name, dns_names=(name,), ip_addresses=("127.0.0.1",))
    cert_path, key_path = directory / "mitm.crt", directory / "mitm.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    key_path.chmod(0o600)
    return cert_path, key_path
