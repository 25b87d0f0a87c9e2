"""What a connection service (a ``pg_service.conf`` section) sets for the pool's logins, read as
asyncpg reads the file: the target, the TLS setting and the credential rules must see the hosts,
the TLS keys and the password it supplies."""

from __future__ import annotations

import functools
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from asyncpool.connect.addresses import Written, host_list, port_list
from asyncpool.errors import PoolConfigError

if TYPE_CHECKING:
    import configparser


@dataclass(frozen=True)
class Service:
    """A service's section: what it sets of where to connect, and whether it holds a password."""

    name: str
    #: Its ``host`` list: each host and the port written with it (`host_list`).
    addresses: tuple[Written, ...]
    has_password: bool
    port: str | None = None
    user: str | None = None
    database: str | None = None
    #: Its TLS settings (`TLS_KEYS`).
    tls: Mapping[str, str] = field(default_factory=dict, repr=False)
    #: Its ``hostaddr`` and ``channel_binding``: libpq reads them, asyncpg does not.
    libpq_only: Mapping[str, str] = field(default_factory=dict)
    #: Its password file (`asyncpool.connect.passfile`), if it names one.
    passfile: str | None = None

    @property
    def hosts(self) -> tuple[str, ...]:
        return tuple(host for host, _ in self.addresses)


TLS_KEYS = ("sslmode", "sslrootcert", "sslcert", "sslkey", "sslpassword", "sslcrl", "sslcrldir",
            "ssl_min_protocol_version", "ssl_max_protocol_version", "sslnegotiation")
#: Keys libpq reads in a service's section and asyncpg does not (some of
#: `asyncpool.connect.dsn.LIBPQ_ONLY`): the pool reads them (raw, as asyncpg's reader never
#: interpolates them) to refuse or apply them, libpq tools see them too.
LIBPQ_ONLY_KEYS = ("sslcrldir", "hostaddr", "channel_binding")


@functools.cache
def driver_reads_services() -> bool:
    """Whether the installed asyncpg reads connection services (``service=``: 0.31 and later)."""
    import inspect

    import asyncpg

    return "service" in inspect.signature(asyncpg.connect).parameters


def service_name(dsn_params: Mapping[str, str], connect_kwargs: Mapping[str, Any],
                 environ: Mapping[str, str]) -> str | None:
    """The connection service the pool's logins use, as libpq picks it: ``service`` given to
    the pool, else the DSN's ``?service=``, else ``PGSERVICE``."""
    name = connect_kwargs.get("service") or dsn_params.get("service") or environ.get("PGSERVICE")
    return str(name) if name else None


def named_service(dsn_params: Mapping[str, str], connect_kwargs: Mapping[str, Any],
                  environ: Mapping[str, str], *, has_dsn: bool = False) -> Service | None:
    """The section of the service the pool's logins use (`service_name`), or None when none is
    named. Read as asyncpg reads it; the file from ``servicefile``, ``PGSERVICEFILE`` or
    ``~/.pg_service.conf``. A named service with no file or no such section is refused, as
    libpq refuses it (asyncpg would dial its defaults); so is one named to an asyncpg that reads
    none (< 0.31), unless it is only ``PGSERVICE`` beside a DSN (`has_dsn`), which that asyncpg
    ignores."""
    service = service_name(dsn_params, connect_kwargs, environ)
    if not service:
        return None
    if not driver_reads_services():
        explicit = connect_kwargs.get("service") or dsn_params.get("service")
        if not explicit and (has_dsn or connect_kwargs.get("host")):
            return None  # PGSERVICE alone beside a DSN: ignored, as this asyncpg ignores it
        raise PoolConfigError(
            f"connection service {service!r}: the installed asyncpg does not read connection "
            "services (asyncpg >= 0.31 does): upgrade asyncpg, or give the host, port, user "
            "and database in the DSN")
    path = connect_kwargs.get("servicefile") or environ.get("PGSERVICEFILE")
    if path is None:
        try:
            path = Path.home() / ".pg_service.conf"
        except (RuntimeError, KeyError):  # no home directory
            raise PoolConfigError(
                f"connection service {service!r} is named, but there is no service file to "
                "read it from (no home directory): set PGSERVICEFILE or servicefile=") from None
    import configparser  # (only when a service is named)

    # Read as asyncpg reads it (configparser, `%` interpolation), or refused: asyncpg's own read
    # fails at every login with an error that quotes the line, or the value from a `%` on.
    parser = configparser.ConfigParser()
    if Path(path).exists() and not os.access(path, os.R_OK):
        # configparser skips a file it cannot open: the service would read as undefined.
        raise PoolConfigError(
            f"connection service file {str(path)!r} cannot be read (permission denied): "
            f"service {service!r} is named there")
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
    if not parser.has_section(service):
        where = f"{str(path)!r}" if Path(path).is_file() else f"{str(path)!r} (no such file)"
        raise PoolConfigError(
            f"connection service {service!r} is not defined in the service file {where}: "
            "fix the name (the DSN's ?service=, service=, or PGSERVICE) or the file "
            "(servicefile=, PGSERVICEFILE)")
    values = _section_values(parser[service], str(path))
    try:
        addresses = tuple(host_list(values["host"])) if values.get("host") else ()
        port_list(values.get("port"))
    except ValueError as exc:
        raise PoolConfigError(
            f"connection service file {str(path)!r}, service [{service}]: its host or port "
            f"cannot be read as asyncpg reads it ({exc}): write host=h1,h2 (a port with a host "
            "as h1:6432) and port=5432 or one port per host") from None
    return Service(
        service, addresses, bool(values.get("password")), port=values.get("port") or None,
        user=values.get("user") or None,
        database=values.get("dbname") or values.get("database") or None,
        tls={k: values[k] for k in TLS_KEYS if values.get(k)},
        libpq_only={k: values[k] for k in LIBPQ_ONLY_KEYS
                    if k not in TLS_KEYS and values.get(k)},
        passfile=values.get("passfile") or None)


def _section_values(section: configparser.SectionProxy, path: str) -> dict[str, str]:
    """What asyncpg reads of `section` (read as it reads it), and what only libpq reads."""
    import configparser

    values: dict[str, str] = {}
    for key in ASYNCPG_SERVICE_KEYS:
        if key in section:
            try:
                values[key] = section[key]
            except configparser.InterpolationError:
                raise PoolConfigError(
                    f"connection service file {path!r}, service [{section.name}]: the value of "
                    f"{key!r} holds a '%' that asyncpg's reader takes for a substitution (Python's "
                    "configparser): write each literal '%' as '%%' in that file") from None
    for key in LIBPQ_ONLY_KEYS:
        if key in section:
            values[key] = section.get(key, "", raw=True)
    return values


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
