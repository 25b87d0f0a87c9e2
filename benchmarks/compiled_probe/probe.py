"""The Python side of the `_probe` extension (README.md beside it): configures it with asyncpool's
classes, and puts a C ``pool.acquire`` on a pool (`install`)."""

from __future__ import annotations

import asyncio
import collections
import os
import sys
import time
from typing import Any

import _probe  # type: ignore[import-not-found]  # (built in place: setup.py)
import asyncpg

from asyncpool.connect import driver
from asyncpool.connect.failures import advise_on_prepared_statements, stopped_by_pool
from asyncpool.pool import checkout, connection, lease, record, slots
from asyncpool.pool.unsynced import left_unsynced


def _stmt_failed(held: lease.Lease, exc: BaseException) -> BaseException:
    """What the Python proxy's statement does when asyncpg's `_execute` raised `exc`: the
    exception to raise instead (or `exc`), the unsynced Parse noted (`connection._statement`)."""
    rec = held.record
    if isinstance(exc, asyncio.CancelledError):
        rec.note_unsynced_parse()
        return exc
    if not isinstance(exc, Exception):
        return exc
    if held.state is not lease.ACTIVE and stopped_by_pool(exc):
        # (the Python proxy's `_unusable()`, raised from exc)
        unusable = connection.PooledConnection(held, rec.owner)._unusable()
        unusable.__cause__ = exc
        return unusable
    if held.state is lease.ACTIVE and left_unsynced(exc):
        rec.note_unsynced_parse()
    advise_on_prepared_statements(exc, rec.owner.statement_mode)
    return exc


async def _ready(value: Any) -> Any:
    """An awaitable of `value` for Python 3.12+ (`_probe.c`: its SEND makes a StopIteration
    object for a C awaitable's value, and pushes a coroutine's frame inline)."""
    return value


async def _first_value(coro: Any, held: lease.Lease) -> Any:
    """The C proxy's ``fetchval`` after its checks, for Python 3.12+ (as `_ready`)."""
    try:
        rows = await coro
    except BaseException as exc:
        failed = _stmt_failed(held, exc)
        if failed is exc:
            raise
        raise failed from exc
    return rows[0][0] if rows else None


#: Python 3.12+ goes through the coroutines above (``PROBE_AWAITABLES=c`` keeps the C ones).
_COROUTINES = sys.version_info >= (3, 12) and os.environ.get("PROBE_AWAITABLES") != "c"
own = driver.own_body("fetchval")
_probe.configure(
    Slots=slots.Slots, ConnectionRecord=record.ConnectionRecord, Lease=lease.Lease,
    PooledConnection=connection.PooledConnection, AcquireContext=checkout.AcquireContext,
    Connection=asyncpg.Connection,
    ACTIVE=lease.ACTIVE, RELEASED=lease.RELEASED, IDLE=record.IDLE, LEASED=record.LEASED,
    GIVEN_BACK=lease.GIVEN_BACK, spare_lease=lease.spare_lease,
    current_tasks=asyncio.tasks._current_tasks,  # type: ignore[attr-defined]
    monotonic=time.monotonic, returned=driver.returned,
    deque_pop=collections.deque.pop, deque_append=collections.deque.append,
    own_fetchval=own[0] if own is not None else None, stmt_failed=_stmt_failed,
    ready=_ready if _COROUTINES else None, first_value=_first_value if _COROUTINES else None,
)


class ForwardingProxy(_probe.Proxy, driver.ConnectionProxyBase):  # type: ignore[misc]
    """The C proxy as a real integration would hand it out: a Python subclass that is an
    ``asyncpg.Connection`` for ``isinstance`` (asyncpg's proxy base, as `PooledConnection`) and
    forwards the rest through `__getattr__` (a class with one is not specialized by Python 3.11)."""

    __slots__ = ()

    def __getattr__(self, name: str) -> Any:
        return getattr(connection.PooledConnection(self._lease, self._owner), name)


#: What `install` hands out as the block's connection.
PROXIES: dict[str, type | None] = {"python": None, "c": _probe.Proxy, "c-subclass": ForwardingProxy}


def install(pool: Any, *, proxy: str = "python") -> None:
    """Make ``pool.acquire()`` (without arguments) the C context. The block's connection is the
    pool's `PooledConnection` ("python"), or the C proxy ("c": its ``fetchval`` in C, the rest
    through a `PooledConnection` on the same lease), or its Python subclass ("c-subclass")."""
    pool.acquire = _probe.Acquirer(pool._slots, pool.acquire, slots.UNSET, PROXIES[proxy])
