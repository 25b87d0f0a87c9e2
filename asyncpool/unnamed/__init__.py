"""``prepared_statements="unnamed"``: one round trip per query through any pooler.

With asyncpg's statement cache off (what transaction poolers without prepared-statement support
need), every query with arguments costs two round trips: Parse/Describe, then Parse/Bind/Execute.
This mode keeps each connection's described, unnamed statements and reuses them: a repeat sends
Parse (with the cached parameter types), Describe, Bind, Execute and Sync in one write. The
server's answer to that Describe is read before any row is decoded: when the schema changed, the
rows are decoded with the description the reply carries (see docs/describe-cache.md).
"""

from __future__ import annotations

import weakref
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
    from asyncpool.unnamed.connection import DescribeCacheConnection
    from asyncpool.unnamed.support import require_asyncpg_features

    require_asyncpg_features(config.name)
    user_class = config.connect_kwargs.get("connection_class")
    if user_class is None or issubclass(DescribeCacheConnection, user_class):
        return DescribeCacheConnection
    key = id(user_class)  # while the class made from `user_class` lives, so does `user_class`
    made = _WITH_USER_CLASS.get(key)
    if made is None:
        made = type("DescribeCacheConnection", (DescribeCacheConnection, user_class),
                    {"__slots__": ()})
        _WITH_USER_CLASS[key] = made
    return made


def describe_cache_policy(config: PoolConfig, totals: CacheTotals) -> Policy:
    """A pool's settings for its connections' description caches; they count their hits,
    misses, stale descriptions and evictions into `totals` too."""
    from asyncpool.unnamed.connection import Policy

    return Policy(config.name, config.statement_cache_size, config.statement_cache_ttl, totals)


#: The classes made for a user's ``connection_class``, each kept while a pool uses it.
_WITH_USER_CLASS: weakref.WeakValueDictionary[int, type[asyncpg.Connection]] = (
    weakref.WeakValueDictionary())
