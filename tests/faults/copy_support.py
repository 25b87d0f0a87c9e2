"""What the COPY fault tests check after a COPY that ended with rows unsent."""

from __future__ import annotations

import asyncio
from typing import Any

import asyncpg

from asyncpool import Pool


async def assert_closed_and_replaced(pool: Pool, via: str, seen: dict[str, Any],
                                     within: float) -> None:
    """The COPY's connection was closed under it (a held one says so at its next statement,
    `seen["next"]`, at once) and the pool serves the next statement on a new one."""
    if via == "acquire":
        assert isinstance(seen["next"], asyncpg.InterfaceError), repr(seen["next"])
    async with asyncio.timeout(within):
        assert await pool.fetchval("SELECT 8") == 8
    stats = pool.stats()
    assert (stats.in_use, stats.closed_total, stats.created_total) == (0, 1, 2), stats
