"""The pool's TLS and credential rules for the logins the load engine makes around a pool.

`asyncpool bench` also connects without asyncpool: the contenders (raw asyncpg, asyncpg.Pool,
psycopg_pool) and the samplers that watch the server. Each of those logins gets what a pool in
the same environment would get (`Login`): the TLS setting resolved from the DSN, ``PGSSLMODE``
and ``ASYNCPOOL_SSL*`` together, a password only over verified TLS or to this machine (refused
before dialling otherwise), and, where the server is not verified, no cleartext or MD5 answer.
asyncpg gets the guarded loop asyncpool's own logins use; libpq gets ``sslmode``,
``sslrootcert`` and ``require_auth``, which it enforces itself.
"""

from __future__ import annotations

from typing import Any

from asyncpool.config import PoolConfig
from asyncpool.connect.authguard import Login
from asyncpool.connect.dsn import ParsedDsn, parse_dsn


class GuardedLogin:
    """One DSN's logins under the pool's rules. Raises `PoolConfigError` as a pool would."""

    def __init__(self, dsn: str, *, name: str = "bench") -> None:
        self.parsed: ParsedDsn = parse_dsn(dsn)
        self.login: Login = Login(PoolConfig.from_env(name=name, dsn=None), self.parsed)

    async def connect_asyncpg(self, **kwargs: Any) -> Any:
        """``asyncpg.connect`` under the rules. A failed login raises what a pool's would: a
        `ConnectError` with the driver's class and SQLSTATE but not its error, whose frames
        hold the password (`AuthMethodRefusedError` when the guard stopped it: nothing was
        sent)."""
        import asyncpg

        from asyncpool.connect.dsn import dialled
        from asyncpool.connect.failures import translate

        parsed = self.parsed
        guarded = self.login.kwargs()
        guard = self.login.guard  # this call's own: concurrent logins each have theirs
        hosts = self.login.hosts  # (so is this)
        error: Exception
        try:
            # The password in no local of this frame (a traceback's locals would show it).
            conn = await asyncpg.connect(self.login.driver_dsn(parsed), password=parsed.password,
                                         **kwargs, **guarded)
            if hosts is not None:
                hosts.finish()
            return conn
        except Exception as exc:
            target = parsed.target()
            # No guard: nothing could be refused (another call's guard is not this login's).
            refused = None if guard is None else self.login.refusal(target, guard)
            error = refused or translate(exc, target, self.login.config.name,
                                         kwargs.get("timeout") or 60.0, secrets=parsed.secrets,
                                         direct_tls=self.login.tls.direct_source,
                                         root_cert_source=self.login.tls.root_cert_source,
                                         tls_optional=self.login.tls.optional,
                                         own_context=self.login.tls.context is not None,
                                         dialled=dialled(parsed, service=self.login.service),
                                         tried=hosts.tries if hosts is not None else ())
        raise error  # outside the except block: no __context__ either

    def libpq_conninfo(self, *, require_auth: bool = True) -> str:
        """The DSN as a libpq ``key=value`` string under the rules (`Login.libpq_kwargs` over
        what the DSN says), without the password: for a libpq program that takes no keyword
        arguments (pgbench). `require_auth` False leaves libpq's ``require_auth`` out, for a
        login that has no password to give (libpq before 16 does not know the option)."""
        parsed = self.parsed
        settings: dict[str, str] = {}
        if any(host for host, _ in parsed.hosts):
            settings["host"] = ",".join(host for host, _ in parsed.hosts)
        if any(port is not None for _, port in parsed.hosts):
            settings["port"] = ",".join("" if port is None else str(port) for _, port in parsed.hosts)
        if parsed.user is not None:
            settings["user"] = parsed.user
        if parsed.database is not None:
            settings["dbname"] = parsed.database
        settings.update(parsed.params)
        settings.update((key, str(value)) for key, value in self.login.libpq_kwargs().items())
        if not require_auth:
            settings.pop("require_auth", None)
        return " ".join(f"{key}='{_conninfo_quoted(value)}'" for key, value in settings.items())

    def psycopg_args(self) -> tuple[str, dict[str, Any]]:
        """The conninfo and keyword arguments for a psycopg connection (libpq enforces them)."""
        import psycopg

        kwargs = self.login.libpq_kwargs(psycopg.pq.version())
        if self.parsed.password:
            kwargs["password"] = self.parsed.password
        return self.parsed.for_driver(), kwargs


def _conninfo_quoted(value: str) -> str:
    """`value` inside single quotes of a libpq conninfo string."""
    return value.replace("\\", "\\\\").replace("'", "\\'")
