"""From what `asyncpool doctor` observed to findings and a recommended prepared-statement mode.

Pure functions of `Facts`, so every branch can be checked without a server.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from typing import Literal

from asyncpool.config import PreparedStatements

#: "unchecked": a check that could not run; its message says why and what would let it run.
Level = Literal["ok", "note", "warning", "problem", "unchecked"]
Pooler = Literal["pgbouncer", "rds-proxy", "unknown"]

#: The first PgBouncer that tracks protocol-level prepared statements in transaction mode.
PGBOUNCER_PREPARED = (1, 21)

EXIT_OK = 0
EXIT_PROBLEMS = 1
EXIT_UNREACHABLE = 2
EXIT_INCOMPLETE = 3  #: no problem found, but some checks could not run


@dataclass
class Facts:
    """Everything the doctor learned; None means it could not tell."""

    target: str  #: user@host:port/database (never a password)
    host: str
    connect_error: str | None = None
    auth_failed: bool = False
    login_ms: float | None = None
    server_version: str | None = None
    tls_in_use: bool | None = None
    tls_version: str | None = None
    tls_offered: bool | None = None
    sslmode: str = "prefer"  #: as the DSN (or PGSSLMODE) asked; libpq's default is prefer
    auth_method: str | None = None
    sasl_mechanisms: tuple[str, ...] = ()
    pooler: Pooler | None = None  #: None: connected straight to PostgreSQL
    pooler_evidence: str | None = None
    pgbouncer_version: tuple[int, ...] | None = None
    #: --admin-dsn as user@host:port/database (None: the DSN's own login was tried on it).
    admin_target: str | None = None
    admin_error: str | None = None
    admin_unreadable: bool = False  #: no installed driver could read the admin console's rows
    pool_mode: str | None = None
    max_prepared_statements: int | None = None
    pgbouncer_settings: dict[str, str] = field(default_factory=dict)
    max_connections: int | None = None
    connections_in_use: int | None = None
    #: The login carried BackendKeyData (False: nothing can be cancelled, as through RDS Proxy).
    backend_key: bool | None = None
    #: PgBouncer's so_reuseport and peer_id (SHOW CONFIG; None: not read, or too old for peering).
    so_reuseport: bool | None = None
    peer_id: int | None = None


@dataclass(frozen=True)
class Finding:
    level: Level
    check: str
    message: str


@dataclass(frozen=True)
class Recommendation:
    prepared_statements: PreparedStatements
    reason: str


@dataclass(frozen=True)
class Diagnosis:
    findings: list[Finding]
    recommendation: Recommendation | None

    @property
    def exit_code(self) -> int:
        if any(f.check == "connection" and f.level == "problem" for f in self.findings):
            return EXIT_UNREACHABLE
        if any(f.level == "problem" for f in self.findings):
            return EXIT_PROBLEMS
        if self.unchecked:
            return EXIT_INCOMPLETE
        return EXIT_OK

    @property
    def unchecked(self) -> list[Finding]:
        return [f for f in self.findings if f.level == "unchecked"]


def version_text(version: tuple[int, ...] | None) -> str:
    return ".".join(map(str, version)) if version else "of unknown version"


def diagnose(f: Facts) -> Diagnosis:
    if f.connect_error is not None:
        return Diagnosis([Finding("problem", "connection", f.connect_error)], None)
    findings = [
        Finding("ok", "connection", f"logged in to {f.target} in {f.login_ms:.0f} ms"
                if f.login_ms is not None else f"logged in to {f.target}"),
        Finding("ok", "server", f"PostgreSQL {f.server_version or '(version not reported)'}"),
        _tls(f),
        _auth(f),
        *_pooler(f),
        *_cancel(f),
    ]
    return Diagnosis(findings, recommend(f))


def is_loopback(host: str) -> bool:
    if host == "localhost" or host.startswith("/"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _tls(f: Facts) -> Finding:
    if f.tls_in_use:
        version = f.tls_version or "version unknown"
        if f.sslmode in ("verify-ca", "verify-full"):
            return Finding("ok", "tls", f"in use ({version}), certificate verified ({f.sslmode})")
        unverified = (f"in use ({version}) but the server's certificate is not verified "
                      f"(sslmode={f.sslmode}): anyone in the path can pose as the server")
        if is_loopback(f.host):
            return Finding("note", "tls", unverified + " (fine on a loopback address)")
        return Finding("warning", "tls", unverified + "; use sslmode=verify-full with the "
                       "server's CA (RDS: the RDS bundle; RDS Proxy: Amazon root CAs)")
    offered = {
        True: "the server offers TLS but this connection did not use it (check sslmode)",
        False: "the server does not offer TLS",
        None: "sslmode=disable",
    }[f.tls_offered]
    if is_loopback(f.host):
        return Finding("note", "tls", f"not in use: {offered} (fine on a loopback address)")
    return Finding(
        "warning", "tls",
        f"not in use: {offered}; queries and results cross the network in clear: use "
        "sslmode=verify-full with the server's CA (RDS: the RDS bundle; RDS Proxy: Amazon "
        "root CAs)",
    )


def _auth(f: Facts) -> Finding:
    method = f.auth_method
    if method == "SCRAM-SHA-256":
        plus = " (channel binding offered)" if "SCRAM-SHA-256-PLUS" in f.sasl_mechanisms else ""
        return Finding("ok", "auth", f"SCRAM-SHA-256{plus}")
    if method == "md5":
        return Finding("warning", "auth", "md5: deprecated and weaker than SCRAM; set "
                       "password_encryption=scram-sha-256, reset the password, and use "
                       "scram-sha-256 in pg_hba.conf (PgBouncer: auth_type)")
    if method == "password":
        level: Level = "warning" if f.tls_in_use else "problem"
        return Finding(level, "auth", "cleartext password: the server asks for the password "
                       "itself" + ("" if f.tls_in_use else ", and without TLS it travels in "
                                   "clear") + "; use scram-sha-256")
    if method == "trust":
        return Finding("warning", "auth", "trust: the server accepted the login without a "
                       "password")
    if method is None:
        return Finding("note", "auth", "could not tell the authentication method")
    return Finding("ok", "auth", method)


def _pooler(f: Facts) -> list[Finding]:
    if f.pooler is None:
        limits = ""
        if f.max_connections is not None:
            limits = f" (max_connections={f.max_connections}"
            if f.connections_in_use is not None:
                limits += f", {f.connections_in_use} in use now"
            limits += ")"
        found = [Finding(
            "note", "pooler",
            f"none: connected straight to PostgreSQL{limits}. Every Lambda environment holds "
            "its own server connections; with many of them, put PgBouncer (transaction mode) "
            "or RDS Proxy in front",
        )]
        if f.admin_target is not None and f.admin_error:
            # No console to read here, so nothing went unchecked; the user still asked for it.
            found.append(Finding("note", "admin_dsn", f"{_console_advice(f)} (not needed: the "
                                 "DSN reaches PostgreSQL itself, with no pooler in front)"))
        return found
    if f.pooler == "rds-proxy":
        return [Finding("ok", "pooler", "RDS Proxy (from the host name)")]
    if f.pooler == "unknown":
        if f.admin_target is not None:
            # The user named the console: its settings were meant to be checked, and were not.
            return [Finding("unchecked", "pooler", f"a pooler or proxy is in front "
                            f"({f.pooler_evidence}); its settings NOT checked: "
                            f"{_console_advice(f)}")]
        console = (f"PgBouncer's admin console did not answer: {f.admin_error}"
                   if f.admin_error else "no PgBouncer admin console answered")
        return [Finding("note", "pooler", f"a pooler or proxy is in front ({f.pooler_evidence});"
                        f" {console}")]
    if f.pool_mode is None:
        return [Finding(
            "unchecked", "pooler",
            f"PgBouncer ({f.pooler_evidence}); pool_mode and max_prepared_statements NOT "
            f"checked: {_console_advice(f)}",
        )]
    found = [Finding("ok", "pooler", f"PgBouncer {version_text(f.pgbouncer_version)}: "
                     f"pool_mode={f.pool_mode}, max_prepared_statements="
                     f"{_prepared_text(f)}")]
    if f.pool_mode == "session":
        found.append(Finding(
            "note", "pool_mode",
            "session: each client connection keeps a server connection until it disconnects, "
            "so idle Lambda environments hold server connections; transaction mode is what "
            "asyncpool is built for",
        ))
    elif f.pool_mode == "statement":
        found.append(Finding(
            "problem", "pool_mode",
            "statement: PgBouncer refuses multi-statement transactions, so pool.transaction() "
            "fails; set pool_mode=transaction",
        ))
    settings = ", ".join(f"{k}={v}" for k, v in f.pgbouncer_settings.items())
    if settings:
        found.append(Finding("note", "limits", settings))
    return found


_SAFETY_NET = ("set statement_timeout and idle_in_transaction_session_timeout on the role "
               "(ALTER ROLE ... SET), so a statement nobody can cancel still ends")


def _cancel(f: Facts) -> list[Finding]:
    """Can a cancel request reach the statement it is for (docs/poolers.md)?"""
    if f.backend_key is False or f.pooler == "rds-proxy":
        why = "RDS Proxy" if f.pooler == "rds-proxy" else "the server or pooler"
        return [Finding("note", "cancel", f"{why} sent no cancel key (BackendKeyData): queries "
                        "cannot be cancelled; asyncpool closes the connection of a timed-out or "
                        f"reclaimed query instead (cancel_requests='auto' does it); {_SAFETY_NET}")]
    if f.pooler != "pgbouncer" or f.pool_mode is None:
        return []
    if f.peer_id:
        return [Finding("ok", "cancel", f"PgBouncer peering is on (peer_id={f.peer_id}): a "
                        "cancel request reaches the process holding the query")]
    if f.so_reuseport:
        return [Finding(
            "warning", "cancel",
            "PgBouncer runs with so_reuseport=1 and no peering (peer_id=0): with several "
            "processes on this port a cancel request lands on one that does not know the query "
            "and is lost, so timed-out statements run on. Set peer_id and [peers] on every "
            "process (PgBouncer >= 1.19), or run the pool with cancel_requests='off' "
            f"(ASYNCPOOL_CANCEL_REQUESTS=off); {_SAFETY_NET}")]
    return [Finding("note", "cancel", "one PgBouncer process delivers cancel requests; if "
                    "several PgBouncers share this address (tasks behind a load balancer), "
                    "give the load balancer source-IP stickiness or configure peering, else "
                    "run the pool with cancel_requests='off'")]


def _console_advice(f: Facts) -> str:
    """Why PgBouncer's admin console was not read, and what would let the doctor read it."""
    if f.admin_unreadable:
        return f.admin_error or "no installed driver can read the admin console"
    if f.admin_target is not None:
        why = f.admin_error or f"no answer from {f.admin_target}"
        if why == "not allowed":
            user = f.admin_target.split("@", 1)[0]
            why = (f"the admin console said 'not allowed' to user {user!r}; add it to "
                   "PgBouncer's admin_users or stats_users")
        return f"--admin-dsn did not work: {why}"
    why = f"the admin console said {f.admin_error!r}; " if f.admin_error else ""
    return (why + "pass --admin-dsn postgresql://ADMIN_USER@HOST:PORT/pgbouncer (a user in "
            "admin_users or stats_users), or set it in ASYNCPOOL_ADMIN_DSN beside ASYNCPOOL_DSN")


def _prepared_text(f: Facts) -> str:
    if f.pgbouncer_version is not None and f.pgbouncer_version < PGBOUNCER_PREPARED:
        return "unsupported (needs PgBouncer >= 1.21)"
    return str(f.max_prepared_statements if f.max_prepared_statements is not None else "unknown")


def recommend(f: Facts) -> Recommendation:
    """The `prepared_statements` mode to run with what was found (the default, "unnamed",
    when unsure: it works through any transaction pooler)."""
    if f.pooler is None:
        return Recommendation("on", "a direct PostgreSQL connection keeps its named prepared "
                              "statements: one round trip per cached query")
    if f.pooler == "rds-proxy":
        return Recommendation("unnamed", "RDS Proxy pins a session that uses named "
                              "prepared statements; 'unnamed' gets one round trip per "
                              "query with unnamed statements only")
    if f.pooler == "unknown":
        return Recommendation("unnamed", "an unidentified pooler or proxy is in front; "
                              "'unnamed' (the default) uses unnamed statements only, which "
                              "work through any transaction pooler, one round trip per query")
    return _pgbouncer_mode(f)


def _pgbouncer_mode(f: Facts) -> Recommendation:
    if f.pool_mode is None:
        return Recommendation("unnamed", "PgBouncer's version and settings are unknown; "
                              "'unnamed' (the default) works with every version, one round trip "
                              "per query; once the doctor can read the admin console it can "
                              "tell whether 'on' (>= 1.21 with max_prepared_statements > 0) is "
                              "faster still")
    if f.pool_mode == "session":
        return Recommendation("on", "session pooling gives each client connection the same "
                              "server connection, so named prepared statements stay valid")
    if f.pool_mode == "statement":
        return Recommendation("off", "statement pooling: fix pool_mode first")
    version = f.pgbouncer_version
    if version is not None and version >= PGBOUNCER_PREPARED and (f.max_prepared_statements or 0) > 0:
        return Recommendation("on", f"PgBouncer {version_text(version)} tracks protocol-level "
                              f"prepared statements (max_prepared_statements="
                              f"{f.max_prepared_statements}): one round trip per cached query")
    why = ("max_prepared_statements=0 (set it, e.g. to 200, to use 'on')"
           if version is not None and version >= PGBOUNCER_PREPARED
           else "PgBouncer < 1.21 cannot carry named prepared statements across transactions")
    return Recommendation("unnamed", f"{why}; 'unnamed' keeps one round trip per "
                          "query using unnamed statements only")
