"""Backoff between connection attempts."""

from __future__ import annotations

import random


class Backoff:
    """Exponential delays with full jitter: 50 ms, 100 ms, 200 ms ... capped at `cap`.

    Jitter spreads the reconnects of hundreds of Lambda environments that lost the pooler at the
    same moment, so they do not all come back in the same instant.
    """

    __slots__ = ("_attempt", "cap", "initial")

    def __init__(self, initial: float = 0.05, cap: float = 2.0) -> None:
        self.initial: float = initial
        self.cap: float = cap
        self._attempt = 0

    def next_delay(self) -> float:
        base: float = min(self.cap, self.initial * (2.0**self._attempt))
        self._attempt += 1
        return base / 2 + random.uniform(0, base / 2)
