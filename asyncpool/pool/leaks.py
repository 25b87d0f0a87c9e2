"""Leak detection: notice a lease held past `leak_timeout`, with one timer for the whole pool."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from asyncpool.pool.lease import Lease

logger = logging.getLogger("asyncpool.leaks")

# Timers may fire a hair early (the loop rounds to its clock resolution).
_EARLY_FIRE_SLACK = 0.001


class LeakTracker:
    """Tracks active leases in acquire order and fires `on_leak` for each one held too long.

    Every lease has the same timeout, so acquire order is deadline order: one timer, armed for the
    oldest lease, serves them all. Tracking a checkout is a dict insert, a clean return a dict
    delete; no task or timer is made per checkout.
    """

    def __init__(self, timeout: float, on_leak: Callable[[Lease], None]) -> None:
        self.timeout = timeout
        self._on_leak = on_leak
        self._leases: dict[Lease, None] = {}
        self._timer: asyncio.TimerHandle | None = None

    def track(self, lease: Lease) -> None:
        self._leases[lease] = None
        if self._timer is None:
            self._arm(lease.acquired_at + self.timeout)

    def untrack(self, lease: Lease) -> None:
        self._leases.pop(lease, None)

    def _arm(self, when: float) -> None:
        self._timer = asyncio.get_running_loop().call_at(when, self._fire)

    def _fire(self) -> None:
        self._timer = None
        leases = self._leases
        now = asyncio.get_running_loop().time() + _EARLY_FIRE_SLACK
        while leases:
            oldest = next(iter(leases))
            deadline = oldest.acquired_at + self.timeout
            if deadline > now:
                self._arm(deadline)
                return
            del leases[oldest]
            context = oldest.context
            try:
                if context is None:
                    self._on_leak(oldest)
                else:
                    context.run(self._on_leak, oldest)
            except Exception:
                logger.exception("leak handler failed")

    def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._leases.clear()


class NoLeakTracker:
    """Stands in when leak detection is off, so the hot path never asks whether it is on."""

    def track(self, lease: Lease) -> None:
        pass

    def untrack(self, lease: Lease) -> None:
        pass

    def close(self) -> None:
        pass


def log_leak(pool_name: str, lease: Lease, held: float, reclaimed: bool, site: str) -> None:
    """One structured WARNING on `asyncpool.leaks` with who held the connection and from where."""
    action = "reclaimed it: cancelled the holder and closed the connection" if reclaimed else (
        "left it with the holder (leak_action='log')"
    )
    logger.warning(
        "pool %r: connection held for %.1fs by task %r, past leak_timeout; %s. Acquired at:\n%s",
        pool_name,
        held,
        lease.task_name(),
        action,
        site,
        extra={
            "asyncpool_pool": pool_name,
            "asyncpool_held_seconds": round(held, 3),
            "asyncpool_task": lease.task_name(),
            "asyncpool_acquire_site": site,
            "asyncpool_reclaimed": reclaimed,
        },
    )


def log_returned(pool_name: str, lease: Lease, held: float) -> None:
    """A connection reported as leaked (leak_action='log') came back after all."""
    logger.warning(
        "pool %r: connection previously reported as leaked was returned after %.1fs by task %r",
        pool_name,
        held,
        lease.task_name(),
        extra={"asyncpool_pool": pool_name, "asyncpool_held_seconds": round(held, 3),
               "asyncpool_task": lease.task_name()},
    )
