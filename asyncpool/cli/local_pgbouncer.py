"""`asyncpool local-pgbouncer`: a throwaway PostgreSQL and PgBouncer to point the examples at,
up until Ctrl-C, its DSN in an env file (the password is never printed)."""

from __future__ import annotations

import argparse
import os
import shlex
import signal
import sys
import time
from pathlib import Path
from types import FrameType
from typing import TextIO

from asyncpool.connect.dsn import redact, redact_dsn

#: The variable the examples (and `lambda_config`, `asyncpool doctor`) read the DSN from.
DSN_VARIABLE = "ASYNCPOOL_DSN"
#: PgBouncer's admin console, which `asyncpool doctor` reads with the DSN above to check the
#: pooler's settings (the app's user is not allowed there).
ADMIN_DSN_VARIABLE = "ASYNCPOOL_ADMIN_DSN"
DEFAULT_ENV_FILE = ".env.asyncpool"
# First line of every env file this command writes: it replaces or deletes only files that
# carry it, never a user's own .env.
_MARK = "# written by `asyncpool local-pgbouncer`; deleted when it stops"
_STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
# How often the wait checks that both servers still run.
_POLL_SECONDS = 0.5


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--env-file", type=Path, default=Path(DEFAULT_ENV_FILE),
                        help=f"where to write {DSN_VARIABLE}=... (mode 0600, deleted at exit; "
                        f"default {DEFAULT_ENV_FILE})")
    parser.add_argument("--port", type=int, default=None,
                        help="PgBouncer's port on 127.0.0.1 (default: a free one)")
    parser.add_argument("--pgbouncer", choices=("current", "legacy"), default="current",
                        help="current (>= 1.21, falls back to the distribution's if none is "
                        "available) or legacy (the distribution's, 1.18 on Debian bookworm)")


def run(args: argparse.Namespace) -> int:
    from asyncpool.load.servers import LocalServers
    from asyncpool.testing import HarnessError

    env_file: Path = args.env_file.absolute()
    if (refused := _unusable(env_file)) is not None:
        print(f"asyncpool local-pgbouncer: {refused}", file=sys.stderr)
        return 2
    # SIGTERM and SIGHUP (a closed terminal) stop as Ctrl-C does, and so does SIGINT when it was
    # ignored at start (`cmd &` in a script): servers stopped, file removed.
    for sig in _STOP_SIGNALS:
        signal.signal(sig, _interrupt)
    out = sys.stdout
    _say(out, "Starting a throwaway PostgreSQL and PgBouncer (transaction mode) on 127.0.0.1 ...")
    try:
        servers = LocalServers.start(pgbouncer=args.pgbouncer, pgbouncer_port=args.port)
    except HarnessError as exc:
        print(f"asyncpool local-pgbouncer: {redact(str(exc))}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    try:
        assert servers.pgbouncer is not None
        bouncer, postgres = servers.pgbouncer, servers.postgres
        for note in servers.notes:
            _say(out, f"note: {note}")
        dsn = bouncer.dsn()
        values = {DSN_VARIABLE: dsn}
        if bouncer.admin_dsn:
            values[ADMIN_DSN_VARIABLE] = bouncer.admin_dsn
        try:
            write_env_file(env_file, values)
        except OSError as exc:  # (not writable, or a file created there meanwhile)
            print(f"asyncpool local-pgbouncer: could not write {env_file} ({exc.strerror}); pass "
                  "--env-file with a path you can write", file=sys.stderr)
            return 2
        shown = [f"{name}={redact_dsn(value)}" for name, value in values.items()]
        _say(out, f"PostgreSQL on 127.0.0.1:{postgres.port}, PgBouncer "
             f"{bouncer.binary.version_text} on 127.0.0.1:{bouncer.port}\n"
             + "\n".join(shown) + "\n"
             f"written, passwords included, to {env_file} (mode 0600). In the shell that runs "
             "your app:\n"
             f"    set -a; . {shlex.quote(str(env_file))}; set +a\n"
             "    uvicorn mangum_app:app    # or any app that reads ASYNCPOOL_DSN\n"
             "    asyncpool doctor          # which settings suit this PgBouncer\n"
             "Ctrl-C stops both servers and deletes the file.")
        while postgres.running() and bouncer.running():
            time.sleep(_POLL_SECONDS)
        which = postgres if not postgres.running() else bouncer
        tail = which.process.log_tail() if which.process is not None else ""
        print(f"asyncpool local-pgbouncer: {type(which).__name__} stopped on its own:\n"
              f"{redact(tail)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        _say(out, "stopping ...")
        return 0
    finally:
        # A second Ctrl-C must not cut the clean-up short (and leave a server or the file).
        for sig in _STOP_SIGNALS:
            signal.signal(sig, signal.SIG_IGN)
        if _ours(env_file):
            env_file.unlink()
        servers.stop()


def write_env_file(path: Path, values: dict[str, str]) -> None:
    """Write `values` as ``NAME=value`` lines (quoted for a shell) to a new file at `path`,
    readable by its owner only. A previous file of ours is replaced; the new one is created
    exclusively, so it is never another file's mode, nor one a symlink points at. It appears
    whole: written under a temporary name beside it, then linked to `path` (a script waiting
    for the file never reads it half written)."""
    if _ours(path):
        path.unlink()
    draft = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(draft, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "w") as file:
            file.write(_MARK + "\n")
            file.writelines(f"{name}={shlex.quote(value)}\n" for name, value in values.items())
        os.link(draft, path)  # (fails if `path` exists, as O_EXCL did)
    finally:
        draft.unlink()


def _unusable(env_file: Path) -> str | None:
    """Why `env_file` cannot be written, found before the servers start (which takes seconds)."""
    if env_file.exists() and not _ours(env_file):
        return (f"{env_file} exists and was not written by this command; move it away or pass "
                "--env-file with another path")
    if not env_file.parent.is_dir():
        return (f"{env_file.parent} is not a folder; create it or pass --env-file with a path "
                "in an existing folder")
    return None


def _ours(path: Path) -> bool:
    try:
        with path.open() as file:
            return file.readline().rstrip("\n") == _MARK
    except (FileNotFoundError, IsADirectoryError, UnicodeDecodeError):
        return False


def _interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


def _say(out: TextIO, text: str) -> None:
    # Flushed: piped into a log or `tee`, the DSN line must show while the servers run.
    print(text, file=out, flush=True)
