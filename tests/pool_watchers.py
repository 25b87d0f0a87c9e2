"""Observers the tests watch a pool with."""

from __future__ import annotations

import collections
import contextlib

from asyncpool.observer import PoolObserver


class PoolWork(PoolObserver):
    """What a pool does on its own: checks of idle connections and resets of returned ones (a
    round trip each), by purpose, and the connections it closes, by reason (`counts`, as
    ``"closed: <reason>"``; `reasons`, in order)."""

    def __init__(self) -> None:
        self.counts: collections.Counter[str] = collections.Counter()
        self.reasons: list[str] = []

    def pool_statement(self, purpose: str) -> contextlib.AbstractContextManager[object]:
        self.counts[purpose] += 1  # "validate" or "reset"
        return contextlib.nullcontext()

    def connection_closed(self, reason: str) -> None:
        self.counts[f"closed: {reason}"] += 1
        self.reasons.append(reason)
