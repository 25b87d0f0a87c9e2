"""Reading and redacting PostgreSQL connection strings."""

from __future__ import annotations

import re
from dataclasses import dataclass
from urllib.parse import parse_qs, unquote, urlsplit

from asyncpool.errors import PoolConfigError

_SCHEMES = ("postgresql", "postgres")
# user:password@ in a URL, up to the last @ on the line: a password with an unescaped @, /,
# space or quote (a DSN typo) must not leave any of itself behind. Hiding more is harmless.
# Also password=... in a key/value string or query.
_URL_PASSWORD = re.compile(r"(?P<pre>://[^:/@\s]*:)(?P<secret>[^\n]*)(?P<post>@)")
_KV_PASSWORD = re.compile(
    r"(?P<pre>\b(?:ssl)?password\s*=\s*)(?P<secret>'(?:[^'\\]|\\.)*'|[^\s&]+)", re.I
)
# The signing parts of an RDS IAM token (a presigned URL), should one be quoted back.
_SIGV4 = re.compile(
    r"(?P<pre>X-Amz-(?:Signature|Security-Token|Credential)=)(?P<secret>[^&\s'\"]+)", re.I
)


def redact(text: str) -> str:
    """`text` with every DSN password and IAM token signature replaced by `***`."""
    text = _URL_PASSWORD.sub(lambda m: f"{m['pre']}***{m['post']}", text)
    text = _KV_PASSWORD.sub(lambda m: f"{m['pre']}***", text)
    return _SIGV4.sub(lambda m: f"{m['pre']}***", text)


@dataclass(frozen=True)
class Target:
    """Where a connection goes: what a credentials provider signs a token for."""

    host: str
    port: int
    user: str
    database: str

    def __str__(self) -> str:
        return f"{self.user}@{self.host}:{self.port}/{self.database}"


def parse_target(dsn: str | None, *, host: str | None = None, port: int | None = None,
                 user: str | None = None, database: str | None = None) -> Target:
    """The first host, port, user and database a DSN (plus explicit options) names.

    Mirrors libpq's defaults: port 5432, database = user.
    """
    query: dict[str, list[str]] = {}
    if dsn:
        parts = urlsplit(dsn)
        if parts.scheme not in _SCHEMES:
            raise PoolConfigError(
                f"DSN {redact(dsn)!r} is not a postgresql:// URL: "
                "write it as postgresql://user@host:port/database"
            )
        query = parse_qs(parts.query)
        try:
            dsn_port = parts.port
        except ValueError as exc:
            raise PoolConfigError(f"DSN {redact(dsn)!r} has an invalid port: {exc}") from None
        host = host or (unquote(parts.hostname) if parts.hostname else None)
        port = port or dsn_port
        user = user or (unquote(parts.username) if parts.username else None)
        path_db = unquote(parts.path.lstrip("/"))
        database = database or path_db or None
    host = host or _first(query.get("host")) or "localhost"
    port = port or int(_first(query.get("port")) or 5432)
    user = user or _first(query.get("user")) or "postgres"
    database = database or _first(query.get("dbname")) or user
    if "," in host:
        host = host.split(",")[0]
    return Target(host=host, port=port, user=user, database=database)


def dsn_password(dsn: str | None) -> str | None:
    """The password written in the DSN, if any."""
    if not dsn:
        return None
    parts = urlsplit(dsn)
    if parts.password:
        return unquote(parts.password)
    return _first(parse_qs(parts.query).get("password"))


def _first(values: list[str] | None) -> str | None:
    return values[0] if values else None
