"""PgBouncer paused (PAUSE) for longer than the acquire timeout, under load."""

from __future__ import annotations

import asyncio

import pytest

from asyncpool import Pool, PoolTimeoutError
from asyncpool.testing import PgBouncerServer
from asyncpool.testing.invariants import assert_clear, full_width, settled
from asyncpool.testing.ledger import Ledger

from .load import Load

WRITERS = 6


async def _paused(pooler: PgBouncerServer) -> bool:
    rows = await pooler.admin("SHOW DATABASES")
    return any(r["name"] == "app" and int(r["paused"]) == 1 for r in rows)


@pytest.mark.parametrize("validate_after", [0, None], ids=["checked-checkout", "unchecked-checkout"])
async def test_pause_past_acquire_timeout(
    fault_pooler: PgBouncerServer, ledger: Ledger, validate_after: float | None
) -> None:
    """While PgBouncer holds every query, each caller gets a timeout (none waits for RESUME);
    after RESUME the same pool commits again, with nothing lost.

    With checked checkouts the check times out (PoolTimeoutError); unchecked, BEGIN does
    (TimeoutError), and RESUME often lands while release() waits for that BEGIN's cancel.
    """
    pool = Pool(fault_pooler.dsn(), name="paused", min_size=2, max_size=4, acquire_timeout=0.5,
                connect_timeout=0.5, validate_after=validate_after,
                # A query PgBouncer holds back is bounded by the driver's command timeout.
                connect_kwargs={"command_timeout": 0.5}, telemetry=False)
    async with pool:
        load = Load(pool, ledger, writers=WRITERS).start()
        try:
            await load.commits(20, within=15)
            await fault_pooler.admin("PAUSE app")
            try:
                await load.every_writer_fails(within=15)
                assert await _paused(fault_pooler), "the failures must come while still paused"
            finally:
                await fault_pooler.admin("RESUME app")
            await load.commits(30, within=15)
        finally:
            await load.stop()
        await ledger.verify()
        # PoolTimeoutError: no connection within acquire_timeout (validation held back too);
        # TimeoutError: a statement held past command_timeout.
        assert_clear(ledger.errors, PoolTimeoutError, TimeoutError)
        await settled(pool, fault_pooler)
        await full_width(pool)


@pytest.mark.parametrize("caller", ["idle", "timed-out", "cancelled"])
async def test_every_connection_serves_after_resume(
    fault_pooler: PgBouncerServer, ledger: Ledger, caller: str
) -> None:
    """A connection whose BEGIN was held by the pause and then timed out or was cancelled (a
    cancel request, then release() finishing it after RESUME), and one that only sat idle, are
    all fit for transactions after RESUME. One connection, so the next writes reuse it."""
    # Only the timed-out caller needs a command timeout; without one, the cancelled caller's
    # release waits for its cancel request until RESUME and then rolls back.
    kwargs = {"command_timeout": 0.3} if caller == "timed-out" else {}
    pool = Pool(fault_pooler.dsn(), name="resumed", min_size=1, max_size=1, acquire_timeout=2,
                validate_after=None, connect_kwargs=kwargs, telemetry=False)
    async with pool:
        await fault_pooler.admin("PAUSE app")
        task = None
        try:
            if caller != "idle":
                task = asyncio.create_task(ledger.write(pool))
                await _queued_in_pgbouncer(fault_pooler)
            if caller == "cancelled":
                assert task is not None
                task.cancel()
            if caller == "timed-out":
                assert task is not None
                assert isinstance(await task, TimeoutError)
        finally:
            await fault_pooler.admin("RESUME app")
        if caller == "cancelled":
            assert task is not None
            with pytest.raises(asyncio.CancelledError):
                await task
        writes = [await ledger.write(pool) for _ in range(4)]
        assert writes == [None] * 4
        check = await ledger.verify()
        assert check.committed == 4
        await settled(pool, fault_pooler)


async def _queued_in_pgbouncer(pooler: PgBouncerServer, within: float = 10.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    while int((await pooler.pool_row())["cl_waiting"]) < 1:
        assert loop.time() < deadline, "BEGIN never reached the paused PgBouncer"
        await asyncio.sleep(0.01)
