"""A credentials provider doing nothing, for tests' own providers to build on."""

from __future__ import annotations


class QuietProvider:
    """`asyncpool.CredentialProvider`'s methods, doing nothing: override what a test needs."""

    requires_tls = False

    async def password(self, target: object) -> str:
        return "unused"

    async def refresh(self, target: object) -> bool:
        return False

    async def warm(self, target: object) -> None:
        pass

    async def close(self) -> None:
        pass
