"""The exceptions asyncpool raises. Every message names the pool and says what to fix."""

from __future__ import annotations


class PoolError(Exception):
    """Base class of every asyncpool error."""


class PoolConfigError(PoolError, ValueError):
    """An option has a value the pool cannot use."""


class PoolClosedError(PoolError):
    """The pool is closed (or closing) and hands out no more connections."""


class PoolTimeoutError(PoolError, TimeoutError):
    """No connection became available within the acquire timeout."""


class ConnectionLeakedError(PoolError):
    """The connection was held past `leak_timeout` and reclaimed by the pool."""


class ConnectError(PoolError):
    """A new connection could not be opened. `__cause__` holds the driver's error."""

    #: True when retrying later may succeed (server starting, pooler full, network blip).
    transient: bool = True


class AuthenticationError(ConnectError):
    """The server refused the credentials (wrong password, expired token or secret)."""

    transient = False


class PoolerExhaustedError(ConnectError):
    """The pooler or server refused the login because it has no client slots left."""


class ConnectionLostError(PoolError):
    """The connection broke while in use (server restart, network loss); the slot was restored."""


class StaleStatementError(PoolError):
    """A reused statement's rows could not be decoded (``prepared_statements="unnamed"``):
    a result column was retyped to a type asyncpg reads only as text, and the server sent it in
    binary. It ran and was not re-run; the connection is replaced when released, and the next
    call describes the statement afresh."""

    #: False when the server refused the statement before running it; True when it may have run.
    may_have_run: bool = True
    #: The statement's text (never in the message: it may hold literals).
    query: str | None = None


class CredentialsError(PoolError):
    """A credentials provider could not produce a password (no AWS credentials, bad secret...)."""
