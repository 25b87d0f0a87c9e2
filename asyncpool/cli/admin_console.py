"""Reading PgBouncer's admin console (``SHOW CONFIG``...) with what is installed.

The console speaks only the simple query protocol. asyncpg logs in to it (TLS, SCRAM, md5...)
and sends simple queries, but throws away the rows they return; psycopg can read them but is not
a dependency. So, first choice: log in with asyncpg, then let a small protocol object read the
answer to each ``Query`` message on asyncpg's own transport. That takes one private asyncpg
attribute, ``Connection._transport`` (asyncpg 0.32), used here only; when it is missing,
psycopg is used if installed, and otherwise the caller is told what could not be read and what to
install (`ConsoleUnavailable`).
"""

from __future__ import annotations

import asyncio
import struct
from typing import TYPE_CHECKING, Any

from asyncpool.config import PoolConfig
from asyncpool.connect import driver
from asyncpool.connect.authguard import Login

if TYPE_CHECKING:
    from asyncpool.connect.dsn import ParsedDsn

Row = dict[str, str | None]

#: What to install when neither reader works.
INSTALL_HINT = "pip install 'psycopg[binary]'"


class ConsoleUnavailable(Exception):
    """Neither asyncpg nor psycopg could read the console; the message says what to install."""


class ConsoleError(Exception):
    """The console answered with an error (the server's own words, never a password)."""

    def __init__(self, message: str, sqlstate: str | None = None) -> None:
        super().__init__(message)
        self.sqlstate = sqlstate


async def read_console(dsn: ParsedDsn, commands: list[str], timeout: float,
                       database: str | None = None, *, login: Login | None = None,
                       ) -> dict[str, list[Row]]:
    """Each of `commands` (``"SHOW CONFIG"``...) run on the console at `dsn`, as rows of text.

    `database` (``"pgbouncer"``) replaces the DSN's database, so the console is reached with the
    application's own host, port, user, password and TLS settings.
    Raises `ConsoleError` for the console's refusals (``not allowed``...), `ConsoleUnavailable`
    when no installed driver can read rows, and asyncpg's or psycopg's connection errors.
    """
    import asyncpg

    override: dict[str, Any] = {"database": database} if database else {}
    if login is None:
        # The pool's TLS and credential rules (PoolConfigError where a pool would refuse).
        login = Login(PoolConfig.from_env(name="doctor", dsn=None), dsn)
    # The DSN rebuilt from its parsed parts, the password as a keyword: no driver parses (and
    # quotes in an error) what the user wrote.
    refused = None
    try:
        conn = await asyncpg.connect(login.driver_dsn(dsn), password=dsn.password,
                                     timeout=timeout, statement_cache_size=0, **override,
                                     **login.kwargs())
    except Exception:
        refused = login.refusal(dsn.target())
        if refused is None:
            raise
    if refused is not None:
        # Outside the except block: the driver's error is no __context__.
        raise ConsoleError(str(refused))
    try:
        transport = transport_of(conn)
        if transport is not None:
            return {cmd: await simple_query(transport, cmd, timeout) for cmd in commands}
    finally:
        # Never hand the connection back to asyncpg's protocol after reading on its transport.
        conn.terminate()
    return await _read_with_psycopg(dsn, commands, timeout, database, login)


def transport_of(conn: Any) -> Any:
    """asyncpg's transport for `conn`, or None if this asyncpg does not expose one."""
    transport = driver.transport_of(conn)
    return transport if hasattr(transport, "set_protocol") else None


async def _read_with_psycopg(dsn: ParsedDsn, commands: list[str], timeout: float,
                             database: str | None, login: Login) -> dict[str, list[Row]]:
    try:
        import psycopg
    except ModuleNotFoundError:
        raise ConsoleUnavailable(
            "this asyncpg cannot return rows from PgBouncer's admin console and psycopg is not "
            f"installed: {INSTALL_HINT}"
        ) from None
    # libpq gets the same rules asyncpg's login had (it enforces sslmode and require_auth).
    override: dict[str, Any] = login.libpq_kwargs(psycopg.pq.version())
    if database:
        override["dbname"] = database
    if dsn.password:
        override["password"] = dsn.password
    out: dict[str, list[Row]] = {}
    try:
        pconn = await psycopg.AsyncConnection.connect(
            dsn.for_driver(), autocommit=True, cursor_factory=psycopg.AsyncClientCursor,
            connect_timeout=max(1, round(timeout)), **override,
        )
    except psycopg.Error as exc:
        message = _libpq_message(exc, dsn.secrets)
        raise ConsoleError(message, getattr(exc, "sqlstate", None)) from None
    async with pconn:
        for cmd in commands:
            cur = await pconn.execute(cmd.encode())
            names = [col.name for col in cur.description or ()]
            out[cmd] = [
                {n: None if v is None else str(v) for n, v in zip(names, row, strict=True)}
                for row in await cur.fetchall()
            ]
    return out


def _libpq_message(exc: BaseException, secrets: tuple[str, ...] = ()) -> str:
    """The server's own words from a libpq error (``... failed: FATAL:  not allowed``)."""
    import re

    from asyncpool.connect.dsn import redact, scrub

    text = scrub(redact(str(exc)), secrets).strip()
    fatal = re.search(r"FATAL:\s+(.+)", text)
    return (fatal.group(1) if fatal else (text.splitlines() or [""])[-1]).strip()


async def simple_query(transport: Any, sql: str, timeout: float) -> list[Row]:
    """Send one ``Query`` message and read its rows on `transport`, then give it back."""
    reader = _SimpleQueryReader(asyncio.get_running_loop().create_future())
    previous = transport.get_protocol()
    transport.set_protocol(reader)
    try:
        body = sql.encode() + b"\0"
        transport.write(b"Q" + struct.pack("!i", len(body) + 4) + body)
        async with asyncio.timeout(timeout):
            return await reader.done
    finally:
        transport.set_protocol(previous)


class _SimpleQueryReader(asyncio.Protocol):
    """The backend's answer to one simple query: RowDescription, DataRow..., ReadyForQuery."""

    def __init__(self, done: asyncio.Future[list[Row]]) -> None:
        self.done = done
        self._buf = bytearray()
        self._names: list[str] = []
        self._rows: list[Row] = []
        self._error: ConsoleError | None = None

    def data_received(self, data: bytes) -> None:
        self._buf += data
        while len(self._buf) >= 5:
            kind = bytes(self._buf[0:1])
            (size,) = struct.unpack_from("!i", self._buf, 1)
            if len(self._buf) < 1 + size:
                return
            body = bytes(self._buf[5 : 1 + size])
            del self._buf[: 1 + size]
            self._message(kind, body)

    def _message(self, kind: bytes, body: bytes) -> None:
        if kind == b"T":
            (count,) = struct.unpack_from("!h", body, 0)
            pos, names = 2, []
            for _ in range(count):
                end = body.index(b"\0", pos)
                names.append(body[pos:end].decode())
                pos = end + 1 + 18  # table oid, column, type oid, size, modifier, format
            self._names = names
        elif kind == b"D":
            (count,) = struct.unpack_from("!h", body, 0)
            pos = 2
            values: list[str | None] = []
            for _ in range(count):
                (size,) = struct.unpack_from("!i", body, pos)
                pos += 4
                if size < 0:
                    values.append(None)
                else:
                    values.append(body[pos : pos + size].decode())
                    pos += size
            self._rows.append(dict(zip(self._names, values, strict=True)))
        elif kind == b"E":
            fields = _error_fields(body)
            self._error = ConsoleError(fields.get("M", "error"), fields.get("C"))
        elif kind == b"Z" and not self.done.done():
            if self._error is not None:
                self.done.set_exception(self._error)
            else:
                self.done.set_result(self._rows)

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.done.done():
            self.done.set_exception(ConnectionError("PgBouncer closed the admin connection"))


def _error_fields(body: bytes) -> dict[str, str]:
    fields: dict[str, str] = {}
    for part in body.split(b"\0"):
        if part:
            fields[chr(part[0])] = part[1:].decode(errors="replace")
    return fields
