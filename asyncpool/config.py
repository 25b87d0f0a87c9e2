"""Every pool option in one place, with its checks and its `ASYNCPOOL_*` environment variable."""

from __future__ import annotations

import dataclasses
import decimal
import difflib
import functools
import inspect
import math
import numbers
import os
import re
import sys
import warnings
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field, fields
from typing import TYPE_CHECKING, Any, ClassVar, Literal, Unpack, get_args

from asyncpool.connect.dsn import (
    LIBPQ_ONLY,
    DsnError,
    left_to_the_pool,
    misspelt_keyword,
    parse_dsn,
    redact_dsn,
)
from asyncpool.errors import (
    ConfigFail,
    PoolConfigError,
    config_errors_without_frames,
    config_fail,
)

if TYPE_CHECKING:
    import ssl as ssl_module

    import asyncpg

    from asyncpool.config_options import PoolConfigOptions
    from asyncpool.credentials.provider import CredentialProvider
    from asyncpool.pool.connection import PooledConnection

PreparedStatements = Literal["off", "on", "unnamed"]
#: Former names of modes, still accepted with a DeprecationWarning.
_RENAMED_MODES = {"describe-cache": "unnamed"}
LeakAction = Literal["reclaim", "log"]
CancelRequests = Literal["auto", "off"]
SslMode = Literal["disable", "allow", "prefer", "require", "verify-ca", "verify-full"]

#: Called once with each new asyncpg connection (asyncpg's ``init``), e.g. to register codecs.
InitHook = Callable[["asyncpg.Connection"], Awaitable[object]]
#: Called with the pooled connection at each checkout (asyncpg's ``setup``).
SetupHook = Callable[["PooledConnection"], Awaitable[object]]


def hook_awaitable(pool_name: str, hook: str, result: object) -> Awaitable[object]:
    """What the `init` or `setup` hook returned, to await; a `PoolConfigError` naming the hook
    if it is not awaitable (a plain ``def`` hook: it ran, but whatever it meant to await did
    not). A plain function returning a coroutine (``lambda conn: conn.execute(...)``) is fine."""
    if inspect.isawaitable(result):
        return result
    raise PoolConfigError(
        f"pool {pool_name!r}: the {hook} hook returned {type(result).__name__}, not something "
        f"to await: write it as `async def {hook}(conn): ...` (asyncpg's {hook} is awaited too)")


ENV_PREFIX = "ASYNCPOOL_"
#: The shortest `max_lifetime` and `max_idle` taken, in seconds.
MIN_CONNECTION_LIMIT = 0.1


class DefaultTimeout(float):
    """A `connect_timeout` nobody gave (the pool's default, or `lambda_config`'s): a DSN's
    ``?connect_timeout=`` takes its place, and an option given in code or the environment wins
    over the DSN's. `default` is the value to go back to when the DSN no longer gives one."""

    default: float

    def __new__(cls, value: float, default: float | None = None) -> DefaultTimeout:
        timeout = super().__new__(cls, value)
        timeout.default = float(value) if default is None else default
        return timeout


@dataclass(frozen=True)
class PoolConfig:
    """The options of a `Pool`. Times are in seconds; `None` turns a limit off, and
    ``float("inf")`` is taken for None (`connect_timeout` must have a limit).

    A time, here or in a call's ``timeout=`` (``acquire()``, ``transaction()``, ``release()``,
    ``close()``, a statement's), is any real number, as asyncpg takes it: an int or a float, or
    another number type that converts to one (a numpy number, a ``Decimal``, a ``Fraction``),
    kept as a float. A bool, a string, NaN and a negative time are refused (`PoolConfigError`).

    dsn: ``postgresql://user[:password]@host:port/database[?...]`` (env ``ASYNCPOOL_DSN``).
        A password in it is used for SCRAM unless `credentials` is given; it is never printed.
    name: the pool's name in stats, logs, errors and metrics (``db.client.connection.pool.name``).
    min_size: connections opened by `open()` and kept while idle (default 1).
    init_size: connections `open()` opens, when more than `min_size` (asyncpg 0.32's
        ``init_size``; default None: `min_size`). From `min_size` to `max_size`; those beyond
        `min_size` are closed once idle past `max_idle`, as any idle connection beyond it.
    max_size: most connections open at once, in use or idle (default 10).
    acquire_timeout: how long `acquire()` waits for a connection before `PoolTimeoutError`
        (default 30). Includes connecting and validating.
    connect_timeout: how long one connection attempt may take (default 10). A DSN's libpq
        ``?connect_timeout=`` (whole seconds; 1 means 2, as in libpq) is used when this option
        is not given; given too, this option wins.
    max_lifetime: a connection older than this is closed when returned or found idle (default
        1800; at least 0.1); each connection's limit is shortened by up to `lifetime_jitter`
        (default 10%) so connections opened together do not expire together.
    max_idle: an idle connection beyond `min_size` unused this long is closed (default 300; at
        least 0.1).
    validate_after: a connection idle longer than this is checked with a round trip before it is
        handed out, so one killed while a Lambda environment was frozen, or dropped by the pooler,
        is replaced unseen (default 1.0; 0 checks every checkout; None never).
    prepared_statements: ``"unnamed"`` (default) keeps each connection's statement descriptions
        and sends every repeated query as one round trip with the unnamed statement only, so any
        transaction pooler works (PgBouncer < 1.21, RDS Proxy; docs/describe-cache.md);
        ``"on"`` uses named prepared statements (PgBouncer >= 1.21 with
        ``max_prepared_statements`` > 0, or a direct server); ``"off"`` is asyncpg exactly, with
        its statement cache off (two round trips per query with arguments).
    statement_cache_size: entries in the statement (or description) cache when it is on (100).
    statement_cache_ttl: seconds a cached statement/description is kept (None: no limit).
    leak_timeout: a connection held longer than this is a leak (default 30; None disables),
        noticed up to a second later on asyncio's own loops (a tenth of a shorter timeout;
        docs/architecture.md).
    leak_action: ``"reclaim"`` (default) logs, cancels the holder and closes the connection;
        ``"log"`` only logs, as HikariCP does.
    cancel_requests: ``"auto"`` (default) lets a timed-out or cancelled query be cancelled on the
        server with a cancel request where one can be delivered (the server sent BackendKeyData,
        and the host is not an RDS Proxy endpoint), and closes the connection instead where not;
        ``"off"`` always closes it (a PgBouncer fleet on one port without ``peer_id``/``[peers]``,
        or several PgBouncers behind a load balancer without source-IP stickiness, where a cancel
        request lands on a process that does not know the query). See docs/poolers.md.
    credentials: a provider awaited for the password of every new connection (IAM tokens,
        rotating secrets). Default: the DSN's password.
    ssl: ``disable``/``allow``/``prefer``/``require``/``verify-ca``/``verify-full``, an
        `ssl.SSLContext`, or ``True`` (``verify-full``) / ``False`` (``disable``; ``true`` /
        ``false`` in ``ASYNCPOOL_SSL``) (default:
        the DSN's ``sslmode``, else ``PGSSLMODE``, else ``prefer``).
        Given in more than one place (this option, the DSN, ``connect_kwargs``), the settings
        must agree. Credentials are only sent over TLS that verifies the server (below).
    ssl_root_cert: CA bundle path used by ``verify-ca``/``verify-full`` (and ``require``, as
        libpq does); given without `ssl` or a DSN ``sslmode``, it means ``verify-full``.
        ``"system"``: the system's CAs. Default: libpq's ``~/.postgresql/root.crt`` if it
        exists, else the system's CAs.
    allow_unprotected_credentials: send credentials (a password, an IAM token, a secret) to a
        server whose certificate and name are not verified, and answer its requests for a
        cleartext or MD5 password: whoever answers on the port can read or replay them. Without
        it a pool with credentials needs ``verify-full`` (or a context that checks both),
        except a password to this machine (loopback, Unix socket), used only for SCRAM.
    allow_iam_without_tls: deprecated name of `allow_unprotected_credentials`.
    require_auth: the authentication methods the server may ask for, as libpq's
        ``require_auth``: a comma-separated list of ``password``, ``md5``, ``scram-sha-256``,
        ``gss``, ``sspi``, ``none`` (or all negated: ``!password,!md5``). Default: any over
        verified TLS; otherwise ``scram-sha-256,gss,sspi,none`` (no password is sent).
    server_settings: run-time parameters. Direct: sent at login. Behind a pooler: the ones it
        passes on (application_name, client_encoding, DateStyle, TimeZone,
        standard_conforming_strings) at login, the others set in each `pool.transaction()`
        (SET LOCAL); a login-only one (``options``...) is a PoolConfigError. docs/poolers.md.
        The DSN's query settings (``?search_path=app``) and ``connect_kwargs["server_settings"]``
        (asyncpg's spelling) are planned with these; one given twice with another value is a
        PoolConfigError.
    command_timeout: default time limit of each query, as asyncpg's ``command_timeout``
        (default None: no limit; a call's own ``timeout=`` wins: seconds >= 0, ``inf`` for no
        limit, anything else a PoolConfigError before the statement is sent).
    max_queries: a connection that has run this many queries is closed when returned and
        replaced, as asyncpg's ``max_queries`` (default None: no limit; `max_lifetime` already
        renews connections).
    init: ``async def init(conn)``, awaited once with each new asyncpg connection before it is
        used (asyncpg's ``init``): register codecs (``conn.set_type_codec``) here. It runs within
        `connect_timeout`; if it raises, the connection is closed and the error reaches the
        caller of ``acquire()`` (or ``open()``).
    setup: ``async def setup(conn)``, awaited with the pooled connection at every checkout
        (asyncpg's ``setup``). If it raises, the connection is closed, not reused, and the error
        reaches the caller of ``acquire()``.
    connect_kwargs: extra keyword arguments for `asyncpg.connect` (``record_class``,
        ``connection_class``, ``host``...; `Pool` also takes these directly).
    telemetry: publish OpenTelemetry metrics and spans (default True; costs next to nothing
        until an application installs the OpenTelemetry SDK).
    """

    # A new option also goes in asyncpool.config_options.PoolSettings (the typed keywords of
    # Pool(), create_pool(), replace() and from_env(); tests/test_asyncpg_options.py checks that
    # every field is there).
    dsn: str | None = field(default=None, repr=False)
    name: str = "asyncpool"
    min_size: int = 1
    init_size: int | None = None
    max_size: int = 10
    acquire_timeout: float | None = 30.0
    connect_timeout: float = DefaultTimeout(10.0)
    max_lifetime: float | None = 1800.0
    lifetime_jitter: float = 0.1
    max_idle: float | None = 300.0
    validate_after: float | None = 1.0
    prepared_statements: PreparedStatements = "unnamed"
    statement_cache_size: int = 100
    statement_cache_ttl: float | None = None
    leak_timeout: float | None = 30.0
    leak_action: LeakAction = "reclaim"
    cancel_requests: CancelRequests = "auto"
    credentials: CredentialProvider | None = field(default=None, repr=False)
    ssl: SslMode | bool | ssl_module.SSLContext | None = None
    ssl_root_cert: str | os.PathLike[str] | None = None
    allow_unprotected_credentials: bool = False
    allow_iam_without_tls: bool = False
    require_auth: str | None = None
    server_settings: Mapping[str, str] | None = None
    command_timeout: float | None = None
    max_queries: int | None = None
    init: InitHook | None = None
    setup: SetupHook | None = None
    connect_kwargs: Mapping[str, Any] = field(default_factory=dict, repr=False)
    telemetry: bool = True

    def __post_init__(self) -> None:
        _check(self)

    def __repr__(self) -> str:
        shown = ", ".join(
            f"{f.name}={getattr(self, f.name)!r}" for f in fields(self) if f.repr
        )
        dsn = f"dsn={redact_dsn(self.dsn)!r}, " if self.dsn else ""
        creds = f", credentials={type(self.credentials).__name__}" if self.credentials else ""
        return f"PoolConfig({dsn}{shown}{creds})"

    def __str__(self) -> str:
        return PoolConfig.__repr__(self)

    @config_errors_without_frames
    def replace(self, **changes: Unpack[PoolConfigOptions]) -> PoolConfig:
        """A copy with `changes` applied (and checked). Typed (`PoolConfigOptions`): a type
        checker refuses ``replace(max_size="5")`` and a misspelt option; at run time they are
        a `PoolConfigError` (naming the closest option)."""
        copy = dataclasses.replace(self, **changes)
        kept = {k: v for k, v in self._set_by.items() if k not in changes}
        if kept:
            object.__setattr__(copy, "_set_by", kept)
        return copy

    #: The options `from_env` read from their variables: option -> ``ASYNCPOOL_SSL='ON'``.
    _set_by: ClassVar[Mapping[str, str]] = {}

    def _variable_of(self, option: str) -> str | None:
        """Where `option` came from when `from_env` read it from its ``ASYNCPOOL_*`` variable
        (and nothing replaced it since), as ``ASYNCPOOL_SSL='ON'``; None otherwise. For the
        pool's messages, which name what to fix where a value has a meaning other than its
        text (not public: a display string, not an API to build on)."""
        return self._set_by.get(option)

    @classmethod
    @config_errors_without_frames
    def from_env(cls, environ: Mapping[str, str] | None = None,
                 **overrides: Unpack[PoolConfigOptions]) -> PoolConfig:
        """Options from ``ASYNCPOOL_<OPTION>`` variables (``ASYNCPOOL_MAX_SIZE=5``...).

        ``none`` turns an optional limit off; an empty variable is not set (the default), as
        libpq takes an empty ``PG*`` variable. `overrides` (`PoolConfig`'s fields, typed as
        `replace()`'s) win over the environment.
        """
        env = os.environ if environ is None else environ
        warn_unknown_variables(env)
        values: dict[str, Any] = {}
        for f in fields(cls):
            if f.name not in _ENV_FIELDS:
                continue
            raw = env_value(env, f.name)
            if raw is None:
                continue
            values[f.name] = _parse_env(f.name, raw, _ENV_FIELDS[f.name])
        from_env = set(values) - set(overrides)
        values.update(overrides)
        try:
            config = cls(**values)
        except PoolConfigError as exc:
            # Say which variable to fix when the refused value came from one.
            named = [ENV_PREFIX + name.upper() for name in sorted(from_env)
                     if f"{name}=" in str(exc) or (name == "dsn" and _about_the_dsn(exc))]
            if not named:
                raise
            # (The same class: a DsnError stays one.)
            raise type(exc)(f"{exc} (set by {', '.join(named)})") from None
        # (Not the DSN's text: it may hold a password.)
        if read := sorted(from_env - {"dsn"}):
            object.__setattr__(config, "_set_by", {
                name: f"{ENV_PREFIX}{name.upper()}={env_value(env, name)!r}" for name in read})
        return config


def _about_the_dsn(exc: PoolConfigError) -> bool:
    """Whether `exc` refuses the DSN (its messages name "the DSN", never an option ``dsn=``)."""
    return isinstance(exc, DsnError) or "the DSN" in str(exc)


def _refusing_unknown_options(init: Any) -> Any:
    """The generated __init__, with an option it does not know refused as `PoolConfigError`
    naming the closest one (Python's own error would only say "unexpected keyword")."""
    known = [f.name for f in fields(PoolConfig)]

    @functools.wraps(init)
    def checked(self: PoolConfig, *args: Any, **kwargs: Any) -> None:
        for key in kwargs:
            if key not in known:
                close = difflib.get_close_matches(key, known, n=1, cutoff=0.6)
                raise PoolConfigError(
                    f"{key}=: not an option of PoolConfig"
                    + (f"; did you mean {close[0]}=?" if close else
                       "; asyncpg's connect() arguments go in connect_kwargs=, and Pool() and "
                       "lambda_config() take them as keywords"))
        init(self, *args, **kwargs)

    return checked


# The generated __init__ holds the DSN and connect_kwargs as locals (see the decorator).
PoolConfig.__init__ = config_errors_without_frames(  # type: ignore[method-assign]
    _refusing_unknown_options(PoolConfig.__init__))


# Field name -> (type, may be None). Options that are objects (credentials...) have no variable.
_ENV_FIELDS: dict[str, tuple[type, bool]] = {
    "dsn": (str, True),
    "name": (str, False),
    "min_size": (int, False),
    "init_size": (int, True),
    "max_size": (int, False),
    "acquire_timeout": (float, True),
    "connect_timeout": (float, False),
    "max_lifetime": (float, True),
    "lifetime_jitter": (float, False),
    "max_idle": (float, True),
    "validate_after": (float, True),
    "prepared_statements": (str, False),
    "statement_cache_size": (int, False),
    "statement_cache_ttl": (float, True),
    "leak_timeout": (float, True),
    "leak_action": (str, False),
    "cancel_requests": (str, False),
    "ssl": (str, True),
    "ssl_root_cert": (str, True),
    "allow_unprotected_credentials": (bool, False),
    "allow_iam_without_tls": (bool, False),
    "require_auth": (str, True),
    "command_timeout": (float, True),
    "max_queries": (int, True),
    "telemetry": (bool, False),
}

#: ``ASYNCPOOL_*`` variables that are not pool options: read by the telemetry, the command line,
#: the test harness and the benchmarks. Any other unknown one is warned about (a misspelt option).
OTHER_VARIABLES = frozenset({
    "ASYNCPOOL_ADMIN_DSN",  # `asyncpool doctor`'s PgBouncer admin console (local-pgbouncer's)
    "ASYNCPOOL_OTEL_SEMCONV",
    "ASYNCPOOL_PG_BINDIR",
    "ASYNCPOOL_PG17_CACHE",
    "ASYNCPOOL_PGBOUNCER_CACHE",
    "ASYNCPOOL_PGBOUNCER_CURRENT",
    "ASYNCPOOL_PGBOUNCER_LEGACY",
    "ASYNCPOOL_PROMETHEUS",
    "ASYNCPOOL_MODEL_EXAMPLES",
})
#: Prefixes of families of such variables (the test harness's servers).
OTHER_PREFIXES = ("ASYNCPOOL_TEST_",)


#: The options that only code can give (no variable reads them).
_CODE_ONLY = sorted({f.name for f in fields(PoolConfig)} - set(_ENV_FIELDS))


def env_variables() -> list[str]:
    """Every ``ASYNCPOOL_*`` variable that sets a pool option."""
    return [ENV_PREFIX + name.upper() for name in _ENV_FIELDS]


def warn_unknown_variables(environ: Mapping[str, str]) -> None:
    """Warn about each ``ASYNCPOOL_*`` variable that names no option, with the closest one."""
    known = env_variables()
    for var in environ:
        if (not var.startswith(ENV_PREFIX) or var in _ENV_VARIABLES or var in OTHER_VARIABLES
                or var.startswith(OTHER_PREFIXES)):
            continue
        # Matched on the option's part of the name: the common prefix makes every pair look alike.
        option = var[len(ENV_PREFIX):].lower()
        close = difflib.get_close_matches(option, [*_ENV_FIELDS, *_CODE_ONLY], n=1, cutoff=0.6)
        if close and close[0] in _CODE_ONLY:
            warnings.warn(
                f"{var} is ignored: {close[0]} is an option with no environment variable (a "
                f"mapping, object or function); give it in code, Pool({close[0]}=...) or "
                f"lambda_config({close[0]}=...)", UserWarning, stacklevel=_outside_stacklevel())
            continue
        hint = (f"; did you mean {ENV_PREFIX}{close[0].upper()}?" if close
                else f"; the options are {', '.join(known)}")
        warnings.warn(f"{var} is not an asyncpool option and is ignored{hint}", UserWarning,
                      stacklevel=_outside_stacklevel())


def _outside_stacklevel() -> int:
    """The `stacklevel` that points a warning at the first caller outside asyncpool (the line
    that made the pool or the config: `Pool()`, `create_pool()`, `lambda_config()`...), however
    deep in the package the warning is raised. Frames are told by their module's name, which
    the code dataclasses generate (`PoolConfig.__init__`) shares."""
    frame = sys._getframe(1)  # the function that calls warnings.warn: stacklevel 1
    level = 1
    while frame.f_back is not None and _ours(frame.f_globals.get("__name__", "")):
        frame = frame.f_back
        level += 1
    return level


def _ours(module: str) -> bool:
    # dataclasses: `PoolConfig.replace()` and `dataclasses.replace()` build the config there.
    return module in ("asyncpool", "dataclasses") or module.startswith("asyncpool.")


_ENV_VARIABLES = frozenset(env_variables())


def env_value(environ: Mapping[str, str], option: str) -> str | None:
    """The ``ASYNCPOOL_*`` variable of `option`, or None when it is unset or empty: an empty
    template variable (Terraform, compose) must not turn a limit off or fail the pool; ``none``
    is the way to say "no limit"."""
    raw = environ.get(ENV_PREFIX + option.upper())
    return raw if raw is not None and raw.strip() else None


#: Options whose variable is one of a few words: taken in any case, as the booleans are.
_CHOICE_FIELDS = frozenset({"prepared_statements", "leak_action", "cancel_requests", "ssl"})
_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off")


def _parse_env(name: str, raw: str, spec: tuple[type, bool]) -> Any:
    kind, nullable = spec
    var = ENV_PREFIX + name.upper()
    text = raw.strip()
    if nullable and text.lower() in ("none", "null", "off") and kind is not str:
        return None
    if kind is bool:
        if text.lower() in _TRUE:
            return True
        if text.lower() in _FALSE:
            return False
        raise PoolConfigError(f"{var}={raw!r}: write true or false (in any case; 1/0, "
                              "yes/no and on/off are taken too)")
    if kind in (int, float):
        try:
            # ASCII only: int() and float() take other scripts' digits ("٣" is 3).
            if not text.isascii():
                raise ValueError(text)
            value = kind(text)
        except ValueError:
            what = "a whole number" if kind is int else "a number of seconds"
            hint = " or none" if nullable else ""
            raise PoolConfigError(f"{var}={raw!r}: write {what}{hint}") from None
        if kind is float and math.isnan(value):  # float() reads it: not a time or a fraction
            what = "a fraction in [0, 1)" if name == "lifetime_jitter" else "a number of seconds"
            hint = " or none" if nullable else ""
            raise PoolConfigError(f"{var}={raw!r}: write {what}{hint}")
        return value + 0  # "-0" is 0, not -0.0
    if name in _CHOICE_FIELDS:
        return _parse_ssl_env(var, raw, text.lower()) if name == "ssl" else text.lower()
    return text


def _parse_ssl_env(var: str, raw: str, word: str) -> str | bool:
    """``ASYNCPOOL_SSL``: a mode, or a switch meaning what ``ssl=True`` / ``ssl=False`` mean in
    code (asyncpg's too): ``verify-full`` (the strictest, never a weaker check than asked for)
    and ``disable``. Anything else is refused here, in the variable's own words (an
    ``ssl.SSLContext`` can only be given in code)."""
    if word in _TRUE:
        return True
    if word in _FALSE:
        return False
    if word in get_args(SslMode):
        return word
    raise PoolConfigError(
        f"{var}={raw!r}: write one of {', '.join(get_args(SslMode))} (in any case), or true "
        "(verify-full: the certificate and the host name are checked) / false (disable), as "
        "ssl=True / ssl=False in code")


def _not_a_dsn(dsn: object) -> str:
    """Why `dsn` (not a string) is refused, and what to pass: its type only, never its value
    (bytes or a mapping may hold a password)."""
    kind = type(dsn).__name__
    if isinstance(dsn, bytes | bytearray | memoryview):
        advice = "decode it first: dsn.decode()"
    elif isinstance(dsn, Mapping):
        advice = ("pass its fields as keywords instead: Pool(host=..., port=..., user=..., "
                  "database=..., credentials=...)")
    elif isinstance(dsn, os.PathLike):
        advice = ("a file is not read as a DSN: for a connection service file or a password "
                  "file pass servicefile= or passfile=")
    elif isinstance(dsn, int | float):
        advice = "a port goes in port= (or after the host in the DSN)"
    else:
        advice = "build the string first"
    return (f"dsn: a DSN is a string, not a {kind} (its value is not shown: it may hold a "
            f"password): write postgresql://user@host:port/database; {advice}")


def _rename_mode(cfg: PoolConfig) -> None:
    # (A list, a dict, a signalling NaN cannot be looked up: the check below refuses them.)
    mode = cfg.prepared_statements
    renamed = _RENAMED_MODES.get(mode) if isinstance(mode, str) else None
    if renamed is not None:
        warnings.warn(
            f"prepared_statements={cfg.prepared_statements!r} is now called {renamed!r}",
            DeprecationWarning, stacklevel=_outside_stacklevel())
        object.__setattr__(cfg, "prepared_statements", renamed)


def _check_init_size(cfg: PoolConfig, fail: ConfigFail) -> None:
    """asyncpg 0.32's bounds: ``min_size <= init_size <= max_size`` (None: `min_size`)."""
    init = cfg.init_size
    if init is None:
        return
    if _not_whole(init) or init < 0:
        fail(f"init_size={init!r}: must be a whole number >= 0 (or None: min_size)")
    if init < cfg.min_size:
        fail(f"init_size={init} is smaller than min_size={cfg.min_size}: open() opens at "
             "least min_size connections; raise init_size or leave it out")
    if init > cfg.max_size:
        fail(f"init_size={init} is greater than max_size={cfg.max_size}: lower init_size")


def opened_by_open(cfg: PoolConfig) -> int:
    """How many connections `open()` opens: `init_size`, or `min_size` without it."""
    return cfg.min_size if cfg.init_size is None else cfg.init_size


def _check(cfg: PoolConfig) -> None:  # noqa: PLR0912, PLR0915 - one check per option reads best
    fail = config_fail(cfg.name)
    if cfg.dsn is not None and not isinstance(cfg.dsn, str):
        fail(_not_a_dsn(cfg.dsn))
    _check_flags(cfg, fail)
    _as_floats(cfg)
    if _not_whole(cfg.min_size) or cfg.min_size < 0:
        fail(f"min_size={cfg.min_size!r}: must be a whole number >= 0")
    if _not_whole(cfg.max_size) or cfg.max_size < 1:
        fail(f"max_size={cfg.max_size!r}: must be a whole number >= 1")
    if cfg.min_size > cfg.max_size:
        fail(f"min_size={cfg.min_size} is larger than max_size={cfg.max_size}: lower min_size")
    _check_init_size(cfg, fail)
    _check_time_limits(cfg, fail)
    if cfg.connect_timeout is None or cfg.connect_timeout == math.inf:
        fail(f"connect_timeout={cfg.connect_timeout!r}: a login must have a time limit; give a "
             "number of seconds > 0")
    _check_libpq_keys(cfg, fail)
    after = cfg.validate_after
    if after is not None and (not_a_number(after) or not after >= 0):
        fail(f"validate_after={cfg.validate_after!r}: must be >= 0 seconds (or None)")
    jitter = cfg.lifetime_jitter
    if not_a_number(jitter) or not 0 <= jitter < 1:
        fail(f"lifetime_jitter={cfg.lifetime_jitter!r}: must be a fraction in [0, 1)")
    _rename_mode(cfg)
    if cfg.prepared_statements not in get_args(PreparedStatements):
        fail(
            f"prepared_statements={cfg.prepared_statements!r}: choose one of "
            + ", ".join(repr(v) for v in get_args(PreparedStatements))
        )
    if cfg.leak_action not in get_args(LeakAction):
        fail(f"leak_action={cfg.leak_action!r}: choose 'reclaim' or 'log'")
    if cfg.cancel_requests not in get_args(CancelRequests):
        fail(f"cancel_requests={cfg.cancel_requests!r}: choose 'auto' or 'off'")
    if _not_whole(cfg.statement_cache_size) or cfg.statement_cache_size < 1:
        fail(f"statement_cache_size={cfg.statement_cache_size!r}: must be a whole number >= 1 "
             "(asyncpg's statement_cache_size=0 is prepared_statements='off', which Pool() and "
             "create_pool() take it for)")
    if cfg.command_timeout is not None and (
            not_a_number(cfg.command_timeout) or not cfg.command_timeout > 0):
        fail(f"command_timeout={cfg.command_timeout!r}: must be a number of seconds > 0 "
             "(or None for no limit)")
    queries = cfg.max_queries
    if queries is not None and (_not_whole(queries) or queries < 1):
        fail(f"max_queries={queries!r}: must be a whole number >= 1 (or None for no limit)")
    _check_server_settings(cfg.server_settings, fail)
    if not isinstance(cfg.connect_kwargs, Mapping):
        fail("connect_kwargs: must be a mapping of asyncpg.connect's options, not a "
             f"{type(cfg.connect_kwargs).__name__}")
    _settings_from_connect_kwargs(cfg, fail)
    _check_dsn_settings(cfg)
    _check_connect_values(cfg.connect_kwargs, fail)
    _check_overridden_connect_args(cfg, fail)
    _check_code(cfg, fail)
    if (cfg.ssl not in get_args(SslMode) if isinstance(cfg.ssl, str)
            else not (cfg.ssl is None or isinstance(cfg.ssl, bool) or _ssl_context(cfg.ssl))):
        fail(
            f"ssl={cfg.ssl!r}: choose one of "
            + ", ".join(get_args(SslMode))
            + " or pass an ssl.SSLContext"
        )
    if cfg.allow_iam_without_tls:
        warnings.warn(
            "allow_iam_without_tls is now called allow_unprotected_credentials (it covers every "
            "credential)", DeprecationWarning, stacklevel=_outside_stacklevel())
    if cfg.require_auth is not None:
        from asyncpool.connect.tls import parse_require_auth

        parse_require_auth(cfg.require_auth)
    _check_root_cert(cfg, fail)
    _no_limit_as_none(cfg)


#: The options in seconds whose None means "no limit" (or "never"): infinity means the same.
NO_LIMIT_OPTIONS = ("acquire_timeout", "max_lifetime", "max_idle", "validate_after",
                    "leak_timeout", "statement_cache_ttl", "command_timeout")


def _no_limit_as_none(cfg: PoolConfig) -> None:
    """``float("inf")`` (``inf`` in a variable) as None: the same meaning, and the same cost
    (an infinite ``leak_timeout`` still tracked every checkout; an infinite ``command_timeout``
    gave asyncpg a timer per query, an infinite ``statement_cache_ttl`` one per statement)."""
    for key in NO_LIMIT_OPTIONS:
        if getattr(cfg, key) == math.inf:
            object.__setattr__(cfg, key, None)


def _check_time_limits(cfg: PoolConfig, fail: ConfigFail) -> None:
    """The options in seconds that must be > 0 when given (None: no limit)."""
    positive = {
        "acquire_timeout": cfg.acquire_timeout,
        "connect_timeout": cfg.connect_timeout,
        "max_lifetime": cfg.max_lifetime,
        "max_idle": cfg.max_idle,
        "leak_timeout": cfg.leak_timeout,
        "statement_cache_ttl": cfg.statement_cache_ttl,
    }
    for key, value in positive.items():
        # `not value > 0` also refuses NaN, which every comparison lets through.
        if value is not None and (not_a_number(value) or not value > 0):
            none = "" if key == "connect_timeout" else " (or None for no limit)"
            fail(f"{key}={value!r}: must be a number of seconds > 0{none}")
        # Housekeeping runs every half of the shorter one, and a connection past max_lifetime is
        # logged in again: 1e-9 spun the loop and logged in ~125 times a second (open() never
        # returned). HikariCP resets a maxLifetime under 30 s; the tests use 0.2 s.
        if key in ("max_lifetime", "max_idle") and value is not None and (
                value < MIN_CONNECTION_LIMIT):
            fail(f"{key}={value!r}: must be at least {MIN_CONNECTION_LIMIT} seconds (or None "
                 "for no limit); a shorter one would log connections in again over and over, "
                 "and keep the event loop busy checking them (times are in seconds)")


def _check_libpq_keys(cfg: PoolConfig, fail: ConfigFail) -> None:
    """The DSN's libpq keywords that asyncpg does not read (`LIBPQ_ONLY`): asyncpg would send
    them to the server as run-time settings, and every login would fail. ``connect_timeout``
    becomes the pool's (unless that option is given), the others are refused."""
    try:
        params = parse_dsn(cfg.dsn).params if isinstance(cfg.dsn, str) else {}
    except DsnError as exc:
        # Here, as the pool is made, not at its open() (on Lambda, the first invocation):
        # the connector's own words for it, which never quote the DSN.
        raise DsnError(f"pool {cfg.name!r}: {exc}") from None
    from asyncpool.connect.tls import check_dsn_spellings  # (tls imports this module)

    check_dsn_spellings(params, fail)
    for key in params:
        # Sent as a run-time setting, a misspelt keyword would fail every direct login; behind
        # a pooler it would only be set in each pool.transaction(), and what it was meant to
        # ask for (?sslmod=verify-full) would silently not be done.
        keyword = misspelt_keyword(key)
        if keyword is not None:
            fail(f"the DSN's ?{key}= is no connection keyword and no setting of PostgreSQL's: "
                 f"did you mean ?{keyword}=? (A key that is no connection keyword is a "
                 "run-time setting, as server_settings= gives; give it there if it is one)")
    refused = [key for key, value in params.items()
               if LIBPQ_ONLY.get(key) and not left_to_the_pool(key, value)]
    if refused:
        key = refused[0]
        fail(f"the DSN's ?{key}= is a libpq setting that asyncpg does not read (it would send "
             f"it to the server as a run-time setting, and every login would fail): "
             f"{LIBPQ_ONLY[key]}")
    timeout = cfg.connect_timeout
    if isinstance(timeout, DefaultTimeout):
        given = params.get("connect_timeout")
        value = timeout.default if given is None else _dsn_connect_timeout(given, fail)
        if value != timeout:
            object.__setattr__(cfg, "connect_timeout", DefaultTimeout(value, timeout.default))


def _dsn_connect_timeout(text: str, fail: ConfigFail) -> float:
    """A DSN's ``connect_timeout`` as libpq reads it: whole seconds, 1 meaning 2."""
    if not re.fullmatch(r"\s*-?[0-9]+\s*", text):
        fail(f"the DSN's ?connect_timeout={text!r}: write whole seconds, as libpq reads it (or "
             "leave it out and give the pool's connect_timeout=, which takes fractions)")
    seconds = int(text)
    if seconds <= 0:
        fail(f"the DSN's ?connect_timeout={text!r} means no time limit to libpq, and a login "
             "must have one: write whole seconds > 0, or leave it out (the pool's "
             "connect_timeout applies)")
    return float(max(2, seconds))


def _check_code(cfg: PoolConfig, fail: ConfigFail) -> None:
    """The options that are code: the hooks, the credentials provider."""
    for hook in ("init", "setup"):
        if getattr(cfg, hook) is not None and not callable(getattr(cfg, hook)):
            fail(f"{hook}={getattr(cfg, hook)!r}: must be an async function taking the connection")
    if cfg.credentials is not None:
        _check_provider(cfg.credentials, fail)


def _check_provider(provider: object, fail: ConfigFail) -> None:
    """A credentials provider has what the pool calls (`CredentialProvider`): found missing only
    at `open()`, it was a bare AttributeError. (Whether a method returns an awaitable is known
    only when it is called: the connector says so for `password`.)"""
    name = type(provider).__name__
    if isinstance(provider, str):
        fail("credentials: give a provider, not a string: StaticPassword('...') for a fixed "
             "password (or put it in the DSN)")
    for method in ("password", "refresh", "warm", "close"):
        function = getattr(provider, method, None)
        if not callable(function):
            fail(f"credentials={name}: it has no {method}() method; a provider implements "
                 "asyncpool.CredentialProvider (async password, refresh, warm and close, and "
                 "requires_tls)")
    # Read without running a property (a provider's own bug there must show as its own).
    declared = inspect.getattr_static(provider, "requires_tls", None)
    if not (isinstance(declared, bool) or hasattr(declared, "__get__")):
        fail(f"credentials={name}: requires_tls must be True (a bearer token) or False (a "
             "password)")


def _ssl_context(value: object) -> bool:
    # (ssl imported only for a value that is no mode: asyncpg has imported it by then anyway)
    import ssl

    return isinstance(value, ssl.SSLContext)


def _not_whole(value: object) -> bool:
    return isinstance(value, bool) or not isinstance(value, int)


#: The largest float: an int past it overflows where the pool computes with it.
FLOAT_MAX = sys.float_info.max


def as_number(value: object) -> float | None:
    """`value` as the number the pool computes with (`PoolConfig`'s rule for times): an int or
    a float as it is, another real number (numpy's, a Decimal, a Fraction) as a float; None for
    anything else, a bool included (True is no time to a user); an int past a float's range
    as infinity. NaN stays, for the caller's range check (every comparison is False) to
    refuse."""
    if type(value) is float:
        return value
    if type(value) is int:
        # One past a float's range would overflow where it meets the clock: it means what
        # float("inf") does (no limit where None is one).
        return value if -FLOAT_MAX <= value <= FLOAT_MAX else math.inf if value > 0 else -math.inf
    if isinstance(value, bool) or not isinstance(value, numbers.Real | decimal.Decimal):
        return None
    try:
        return float(value)
    except (ValueError, OverflowError):  # a signalling NaN; an int too large for a float
        return None


#: The options that are real numbers (seconds; `lifetime_jitter` a fraction).
_REAL_OPTIONS = ("acquire_timeout", "connect_timeout", "max_lifetime", "lifetime_jitter",
                 "max_idle", "validate_after", "statement_cache_ttl", "leak_timeout",
                 "command_timeout")


def _as_floats(cfg: PoolConfig) -> None:
    """Each real-number option given as another number type (a numpy number, a Decimal...) as
    a float, which the pool adds to the loop's clock and gives asyncio's timers (a Decimal
    cannot be added to a float). What is no number is left for the checks to refuse."""
    for key in _REAL_OPTIONS:
        value = getattr(cfg, key)
        if value is None or type(value) is float or isinstance(value, DefaultTimeout) or (
                type(value) is int and -FLOAT_MAX <= value <= FLOAT_MAX):
            continue
        number = as_number(value)
        if number is not None:
            object.__setattr__(cfg, key, number)


def not_a_number(value: object) -> bool:
    """True unless `value` is an int or a float; True itself (an int to Python) is never a
    number of seconds to a user."""
    return isinstance(value, bool) or not isinstance(value, int | float)


#: asyncpg.connect's arguments that are text (a name, a path).
_TEXT_CONNECT_ARGS = ("user", "database", "passfile", "service", "servicefile",
                      "target_session_attrs", "krbsrvname", "gsslib")


def _check_connect_values(connect: Mapping[str, Any], fail: ConfigFail) -> None:
    """asyncpg.connect's address and identity arguments, checked here: asyncpg would take them
    and fail at each login with an error that names none of them."""
    for key in _TEXT_CONNECT_ARGS:
        value = connect.get(key)
        if value is not None and not isinstance(value, str):
            fail(f"{key}={value!r}: must be a string")
    password = connect.get("password")
    if password is not None and not isinstance(password, str):  # (its value is never shown)
        fail(f"password: must be a string, not {type(password).__name__} (for a password or "
             "token that changes, give credentials=, a provider awaited at each login)")
    host = connect.get("host")
    hosts = [host] if isinstance(host, str) else host
    if host is not None and not (isinstance(hosts, list | tuple) and hosts
                                 and all(isinstance(h, str) and h for h in hosts)):
        fail(f"host={host!r}: must be a host name, an address or a socket directory, or a "
             "list of them")
    if isinstance(host, str) and "," in host and not host.startswith("/"):
        # asyncpg splits a list only in a DSN or PGHOST: it would dial one host named so.
        fail(f"host={host!r}: asyncpg takes a host= string as one host name, not a list; "
             f"pass host={[h.strip() for h in host.split(',')]!r} (ports: port=[...], one per "
             "host) or name the hosts in the DSN (postgresql://user@h1:5432,h2:5432/db)")
    port = connect.get("port")
    ports = port if isinstance(port, list | tuple) else [port]
    if port is not None and not (ports and all(_port_number(p) for p in ports)):
        fail(f"port={port!r}: must be a port number from 1 to 65535 (or a list of them, one "
             "per host)")
    size = connect.get("max_cacheable_statement_size")
    if size is not None and (not isinstance(size, numbers.Real) or isinstance(size, bool)
                             or not float(size) >= 0):
        fail(f"max_cacheable_statement_size={size!r}: must be a number of bytes >= 0 "
             "(0: no limit)")


def statement_cache_args(cfg: PoolConfig) -> dict[str, float]:
    """asyncpg.connect's statement cache arguments, set from the pool's own options (the
    connector passes them over any in `connect_kwargs`)."""
    if cfg.prepared_statements == "on":
        return {"statement_cache_size": cfg.statement_cache_size,
                "max_cached_statement_lifetime": cfg.statement_cache_ttl or 0}
    # "unnamed" too: it keeps unnamed statements itself, never asyncpg's named ones.
    return {"statement_cache_size": 0}


#: The pool's option behind each of `statement_cache_args`.
_CACHE_OPTIONS = {"statement_cache_size": "statement_cache_size",
                  "max_cached_statement_lifetime": "statement_cache_ttl"}


def _check_overridden_connect_args(cfg: PoolConfig, fail: ConfigFail) -> None:
    """A `connect_kwargs` argument the pool sets itself (`statement_cache_args`, and
    ``command_timeout`` when the option is given too), given with another value, would be
    overridden without a word (the same value, such as asyncpg's
    ``statement_cache_size=0`` behind PgBouncer outside the "on" mode, is what the pool sends
    anyway)."""
    given = cfg.connect_kwargs.get("command_timeout")
    if (cfg.command_timeout is not None and given is not None
            and given != cfg.command_timeout):
        fail(f"command_timeout is given twice and the two disagree: command_timeout="
             f"{cfg.command_timeout!r} and connect_kwargs['command_timeout']={given!r}; give it "
             "once (the pool does not pick one)")
    for key, value in statement_cache_args(cfg).items():
        if key in cfg.connect_kwargs and cfg.connect_kwargs[key] != value:
            fail(f"connect_kwargs[{key!r}]={cfg.connect_kwargs[key]!r}: the pool sets it to "
                 f"{value!r} (prepared_statements={cfg.prepared_statements!r}); to change it, "
                 f"give {_CACHE_OPTIONS[key]}= to the pool, with prepared_statements='on'")


def _port_number(value: object) -> bool:
    if isinstance(value, str) and value.isascii() and value.isdigit():
        value = int(value)
    return isinstance(value, int) and not isinstance(value, bool) and 1 <= value <= 65535


def _check_server_settings(settings: object, fail: ConfigFail) -> None:
    if settings is None:
        return
    if not isinstance(settings, Mapping):
        fail(f"server_settings: must be a mapping of setting names to values, not a "
             f"{type(settings).__name__}")
        return
    for key, value in settings.items():
        # asyncpg sends them as text and fails at login otherwise, as a connect error.
        if not isinstance(key, str) or not isinstance(value, str):
            fix = ("leave the setting out" if value is None
                   else f"write {{{str(key)!r}: {str(value)!r}}}")
            fail(f"server_settings: {key!r}: {value!r}: names and values must be strings "
                 f"({fix})")


def _settings_from_connect_kwargs(cfg: PoolConfig, fail: ConfigFail) -> None:
    """``connect_kwargs["server_settings"]`` (asyncpg.connect's spelling) taken into the
    `server_settings` option, so that it is planned as the option is (behind a pooler too) and
    never replaced by the settings the pool sends at login. The two must agree where both give
    a setting; asyncpg merges its DSN's settings under it, and the pool does the same
    (`_check_dsn_settings`)."""
    given = cfg.connect_kwargs.get("server_settings")
    if given is None:
        return
    _check_server_settings(given, lambda message: fail(
        "connect_kwargs['server_settings']" + message.removeprefix("server_settings")))
    option = dict(cfg.server_settings or {})
    by_name = {name.lower(): name for name in option}
    for name, value in given.items():
        other = by_name.get(name.lower())
        if other is not None and option[other] != value:
            fail(f"the setting {name!r} is given twice and the two disagree: "
                 f"connect_kwargs['server_settings'][{name!r}]={value!r} and server_settings"
                 f"[{other!r}]={option[other]!r}; give it once (the pool does not pick one)")
    merged = {name: value for name, value in given.items() if name.lower() not in by_name}
    merged.update(option)
    object.__setattr__(cfg, "server_settings", merged)
    object.__setattr__(cfg, "connect_kwargs", {key: value for key, value in
                                               cfg.connect_kwargs.items()
                                               if key != "server_settings"})


def _check_dsn_settings(cfg: PoolConfig) -> None:
    """The DSN's run-time settings (``?search_path=app``) and the `server_settings` option's
    must agree where both give one (`combined` says which, when they do not)."""
    if not cfg.server_settings or not isinstance(cfg.dsn, str):
        return
    from asyncpool.connect.startup import combined  # (it imports nothing of the pool's)

    try:
        from_dsn = parse_dsn(cfg.dsn).setting_values()
    except DsnError:
        return  # (refused already, by `_check_libpq_keys`)
    combined(from_dsn, cfg.server_settings, cfg.name)


def _check_root_cert(cfg: PoolConfig, fail: ConfigFail) -> None:
    if cfg.ssl_root_cert is not None and not isinstance(cfg.ssl_root_cert,
                                                        str | bytes | os.PathLike):
        fail(f"ssl_root_cert={cfg.ssl_root_cert!r}: must be the path of one CA bundle file (a "
             f"string), or 'system', not a {type(cfg.ssl_root_cert).__name__}")
    if (cfg.ssl_root_cert is not None and cfg.ssl_root_cert != "system"
            and not os.path.exists(cfg.ssl_root_cert)):
        fail(f"ssl_root_cert={cfg.ssl_root_cert!r}: no such file")


def _check_flags(cfg: PoolConfig, fail: ConfigFail) -> None:
    if not isinstance(cfg.name, str) or not cfg.name:
        fail(f"name={cfg.name!r}: must be a non-empty string")
    for flag in ("allow_unprotected_credentials", "allow_iam_without_tls", "telemetry"):
        value = getattr(cfg, flag)
        # Strictly True or False: "false" is a true value in Python, and a switch that lets
        # credentials travel unprotected must not turn on by a string meant to turn it off.
        if not isinstance(value, bool):
            hint = (f" (a string is not read as one: write True or False, not {value!r}; the "
                    f"{ENV_PREFIX}{flag.upper()} variable takes true/false text)"
                    if isinstance(value, str) else "")
            fail(f"{flag}={value!r}: must be True or False{hint}")
