"""`asyncpool plan`: does a Lambda fleet fit its pooler and its database? (#20)

The arithmetic (docs/poolers.md, "Connection budget"):

    clients          = instances (reserved concurrency) x workers per instance x max_size
    PgBouncer        : clients <= processes x max_client_conn
                       server connections = processes x min(default_pool_size + reserve_pool_size,
                                                           max_db_connections or unlimited)
    RDS Proxy        : server connections = max_connections x max_connections_percent / 100
    PostgreSQL       : server connections (or clients, direct) <= max_connections
                       - superuser_reserved_connections - headroom (admin, migrations, other apps)

Limits not given on the command line are read where they can be: PostgreSQL's through the DSN
(``SHOW max_connections`` runs on the server through any pooler), PgBouncer's from its console
(``SHOW CONFIG``, a stats user is enough).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import sys
from dataclasses import asdict, dataclass, field
from typing import Any, TextIO

#: A PgBouncer process or task may get more than its share (source-IP stickiness, the kernel's
#: hash): each one's max_client_conn should cover this much over the even share.
SKEW = 1.25


@dataclass
class Budget:
    instances: int
    workers: int = 1
    max_size: int = 1
    pooler: str = "pgbouncer"  #: "pgbouncer", "rds-proxy" or "none"
    processes: int = 1  #: PgBouncer processes or tasks sharing the load
    max_client_conn: int | None = None
    default_pool_size: int | None = None
    reserve_pool_size: int = 0
    max_db_connections: int | None = None  #: 0 or None: no limit
    max_connections_percent: int | None = None  #: RDS Proxy
    max_connections: int | None = None
    superuser_reserved_connections: int = 3
    headroom: int = 5  #: server connections kept free for admins, migrations, other clients


@dataclass
class Verdict:
    fits: bool | None  #: None: a limit is unknown, so it could not be checked
    clients: int
    server_connections: int | None
    findings: list[str] = field(default_factory=list)
    changes: list[str] = field(default_factory=list)


def check(b: Budget) -> Verdict:  # noqa: PLR0912, PLR0915 - one branch per limit reads best
    clients = b.instances * b.workers * b.max_size
    v = Verdict(None, clients, None)
    v.findings.append(f"clients: {b.instances} instances x {b.workers} workers x max_size "
                      f"{b.max_size} = {clients}")
    fits = True
    unknown = False
    usable = None
    if b.max_connections is not None:
        usable = b.max_connections - b.superuser_reserved_connections - b.headroom
        v.findings.append(f"PostgreSQL: max_connections {b.max_connections} - "
                          f"{b.superuser_reserved_connections} reserved - {b.headroom} headroom = "
                          f"{usable} for this fleet")
    if b.pooler == "none":
        v.server_connections = clients
        if usable is None:
            unknown = True
        elif clients > usable:
            fits = False
            v.changes.append(
                f"{clients} direct connections exceed {usable}: put PgBouncer or RDS Proxy in "
                f"front, or cap reserved concurrency at {max(usable // (b.workers * b.max_size), 0)}")
    elif b.pooler == "rds-proxy":
        if b.max_connections is None or b.max_connections_percent is None:
            unknown = True
        else:
            v.server_connections = b.max_connections * b.max_connections_percent // 100
            v.findings.append(f"RDS Proxy: {b.max_connections_percent}% of {b.max_connections} = "
                              f"{v.server_connections} server connections")
            if usable is not None and v.server_connections > usable:
                fits = False
                pct = max(usable * 100 // b.max_connections, 1)
                v.changes.append(f"lower max_connections_percent to {pct} (or raise "
                                 "max_connections): the proxy would take the headroom")
    else:
        if b.max_client_conn is None:
            unknown = True
        else:
            total = b.processes * b.max_client_conn
            share = math.ceil(clients / b.processes * SKEW)
            v.findings.append(f"PgBouncer: {b.processes} process(es) x max_client_conn "
                              f"{b.max_client_conn} = {total} client connections")
            if clients > total or share > b.max_client_conn:
                fits = False
                v.changes.append(
                    f"raise max_client_conn to {share} per process (clients / processes x "
                    f"{SKEW} for an uneven spread), add processes, or lower reserved "
                    "concurrency or max_size")
        if b.default_pool_size is None:
            unknown = True
        else:
            per = b.default_pool_size + b.reserve_pool_size
            if b.max_db_connections:
                per = min(per, b.max_db_connections)
            v.server_connections = b.processes * per
            v.findings.append(f"PgBouncer: {b.processes} x {per} = {v.server_connections} server "
                              "connections at most")
            if usable is not None and v.server_connections > usable:
                fits = False
                v.changes.append(
                    f"lower default_pool_size (or max_db_connections) to {max(usable // b.processes, 1)}"
                    " per process, or raise max_connections: together the processes could open "
                    f"{v.server_connections} server connections")
            elif usable is None:
                unknown = True
    v.fits = fits if not (unknown and fits) else None
    if v.fits is None:
        v.findings.append("some limits are unknown: give them (--max-client-conn, "
                          "--default-pool-size, --max-connections...) or a --dsn/--admin-dsn to "
                          "read them")
    return v


async def read_limits(b: Budget, dsn: str | None, admin_dsn: str | None, timeout: float) -> None:
    """Fill the limits `b` lacks from the server (through `dsn`) and PgBouncer's console."""
    from asyncpool.config import PoolConfig
    from asyncpool.connect.authguard import Login
    from asyncpool.connect.dsn import parse_dsn

    if dsn:
        # The pool's TLS and credential rules, as doctor's: no password to another machine
        # without verified TLS, none in clear text (PoolConfigError, ConnectError).
        login = Login(PoolConfig.from_env(name="plan", dsn=None), parse_dsn(dsn))
        conn = await login.connect(timeout, "plan")
        try:
            if b.max_connections is None:
                b.max_connections = int(await conn.fetchval("SHOW max_connections"))
            reserved = await conn.fetchval("SHOW superuser_reserved_connections")
            b.superuser_reserved_connections = int(reserved)
        finally:
            await conn.close(timeout=timeout)
    if admin_dsn and b.pooler == "pgbouncer":
        from asyncpool.cli.admin_console import read_console

        rows = await read_console(parse_dsn(admin_dsn), ["SHOW CONFIG"], timeout)
        config = {str(r["key"]): str(r["value"]) for r in rows["SHOW CONFIG"]}
        if b.max_client_conn is None and "max_client_conn" in config:
            b.max_client_conn = int(config["max_client_conn"])
        if b.default_pool_size is None and "default_pool_size" in config:
            b.default_pool_size = int(config["default_pool_size"])
        if b.max_db_connections is None and "max_db_connections" in config:
            b.max_db_connections = int(config["max_db_connections"])
        b.reserve_pool_size = int(config.get("reserve_pool_size", b.reserve_pool_size) or 0)


def render(b: Budget, v: Verdict) -> str:
    head = {True: "FITS", False: "DOES NOT FIT", None: "UNKNOWN"}[v.fits]
    lines = [f"asyncpool plan: {head}", ""]
    lines += [f"  {line}" for line in v.findings]
    if v.changes:
        lines += ["", "Change:"] + [f"  - {c}" for c in v.changes]
    return "\n".join(lines) + "\n"


def _at_least_one(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: write a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text}: must be at least 1")
    return value


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--instances", type=_at_least_one, required=True,
                   help="execution environments at most (the function's reserved concurrency)")
    p.add_argument("--workers", type=_at_least_one, default=1,
                   help="workers per environment (AWS_LAMBDA_MAX_CONCURRENCY on managed instances)")
    p.add_argument("--max-size", type=_at_least_one, default=1,
                   help="the pool's max_size (default 1)")
    p.add_argument("--pooler", choices=("pgbouncer", "rds-proxy", "none"), default="pgbouncer")
    p.add_argument("--processes", type=_at_least_one, default=1,
                   help="PgBouncer processes or tasks (a fleet; the module's max_tasks)")
    p.add_argument("--max-client-conn", type=int)
    p.add_argument("--default-pool-size", type=int)
    p.add_argument("--max-db-connections", type=int)
    p.add_argument("--max-connections-percent", type=int, help="RDS Proxy's target group setting")
    p.add_argument("--max-connections", type=int, help="PostgreSQL's max_connections")
    p.add_argument("--headroom", type=int, default=5,
                   help="server connections to keep free for admins and other clients (5)")
    p.add_argument("--dsn", help="read max_connections through this DSN (any pooler)")
    p.add_argument("--admin-dsn", help="read PgBouncer's limits from its console (a stats user)")
    p.add_argument("--timeout", type=float, default=5.0)
    p.add_argument("--json", action="store_true")


def run(args: argparse.Namespace, out: TextIO | None = None) -> int:
    out = out or sys.stdout
    b = Budget(args.instances, args.workers, args.max_size, args.pooler, args.processes,
               args.max_client_conn, args.default_pool_size, 0, args.max_db_connections,
               args.max_connections_percent, args.max_connections, headroom=args.headroom)
    if args.dsn or args.admin_dsn:
        try:
            asyncio.run(read_limits(b, args.dsn, args.admin_dsn, args.timeout))
        except Exception as exc:  # the limits stay unknown; say why, never a password
            from asyncpool.connect.dsn import redact

            out.write(f"asyncpool plan: could not read limits: {type(exc).__name__}: "
                      f"{redact(str(exc))}\n")
    verdict = check(b)
    if args.json:
        document: dict[str, Any] = {"budget": asdict(b), **asdict(verdict)}
        out.write(json.dumps(document, indent=2) + "\n")
    else:
        out.write(render(b, verdict))
    return {True: 0, False: 1, None: 3}[verdict.fits]
