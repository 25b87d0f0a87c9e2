"""Opening one connection: credentials, then `asyncpg.connect`, with errors made clear."""

from __future__ import annotations

import asyncio
import dataclasses
import difflib
import inspect
import os
import time
from collections.abc import Mapping
from types import CodeType, TracebackType
from typing import TYPE_CHECKING, Any

import asyncpg

from asyncpool.config import PoolConfig, hook_awaitable, statement_cache_args
from asyncpool.connect import driver
from asyncpool.connect.authguard import AuthGuard, GuardedLoop, refusal_error
from asyncpool.connect.dsn import DsnError, ParsedDsn, Target, dialled, parse_dsn
from asyncpool.connect.failures import (
    refused_transaction_setting,
    setting_sources,
    translate,
)
from asyncpool.connect.hosts import HostLog, HostsLoop
from asyncpool.connect.negotiation import NegotiationLoop
from asyncpool.connect.poolers import is_rds_proxy
from asyncpool.connect.reads import cap_reads
from asyncpool.connect.startup import LOGIN_SAFE, UNSUPPORTED, StartupPlan, combined
from asyncpool.connect.startup import plan as plan_startup
from asyncpool.connect.tls import (
    AUTH_METHODS,
    CredentialKind,
    TlsSetting,
    allowed_auth_methods,
    checked_hosts,
    missing_password_hint,
    passfile_login,
    require_auth_setting,
    resolve_tls,
    service_of,
    withheld_password,
)
from asyncpool.credentials.provider import CredentialProvider, StaticPassword, auth_failure_hint
from asyncpool.errors import (
    AuthenticationError,
    ConnectError,
    CredentialsError,
    CredentialsUnavailableError,
    PoolConfigError,
    PoolError,
    config_errors_without_frames,
)
from asyncpool.observer import ConnectAttempt, PoolObserver
from asyncpool.options import check_connect_classes

if TYPE_CHECKING:
    from asyncpool.unnamed import CacheTotals
    from asyncpool.unnamed.connection import Policy

ALL_AUTH_METHODS = frozenset(AUTH_METHODS)


class CutShort:
    """Set by whoever stops a login part-way (the pool, at connect_timeout, close() or the end
    of the caller's acquire_timeout) to the error class its caller is given, so that the
    attempt is reported with that error rather than as a bare cancellation."""

    __slots__ = ("caller_error", "hosts", "in_init")

    def __init__(self) -> None:
        self.caller_error: type[BaseException] = asyncio.CancelledError
        # Logged in, and running the `init` hook: a timeout then is the hook's, not the network's.
        self.in_init: bool = False
        #: Each host's failure so far (several hosts): which one the time ran out on.
        self.hosts: HostLog | None = None


class Connector:
    """Knows how to open a connection for one pool; holds nothing but settings."""

    @config_errors_without_frames
    def __init__(self, config: PoolConfig, observer: PoolObserver, *,
                 totals: CacheTotals | None = None) -> None:
        """`totals`: the description cache's counts to go on with (a pool's new connection
        arguments, `Pool.set_connect_args`: its counters never go back)."""
        self.config = config
        self.observer = observer
        # Parsed once, here; asyncpg gets it rebuilt without the password and the keywords the
        # pool reads itself (`for_asyncpg`).
        self._dsn: ParsedDsn | None = None
        problem = None
        try:
            self._dsn = parse_dsn(config.dsn) if config.dsn else None
        except DsnError as exc:
            problem = str(exc)
        if problem is not None:
            raise DsnError(f"pool {config.name!r}: {problem}")
        kw = dict(config.connect_kwargs)
        _check_connect_kwargs(config.name, kw)
        require_target(config, kw)
        service = service_of(config, self._dsn.params if self._dsn else {})
        if service is not None:
            # asyncpg reads a service only from a DSN, and never from PGSERVICE: give it both,
            # or it would dial its defaults.
            kw.setdefault("service", service.name)
            if self._dsn is None:
                self._dsn = parse_dsn("postgresql://")
        self.target: Target = (self._dsn or _NO_DSN).target(
            host=kw.get("host"),
            port=kw.get("port"),
            user=kw.get("user"),
            database=kw.get("database"),
            service=service,
        )
        explicit = kw.pop("password", None)
        self.credentials: CredentialProvider | None = config.credentials or _default_credentials(
            self._dsn, explicit
        )
        # Secrets known here, scrubbed from every message a failure produces.
        known = [*(self._dsn.secrets if self._dsn else ()), explicit]
        if isinstance(self.credentials, StaticPassword):
            known.append(self.credentials.reveal())
        self._secrets = tuple(s for s in known if isinstance(s, str) and s)
        #: The one TLS setting every connection uses (all spellings resolved, or a conflict).
        self.tls: TlsSetting = resolve_tls(
            config, list(self._dsn.params.items()) if self._dsn else [], service=service)
        credentials = self.credentials
        kind: CredentialKind | None = (None if credentials is None else "token"
                                       if credentials.requires_tls else "password")
        hosts = checked_hosts(config, self.tls, kind,
                              [h for h, _ in self._dsn.hosts] if self._dsn else None, service)
        passfile = passfile_login(self._dsn, self.target, host=kw.get("host"),
                                  port=kw.get("port"), service=service)
        #: The password file's password, when it may not be sent (`withheld_password`).
        self.withheld: str | None = withheld_password(config, self.tls, kind, hosts, service,
                                                      passfile=passfile)
        # For a refused login's message only (`missing_password_hint`).
        self._password_sources = (hosts, service, passfile)
        #: What the server may ask for (a cleartext or MD5 request otherwise is refused).
        self.require_auth: str | None = require_auth_setting(config, self._dsn.params if self._dsn else {})
        self.auth_methods: frozenset[str] = allowed_auth_methods(
            config, self.tls, self.require_auth, withheld=self.withheld is not None)
        self._several_hosts = len(hosts) > 1
        #: Each host and port a login tries, in order, when there are several (for messages).
        self._dialled = (dialled(self._dsn, host=kw.get("host"), port=kw.get("port"),
                                 service=service) if self._several_hosts else ())
        if (self._several_hosts and credentials is not None
                and getattr(credentials, "token_host", _NOT_SIGNED) is None):
            # asyncpg asks for the password once per host it tries, without saying which: a
            # token signed for one host (IAM) would go to the others, and be refused there.
            raise PoolConfigError(
                f"pool {config.name!r}: {type(credentials).__name__} signs its token for one "
                f"host, and the DSN names {len(hosts)} ({', '.join(hosts)}): give one (an RDS "
                "cluster or proxy endpoint fails over behind its name), or token_host= to sign "
                "for the endpoint they all stand for")
        #: The description cache's counts over all connections ("unnamed" mode only).
        self.statement_cache: CacheTotals | None = None
        self._totals = totals
        #: Connections are opened through an InterceptingLoop (the one-round-trip path), which
        #: gives them this pool's description-cache policy.
        self._intercept = False
        self._policy: Policy | None = None
        #: Its connections say when they must not be reused (``retire_reason``, "unnamed" mode).
        self.retire_reasons: bool = False
        #: A login has worked (with direct TLS: the server takes it, so a hang-up in the
        #: handshake is the network's, and retried).
        self.logged_in = False
        self._kwargs = self._driver_kwargs(kw)

    def _driver_kwargs(self, kw: dict[str, Any]) -> dict[str, Any]:
        cfg = self.config
        kw.setdefault("timeout", cfg.connect_timeout)
        if cfg.command_timeout is not None:
            kw["command_timeout"] = cfg.command_timeout
        kw.update(statement_cache_args(cfg))
        if cfg.prepared_statements == "unnamed":
            from asyncpool.unnamed import (
                CacheTotals,
                describe_cache_connection_class,
                describe_cache_policy,
            )

            self.statement_cache = self._totals if self._totals is not None else CacheTotals()
            kw["connection_class"] = describe_cache_connection_class(cfg)
            self._policy = describe_cache_policy(cfg, self.statement_cache)
            self._intercept = True
            self.retire_reasons = True
        # Cancel requests only where they can arrive; elsewhere a timed-out query's connection
        # is closed instead of waiting for a statement nobody can stop.
        cancels = cfg.cancel_requests != "off" and not is_rds_proxy(self.target.host)
        kw["connection_class"] = driver.cancel_aware_class(kw.get("connection_class"),
                                                           cancels=cancels)
        kw["ssl"] = self.tls.driver_argument()
        # Behind a pooler only the settings it passes on go at login; the others are set in each
        # transaction (asyncpool/connect/startup.py). RDS Proxy is known by its name; PgBouncer
        # by refusing a startup parameter, or by a backend pid that is not the key's.
        rds = is_rds_proxy(self.target.host)
        # The DSN's query settings (``?search_path=app``) with the option's, planned as one:
        # asyncpg would send the DSN's at login whatever the pooler does with them.
        from_dsn = self._dsn.setting_values() if self._dsn is not None else {}
        self._dsn_settings = frozenset(from_dsn)
        self._settings = combined(from_dsn, cfg.server_settings, cfg.name)
        self.startup: StartupPlan = plan_startup(self._settings, pooled=rds, pool=cfg.name,
                                                 pooler="RDS Proxy", from_dsn=self._dsn_settings)
        #: Settings beyond the login-safe ones went at login: the first login checks they held.
        self._check_startup = not rds and set(self.startup.at_login) != {
            k for k in self.startup.at_login if k.lower() in LOGIN_SAFE}
        if self.startup.at_login:
            kw["server_settings"] = dict(self.startup.at_login)
        # The pool manages the target through the DSN; explicit host/port/user stay as given.
        return kw

    async def connect(self, cut_short: CutShort | None = None) -> asyncpg.Connection:
        """One new connection, given to the `init` hook; on an authentication failure, refresh
        credentials and retry once.

        `cut_short` tells, if this login is cancelled, what its caller was told instead.
        Failures are `ConnectError`s with the driver error's class and SQLSTATE as attributes
        and no cause or context: the driver's frames hold the password (error trackers record
        frame locals). If `init` raises (or is cancelled), the connection is closed and the
        hook's error goes up as it is, as asyncpg's pool does."""
        conn = await self._login_with_settings(cut_short)
        cap_reads(driver.transport_of(conn))
        init = self.config.init
        if init is not None:
            if cut_short is not None:
                cut_short.in_init = True
            try:
                await hook_awaitable(self.config.name, "init", init(conn))
            except BaseException:
                conn.terminate()
                raise
            driver.keep_callbacks(conn)
        return conn

    async def _login_with_settings(self, cut_short: CutShort | None) -> asyncpg.Connection:
        """A login with the server settings where the pooler lets them hold: one a pooler refuses
        for a startup parameter is retried without it; the first login checks they held."""
        try:
            conn = await self._login(cut_short)
        except ConnectError as exc:
            if not self._check_startup or UNSUPPORTED not in str(exc):
                raise
            self._behind_pooler("PgBouncer")
            return await self._login(cut_short)
        if self._check_startup:
            try:
                pooled = conn.get_server_pid() != await conn.fetchval("SELECT pg_backend_pid()")
                if pooled:
                    # The pooler dropped them (ignore_startup_parameters): set per transaction.
                    self._behind_pooler("a pooler (the backend pid is not the cancel key's)")
                self._check_startup = False
            except BaseException:
                conn.terminate()
                raise
        return conn

    def _behind_pooler(self, pooler: str) -> None:
        """Plan the settings again for a pooler, for this and every later login."""
        self._check_startup = False
        self.startup = plan_startup(self._settings, pooled=True, pool=self.config.name,
                                    pooler=pooler, from_dsn=self._dsn_settings)
        if self.startup.at_login:
            self._kwargs["server_settings"] = dict(self.startup.at_login)
        else:
            self._kwargs.pop("server_settings", None)

    async def _login(self, cut_short: CutShort | None) -> asyncpg.Connection:
        refused: AuthenticationError
        try:
            return await self._attempt(cut_short)
        except AuthenticationError as exc:
            refused = exc
        # Outside the except block, so no exception becomes the next one's __context__.
        if (self.credentials is None or not self.retry_is_safe
                or not await provider_call(self.credentials, "refresh", self.target,
                                           self.config.name)):
            raise refused
        del refused
        return await self._attempt(cut_short)

    def refused_setting(self, exc: BaseException,
                        within: str = "pool.transaction()") -> PoolConfigError | None:
        """`failures.refused_transaction_setting` for this pool's settings."""
        return refused_transaction_setting(
            exc, self.config.name, setting_sources(self._dsn, self.config.server_settings),
            within)

    def _translate(self, exc: BaseException, hosts: HostLog | None = None) -> ConnectError:
        hint = (auth_failure_hint(self.credentials, self.target) if self.credentials
                else missing_password_hint(self.config, *self._password_sources) or None)
        return translate(exc, self.target, self.config.name, self.config.connect_timeout, hint,
                         secrets=self._secrets,
                         settings=setting_sources(self._dsn, self.config.server_settings),
                         direct_tls=self.tls.direct_source, direct_tls_worked=self.logged_in,
                         root_cert_source=self.tls.root_cert_source,
                         tls_optional=self.tls.optional,
                         own_context=self.tls.context is not None, dialled=self._dialled,
                         tried=hosts.tries if hosts is not None else ())

    def timed_out(self, exc: TimeoutError, cut_short: CutShort) -> ConnectError:
        """The error for a login `connect_timeout` stopped: with several hosts, it names the
        one being dialled, and each one's failure before it."""
        return self._translate(exc, cut_short.hosts)

    @property
    def retry_is_safe(self) -> bool:
        """Whether a second credential may follow a refused one: only to the same verified server
        (one host: with several, which one refused is not known), or where the guard lets nothing
        but SCRAM through (no password or token is sent)."""
        if not self.auth_methods & {"password", "md5"}:
            return True
        return self.tls.verified and not self._several_hosts

    def _loop(self) -> tuple[AuthGuard | None, HostLog | None, Any]:
        """The loop asyncpg is given: the running one, wrapped by the auth guard (unless the
        server is verified and every method allowed) and the one-round-trip path's interceptor,
        or else by `NegotiationLoop` (each marks seen the error asyncpg's TLS negotiation keeps
        when a login is cancelled as it connects); with several hosts, by `HostsLoop` too, which
        notes each host's failure (asyncpg raises only the last one's)."""
        loop: Any = asyncio.get_running_loop()
        hosts = None
        if self._several_hosts:
            # Innermost: the unnamed mode's connections take the loop under the interceptor.
            hosts = HostLog()
            loop = HostsLoop(loop, hosts)
        guard: AuthGuard | None = None
        if self.auth_methods != ALL_AUTH_METHODS or not self.tls.verified:
            guard = AuthGuard(self.auth_methods, once=not self.tls.verified)
            loop = GuardedLoop(loop, guard)
        if self._intercept:
            from asyncpool.unnamed.wire import InterceptingLoop

            loop = InterceptingLoop(loop, self._policy)
        elif guard is None:
            loop = NegotiationLoop(loop)
        return guard, hosts, loop

    async def _attempt(self, cut_short: CutShort | None) -> asyncpg.Connection:
        cred_times: list[int] = []
        provider = self.credentials
        kwargs = self._kwargs
        cred_failed: list[type[BaseException]] = []
        password_code: CodeType | None = None
        if provider is not None:
            target = self.target

            async def password() -> str:
                cred_times.append(time.time_ns())
                try:
                    return await _ask(provider, target, self.config.name)
                except BaseException as exc:  # its class only: the span must not carry its message
                    cred_failed.append(type(exc))
                    raise
                finally:
                    cred_times.append(time.time_ns())

            kwargs = {**kwargs, "password": password}
            password_code = password.__code__
        guard, hosts, loop = self._loop()
        if cut_short is not None:
            cut_short.hosts = hosts
        kwargs = {**kwargs, "loop": loop}
        started = time.time_ns()
        error: BaseException | None = None
        caller_error: type[BaseException] | None = None
        try:
            # The DSN asyncpg gets is no local of this frame, which every failed login's error
            # carries up: it may hold `sslpassword` (asyncpg reads that from the DSN only).
            conn: asyncpg.Connection = await asyncpg.connect(
                self._dsn.for_asyncpg() if self._dsn is not None else None, **kwargs)
            self.logged_in = True
            if hosts is not None:
                hosts.finish()
            return conn
        except PoolError as exc:  # a credentials provider's own error: raised as it is...
            error = exc
            caller_error = type(exc)
            # ...from the provider's frames on: asyncpg's, which called it, hold the DSN and
            # the connection arguments (`sslpassword` included) as locals.
            raise exc.with_traceback(_from_code(exc.__traceback__, password_code)) from exc.__cause__
        except Exception as exc:
            # Only what matters is kept (class, SQLSTATE, a scrubbed message): the driver's
            # exception and its frames (which hold the connection parameters, password
            # included) are dropped when this block ends. Any exception, not only the driver's
            # usual ones: asyncpg turns whatever fails during authentication (a malformed SCRAM
            # reply, a password it cannot encode) into InternalClientError and others.
            if guard is not None and guard.refused is not None:
                error = refusal_error(guard, self.config, _refuser(self.target, hosts), self.tls,
                                      self.require_auth, withheld=self.withheld)
            else:
                error = self._translate(exc, hosts)
            caller_error = type(error)
        except BaseException as exc:  # a cancellation, Ctrl-C, a SystemExit: raised as it is...
            error = exc
            caller_error = (cut_short.caller_error if cut_short is not None
                            and isinstance(exc, asyncio.CancelledError) else type(exc))
            raise _without_driver_frames(exc, password_code)  # noqa: B904 (itself, re-raised)
        finally:
            self.observer.connect_attempted(
                ConnectAttempt(
                    target=self.target,
                    started_ns=started,
                    ended_ns=time.time_ns(),
                    credentials_started_ns=cred_times[0] if cred_times else None,
                    credentials_ended_ns=cred_times[1] if len(cred_times) > 1 else None,
                    error=error,
                    caller_error=caller_error,
                    credentials_error=_step_error(cred_failed, caller_error),
                )
            )
        # Raised outside the except block: no __context__ either.
        raise error


def _refuser(target: Target, hosts: HostLog | None) -> Target:
    """`target` at the host whose request the guard refused: the last one dialled (asyncpg
    stops at a refusal)."""
    if hosts is None or not hosts.tries:
        return target
    return dataclasses.replace(target, host=hosts.tries[-1].host, port=hosts.tries[-1].port)


def _without_driver_frames(exc: BaseException, password_code: CodeType | None) -> BaseException:
    """`exc` (not an `Exception`: it must go up) without asyncpg's frames, whose locals hold the
    connection parameters (password included) that error trackers and crash reports record.
    Raised in the provider: from its frames on (its context is its own). Raised in the driver:
    from the login's frame on, and nothing chained (an exception asyncpg was handling)."""
    tb = _from_code(exc.__traceback__, password_code)
    if tb is None:
        exc.__cause__ = exc.__context__ = None
    return exc.with_traceback(tb)


def _step_error(failed: list[type[BaseException]],
                caller_error: type[BaseException] | None) -> type[BaseException] | None:
    """The class the credentials step failed with: what it raised, or, when the login was
    stopped while it ran (a cancellation: connect_timeout, the caller's acquire_timeout,
    close()), the error the caller got for the login; None when that caller went away (an
    abandoned login failed nothing)."""
    if not failed:
        return None
    if issubclass(failed[0], asyncio.CancelledError):
        return None if caller_error in (None, asyncio.CancelledError) else caller_error
    return failed[0]


async def _ask(provider: CredentialProvider, target: Target, pool: str) -> str:
    """`provider`'s password. What it raises, unless a `PoolError` of its own, becomes a
    `CredentialsError` naming only the exception's class: the message may hold a credential (a
    URL with a token in it, a secret's text in a parse error) that the pool cannot scrub."""
    failed: type[BaseException]
    try:
        result = provider.password(target)
        if not inspect.isawaitable(result):
            # (Its type only: the value may be the password itself.)
            raise CredentialsError(
                f"pool {pool!r}: {type(provider).__name__}.password() returned a "
                f"{type(result).__name__}, not something to await: write it as "
                "`async def password(self, target)`")
        password = await result
    except PoolError:
        raise
    except Exception as exc:
        failed = type(exc)
    else:
        if isinstance(password, str):
            return password
        # asyncpg failed with "unexpected error while performing authentication: Expected str,
        # got bytes", naming no provider (None: no password sent, read as a refused one).
        raise CredentialsError(
            f"pool {pool!r}: {type(provider).__name__}.password() returned "
            f"{type(password).__name__}, not the password as a str (decode bytes first)")
    # Raised outside the except block: the provider's exception is neither this one's cause nor
    # its context, and its frames (whatever they held) are gone.
    raise _hidden_error(provider, "password", failed, pool)


async def provider_call(provider: CredentialProvider, method: str, target: Target,
                        pool: str) -> Any:
    """``await provider.<method>(target)`` (`refresh`, `warm`), its errors treated as
    `password`'s are (`_ask`): a refresh that reads a store again fails with that store's error,
    which reached the caller of `acquire()` as it was, its message and frames (a URL with a
    token, a secret being parsed) included."""
    failed: type[BaseException]
    try:
        return await getattr(provider, method)(target)
    except PoolError:
        raise
    except Exception as exc:
        failed = type(exc)
    raise _hidden_error(provider, method, failed, pool)


def close_failure(provider: object, exc: BaseException) -> str:
    """What to log when a provider's ``close()`` raised `exc`: its class only, as for
    `password()`: its message may hold a credential (a URL with a token)."""
    return (f"{type(provider).__name__}.close() raised {_class_name(type(exc))} (its message is "
            "not shown: it may hold a credential)")


def _hidden_error(provider: CredentialProvider, method: str, failed: type[BaseException],
                  pool: str) -> CredentialsError:
    """The error for a provider's exception whose message is not shown. A network error or a
    timeout (the secret store unreachable for a moment) is retried, as before it was hidden."""
    error = (CredentialsUnavailableError if issubclass(failed, OSError | TimeoutError)
             else CredentialsError)
    return error(
        f"pool {pool!r}: {type(provider).__name__}.{method}() raised {_class_name(failed)} (its "
        "message is not shown: it may hold a credential; log it inside the provider to see "
        "it, or raise a CredentialsError with a message that holds none)")


def _class_name(cls: type[BaseException]) -> str:
    return cls.__qualname__ if cls.__module__ == "builtins" else f"{cls.__module__}.{cls.__qualname__}"


def _from_code(tb: TracebackType | None, code: CodeType | None) -> TracebackType | None:
    """The part of traceback `tb` from the first frame running `code` on (None if none does)."""
    while tb is not None and tb.tb_frame.f_code is not code:
        tb = tb.tb_next
    return tb


_NOT_SIGNED = object()  # a provider without token_host: its credential is not bound to a host
_NO_DSN = ParsedDsn("postgresql", None, None, (), None, {})

#: libpq's environment variables that name a server: with one set, no DSN is needed.
_LIBPQ_TARGET_VARIABLES = ("PGHOST", "PGPORT", "PGSERVICE", "PGDATABASE")


def _check_connect_kwargs(pool: str, connect_kwargs: Mapping[str, Any]) -> None:
    """Refuse a misspelt option before asyncpg.connect does, as a TypeError at each login."""
    params = inspect.signature(asyncpg.connect).parameters
    # asyncpg.connect wrapped by instrumentation that takes **kwargs: its options are unknown.
    if any(p.kind is p.VAR_KEYWORD for p in params.values()):
        return
    known = set(params) - {"dsn"}
    for key in connect_kwargs:
        if key == "dsn":
            raise PoolConfigError(f"pool {pool!r}: connect_kwargs: give the DSN as the pool's "
                                  "dsn (the first argument), not in connect_kwargs")
        if key not in known:
            close = difflib.get_close_matches(str(key), sorted(known), n=1, cutoff=0.6)
            raise PoolConfigError(
                f"pool {pool!r}: connect_kwargs: {key!r} is not an option of asyncpg.connect"
                + (f"; did you mean {close[0]!r}?" if close else ""))
    try:
        check_connect_classes(connect_kwargs)
    except PoolConfigError as exc:
        raise PoolConfigError(f"pool {pool!r}: connect_kwargs: {exc}") from None


def require_target(config: PoolConfig, connect_kwargs: dict[str, Any]) -> None:
    """Refuse a pool told nowhere to connect, instead of dialling libpq's defaults."""
    if config.dsn or any(connect_kwargs.get(k) for k in ("host", "port", "service", "database")):
        return
    if any(os.environ.get(var) for var in _LIBPQ_TARGET_VARIABLES):
        return
    # Other tools' variables are not read (a DSN is explicit), but one that is set is named:
    # it is most likely what the caller meant.
    others = [var for var in _OTHER_DSN_VARIABLES if os.environ.get(var)]
    raise PoolConfigError(
        f"pool {config.name!r}: no database to connect to: pass a DSN "
        "(Pool('postgresql://user@host:port/database')), set ASYNCPOOL_DSN, or set libpq's "
        "PGHOST/PGPORT/PGDATABASE/PGSERVICE"
        + (f" ({others[0]} is set but not read: pass Pool(os.environ[{others[0]!r}]), or set "
           f"ASYNCPOOL_DSN to it)" if others else "")
    )


#: Variables other tools read a DSN from (Heroku, Render, Django and SQLAlchemy apps...).
_OTHER_DSN_VARIABLES = ("DATABASE_URL", "POSTGRES_URL", "POSTGRESQL_URL", "PG_DSN")


def _default_credentials(dsn: ParsedDsn | None, explicit: str | None) -> CredentialProvider | None:
    """The DSN's (or `connect_kwargs`', or PGPASSWORD's) password as a provider, if any."""
    password = explicit or (dsn.password if dsn else None) or os.environ.get("PGPASSWORD")
    return StaticPassword(password) if password else None
