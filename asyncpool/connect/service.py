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
    parser = configparser.ConfigParser(interpolation=None)  # values as written, as libpq reads them
    try:
        parser.read(path)
    except (configparser.Error, OSError, UnicodeDecodeError):
        return None  # asyncpg fails to read it too, before anything is sent
    if not parser.has_section(str(service)):
        return None
    section = parser[str(service)]
    _refuse_what_asyncpg_misreads(path, str(service))
    hosts = tuple(h.strip() for h in section.get("host", "").split(",") if h.strip())
    return Service(hosts, bool(section.get("password")))


def _refuse_what_asyncpg_misreads(path: str | Path, service: str) -> None:
    """asyncpg reads the file at every login with configparser's ``%`` interpolation: a value
    with a lone ``%`` (a password, often) makes it raise an error that quotes the value from the
    ``%`` on. Refused here instead, naming the key, never the value."""
    interpolating = configparser.ConfigParser()
    interpolating.read(path)
    section = interpolating[service]
    for key in section:
        try:
            section[key]
        except configparser.InterpolationError:
            raise PoolConfigError(
                f"connection service file {str(path)!r}, service [{service}]: the value of "
                f"{key!r} holds a '%' that asyncpg's reader takes for a substitution (Python's "
                "configparser): write each literal '%' as '%%' in that file") from None
