"""Bookkeeping for one open connection: when it was made, when it must go, when it was last used."""

from __future__ import annotations

import random
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import asyncpg


class ConnectionRecord:
    """One pooled connection. Times come from the event loop's monotonic clock."""

    __slots__ = ("conn", "created_at", "expires_at", "last_used")

    def __init__(self, conn: asyncpg.Connection, now: float, max_lifetime: float | None,
                 jitter: float) -> None:
        self.conn = conn
        self.created_at = now
        self.expires_at = expiry(now, max_lifetime, jitter)
        self.last_used = now

    def expired(self, now: float) -> bool:
        return self.expires_at is not None and now >= self.expires_at

    def usable(self) -> bool:
        return not self.conn.is_closed()


def expiry(now: float, max_lifetime: float | None, jitter: float) -> float | None:
    """When a connection made `now` must be retired: up to `jitter` of the lifetime earlier, at
    random, so connections opened together (a cold start) do not all reconnect together."""
    if max_lifetime is None:
        return None
    return now + max_lifetime * (1.0 - jitter * random.random())
