"""A pool's lifecycle: the state its `Slots` is in."""

from __future__ import annotations

import enum


class PoolState(enum.Enum):
    NEW = "new"  # created, not opened
    OPEN = "open"
    CLOSING = "closing"  # close() or terminate() has begun: nothing is handed out any more
    CLOSED = "closed"


NEW = PoolState.NEW
OPEN = PoolState.OPEN
CLOSING = PoolState.CLOSING
CLOSED_STATE = PoolState.CLOSED
