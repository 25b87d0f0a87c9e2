"""pgbench through the same target: the C client's throughput is the ceiling Python can aim at."""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import ssl
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from asyncpool.config import PreparedStatements
from asyncpool.connect.tls import SYSTEM
from asyncpool.load.logins import GuardedLogin
from asyncpool.load.spec import pgbench_script

_NUMBERS = {
    "transactions": re.compile(r"number of transactions actually processed: (\d+)"),
    "failed": re.compile(r"number of failed transactions: (\d+)"),
    "latency_ms": re.compile(r"latency average = ([\d.]+) ms"),
    "tps": re.compile(r"tps = ([\d.]+) \(without initial connection time\)"),
}


class PgbenchError(RuntimeError):
    """pgbench is missing or its run failed."""


def _has_passfile(env: dict[str, str]) -> bool:
    """Whether libpq would find a password file (``PGPASSFILE``, or ``~/.pgpass``)."""
    path = env.get("PGPASSFILE") or os.path.join(os.path.expanduser("~"), ".pgpass")
    return os.path.isfile(path)


@dataclass(frozen=True)
class PgbenchResult:
    target: str
    clients: int
    threads: int
    duration: float
    protocol: str  #: pgbench -M: extended (unnamed statements) or prepared
    transactions: int
    failed: int
    tps: float
    latency_avg_ms: float

    def to_json(self) -> dict[str, Any]:
        """A bench JSON ``runs`` entry; pgbench reports only the mean latency."""
        return {
            "target": self.target,
            "driver": "pgbench",
            "prepared_statements": "on" if self.protocol == "prepared" else "off",
            "telemetry": "off",
            "clients": self.clients,
            "processes": self.threads,
            "pool_size": 1,
            "duration_s": self.duration,
            "queries": self.transactions,
            "queries_per_s": round(self.tps, 1),
            "latency_ms": {"p50": None, "p95": None, "p99": None, "mean": self.latency_avg_ms,
                           "max": None},
            "errors": {"failed transactions": self.failed} if self.failed else {},
            "error_count": self.failed,
            "warmup_errors": {},
            "connect_errors": 0,
            "clients_never_served": 0,
            "leaks_injected": 0,
            "leaks_reclaimed": 0,
            "client_cpu_us_per_query": None,
            "server_connections_max": None,
            "server_connections_limit": None,
            "clients_waiting_max": None,
        }


def pgbench_binary() -> str:
    """pgbench from PATH or next to the PostgreSQL server binaries."""
    found = shutil.which("pgbench")
    if found:
        return found
    try:
        from asyncpool.testing.binaries import postgres_bindir

        candidate = postgres_bindir() / "pgbench"
    except RuntimeError:
        candidate = None
    if candidate is not None and candidate.exists():
        return str(candidate)
    raise PgbenchError("pgbench not found: install PostgreSQL's client tools (postgresql-contrib)")


#: libpq's words when the root certificate file it was told to read (or its default,
#: ``~/.postgresql/root.crt``) is not there: before 16, ``sslrootcert=system`` is such a file.
_NO_ROOT_FILE = re.compile(r'root certificate file "(?P<path>[^"]*)" does not exist')


def _root_cert_advice(stderr: str, login: GuardedLogin) -> str | None:
    """What to do when pgbench's libpq could not find the CAs the pool verifies against (the
    system's), or None for any other failure."""
    found = _NO_ROOT_FILE.search(stderr)
    if found is None:
        return None
    bundle = ssl.get_default_verify_paths().cafile
    named = (f"the path of a CA bundle (this machine's system CAs: sslrootcert={bundle})"
             if bundle else "the path of a PEM file of the CAs")
    if found["path"] == SYSTEM:
        return ("pgbench's libpq is older than 16: it reads sslrootcert=system as a file named "
                f"'system' (which does not exist) and cannot use the system CAs. Give sslrootcert "
                f"{named}, or use a pgbench built with libpq >= 16")
    if login.login.tls.root_cert is None:
        # The pool takes the system CAs where no root certificate is named; libpq looks for
        # ~/.postgresql/root.crt (and, from 16, takes the system CAs only if told so).
        return (f"pgbench's libpq found no root certificate ({found['path']} does not exist): "
                "where none is named the pool verifies against the system CAs, libpq does not. "
                f"Give sslrootcert {named} (or sslrootcert=system, with libpq >= 16)")
    return None


async def run_pgbench(
    dsn: str,
    *,
    target: str,
    clients: int,
    duration: float,
    query: str,
    prepared_statements: PreparedStatements,
    threads: int | None = None,
) -> PgbenchResult:
    """Run `query` from `clients` pgbench connections for `duration` seconds, under the pool's
    TLS and credential rules (`GuardedLogin`: `PoolConfigError` where a pool would refuse)."""
    login = GuardedLogin(dsn)
    if "sslpassword" in login.parsed.params:
        raise PgbenchError("pgbench takes its connection settings on its command line, where "
                           "other processes can read them: it cannot be given sslpassword (use "
                           "a client key without a passphrase for pgbench, or leave --pgbench out)")
    threads = max(1, min(threads or os.cpu_count() or 1, clients))
    protocol = "prepared" if prepared_statements == "on" else "extended"
    env = dict(os.environ)
    password = login.parsed.password
    if password:
        env["PGPASSWORD"] = password  # never on the command line, where `ps` would show it
    # libpq's require_auth (what the pool's guard refuses, libpq refuses itself) wherever a
    # password could be sent; with none to send, it is left out for a libpq before 16.
    conninfo = login.libpq_conninfo(require_auth=bool(env.get("PGPASSWORD")) or _has_passfile(env))
    with tempfile.TemporaryDirectory(prefix="asyncpool-pgbench-") as tmp:
        script = Path(tmp) / "query.sql"
        script.write_text(pgbench_script(query))
        proc = await asyncio.create_subprocess_exec(
            pgbench_binary(),
            "--no-vacuum",
            f"--client={clients}",
            f"--jobs={threads}",
            f"--time={max(1, round(duration))}",
            f"--protocol={protocol}",
            f"--file={script}",
            conninfo,  # the database argument: libpq reads a conninfo string there
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            env=env,
        )
        out, err = await proc.communicate()
    text = out.decode(errors="replace")
    values = {key: pattern.search(text) for key, pattern in _NUMBERS.items()}
    if proc.returncode != 0 or values["tps"] is None or values["transactions"] is None:
        tail = err.decode(errors="replace").strip()[-800:]
        if 'invalid connection option "require_auth"' in tail:
            raise PgbenchError(
                "pgbench's libpq is older than 16: it cannot refuse a server's request for a "
                "cleartext or MD5 password, which asyncpool's rules require where TLS does not "
                "verify the server. Use sslmode=verify-full, a pgbench built with libpq >= 16, or "
                "ASYNCPOOL_ALLOW_UNPROTECTED_CREDENTIALS=1 on a network you trust"
            )
        if (advice := _root_cert_advice(tail, login)) is not None:
            raise PgbenchError(advice)
        raise PgbenchError(f"pgbench failed ({proc.returncode}): {tail or text[-800:]}")
    failed = values["failed"]
    latency = values["latency_ms"]
    return PgbenchResult(
        target=target,
        clients=clients,
        threads=threads,
        duration=float(max(1, round(duration))),
        protocol=protocol,
        transactions=int(values["transactions"].group(1)),
        failed=int(failed.group(1)) if failed else 0,
        tps=float(values["tps"].group(1)),
        latency_avg_ms=float(latency.group(1)) if latency else 0.0,
    )
