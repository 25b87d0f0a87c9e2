"""A pool used where it cannot be, against the fake driver: refused at once, with what to do
instead, and nothing changed."""

from __future__ import annotations

import asyncio

import pytest

from asyncpool import PoolError
from asyncpool.pool import forks
from tests.unit.fakes import FakeServer, fake_pool, run


def test_open_of_a_pool_open_in_the_parent_of_a_fork_is_refused(server: FakeServer) -> None:
    """``await pool.open()`` ("no-op once open", as the integrations call it per request) in a
    forked child returned the inherited pool as open, which then refused every use."""
    async def main() -> None:
        pool = fake_pool(server, min_size=1)
        await pool.open()
        forks._after_fork_in_child()  # what os.register_at_fork runs in the child
        with pytest.raises(PoolError, match="is a fork of it"):
            await pool.open(wait=False)
        await pool.close()

    count = forks.FORKS[0]
    try:
        run(main())
    finally:
        forks.FORKS[0] = count
    assert all(c.closed_how is None for c in server.connections)  # the parent's, untouched


def test_open_of_a_pool_open_on_another_loop_is_refused(server: FakeServer) -> None:
    """From another thread's loop, or a later loop of the same thread once the first has
    ended, open() returned the pool as open; every use then failed. (Under way on the first
    loop, the second waited on that loop's future from its own thread.)"""
    pool = fake_pool(server, min_size=1)

    async def elsewhere() -> None:
        with pytest.raises(PoolError, match="comes from thread"):
            await pool.open()

    async def main() -> None:
        opening = asyncio.ensure_future(pool.open())
        await asyncio.sleep(0)  # under way: logging in
        assert not opening.done()
        await asyncio.to_thread(asyncio.run, elsewhere())
        await opening
        await asyncio.to_thread(asyncio.run, elsewhere())
        assert pool.stats().size == 1

    run(main())

    async def next_run() -> None:
        with pytest.raises(PoolError, match="the loop that opened it has ended"):
            await pool.open()
        await pool.close()  # (its loop gone: terminated)

    asyncio.run(next_run())
    assert pool.closed


@pytest.mark.parametrize("how", ["terminate", "close"])
def test_a_pool_whose_loop_was_closed_with_its_tasks_pending_terminates(
        server: FakeServer, how: str) -> None:
    """``loop.close()`` after ``run_until_complete()`` leaves the pool's tasks pending (its
    housekeeping, a caller waiting in line). terminate(), and close() from a later loop, woke
    them on the closed loop: RuntimeError ("Event loop is closed") half-way, the server
    connections left open and the pool neither open nor closed."""
    pool = fake_pool(server, min_size=1, max_size=1)

    async def main() -> None:
        await pool.open()
        await pool.acquire()
        asyncio.ensure_future(pool.fetchval("SELECT 1"))  # waits in line
        asyncio.ensure_future(pool.open())  # (no-op once open)
        await asyncio.sleep(0.01)
        assert pool.stats().waiting == 1

    run(main())  # closes the loop, its tasks still pending
    if how == "terminate":
        pool.terminate()
    else:
        asyncio.run(pool.close())
    assert pool.closed
    assert server.open_connections() == []
