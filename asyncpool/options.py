"""The keyword options of `Pool()` and `create_pool()`: asyncpool's own, asyncpg's pool and
connect options with asyncpg's meaning, and the environment's ``ASYNCPOOL_*`` defaults.

asyncpg's options either map onto an asyncpool option (``timeout`` is `connect_timeout`,
``max_inactive_connection_lifetime`` is `max_idle`...), go to `asyncpg.connect` unchanged
(``record_class``, ``host``...), or do not fit, and are refused with the asyncpool way to get
the same. Unknown names are refused with the closest valid one.
"""

from __future__ import annotations

import difflib
import enum
import numbers
import os
from collections.abc import Mapping, Sequence
from dataclasses import fields
from typing import TYPE_CHECKING, Any, Literal, get_args

from asyncpool.config import (
    FLOAT_MAX,
    InitHook,
    PoolConfig,
    SetupHook,
    as_number,
)
from asyncpool.config_options import PoolSettings
from asyncpool.errors import PoolConfigError

if TYPE_CHECKING:

    import asyncpg

    from asyncpool.credentials.provider import CredentialProvider


class PoolOptionsWithoutRows(PoolSettings, total=False):
    """`PoolOptions` but ``record_class`` and the hooks given its rows (``init``, ``setup``),
    which `Pool()` and `create_pool()` name on their own: type checkers then give the pool's
    rows that class (``Pool[Row]``), and its hooks connections of them. asyncpool's own
    options (`PoolSettings`: PoolConfig's fields but dsn and the hooks), and asyncpg's."""

    # asyncpg's names for asyncpool options
    timeout: float
    max_inactive_connection_lifetime: float
    max_cached_statement_lifetime: float
    # asyncpg.connect's, passed on to it
    connection_class: type[asyncpg.Connection]
    host: str | Sequence[str]
    port: int | Sequence[int]
    user: str
    password: str
    passfile: str
    database: str
    service: str
    servicefile: str
    direct_tls: bool
    target_session_attrs: str
    krbsrvname: str
    gsslib: str
    max_cacheable_statement_size: int


class PoolOptionsWithoutRecordClass(PoolOptionsWithoutRows, total=False):
    """`PoolOptions` but ``record_class``."""

    init: InitHook | None
    setup: SetupHook | None


class PoolOptions(PoolOptionsWithoutRecordClass, total=False):
    """Every keyword option `Pool()` and `create_pool()` take (see `PoolConfig` for each of
    asyncpool's own; the asyncpg ones have asyncpg's meaning, see docs/migration.md)."""

    # asyncpg.connect's, passed on to it
    record_class: type[asyncpg.Record]


class _NotGiven:
    """The type of `NOT_GIVEN`: a default that says what it means where a signature is shown
    (``help(Pool)``, IDEs), and stays itself when copied or pickled with the arguments (a bare
    ``object()`` showed as ``<object object at 0x...>``, and a deep copy of it was refused as
    a record class)."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "<not given: asyncpg.Record, or config's record_class>"

    def __reduce__(self) -> str:
        return "NOT_GIVEN"  # copy, deepcopy and pickle give back the module's own


#: The default of `Pool()`'s ``record_class``: not given (asyncpg's Record then, or the one
#: `config` names).
NOT_GIVEN: Any = _NotGiven()


def with_record_class(options: Mapping[str, Any], record_class: object) -> Mapping[str, Any]:
    """`options` with ``record_class``, which `Pool()` takes on its own (typed: ``Pool[Row]``),
    if it was given; `resolve` checks it with the others."""
    return options if record_class is NOT_GIVEN else {**options, "record_class": record_class}

#: asyncpg.connect's options that mean the same to asyncpool: given to asyncpg.connect as they are.
CONNECT_OPTIONS = frozenset({
    "record_class", "connection_class", "host", "port", "user", "password", "passfile",
    "database", "service", "servicefile", "direct_tls", "target_session_attrs", "krbsrvname",
    "gsslib", "max_cacheable_statement_size",
})

#: asyncpg's names of asyncpool options (0 means "no limit" in asyncpg, None in asyncpool).
RENAMED = {
    "timeout": "connect_timeout",
    "max_inactive_connection_lifetime": "max_idle",
    "max_cached_statement_lifetime": "statement_cache_ttl",
}
_ZERO_IS_NONE = frozenset({"max_inactive_connection_lifetime", "max_cached_statement_lifetime"})

#: asyncpg options with no asyncpool meaning, and what to use instead.
UNFIT = {
    "connect": "asyncpool opens its connections itself (credentials, TLS, retries); give a "
               "rotating password with credentials=, asyncpg.connect options as keywords "
               "(or connect_kwargs=), and per-connection set-up with init=",
    "reset": "asyncpool resets a returned connection itself, with no round trip unless it is "
             "needed (ROLLBACK of an open transaction, UNLISTEN * after LISTEN); run per-checkout "
             "statements in setup= (direct connections), or, behind a transaction-mode pooler, "
             "in the transaction (SET LOCAL, pool.transaction())",
    # (Pool() and create_pool() take loop=: `asyncpool.pool.given_loop`; lambda_config() not.)
    "loop": "a pool uses the event loop it is opened on: open it from the loop that uses it "
            "(see asyncpool.integrations.lambda_runner), or give loop= to Pool() or "
            "create_pool(), which check it when the pool opens",
}

#: psycopg_pool's AsyncConnectionPool options that asyncpool does not take, and its way to get
#: the same: the closest spelling of one of asyncpool's would mislead (``max_waiting`` is not
#: ``max_lifetime``). Its other names mean the same here (sizes, max_idle, max_lifetime, name),
#: but for ``timeout``, asyncpg's connect timeout (psycopg_pool's is acquire_timeout).
PSYCOPG_POOL = {
    "conninfo": ("the DSN is the first argument (dsn=): the same string, a postgresql:// URL "
                 "or libpq's key=value form (host=... dbname=...)"),
    "kwargs": "give asyncpg.connect's arguments as keywords, or as connect_kwargs=",
    "open": "Pool() does not open: `await pool.open()` or `async with Pool(...)` does; "
            "create_pool() returns a pool that `await` opens",
    "configure": "init= is awaited once with each new connection",
    "check": "validate_after= (seconds) checks a connection idle longer than this before it is "
             "handed out (0: at every checkout)",
    "max_waiting": "callers queue without a limit; each waits at most acquire_timeout= and then "
                   "gets PoolTimeoutError",
    "reconnect_timeout": "a failed login is retried with backoff within each caller's "
                         "acquire_timeout=",
    "reconnect_failed": "callers get the ConnectError of the failed logins; pool.stats() and "
                        "the observers see them",
    "num_workers": "asyncpool has no worker tasks: connections are opened by the acquire() "
                   "that needs one (min_size's by open() and housekeeping)",
}

_OWN = frozenset(f.name for f in fields(PoolConfig)) - {"dsn"}
#: Every name Pool() takes as a keyword option.
VALID = sorted(_OWN | CONNECT_OPTIONS | set(RENAMED) | {"config", "observers"})


def _refuse_unfit(key: str, value: Any) -> None:
    if value is not None:  # None: asyncpg's default, which asks for nothing (code passing it on)
        raise PoolConfigError(f"{key}=: not an asyncpool option; {UNFIT[key]}")


def translate(options: Mapping[str, Any], where: str = "Pool()") -> dict[str, Any]:
    """`options` as `PoolConfig` fields: asyncpg's names mapped, connect options moved into
    ``connect_kwargs``; unknown and unfit names refused with `PoolConfigError` (`where`: the
    call that was given them, for the message)."""
    values: dict[str, Any] = {}
    connect: dict[str, Any] = {}
    for key, value in options.items():
        if key in _OWN:
            if key == "statement_cache_size" and _cache_off(value):
                continue  # asyncpg's advice behind poolers, below
            values[key] = value
        elif key in CONNECT_OPTIONS:
            connect[key] = value
        elif key in RENAMED:
            # (False is no number of seconds: left for the checks to refuse.)
            zero = key in _ZERO_IS_NONE and value == 0 and not isinstance(value, bool)
            values[RENAMED[key]] = None if zero else value
        elif key in UNFIT:
            _refuse_unfit(key, value)
        elif key in ("config", "observers"):
            raise PoolConfigError(f"{key}=: an argument of Pool(), not an option of {where}")
        else:
            raise PoolConfigError(f"{key}=: not an option of {where}{_advice(key)}")
    for renamed, own in RENAMED.items():
        if renamed in options and own in options:
            raise PoolConfigError(f"{renamed}= and {own}= are the same option: give one")
    if _cache_off(options.get("statement_cache_size")):
        _statement_cache_off(options, values)
    if connect:
        check_connect_classes(connect)
        values["connect_kwargs"] = {**options.get("connect_kwargs", {}), **connect}
    return values


def _cache_off(size: object) -> bool:
    """asyncpg's ``statement_cache_size=0``: the int (a float or False is no size: refused)."""
    return isinstance(size, numbers.Integral) and not isinstance(size, bool) and size == 0


def _statement_cache_off(options: Mapping[str, Any], values: dict[str, Any]) -> None:
    """asyncpg's ``statement_cache_size=0`` (no named prepared statements, the usual advice
    behind PgBouncer) is ``prepared_statements="off"``."""
    mode = options.get("prepared_statements", "off")
    if mode != "off":
        raise PoolConfigError(
            f"statement_cache_size=0 with prepared_statements={mode!r}: statement_cache_size=0 "
            "is asyncpg's way to say prepared_statements='off'; give one of them. Behind a "
            "pooler, prepared_statements='unnamed' (the default) is also safe and one round "
            "trip per query; 'on' needs PgBouncer >= 1.21 with max_prepared_statements > 0"
        )
    values["prepared_statements"] = "off"


def check_connect_classes(connect: Mapping[str, Any]) -> None:
    """Refuse a `record_class` or `connection_class` that is not asyncpg's kind (None too, as
    asyncpg does), here rather than at each login."""
    import asyncpg

    for key, base in (("record_class", asyncpg.Record), ("connection_class", asyncpg.Connection)):
        value = connect.get(key, base)
        if not (isinstance(value, type) and issubclass(value, base)):
            raise PoolConfigError(
                f"{key}={value!r}: must be a subclass of {base.__module__}.{base.__qualname__}")


def _advice(name: str) -> str:
    if name in PSYCOPG_POOL:
        return f" (psycopg_pool's); {PSYCOPG_POOL[name]}"
    close = difflib.get_close_matches(name, VALID, n=1, cutoff=0.6)
    return f"; did you mean {close[0]}=?" if close else "; see PoolConfig for the options"


def resolve(dsn: str | None, config: PoolConfig | None, options: Mapping[str, Any],
            environ: Mapping[str, str] | None = None) -> PoolConfig:
    """The `PoolConfig` of ``Pool(dsn, config=config, **options)``.

    Without `config`, ``ASYNCPOOL_*`` variables give the defaults (``ASYNCPOOL_DSN`` the DSN
    when `dsn` is None) and arguments win; a given `config` is used as it is, with `options`
    applied over it.
    """
    values = translate(options)
    if dsn is not None:
        values["dsn"] = dsn
    if config is not None:
        if "connect_kwargs" in values and "connect_kwargs" not in options:
            values["connect_kwargs"] = {**config.connect_kwargs, **values["connect_kwargs"]}
        return config.replace(**values) if values else config
    return PoolConfig.from_env(os.environ if environ is None else environ, **values)


#: What `Pool.set_connect_args()` replaces, as asyncpg's does: the DSN and the arguments of
#: asyncpg's ``connect()`` (``timeout`` is the pool's ``connect_timeout``, kept if not given).
#: ``record_class`` and ``connection_class`` are the pool's, in asyncpg's pool as here.
_POOL_CLASSES = frozenset({"record_class", "connection_class"})
CONNECT_ARGS = (CONNECT_OPTIONS - _POOL_CLASSES) | {"ssl", "server_settings", "command_timeout",
                                                   "timeout"}


class Keep(enum.Enum):
    """`with_connect_args`'s `credentials` when none is given: the pool's stays."""

    KEEP = "keep"


def with_connect_args(config: PoolConfig, dsn: str | None, connect_kwargs: Mapping[str, Any],
                      credentials: CredentialProvider | Keep | None = Keep.KEEP) -> PoolConfig:
    """`config` with its connection arguments replaced by `dsn` and `connect_kwargs`, as
    asyncpg's ``Pool.set_connect_args()`` replaces them (every one given before goes); the
    pool's own options stay, but for `credentials` if given (None: none, the password given
    logs in). Checked here: `PoolConfigError` for anything else, and for a password given
    beside a provider (the provider's would be used and the password dropped unseen)."""
    refused = sorted(set(connect_kwargs) - CONNECT_ARGS)
    if refused:
        names = ", ".join(f"{name}=" for name in refused)
        raise PoolConfigError(
            f"pool {config.name!r}: set_connect_args({names}): not a connection argument. It "
            f"takes the DSN and asyncpg's connect() arguments ({', '.join(sorted(CONNECT_ARGS))}); "
            "the pool's own options are fixed when it is created: create a new pool to change them")
    kept = {k: v for k, v in config.connect_kwargs.items() if k in _POOL_CLASSES}
    provider = config.credentials if credentials is Keep.KEEP else credentials
    base = config.replace(dsn=None, connect_kwargs=kept, ssl=None, server_settings=None,
                          command_timeout=None, credentials=provider)
    new = resolve(dsn, base, connect_kwargs)
    if provider is not None and (where := _password_given(new, connect_kwargs)) is not None:
        how = "kept from before" if credentials is Keep.KEEP else "given with it"
        raise PoolConfigError(
            f"pool {config.name!r}: set_connect_args() was given a password ({where}), but the "
            f"pool logs in with credentials={type(provider).__name__} ({how}): the "
            "provider's password would be used and this one dropped. To log in with the "
            "password, pass credentials=None with it; to rotate a provider's, pass the new "
            "provider as credentials= (for example StaticPassword(...)) and leave the password "
            "out")
    return new


def _password_given(config: PoolConfig, connect_kwargs: Mapping[str, Any]) -> str | None:
    """Where `set_connect_args` was given a password, if it was: ``password=`` or the DSN's."""
    if connect_kwargs.get("password"):
        return "password="
    if config.dsn:
        from asyncpool.connect.dsn import parse_dsn

        if parse_dsn(config.dsn).password:
            return "in the DSN"
    return None


def check_timeout(pool_name: str, what: str, timeout: Any,
                  none: str = "no limit") -> float | None:
    """`timeout` (given to `what`) as the pool computes with it (`in_seconds`): None (meaning
    `none`) or seconds >= 0 (`PoolConfig`'s rule for times); else `PoolConfigError`."""
    if type(timeout) is float:  # the usual first
        if timeout >= 0:  # (False for NaN)
            return timeout
    elif type(timeout) is int and 0 <= timeout <= FLOAT_MAX:  # (past it: infinity, below)
        return timeout
    error = timeout_error(pool_name, what, timeout, none)
    if error is not None:
        raise error
    return in_seconds(timeout)


def in_seconds(timeout: Any) -> float | None:
    """A checked `timeout` (None or seconds >= 0) as the pool computes with it: an int or a float
    as it is, another real number (a numpy number, a Decimal, a Fraction) as a float, which can
    be added to the loop's clock and given to asyncio's timers."""
    return None if timeout is None else as_number(timeout)


def check_statement_timeout(pool_name: str | None, what: str, timeout: Any) -> None:
    """Raise `PoolConfigError` for a statement's ``timeout=`` (given to `what`, such as
    ``fetchval``) that is not seconds >= 0, before anything is sent. Called only for a
    timeout that is not None (None is the pool's `command_timeout`), off the query path.

    asyncpg itself runs the statement with NaN (no limit, and a NaN timer in the event loop's
    schedule) and with a numeric string or bytes (``"5"``), raises TimeoutError at once for a
    negative one (indistinguishable from a statement that ran out of time), and refuses the
    rest late (``True``, a list) or, for ``copy_records_to_table``, only after sending its
    introspection query. ``inf`` is no limit, as for every time limit of the pool; 0 is
    asyncpg's: no time at all (TimeoutError, nothing sent). Any real number is taken
    (`PoolConfig`'s rule for times: a numpy number, a Decimal, a Fraction), as asyncpg reads
    it with ``float()``; asyncpg gets it as it was given."""
    if type(timeout) is float:  # the usual: no ABC lookup
        if timeout >= 0:  # (False for NaN)
            return
    elif type(timeout) is int:
        if 0 <= timeout <= FLOAT_MAX:  # (asyncpg's float() overflows past it)
            return
    elif _seconds(timeout):
        return
    whose = "" if pool_name is None else f"pool {pool_name!r}: "
    past = (" within a float's range (float('inf') for no limit,"
            if type(timeout) is int and timeout > 0 else " (or")
    raise PoolConfigError(
        f"{whose}{what}(timeout={timeout!r}): must be a number of seconds >= 0{past} None "
        "for the pool's command_timeout); nothing was sent")


#: The most rows one cursor fetch, move or prefetch may count: PostgreSQL reads the count as a
#: 32-bit integer (the Execute message's row limit, FETCH's and MOVE's count).
MAX_ROW_COUNT = 2**31 - 1


def check_row_count(what: str, name: str, count: object) -> None:
    """Raise `PoolConfigError` for a cursor's row count (`name` given to `what`: ``prefetch=``
    of ``cursor()``, ``n`` of ``Cursor.fetch()`` or ``forward()``) that is not a whole number
    from 1 to `MAX_ROW_COUNT`, before anything is sent. asyncpg took ``True`` and ``1.5``,
    failed a string or None with a bare TypeError ("'<=' not supported"), NaN with a
    ValueError, and past 32 bits a ``prefetch`` closed the connection (and its transaction)
    with an OverflowError, a ``forward()`` sent a MOVE the server refused as a syntax error,
    which aborted the transaction."""
    if type(count) is int and 1 <= count <= MAX_ROW_COUNT:
        return
    raise PoolConfigError(
        f"{what}({name}={count!r}): must be a whole number of rows from 1 to {MAX_ROW_COUNT} "
        "(PostgreSQL reads a 32-bit count); nothing was sent")


def _seconds(timeout: object) -> bool:
    """Whether `timeout` is a real number of seconds >= 0 (`PoolConfig`'s rule for times)."""
    number = as_number(timeout)
    return number is not None and number >= 0  # (False for NaN)


#: What `timeout_error` adds for a connection given back anyway.
GIVEN_BACK = "; the connection was given back all the same, within the pool's limit"


def timeout_error(pool_name: str, what: str, timeout: Any, none: str = "no limit",
                  done: str = "") -> PoolConfigError | None:
    """`check_timeout`'s error, returned, for a call that does its work with its default time
    limit before raising it (`done` says so): one that gives something back (a connection, the
    pool's connections) must not keep it for a typo. Without an error, `in_seconds` gives the
    value to compute with."""
    if timeout is None or _seconds(timeout):
        return None
    return PoolConfigError(
        f"pool {pool_name!r}: {what}={timeout!r}: must be a number of seconds >= 0 "
        f"(or None for {none}){done}"
    )


#: What ``pool.transaction(isolation=...)`` takes: asyncpg's names of PostgreSQL's levels.
Isolation = Literal["read_committed", "read_uncommitted", "repeatable_read", "serializable"]
ISOLATION_LEVELS: tuple[Isolation, ...] = get_args(Isolation)


def check_transaction_options(pool_name: str, isolation: Any, readonly: Any,
                              deferrable: Any) -> None:
    """Raise `PoolConfigError` for ``pool.transaction()`` options asyncpg would misread or refuse
    only once a connection is taken: ``readonly="no"`` is a true value to asyncpg. What asyncpg
    reads as it is meant stays accepted (``readonly=1``, a numpy bool, ``isolation=""``)."""
    if isolation and isolation not in ISOLATION_LEVELS:
        raise PoolConfigError(
            f"pool {pool_name!r}: transaction(isolation={isolation!r}): must be one of "
            f"{', '.join(map(repr, ISOLATION_LEVELS))}, or None for the server's default")
    for name, value in (("readonly", readonly), ("deferrable", deferrable)):
        if isinstance(value, str | bytes):
            raise PoolConfigError(
                f"pool {pool_name!r}: transaction({name}={value!r}): must be True or False (a "
                "string is not read as one: asyncpg takes any non-empty one for True)")
