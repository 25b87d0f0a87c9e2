"""A pool's `PoolStats`, read from its `Slots`: sizes computed from where its connections are,
and the totals it counts."""

from __future__ import annotations

import weakref
from collections.abc import Callable
from typing import TYPE_CHECKING

from asyncpool.stats import PoolStats, StatementCacheStats

if TYPE_CHECKING:
    from asyncpool.pool.slots import Slots


def stats(slots: Slots) -> PoolStats:
    """Current sizes and totals. Safe from any thread: it reads lengths and counters and
    counts the records in use (no lock on the checkout path); read from another thread,
    fields may come from instants a few instructions apart, and `in_use` may count a
    connection returned and another taken during the count both."""
    idle = len(slots.idle)
    in_use = len(slots.leased())
    connecting = slots.connecting
    # Callers in acquire(): queued (less those between login attempts, counted by the slot
    # they hold), or holding a slot (logging in, checking a connection, granted one and not
    # yet run), or handed a connection and not yet run. Computed here, not counted on the
    # checkout path.
    waiting = max(0, len(slots.waiters) - slots.retrying)
    pending = waiting + max(0, connecting - slots.filling) + len(slots.handed)
    return PoolStats(
        name=slots.name,
        size=idle + in_use + connecting,
        idle=idle,
        in_use=in_use,
        connecting=connecting,
        waiting=waiting,
        min_size=slots.config.min_size,
        max_size=slots.config.max_size,
        created_total=slots.created_total,
        closed_total=slots.closed_total,
        timeouts_total=slots.timeouts_total,
        leaked_total=slots.leaked_total,
        validation_failures_total=slots.validation_failures_total,
        acquired_total=slots.acquired_total,
        connect_errors_total=slots.connect_errors_total,
        statement_cache=_statement_cache_stats(slots),
        validating=len(slots.checking),
        pending=pending,
    )


def _statement_cache_stats(slots: Slots) -> StatementCacheStats | None:
    totals = slots.connector.statement_cache if slots.connector is not None else None
    return totals.snapshot() if totals is not None else None


def weak_stats(slots: Slots) -> Callable[[], PoolStats]:
    """`stats(slots)` without keeping the pool alive: observers (a global metrics registry) hold
    it, and a pool dropped without close() must still be collected."""
    ref = weakref.ref(slots)
    name, cfg = slots.name, slots.config

    def read() -> PoolStats:
        owner = ref()
        if owner is not None:
            return stats(owner)
        return PoolStats(name, 0, 0, 0, 0, 0, cfg.min_size, cfg.max_size, 0, 0, 0, 0, 0, 0, 0)

    return read
