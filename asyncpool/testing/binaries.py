"""Find the PostgreSQL and PgBouncer binaries the test servers run from."""

from __future__ import annotations

import glob
import os
import re
import shutil
import stat
import subprocess
from dataclasses import dataclass
from pathlib import Path

from asyncpool.testing.harness_error import HarnessError

REPO_ROOT = Path(__file__).resolve().parents[2]
CURRENT_PGBOUNCER_SCRIPT = REPO_ROOT / "scripts" / "get-pgbouncer-current.sh"


@dataclass(frozen=True)
class PgBouncerBinary:
    """One runnable PgBouncer: the command that starts it and the version it reports."""

    command: tuple[str, ...]
    version: tuple[int, int]

    @property
    def version_text(self) -> str:
        return f"{self.version[0]}.{self.version[1]}"

    @property
    def supports_prepared_statements(self) -> bool:
        return self.version >= (1, 21)


def postgres_bindir() -> Path:
    """The directory holding `initdb` and `postgres`; `ASYNCPOOL_PG_BINDIR` overrides."""
    override = os.environ.get("ASYNCPOOL_PG_BINDIR")
    candidates = [override] if override else []
    pg_config = shutil.which("pg_config")
    if pg_config:
        out = subprocess.run([pg_config, "--bindir"], capture_output=True, text=True, check=False)
        candidates.append(out.stdout.strip())
    candidates += sorted(glob.glob("/usr/lib/postgresql/*/bin"), reverse=True)
    for cand in candidates:
        if cand and (Path(cand) / "postgres").exists() and (Path(cand) / "initdb").exists():
            return Path(cand)
    raise HarnessError(
        "PostgreSQL server binaries (initdb, postgres) not found: run scripts/setup.sh, "
        "install Debian's postgresql package, or set ASYNCPOOL_PG_BINDIR"
    )


def postgres_version(bindir: Path) -> tuple[int, int]:
    """The version of the PostgreSQL server in `bindir`, as (major, minor): (17, 12)."""
    command = (str(bindir / "postgres"),)
    out = subprocess.run([*command, "--version"], capture_output=True, text=True, check=False)
    # "postgres (PostgreSQL) 17.12 (Debian 17.12-0+deb13u1)"
    found = re.match(r"postgres \(PostgreSQL\) (\d+)(?:\.(\d+))?", out.stdout)
    if found is None:
        raise HarnessError(f"{command[0]} --version printed {(out.stdout or out.stderr)[:200]!r}")
    return int(found[1]), int(found[2] or 0)


def _version_of(command: tuple[str, ...]) -> tuple[int, int]:
    out = subprocess.run([*command, "--version"], capture_output=True, text=True, check=False)
    first = (out.stdout or out.stderr).splitlines()[0] if (out.stdout or out.stderr) else ""
    # "PgBouncer 1.18.0"
    parts = first.split()
    if len(parts) < 2 or parts[0] != "PgBouncer":
        raise HarnessError(f"{' '.join(command)} --version printed {first!r}, not a PgBouncer version")
    major, minor = parts[1].split(".")[:2]
    return int(major), int(minor)


def system_pgbouncer() -> PgBouncerBinary:
    """The distribution's PgBouncer (1.18 on Debian bookworm); `ASYNCPOOL_PGBOUNCER_LEGACY` overrides."""
    path = os.environ.get("ASYNCPOOL_PGBOUNCER_LEGACY") or shutil.which("pgbouncer") or "/usr/sbin/pgbouncer"
    if not Path(path).exists():
        raise HarnessError("pgbouncer not found: run scripts/setup.sh or `apt-get install pgbouncer`")
    command = (path,)
    return PgBouncerBinary(command, _version_of(command))


def current_pgbouncer_cache() -> Path:
    """Where scripts/get-pgbouncer-current.sh keeps the current PgBouncer (same rule as the script).

    As root the servers run as `postgres`, which may not be able to enter the clone's directory,
    so root's copy lives in /var/cache/asyncpool.
    """
    override = os.environ.get("ASYNCPOOL_PGBOUNCER_CACHE")
    if override:
        return Path(override)
    if os.geteuid() == 0:
        return Path("/var/cache/asyncpool/pgbouncer-trixie")
    return REPO_ROOT / ".cache" / "pgbouncer-trixie"


def untrusted_paths(cache: Path, uid: int | None = None) -> list[str]:
    """What in `cache` (a cached PgBouncer) someone other than `uid` or root could have changed.

    Checked before the cache is run, as root for the test servers: every file and folder in it,
    and every folder above it, must belong to root or `uid` and be writable by nobody else (a
    world-writable folder above is allowed only with the sticky bit, as /tmp has). Each problem
    is one line naming the path and why.
    """
    uid = os.geteuid() if uid is None else uid
    trusted = {0, uid}
    problems: list[str] = []

    def check(path: Path, *, above: bool) -> None:
        info = path.lstat()
        mode = info.st_mode
        if info.st_uid not in trusted:
            problems.append(f"{path}: owned by uid {info.st_uid}, not by root or uid {uid}")
        sticky_dir = above and stat.S_ISDIR(mode) and bool(mode & stat.S_ISVTX)
        if mode & (stat.S_IWGRP | stat.S_IWOTH) and not stat.S_ISLNK(mode) and not sticky_dir:
            problems.append(f"{path}: writable by group or others (mode {stat.S_IMODE(mode):o})")

    cache = cache.absolute()
    for parent in reversed(cache.parents):
        check(parent, above=True)
    if not cache.exists():
        return problems
    check(cache, above=False)
    for folder, dirs, files in os.walk(cache):
        for name in [*dirs, *files]:
            check(Path(folder) / name, above=False)
    return problems


def current_pgbouncer() -> PgBouncerBinary:
    """A PgBouncer >= 1.21, fetched once by scripts/get-pgbouncer-current.sh and cached."""
    path = os.environ.get("ASYNCPOOL_PGBOUNCER_CURRENT")
    if not path:
        cache = current_pgbouncer_cache()
        cached = cache / "pgbouncer"
        if cached.exists() and os.geteuid() == 0 and (problems := untrusted_paths(cache)):
            raise HarnessError(
                f"refusing to run the cached PgBouncer in {cache} as root: "
                + "; ".join(problems[:5])
                + f"{' ...' if len(problems) > 5 else ''}. Remove {cache} (scripts/setup.sh fetches it "
                "again) or fix the ownership."
            )
        if cached.exists():
            path = str(cached)
        elif CURRENT_PGBOUNCER_SCRIPT.exists():
            out = subprocess.run(
                ["bash", str(CURRENT_PGBOUNCER_SCRIPT)], capture_output=True, text=True, check=False
            )
            if out.returncode != 0:
                raise HarnessError(f"could not fetch a current PgBouncer: {out.stderr.strip()[-500:]}")
            path = out.stdout.strip().splitlines()[-1]
        else:
            raise HarnessError("no current PgBouncer: set ASYNCPOOL_PGBOUNCER_CURRENT")
    command = (path,)
    binary = PgBouncerBinary(command, _version_of(command))
    if not binary.supports_prepared_statements:
        raise HarnessError(f"{path} is PgBouncer {binary.version_text}; the current one must be >= 1.21")
    return binary
