"""``prepared_statements="unnamed"``: one round trip per query through any pooler.

With asyncpg's statement cache off (what transaction poolers without prepared-statement support
need), every query with arguments costs two round trips: Parse/Describe, then Parse/Bind/Execute.
This mode keeps each connection's described, unnamed statements and reuses them: a repeat sends
Parse (with the cached parameter types), Describe, Bind, Execute and Sync in one write. The
server's answer to that Describe is read before any row is decoded: when the schema changed, the
rows are decoded with the description the reply carries (see docs/describe-cache.md).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from asyncpool.unnamed.entries import CacheTotals, DescribeCacheStats, invalidate_all

if TYPE_CHECKING:
    import asyncpg

    from asyncpool.config import PoolConfig

__all__ = ["CacheTotals", "DescribeCacheStats", "describe_cache_connection_class", "invalidate_all"]


def describe_cache_connection_class(
    config: PoolConfig, totals: CacheTotals
) -> type[asyncpg.Connection]:
    """The asyncpg ``connection_class`` for a pool in "unnamed" mode; its connections count
    their cache hits, misses, stale descriptions and evictions into `totals` too.

    Raises `PoolConfigError` if the installed asyncpg lacks what the mode builds on. A
    ``connection_class`` given in ``connect_kwargs`` is kept as a base class.
    """
    from asyncpool.unnamed.connection import DescribeCacheConnection, Policy
    from asyncpool.unnamed.support import require_asyncpg_features

    require_asyncpg_features(config.name)
    policy = Policy(config.name, config.statement_cache_size, config.statement_cache_ttl, totals)
    bases: tuple[type, ...] = (DescribeCacheConnection,)
    user_class = config.connect_kwargs.get("connection_class")
    if user_class is not None and not issubclass(DescribeCacheConnection, user_class):
        bases += (user_class,)
    return type("DescribeCacheConnection", bases, {"__slots__": (), "_policy": policy})
