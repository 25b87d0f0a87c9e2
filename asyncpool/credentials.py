"""Where the password of each new connection comes from."""

from __future__ import annotations

from typing import Protocol, runtime_checkable

from asyncpool.dsn import Target


@runtime_checkable
class CredentialProvider(Protocol):
    """Something the pool awaits for the password of every **new** connection.

    `password` is called once per connection attempt with the host, port, user and database
    actually dialled. When the server rejects the login as an authentication failure, the pool
    calls `refresh` and, if it returns True, tries once more with a fresh `password`.
    """

    #: Whether logins with these credentials must use TLS (IAM tokens do).
    requires_tls: bool

    async def password(self, target: Target) -> str: ...

    async def refresh(self, target: Target) -> bool: ...

    async def warm(self, target: Target) -> None:
        """Do the expensive set-up now (Lambda INIT phase) rather than on the first connect."""

    async def close(self) -> None: ...


class StaticPassword:
    """A fixed password (self-hosted PgBouncer with SCRAM-SHA-256). Never shown in reprs."""

    requires_tls = False

    def __init__(self, password: str) -> None:
        self._password = password

    def __repr__(self) -> str:
        return "StaticPassword(***)"

    async def password(self, target: Target) -> str:
        return self._password

    async def refresh(self, target: Target) -> bool:
        return False

    async def warm(self, target: Target) -> None:
        return None

    async def close(self) -> None:
        return None
