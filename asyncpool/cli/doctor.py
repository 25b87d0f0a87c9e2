"""`asyncpool doctor DSN`: connect, look around, and say which settings to use."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import sys
import time
from dataclasses import asdict
from typing import Any, TextIO

from asyncpool.cli.diagnosis import EXIT_UNREACHABLE, Diagnosis, Facts, Finding, diagnose
from asyncpool.cli.probe import probe_startup
from asyncpool.config import PoolConfig
from asyncpool.connect.authguard import Login
from asyncpool.connect.dsn import DsnError, ParsedDsn, Target, parse_dsn, redact, scrub
from asyncpool.connect.poolers import RDS_PROXY_HOST as _RDS_PROXY_HOST
from asyncpool.errors import AuthenticationError, ConnectError, PoolConfigError

# PgBouncer settings worth seeing next to the pool mode.
_PGBOUNCER_SETTINGS = ("max_client_conn", "default_pool_size", "max_db_connections",
                       "query_wait_timeout", "auth_type")


def run(args: argparse.Namespace) -> int:
    return asyncio.run(doctor(args.dsn, args.admin_dsn, args.timeout, args.json, sys.stdout))


async def doctor(dsn: str | None, admin_dsn: str | None, timeout: float, as_json: bool,
                 out: TextIO) -> int:
    if not dsn:
        return _refused(out, as_json, "dsn", "give a DSN or set ASYNCPOOL_DSN")
    try:
        parsed = parse_dsn(dsn)
    except DsnError as exc:
        return _refused(out, as_json, "dsn", str(exc))
    try:
        admin = parse_dsn(admin_dsn) if admin_dsn else None
    except DsnError as exc:
        return _refused(out, as_json, "admin_dsn", f"--admin-dsn: {exc}")
    del dsn, admin_dsn  # only the parsed parts from here on (error trackers record locals)
    target = parsed.target()
    try:
        # The pool's rules: a password goes only over verified TLS (or to this machine, SCRAM
        # only), unless allow_unprotected_credentials says otherwise.
        login = Login(PoolConfig.from_env(name="doctor", dsn=None), parsed)
    except PoolConfigError as exc:
        return _refused(out, as_json, "dsn", str(exc), target)
    if admin is not None:
        try:
            Login(login.config, admin)  # the same rules for the console's login, up front
        except PoolConfigError as exc:
            return _refused(out, as_json, "admin_dsn", f"--admin-dsn: {exc}", target)
    facts = await gather_facts(parsed, target, admin, timeout, login=login)
    diagnosis = diagnose(facts)
    out.write(render_json(facts, diagnosis) if as_json else render_text(facts, diagnosis))
    return diagnosis.exit_code


def _refused(out: TextIO, as_json: bool, check: str, message: str,
             target: Target | None = None) -> int:
    """A DSN the doctor will not use: said in text, or in the JSON shape of every other
    outcome (`facts` null: nothing was tried)."""
    if as_json:
        out.write(json.dumps({
            "target": str(target) if target is not None else None,
            "exit_code": EXIT_UNREACHABLE,
            "facts": None,
            "findings": [asdict(Finding("problem", check, message))],
            "recommendation": None,
        }, indent=2) + "\n")
    else:
        out.write(f"asyncpool doctor: {message}\n")
    return EXIT_UNREACHABLE


async def gather_facts(dsn: ParsedDsn | str, target: Target, admin_dsn: ParsedDsn | str | None,
                       timeout: float, *, login: Login | None = None) -> Facts:
    """Log in once (asyncpg), probe the authentication request, and read PgBouncer if present.

    asyncpg gets the DSN rebuilt from its parsed parts and the password as a keyword, so no
    parser (asyncpg's, libpq's) ever sees, or quotes, the text the user wrote."""
    if isinstance(dsn, str):
        dsn = parse_dsn(dsn)
    if isinstance(admin_dsn, str):
        admin_dsn = parse_dsn(admin_dsn)
    if login is None:
        login = Login(PoolConfig.from_env(name="doctor", dsn=None), dsn)
    facts = Facts(target=str(target), host=target.host,
                  admin_target=str(admin_dsn.target()) if admin_dsn else None)
    started = time.perf_counter()
    try:
        conn = await login.connect(timeout, "doctor")
    except ConnectError as error:
        facts.connect_error = _could_not_connect(error)
        facts.auth_failed = isinstance(error, AuthenticationError)
        return facts
    try:
        facts.login_ms = (time.perf_counter() - started) * 1000
        await _read_connection(conn, facts)
    finally:
        await conn.close(timeout=timeout)
    await _probe(dsn, target, timeout, facts)
    if facts.pooler is not None or admin_dsn:
        await _read_pgbouncer(dsn, target, admin_dsn, timeout, facts, login=login)
    return facts


async def _read_connection(conn: Any, facts: Facts) -> None:
    settings = conn.get_settings()
    facts.server_version = str(getattr(settings, "server_version", "")).split(" ")[0] or None
    ssl_object = conn._transport.get_extra_info("ssl_object")
    facts.tls_in_use = ssl_object is not None
    facts.tls_version = ssl_object.version() if ssl_object is not None else None
    from asyncpool.connect import driver

    facts.backend_key = driver.backend_key(conn) is not None
    backend_pid: int = await conn.fetchval("SELECT pg_backend_pid()")
    if _RDS_PROXY_HOST.search(facts.host):
        facts.pooler = "rds-proxy"
        facts.pooler_evidence = "RDS Proxy host name"
    elif conn.get_server_pid() != backend_pid:
        # A pooler hands out its own cancel keys, so the process id it announced at login is
        # not the process that ran our query.
        facts.pooler = "unknown"
        facts.pooler_evidence = "the backend key at login is not the server process's id"
    else:
        facts.max_connections = int(await conn.fetchval("SHOW max_connections"))
        facts.connections_in_use = int(await conn.fetchval("SELECT count(*) FROM pg_stat_activity"
                                                           " WHERE backend_type = 'client backend'"))


async def _probe(dsn: ParsedDsn, target: Target, timeout: float, facts: Facts) -> None:
    facts.sslmode = dsn.params.get("sslmode") or os.environ.get("PGSSLMODE", "prefer")
    ask_tls = facts.sslmode != "disable"
    try:
        probe = await probe_startup(target.host, target.port, target.user, target.database,
                                    ask_tls=ask_tls, timeout=timeout)
    except (OSError, TimeoutError, EOFError, asyncio.IncompleteReadError):
        return
    facts.tls_offered = probe.tls_offered
    facts.auth_method = probe.auth_method
    facts.sasl_mechanisms = probe.sasl_mechanisms


async def _read_pgbouncer(dsn: ParsedDsn, target: Target, admin_dsn: ParsedDsn | None,
                          timeout: float, facts: Facts, *, login: Login | None = None,
                          ) -> None:
    """PgBouncer's version and settings from its admin console: `admin_dsn`, or by default the
    application's own login with database ``pgbouncer``."""
    import asyncpg

    from asyncpool.cli.admin_console import ConsoleError, ConsoleUnavailable, read_console
    from asyncpool.connect.failures import is_auth_failure

    commands = ["SHOW VERSION", "SHOW CONFIG", "SHOW DATABASES", "SHOW USERS"]
    try:
        if admin_dsn:
            admin_login = Login(login.config, admin_dsn) if login is not None else None
            rows = await read_console(admin_dsn, commands, timeout, login=admin_login)
        else:
            rows = await read_console(dsn, commands, timeout, database="pgbouncer", login=login)
    except ConsoleUnavailable as exc:
        facts.pooler = "pgbouncer"
        facts.pooler_evidence = "its admin console accepted the login"
        facts.admin_error = str(exc)
        facts.admin_unreadable = True
        return
    except (ConsoleError, asyncpg.PostgresError) as exc:
        text = _shown(exc, dsn, admin_dsn)
        if text == "not allowed":
            # PgBouncer's answer to a user outside admin_users/stats_users: it is a PgBouncer.
            user = admin_dsn.target().user if admin_dsn else target.user
            facts.pooler = "pgbouncer"
            facts.pooler_evidence = f"its admin console refused user {user!r}"
            facts.admin_error = text
        elif admin_dsn and (isinstance(exc, asyncpg.PostgresError) or is_auth_failure(exc)):
            # The user's own console DSN: explained as a failed login is (what to fix).
            facts.admin_error = _admin_failure(exc, admin_dsn, timeout, dsn)
        else:
            facts.admin_error = text
        return
    except Exception as exc:  # any other: asyncpg's frames hold the password
        facts.admin_error = (_admin_failure(exc, admin_dsn, timeout, dsn) if admin_dsn
                             else _shown(exc, dsn, admin_dsn) or type(exc).__name__)
        return
    facts.pooler = "pgbouncer"
    facts.pooler_evidence = "admin console"
    version = re.search(r"(\d+)\.(\d+)(?:\.(\d+))?", str((rows["SHOW VERSION"] or [{}])[0].get("version")))
    if version:
        facts.pgbouncer_version = tuple(int(g) for g in version.groups() if g is not None)
    config = {str(r["key"]): str(r["value"]) for r in rows["SHOW CONFIG"]}
    facts.max_prepared_statements = int(config.get("max_prepared_statements", "0") or 0)
    facts.pgbouncer_settings = {k: config[k] for k in _PGBOUNCER_SETTINGS if k in config}
    if "so_reuseport" in config:
        facts.so_reuseport = config["so_reuseport"] in ("1", "yes", "on", "true")
    if "peer_id" in config:
        facts.peer_id = int(config["peer_id"] or 0)
    facts.pool_mode = _effective_pool_mode(config, rows["SHOW DATABASES"], rows["SHOW USERS"], target)


def _could_not_connect(error: BaseException) -> str:
    """The error's text from "could not connect to X: why; what to do" on (no pool name)."""
    return "could not connect" + str(error).split("could not connect", 1)[-1]


def _admin_failure(exc: BaseException, admin_dsn: ParsedDsn, timeout: float,
                   dsn: ParsedDsn) -> str:
    """Why the console login of --admin-dsn failed and what to fix, with no secret in it."""
    from asyncpool.connect.failures import translate

    error = translate(exc, admin_dsn.target(), "doctor", timeout,
                      "check the user and password of --admin-dsn",
                      secrets=(*admin_dsn.secrets, *dsn.secrets))
    return _could_not_connect(error)


def _shown(exc: BaseException, *dsns: ParsedDsn | None) -> str:
    """An error's text as doctor prints it: no password, nor any piece of one."""
    secrets = [s for d in dsns if d is not None for s in d.secrets]
    return scrub(redact(str(exc)), secrets).strip()


def _effective_pool_mode(config: dict[str, str], databases: list[dict[str, Any]],
                         users: list[dict[str, Any]], target: Target) -> str:
    """PgBouncer's precedence: the user's pool_mode, then the database's, then the default."""
    for rows, name in ((users, target.user), (databases, target.database)):
        for row in rows:
            if row.get("name") == name and row.get("pool_mode"):
                return str(row["pool_mode"])
    return config.get("pool_mode", "session")


def render_text(facts: Facts, diagnosis: Diagnosis) -> str:
    lines = [f"asyncpool doctor: {facts.target}", ""]
    width = max(len(f.check) for f in diagnosis.findings)
    for finding in diagnosis.findings:
        lines.append(f"  {finding.level:<9} {finding.check:<{width}}  {finding.message}")
    rec = diagnosis.recommendation
    if rec is not None:
        mode = rec.prepared_statements
        lines += [
            "",
            f'Recommended: prepared_statements="{mode}"',
            f"  {rec.reason}.",
            f'  Pool(dsn, prepared_statements="{mode}")  or  ASYNCPOOL_PREPARED_STATEMENTS={mode}',
        ]
    problems = sum(f.level == "problem" for f in diagnosis.findings)
    unchecked = diagnosis.unchecked
    if rec is None:
        lines += ["", "Could not check the server: fix the connection first."]
    elif unchecked:
        # Never "No problems found" after a check that did not run.
        lines += ["", f"{problems} problem(s) found, and {len(unchecked)} check(s) NOT run: "
                  + ", ".join(f.check for f in unchecked) + " (see above for why and what to do)."]
    else:
        lines += ["", f"{problems} problem(s) found." if problems else "No problems found."]
    return "\n".join(lines) + "\n"


def render_json(facts: Facts, diagnosis: Diagnosis) -> str:
    rec = diagnosis.recommendation
    document = {
        "target": facts.target,
        "exit_code": diagnosis.exit_code,
        "facts": {**asdict(facts), "sasl_mechanisms": list(facts.sasl_mechanisms)},
        "findings": [asdict(f) for f in diagnosis.findings],
        "recommendation": asdict(rec) if rec else None,
    }
    return json.dumps(document, indent=2) + "\n"
