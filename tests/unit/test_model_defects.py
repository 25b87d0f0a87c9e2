"""Defects the stateful model test (test_model.py) found, each as its minimal failing example
written out as a plain test, against the fake driver on a virtual clock."""

from __future__ import annotations

import asyncio
import math

import pytest

from asyncpool import PoolTimeoutError
from asyncpool.pool import snapshot
from tests.pool_watchers import PoolWork
from tests.unit.fakes import FakeServer, fake_pool, run


def _kept(server: FakeServer) -> list[object]:
    """The connections a snapshot taken now would keep: open, and not being closed."""
    return [conn for conn in server.open_connections() if not conn.closing]


def test_a_connection_being_validated_at_a_snapshot_is_not_kept_in_it(server: FakeServer) -> None:
    """Model: open(min_size=1, max_size=1), mark_stale(), a user, snapshot. The idle
    connection's check was under way at the snapshot: it was neither idle nor held, and its
    socket went into the snapshot. Now it is closed, and its caller logs in after the restore."""

    async def main() -> None:
        pool = fake_pool(server, min_size=1, max_size=1)
        await pool.open()
        pool.mark_stale()
        user = asyncio.create_task(pool.fetchval("SELECT 1"))
        await asyncio.sleep(0)
        assert pool._slots.checking  # its check's SELECT 1 is on the wire
        await snapshot.empty_for_snapshot(pool._slots, 0.0)
        assert _kept(server) == []
        snapshot.resume_after_restore(pool._slots)
        assert await user == 1
        assert server.logins == 2  # (after the restore)
        await pool.close()

    run(main())


def test_a_connection_being_reset_at_a_snapshot_is_not_kept_in_it(server: FakeServer) -> None:
    """A connection released inside a transaction is rolled back before it goes idle; a
    snapshot taken during that ROLLBACK kept its socket."""

    async def main() -> None:
        pool = fake_pool(server, min_size=1, max_size=1)
        await pool.open()
        conn = await pool.acquire()
        await conn.execute("BEGIN")
        release = asyncio.create_task(pool.release(conn))
        raw = server.connections[0]
        for _ in range(10):  # (bounded: the reset starts within a few turns of the loop)
            await asyncio.sleep(0)
            if raw._op is not None:
                break
        assert raw.queries[-1] == "BEGIN"
        assert raw._op is not None  # its ROLLBACK is on the wire
        await snapshot.empty_for_snapshot(pool._slots, 0.0)
        assert _kept(server) == []
        await release
        snapshot.resume_after_restore(pool._slots)
        assert await pool.fetchval("SELECT 1") == 1
        await pool.close()

    run(main())


def test_the_setup_hooks_share_of_the_timeout_is_read_by_the_pools_clock(
        server: FakeServer) -> None:
    """The acquire's timeout runs on the loop's clock, but the ``setup`` hook's share of it was
    read by `time.monotonic()`: on a loop whose clock is another (here the virtual one; in the
    model, a hook timed out or not by how long the machine took), the hook got the whole
    timeout again after a wait in line. Now both read the pool's clock: 0.9 s in line leaves
    the hook 0.1 s of ``acquire_timeout=1``."""

    async def setup(conn: object) -> None:
        await asyncio.sleep(0.2)

    async def main() -> None:
        pool = fake_pool(server, min_size=1, max_size=1, acquire_timeout=1.0, setup=setup)
        await pool.open()
        conn = await pool.acquire()
        loop = asyncio.get_running_loop()
        loop.call_later(0.9, lambda: loop.create_task(pool.release(conn)))
        started = loop.time()
        with pytest.raises(PoolTimeoutError, match="setup hook"):
            async with pool.acquire():
                pass
        assert loop.time() - started == pytest.approx(1.0, abs=0.01)
        await pool.close()

    run(main())


@pytest.mark.parametrize("cancel_key", ["absent", "off"])
def test_a_statement_cut_short_without_a_cancel_key_loses_no_connection(cancel_key: str) -> None:
    """Model: open(min_size=1, max_size=2, no BackendKeyData), a user in pool.transaction()
    cancelled mid-statement (here, a statement past its timeout). Where no cancel request can
    arrive (RDS Proxy sends no key, or ``cancel_requests="off"``) the connection class closes
    the connection on the next turn of the loop; a holder still in its block then (it awaited
    anything after its TimeoutError or CancelledError) gave back a closed connection, taken for
    one the server or the network lost: every idle connection was checked (a round trip each)
    before its next checkout, and the close was reported as "broken". The pool closed it
    itself: "cancel undeliverable", and no checks."""
    server = FakeServer(requests_outlive=True)  # (the real Connector's connection class)
    server.cancel_key = cancel_key
    closes = PoolWork()

    async def main() -> None:
        pool = fake_pool(server, min_size=2, max_size=2, validate_after=60.0, observers=[closes],
                         cancel_requests="off" if cancel_key == "off" else "auto")
        await pool.open()
        async with pool.acquire() as conn:
            with pytest.raises(TimeoutError):
                await conn.fetchval("SELECT pg_sleep(1)", timeout=0.01)
            await asyncio.sleep(0)  # (anything awaited: the connection is closed meanwhile)
            assert conn.is_closed()
        assert closes.reasons == ["cancel undeliverable"]
        assert [r.check_at != -math.inf for r in pool._slots.idle] == [True]
        assert await pool.fetchval("SELECT 1") == 1
        assert closes.counts["validate"] == 0
        await pool.close()

    run(main())
    assert server.cancels_taken == 0
