"""A snapshot of a pool's numbers."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class StatementCacheStats:
    """Totals of the description cache over every connection the pool has had, closed ones included."""

    hits: int  #: executions that reused a cached description (one round trip)
    misses: int  #: executions that had to describe their statement first
    stale: int  #: cached descriptions the server's reply contradicted (after DDL)
    evicted: int  #: descriptions dropped to stay within statement_cache_size


@dataclass(frozen=True, slots=True)
class PoolStats:
    """What `Pool.stats()` returns. Totals count since the pool was created."""

    name: str
    size: int  #: connections open or being opened (``idle + in_use + connecting``)
    idle: int  #: open and waiting in the pool
    in_use: int  #: checked out by callers, or being reset after their return
    #: slots reserved to open a connection (for a caller, or for min_size) or to check an idle
    #: one for a caller (`validating`)
    connecting: int
    waiting: int  #: callers queued in acquire()
    min_size: int
    max_size: int
    created_total: int
    closed_total: int
    timeouts_total: int
    leaked_total: int
    validation_failures_total: int
    acquired_total: int
    connect_errors_total: int
    #: prepared_statements="unnamed" only; None in the other modes.
    statement_cache: StatementCacheStats | None = None
    #: of `connecting`: open connections being checked (``SELECT 1``) for a caller at checkout
    #: (open connections: ``idle + in_use + validating``)
    validating: int = 0
    #: callers in acquire() that have no connection yet: queued (`waiting`), opening one,
    #: or checking one (`db.client.connection.pending_requests`)
    pending: int = 0
