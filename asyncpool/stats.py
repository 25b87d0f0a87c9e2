"""A snapshot of a pool's numbers."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class PoolStats:
    """What `Pool.stats()` returns. Totals count since the pool was created."""

    name: str
    size: int  #: connections open or being opened
    idle: int  #: open and waiting in the pool
    in_use: int  #: checked out by callers
    connecting: int  #: being opened or validated for a caller
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
