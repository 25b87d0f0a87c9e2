"""The exceptions asyncpool raises. Every message names the pool and says what to fix."""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from types import TracebackType
from typing import NoReturn, ParamSpec, TypeVar

_P = ParamSpec("_P")
_R = TypeVar("_R")


class PoolError(Exception):
    """Base class of every asyncpool error."""


class PoolConfigError(PoolError, ValueError):
    """An option has a value the pool cannot use."""


#: How a check refuses an option: raises `PoolConfigError` with the message, never returns.
ConfigFail = Callable[[str], NoReturn]


def config_fail(pool_name: str) -> ConfigFail:
    """The `ConfigFail` of pool `pool_name`: its errors read ``pool 'orders': <message>``."""

    def fail(message: str) -> NoReturn:
        raise PoolConfigError(f"pool {pool_name!r}: {message}")

    return fail


class PoolClosedError(PoolError):
    """The pool is closed (or closing) and hands out no more connections."""


class PoolTimeoutError(PoolError, TimeoutError):
    """No connection became available within the acquire timeout."""


class ConnectionLeakedError(PoolError):
    """The connection was held past `leak_timeout` and reclaimed by the pool."""


class ConnectError(PoolError):
    """A new connection could not be opened.

    The driver's error is not kept as `__cause__` (its frames hold the password, and error
    trackers record frame locals): what matters of it is copied into `sqlstate` and
    `driver_error_class`, and its message, with secrets scrubbed, into this one's.
    """

    #: True when retrying later may succeed (server starting, pooler full, network blip).
    transient: bool = True
    #: The server's SQLSTATE (``"28P01"``...), when the driver's error had one.
    sqlstate: str | None = None
    #: The driver error's qualified class name (``"asyncpg.exceptions.InvalidPasswordError"``).
    driver_error_class: str | None = None


class AuthenticationError(ConnectError):
    """The server refused the login (wrong password, expired token or secret, unknown role)."""

    transient = False


class PoolerExhaustedError(ConnectError):
    """The pooler or server refused the login because it has no client slots left."""


class ConnectionLostError(PoolError):
    """The connection broke while in use (server restart, network loss); the slot was restored."""


class TransactionRolledBackError(PoolError):
    """``pool.transaction()``'s COMMIT was answered ROLLBACK: a statement in the block failed
    and its error was caught inside the block, so nothing the block did was committed."""


class StaleStatementError(PoolError):
    """A statement's rows could not be decoded with its description. With
    ``prepared_statements="unnamed"``: a reused statement's result column was retyped to a type
    asyncpg reads in the other format than the rows came in, and the server did not turn the
    values (refused, or no answer within the timeout), or a prepared statement's ``fetchmany``
    met a changed result. On asyncpg's own path (``"off"``): a migration landed between asyncpg's
    describe and its run, and the rows did not fit (asyncpg's error is the cause). It ran and
    was not re-run; the next call describes the statement afresh."""

    #: False when the server refused the statement before running it; True when it may have run.
    may_have_run: bool = True
    #: The statement's text (never in the message: it may hold literals).
    query: str | None = None


class CredentialsError(PoolError):
    """A credentials provider could not produce a password (no AWS credentials, bad secret...)."""


class CredentialsUnavailableError(CredentialsError, ConnectError):
    """A credentials provider failed with a network error or a timeout (`OSError`,
    `TimeoutError`): retried with backoff, as a connection error is, within the acquire's time."""


class AuthMethodRefusedError(ConnectError):
    """The server asked for an authentication method the pool does not allow on this connection
    (a cleartext or MD5 password where the server's certificate is not verified, or a method
    `require_auth` leaves out). Nothing was sent. Not retried: the same server asks again."""

    transient = False
    #: The method asked for, as libpq's ``require_auth`` names it (``"password"``, ``"md5"``...).
    method: str = "password"


def config_errors_without_frames(function: Callable[_P, _R]) -> Callable[_P, _R]:
    """`function`, raising its errors with nothing chained to them and with a traceback that
    starts here: the frames they came through hold the DSN, the password or the environment
    (``PGPASSWORD``, AWS session tokens) as locals, which error trackers record. The message says
    what to fix. For the public calls that take them (`Pool()`, `PoolConfig.from_env()`...).

    Any `Exception`, not only `PoolConfigError`: a mistake the checks did not foresee (a
    misspelt keyword's `TypeError`) came through the same frames. For those, the frames of the
    caller's own code it was raised in (a credentials provider's property...) are kept: the bug
    may be there."""

    @functools.wraps(function)
    def checked(*args: _P.args, **kwargs: _P.kwargs) -> _R:
        try:
            return function(*args, **kwargs)
        except Exception as exc:  # (raised again below, without asyncpool's frames)
            error = exc
        del args, kwargs  # this frame starts the traceback: nothing of the call in it
        error.__cause__ = error.__context__ = None
        error.__suppress_context__ = True
        kept = None if isinstance(error, PoolConfigError) else _callers_frames(error.__traceback__)
        raise error.with_traceback(kept)

    return checked


def _callers_frames(tb: TracebackType | None) -> TracebackType | None:
    """The entries of `tb` in code that is neither asyncpool's nor the standard library's (nor
    generated, as a dataclass's ``__init__``), linked anew: the others hold what the call was
    given as locals."""
    import sysconfig  # (only when such an error happens)

    ours = os.path.dirname(os.path.abspath(__file__)) + os.sep
    paths = sysconfig.get_paths()
    stdlib = tuple({paths["stdlib"] + os.sep, paths["platstdlib"] + os.sep})
    kept: list[TracebackType] = []
    while tb is not None:
        filename = tb.tb_frame.f_code.co_filename
        if not (filename.startswith((ours, *stdlib)) or filename.startswith("<")):
            kept.append(tb)
        tb = tb.tb_next
    linked = None
    for entry in reversed(kept):
        linked = TracebackType(linked, entry.tb_frame, entry.tb_lasti, entry.tb_lineno)
    return linked


def missing_dependency(exc: ModuleNotFoundError, module: str, install: str) -> ModuleNotFoundError:
    """What `module` raises when a package it imports is not installed: the missing package and the
    pip argument that brings it (``'asyncpool-pg[fastapi]'``), where Python alone would say only
    "No module named 'starlette'". Raise it ``from`` `exc`."""
    needed = (f"{exc.name}, which is not installed" if exc.name
              else f"a package that is not installed ({exc})")
    return ModuleNotFoundError(f"{module} needs {needed}: pip install {install}", name=exc.name)
