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
    from asyncpool.unnamed.connection import Policy

__all__ = ["CacheTotals", "DescribeCacheStats", "describe_cache_connection_class",
           "describe_cache_policy", "invalidate_all"]


def describe_cache_connection_class(config: PoolConfig) -> type[asyncpg.Connection]:
    """The asyncpg ``connection_class`` for a pool in "unnamed" mode, shared by every pool of
    the process with the same ``connection_class`` in ``connect_kwargs`` (kept as a base class).
    Each connection takes its pool's `Policy` from the `InterceptingLoop` it is opened with.

    Raises `PoolConfigError` if the installed asyncpg lacks what the mode builds on.
    """
    from asyncpool.connect.driver import shared_subclass
    from asyncpool.unnamed.connection import DescribeCacheConnection
    from asyncpool.unnamed.support import require_asyncpg_features

    require_asyncpg_features(config.name)
    user_class = config.connect_kwargs.get("connection_class")
    if user_class is None or issubclass(DescribeCacheConnection, user_class):
        return DescribeCacheConnection
    return shared_subclass("DescribeCacheConnection", (DescribeCacheConnection, user_class),
                           {"__slots__": ()})


def describe_cache_policy(config: PoolConfig, totals: CacheTotals) -> Policy:
    """A pool's settings for its connections' description caches; they count their hits,
    misses, stale descriptions and evictions into `totals` too."""
    from asyncpool.unnamed.connection import Policy

    return Policy(config.name, config.statement_cache_size, config.statement_cache_ttl, totals)
