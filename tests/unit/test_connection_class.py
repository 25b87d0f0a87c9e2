"""The connection classes the pool hands asyncpg: one per kind for the process, not one per pool
(CPython's attribute caches and specialized bytecode are keyed by class)."""

from __future__ import annotations

import gc
import weakref

import asyncpg

from asyncpool.connect import driver


def test_pools_share_the_cancel_aware_class_of_a_base() -> None:
    first = driver.cancel_aware_class(None, cancels=True)
    assert driver.cancel_aware_class(None, cancels=True) is first
    assert driver.cancel_aware_class(asyncpg.Connection, cancels=True) is first
    assert first.__mro__[1] is asyncpg.Connection
    never = driver.cancel_aware_class(None, cancels=False)
    assert never is not first
    assert (first._asyncpool_cancels, never._asyncpool_cancels) == (True, False)


def test_a_class_made_from_a_pools_own_base_goes_with_it() -> None:
    class Own(asyncpg.Connection):
        __slots__ = ()

    made = driver.cancel_aware_class(Own, cancels=True)
    assert driver.cancel_aware_class(Own, cancels=True) is made
    assert made.__mro__[1] is Own
    gone = weakref.ref(Own)
    del Own, made
    gc.collect()
    assert gone() is None  # the process keeps no class of a base nobody uses


def test_unnamed_pools_share_one_class_and_keep_their_own_policy() -> None:
    from asyncpool.config import PoolConfig
    from asyncpool.unnamed import CacheTotals, describe_cache_connection_class, describe_cache_policy

    a = PoolConfig(dsn="postgresql://u@h/d", name="a", statement_cache_size=10)
    b = PoolConfig(dsn="postgresql://u@h/d", name="b", statement_cache_size=20)
    assert describe_cache_connection_class(a) is describe_cache_connection_class(b)
    totals = CacheTotals()
    policy = describe_cache_policy(a, totals)
    assert (policy.pool_name, policy.max_size, policy.totals) == ("a", 10, totals)
    assert describe_cache_policy(b, CacheTotals()).pool_name == "b"


def test_an_unnamed_pools_own_connection_class_is_a_base_shared_while_used() -> None:
    from asyncpool.config import PoolConfig
    from asyncpool.unnamed import describe_cache_connection_class
    from asyncpool.unnamed.connection import DescribeCacheConnection

    class Own(asyncpg.Connection):
        __slots__ = ()

    config = PoolConfig(dsn="postgresql://u@h/d", connect_kwargs={"connection_class": Own})
    made = describe_cache_connection_class(config)
    assert made.__mro__[1:3] == (DescribeCacheConnection, Own)
    assert describe_cache_connection_class(config) is made
    gone = weakref.ref(Own)
    del Own, made, config
    gc.collect()
    assert gone() is None
