"""What a connection service file (``pg_service.conf``) names for the pool's DSN, read as asyncpg
reads it: the credential rules must see the hosts and the password it supplies."""

from __future__ import annotations

import configparser
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from asyncpool.errors import PoolConfigError


@dataclass(frozen=True)
class Service:
    """A service's section: its hosts (empty: none named) and whether it holds a password."""

    hosts: tuple[str, ...]
    has_password: bool


def named_service(has_dsn: bool, dsn_params: Mapping[str, str],
                  connect_kwargs: Mapping[str, Any], environ: Mapping[str, str]) -> Service | None:
    """The section of the service the pool's logins use, or None (no service named, no file, no
    such section). As asyncpg: only with a DSN; ``service`` from `connect_kwargs`, else the DSN's
    ``?service=``; the file from ``servicefile``, ``PGSERVICEFILE`` or ``~/.pg_service.conf``."""
    service = connect_kwargs.get("service") or dsn_params.get("service")
    if not has_dsn or not service:
        return None
    path = connect_kwargs.get("servicefile") or environ.get("PGSERVICEFILE")
    if path is None:
        try:
            path = Path.home() / ".pg_service.conf"
        except (RuntimeError, KeyError):  # no home directory: asyncpg reads no file either
            return None
    # Read as asyncpg reads it (configparser, `%` interpolation), or refused: asyncpg's own read
    # fails at every login with an error that quotes the line, or the value from a `%` on.
    parser = configparser.ConfigParser()
    try:
        parser.read(path)
    except configparser.Error as exc:
        raise PoolConfigError(
            f"connection service file {str(path)!r} cannot be read as asyncpg reads it (Python's "
            f"configparser: {type(exc).__name__}{_lines(exc)}); fix it (its lines are not "
            "shown: one may hold a password)") from None
    except UnicodeDecodeError:
        raise PoolConfigError(
            f"connection service file {str(path)!r} is not UTF-8, as asyncpg reads it") from None
    if not parser.has_section(str(service)):
        return None
    section = parser[str(service)]
    values: dict[str, str] = {}
    for key in ASYNCPG_SERVICE_KEYS:
        if key in section:
            try:
                values[key] = section[key]
            except configparser.InterpolationError:
                raise PoolConfigError(
                    f"connection service file {str(path)!r}, service [{service}]: the value of "
                    f"{key!r} holds a '%' that asyncpg's reader takes for a substitution (Python's "
                    "configparser): write each literal '%' as '%%' in that file") from None
    hosts = tuple(h.strip() for h in values.get("host", "").split(",") if h.strip())
    return Service(hosts, bool(values.get("password")))


#: What asyncpg reads from a service's section (asyncpg/connect_utils.py); other keys it leaves.
ASYNCPG_SERVICE_KEYS = (
    "host", "port", "dbname", "database", "user", "password", "passfile", "sslmode", "sslcert",
    "sslkey", "sslrootcert", "sslnegotiation", "sslcrl", "sslpassword",
    "ssl_min_protocol_version", "ssl_max_protocol_version", "target_session_attrs",
    "krbsrvname", "gsslib",
)


def _lines(exc: configparser.Error) -> str:
    """Where configparser found the fault, by line number only."""
    numbers = [number for number, _ in getattr(exc, "errors", [])]
    lineno = getattr(exc, "lineno", None)
    if lineno is not None and lineno not in numbers:
        numbers.insert(0, lineno)
    if not numbers:
        return ""
    return f" at line{'s' if len(numbers) > 1 else ''} {', '.join(map(str, numbers))}"
