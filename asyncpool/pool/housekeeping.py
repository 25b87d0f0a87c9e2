"""Housekeeping: every few seconds, retire idle connections that are broken, expired or idle
past `max_idle`, and open connections up to `min_size`; `expire_all` and `mark_stale` act on
every connection at once."""

from __future__ import annotations

import logging
import math
import weakref
from collections.abc import Callable, Coroutine
from typing import TYPE_CHECKING, Any

from asyncpool.errors import ConnectError, PoolClosedError
from asyncpool.pool import alarms, logins
from asyncpool.pool.record import MOVING
from asyncpool.pool.state import OPEN

if TYPE_CHECKING:
    from asyncpool.config import PoolConfig
    from asyncpool.pool.slots import Slots

logger: logging.Logger = logging.getLogger("asyncpool.pool")


def expire_all(slots: Slots) -> None:
    """Retire every connection: idle ones now, held ones when returned, logins under way
    when they succeed."""
    slots.generation += 1
    for record in list(slots.idle):
        slots.retire(record, "expired by expire_all", graceful=True)
    for record in [*slots.leased(), *slots.checking]:
        record.expires_at = -math.inf


def mark_stale(slots: Slots) -> None:
    """Validate every connection before its next checkout, whatever the clock says: a held
    one keeps the mark through its return (`record.stale`), a statement of a query helper
    under way included."""
    for record in list(slots.records):
        record.stale = True
        record.check_at = -math.inf


async def fill_in_background(slots: Slots, count: int) -> None:
    """`fill` for ``open(wait=False)``: a failure is logged, and housekeeping tries again."""
    try:
        await fill(slots, count, own=True)
    except Exception as exc:
        if _planned(exc):
            return
        logger.warning("pool %r: could not open %d connections in the background "
                       "(%s); housekeeping tries again", slots.name, count, exc)


async def fill(slots: Slots, count: int, *, own: bool = False) -> None:
    """Open connections until `count` exist (raising the first failure). `own`: nobody waits
    for them (`logins.give_up_fills` may stop their logins)."""
    loop = slots.loop
    assert loop is not None
    while slots.state is OPEN and slots.size() < count:
        slots.connecting += 1
        slots.filling += 1
        holding = True
        try:
            conn = await logins.log_in(slots, own=own)
            record = logins.new_record(slots, conn)
            slots.connecting -= 1
            slots.filling -= 1
            holding = False
            record.place = MOVING
            slots._put(record, loop.time())
        finally:
            if holding:
                slots.filling -= 1
                slots._release_slot()


def reap(slots: Slots) -> None:
    """Retire idle connections that are broken, expired, or idle past max_idle beyond
    min_size (the least recently used first)."""
    assert slots.loop is not None
    now = slots.loop.time()
    cfg = slots.config
    surplus = slots.size() - cfg.min_size
    for record in list(slots.idle):  # oldest-used first
        if not record.usable():
            slots.retire_lost(record)
        elif record.expired(now):
            slots.retire(record, "expired", graceful=True)
        elif cfg.max_idle is not None and now - record.last_used > cfg.max_idle and surplus > 0:
            slots.retire(record, "idle", graceful=True)
        else:
            continue
        surplus -= 1


async def housekeep(slots: Slots) -> None:
    slots.on_acquired, slots.on_released = slots.observer.checkout_hooks()
    reap(slots)
    if slots.state is OPEN and slots.size() < slots.config.min_size:
        try:
            await fill(slots, slots.config.min_size, own=True)
        except (ConnectError, PoolClosedError) as exc:
            if _planned(exc):
                return
            logger.warning("%s; could not keep min_size connections", logins.named(slots.name, exc))


def _planned(exc: BaseException) -> bool:
    """A refill given up on purpose (`logins.give_up_fills`, at a Lambda invocation's start or
    end): said at INFO, as nobody waited for it and the next checkout logs in. (A pool opened
    with ``open(wait=False)`` at INIT has its refill given up as the first invocation starts: a
    WARNING there came with every cold start.)"""
    if isinstance(exc, logins.FillGivenUp):
        logger.info("%s", exc)
        return True
    return False


def period_for(cfg: PoolConfig) -> float:
    limits = [v for v in (cfg.max_idle, cfg.max_lifetime) if v is not None]
    return min([5.0] + [v / 2 for v in limits])


async def run(ref: weakref.ref[Slots], period: float) -> None:
    """Reap idle and expired connections and keep min_size open, every `period`, until the pool
    closes or is collected. Any error is logged and the next round runs as planned: the schedule
    comes first, so no failure can stop it (psycopg's ShrinkPool, HikariCP's HouseKeeper)."""
    # The first round a whole period after opening, then on the period's multiples.
    wait: Callable[[float], Coroutine[Any, Any, None]] = alarms.sleep
    while True:
        await wait(period)
        wait = alarms.tick
        slots = ref()
        if slots is None or slots.state is not OPEN:
            return
        try:
            await housekeep(slots)
        except Exception:
            logger.exception("pool %r: housekeeping failed; it runs again in %gs", slots.name, period)
        del slots  # only a weak reference between rounds: a dropped pool can be collected
