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
    class Own(asyncpg.Connection):  # type: ignore[misc]
        __slots__ = ()

    made = driver.cancel_aware_class(Own, cancels=True)
    assert driver.cancel_aware_class(Own, cancels=True) is made
    assert made.__mro__[1] is Own
    gone = weakref.ref(Own)
    del Own, made
    gc.collect()
    assert gone() is None  # the process keeps no class of a base nobody uses
