"""Whether asyncpg will read a password from the password file (``.pgpass``) for a login.

The pool gives asyncpg no password of its own in that case, and asyncpg reads the file itself at
each connect: the credential rules (`asyncpool.connect.tls.withheld_password`) must know of that
password before anything is dialled, as they know of one in the DSN. The file is read as asyncpg
reads it (`asyncpg.connect_utils._read_password_file`): ``passfile`` (an option, the DSN's or
the service's), else ``PGPASSFILE``, else ``~/.pgpass`` (Windows:
``%APPDATA%\\postgresql\\pgpass.conf``); a file others may read is ignored (not on Windows);
``\\:`` and ``\\\\`` escape. Only the first four fields of a line are kept: its password is
dropped as it is read, and nothing here raises while a line is held.
"""

from __future__ import annotations

import os
import re
import stat
from collections.abc import Iterable, Mapping
from pathlib import Path

_FIELDS = re.compile(r"(?<!\\):")


def passfile_path(passfile: object, env: Mapping[str, str]) -> Path | None:
    """The file asyncpg reads: `passfile` (given), else ``PGPASSFILE``, else ``~/.pgpass``
    (on Windows ``%APPDATA%\\postgresql\\pgpass.conf``, as libpq and asyncpg have it)."""
    if isinstance(passfile, str | os.PathLike) and str(passfile):
        return Path(passfile)
    if env.get("PGPASSFILE"):
        return Path(env["PGPASSFILE"])
    if on_windows():
        # asyncpg asks Windows for the folder (SHGetFolderPathW), which APPDATA names.
        return Path(env["APPDATA"], "postgresql", "pgpass.conf") if env.get("APPDATA") else None
    try:
        return Path.home() / ".pgpass"
    except (RuntimeError, KeyError):  # no home directory: asyncpg reads none either
        return None


def on_windows() -> bool:
    """Whether asyncpg runs on Windows (its password file's name and permissions differ)."""
    return os.name == "nt"


def _entries(path: Path) -> list[tuple[str, ...]]:
    """(host, port, database, user) of each line asyncpg would read; [] if it reads none."""
    try:
        if not path.is_file() or (not on_windows()
                                  and path.stat().st_mode & (stat.S_IRWXG | stat.S_IRWXO)):
            return []
        lines = path.read_text().splitlines()
    except (OSError, UnicodeDecodeError):
        return []
    entries = []
    for raw in lines:
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        fields = _FIELDS.split(line.replace("\\\\", "\n"), maxsplit=4)
        if len(fields) == 5:  # (asyncpg fails on a shorter line)
            del fields[4]  # the password: not kept
            entries.append(tuple(f.replace("\n", "\\\\") for f in fields))
    return entries


def has_password_for(path: Path | None, hosts: Iterable[str], ports: Iterable[int],
                     database: str, user: str) -> bool:
    """Whether the file at `path` has a password asyncpg would use for one of `hosts` (each
    with any of `ports`), `database` and `user`, as asyncpg matches them."""
    if path is None:
        return False
    wanted_ports = {str(p) for p in ports}
    entries = _entries(path)
    for given in hosts:
        host = "localhost" if given.startswith("/") else given  # a Unix socket, as asyncpg has it
        for p_host, p_port, p_database, p_user in entries:
            if (p_host in ("*", host) and (p_port == "*" or p_port in wanted_ports)
                    and p_database in ("*", database) and p_user in ("*", user)):
                return True
    return False
