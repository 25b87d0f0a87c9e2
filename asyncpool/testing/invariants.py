"""What must hold after any fault: slots all accounted for, the pooler idle, the pool serving."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any, Protocol

from asyncpool import Pool, PoolError


class Pooler(Protocol):
    async def pool_row(self, database: str = ..., user: str = ...) -> dict[str, Any]: ...


async def settled(pool: Pool, pooler: Pooler | None = None, within: float = 10.0) -> None:
    """Wait until nothing is in flight: every slot the pool counts is an idle connection, and
    PgBouncer has no waiting client and no server stuck in one of our transactions."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    while True:
        s = pool.stats()
        row = await pooler.pool_row() if pooler is not None else {"cl_waiting": 0, "sv_active": 0}
        if (
            s.in_use == 0 and s.waiting == 0 and s.connecting == 0 and s.pending == 0
            and s.idle == s.size <= s.max_size
            and int(row["cl_waiting"]) == 0 and int(row["sv_active"]) == 0
        ):
            return
        if loop.time() > deadline:
            raise AssertionError(f"no return to baseline within {within}s: {s} / {row}")
        await asyncio.sleep(0.05)


async def serves_again(pool: Pool, within: float = 15.0) -> float:
    """Seconds until a query succeeds; fail if it does not within `within`."""
    loop = asyncio.get_running_loop()
    start = loop.time()
    last: BaseException | None = None
    while loop.time() - start < within:
        try:
            async with asyncio.timeout(2):
                assert await pool.fetchval("SELECT 1") == 1
            return loop.time() - start
        except (PoolError, OSError, TimeoutError) as exc:
            last = exc
            await asyncio.sleep(0.05)
    raise AssertionError(f"the pool did not serve again within {within}s; last error: {last!r}")


async def full_width(pool: Pool) -> None:
    """Hold `max_size` connections at once: a slot lost to a fault would make this time out."""
    size = pool.config.max_size
    conns = await asyncio.gather(*[pool.acquire(timeout=10) for _ in range(size)])
    try:
        values = await asyncio.gather(*[c.fetchval("SELECT 1") for c in conns])
        assert values == [1] * size
    finally:
        for conn in conns:
            await pool.release(conn)


async def pooler_forgets(pooler: Pooler, clients_before: int, within: float = 10.0) -> None:
    """After a pool closed, PgBouncer's client count for app/app returns to what it was."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    while True:
        row = await pooler.pool_row()
        clients = int(row["cl_active"]) + int(row["cl_waiting"])
        if clients <= clients_before and int(row["cl_waiting"]) == 0:
            return
        if loop.time() > deadline:
            raise AssertionError(f"PgBouncer still counts our clients after close: {row}")
        await asyncio.sleep(0.05)


async def clients_of(pooler: Pooler) -> int:
    row = await pooler.pool_row()
    return int(row["cl_active"]) + int(row["cl_waiting"])


def chain(exc: BaseException) -> Iterator[BaseException]:
    """`exc` and every exception chained to it (cause or context), each once."""
    seen: set[int] = set()
    todo: list[BaseException] = [exc]
    while todo:
        e = todo.pop()
        if id(e) in seen:
            continue
        seen.add(id(e))
        yield e
        todo += [c for c in (e.__cause__, e.__context__) if c is not None]


def assert_clear(errors: list[BaseException], *allowed: type[BaseException]) -> None:
    """Every error is one a caller can act on: one of `allowed`, with a message when asyncpool's."""
    odd = [e for e in errors if not isinstance(e, allowed)]
    assert not odd, f"unexpected errors reached callers: {odd[:5]}"
    for e in errors:
        if isinstance(e, PoolError):
            assert str(e), f"{type(e).__name__} without a message"
