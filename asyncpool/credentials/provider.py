"""Where the password of each new connection comes from."""

from __future__ import annotations

import os
from typing import Protocol, runtime_checkable

from asyncpool.connect.dsn import Target
from asyncpool.errors import CredentialsError


@runtime_checkable
class CredentialProvider(Protocol):
    """Something the pool awaits for the password of every **new** connection.

    `password` is called once per connection attempt with the host, port, user and database
    dialled (with several hosts, the first one's: asyncpg asks once per host tried without
    saying which, so a provider whose credential is bound to a host, ``requires_tls``, is
    refused beside several hosts unless it has a ``token_host``). When the server rejects the
    login as an authentication failure, the pool calls `refresh` and, if it returns True, tries
    once more with a fresh `password`.

    A provider may also define ``auth_failure_hint(target) -> str``: what to check when its
    credentials are refused for good; the pool adds it to the `AuthenticationError`.
    Nothing a provider returns or raises may contain the secret itself.
    """

    #: True when the credential is sent as it is (a bearer token: an IAM token goes as a
    #: cleartext password message), so it needs verified TLS even to this machine. False for a
    #: password, which may also go to a local server without TLS, used there only for SCRAM.
    #: Either way, other servers need ``verify-full`` (docs/credentials-and-tls.md).
    requires_tls: bool

    async def password(self, target: Target) -> str: ...

    async def refresh(self, target: Target) -> bool: ...

    async def warm(self, target: Target) -> None:
        """Do the expensive set-up now (Lambda INIT phase) rather than on the first connect.

        A subclass that has none to do may leave it out (this one does nothing)."""
        return None

    async def close(self) -> None:
        """Release what the provider holds (an AWS client): at `pool.close()`, and when an
        `open()` fails or is cancelled, after which the next `open()` calls `warm` again."""


@runtime_checkable
class ExplainsAuthFailure(Protocol):
    """A provider that can say what to check when its credentials are refused."""

    def auth_failure_hint(self, target: Target) -> str: ...


@runtime_checkable
class Preloads(Protocol):
    """A provider that can import what its first connection needs ahead of time (Lambda INIT)."""

    def preload(self) -> None: ...


def auth_failure_hint(provider: object, target: Target) -> str | None:
    """The provider's advice for a refused login, if it has any."""
    if isinstance(provider, ExplainsAuthFailure):
        return provider.auth_failure_hint(target)
    return None


class StaticPassword:
    """A fixed password (self-hosted PgBouncer with SCRAM-SHA-256). Never shown in reprs."""

    requires_tls = False

    def __init__(self, password: str) -> None:
        # Refused here: at each login an int or bytes failed inside asyncpg's SCRAM ("Expected
        # str, got int"), and None or "" sent no password and read as a refused one. (Its
        # type only: the value is the password.)
        if not isinstance(password, str) or not password:
            what = "an empty string" if isinstance(password, str) else f"a {type(password).__name__}"
            raise CredentialsError(f"StaticPassword: the password must be a non-empty string, "
                                   f"not {what} (for a DSN without one, leave credentials= out)")
        self._password = password

    @classmethod
    def from_env(cls, variable: str = "PGPASSWORD") -> StaticPassword:
        """The password in environment variable `variable` (read now, once)."""
        value = os.environ.get(variable)
        if not value:
            raise CredentialsError(
                f"environment variable {variable} is not set or empty: set it to the database "
                "password"
            )
        return cls(value)

    def __repr__(self) -> str:
        return "StaticPassword(***)"

    def reveal(self) -> str:
        """The password (for scrubbing it from messages; never print it)."""
        return self._password

    async def password(self, target: Target) -> str:
        return self._password

    async def refresh(self, target: Target) -> bool:
        return False

    async def warm(self, target: Target) -> None:
        return None

    async def close(self) -> None:
        return None

    def auth_failure_hint(self, target: Target) -> str:
        return (
            f"the password given for user {target.user!r} was refused, or the server has no such "
            "user (it answers both alike); fix it in the DSN or settings (behind PgBouncer, also "
            "check the secret in its auth_file)"
        )
