"""Idle connections closed under the pool (the server, the pooler or the network closed them)
are retired as the close arrives, without a checkout, and `min_size` refilled
(`asyncpool.pool.lost_idle`); against the fake driver on a virtual clock."""

from __future__ import annotations

import asyncio
from typing import Any

from asyncpool.connect import driver
from tests.pool_watchers import PoolWork
from tests.unit.fakes import FakeConnection, FakeServer, VirtualClockLoop, fake_pool, run

# The housekeeping period is 5 s: everything below happens well before its first round.
SOON = 0.5


async def _turns(n: int = 3) -> None:
    for _ in range(n):
        await asyncio.sleep(0)


def test_an_idle_connection_closed_by_the_server_is_retired_and_min_size_refilled(
        server: FakeServer) -> None:
    work = PoolWork()

    async def main() -> None:
        async with fake_pool(server, min_size=2, max_size=4, observers=[work]) as pool:
            gone = server.connections[0]
            gone.die()
            await _turns()
            s = pool.stats()
            assert (s.size, s.idle, s.closed_total) == (1, 1, 1), s
            assert (pool.get_size(), pool.get_idle_size()) == (1, 1)
            assert work.reasons == ["broken"]
            assert all(record.conn is not gone for record in pool._slots.records)
            await asyncio.sleep(SOON)  # the refill: one backoff delay, then a login
            s = pool.stats()
            assert (s.size, s.idle, s.created_total) == (2, 2, 3), s
            assert server.logins == 3

    run(main())


def test_a_lost_idle_connection_is_retired_once(server: FakeServer) -> None:
    """Told twice (a second cleanup), then found by the housekeeping and a checkout: one close."""
    work = PoolWork()

    async def main() -> None:
        async with fake_pool(server, min_size=1, max_size=2, validate_after=0.0,
                             observers=[work]) as pool:
            gone = server.connections[0]
            gone.die()
            driver.cleaned_up(gone)
            await _turns()
            await asyncio.sleep(6)  # a housekeeping round
            assert await pool.fetchval("SELECT 1") == 1
            assert pool.stats().closed_total == 1
            assert work.reasons == ["broken"]

    run(main())


def test_a_held_connection_closed_under_its_holder_is_left_to_it(server: FakeServer) -> None:
    """Its holder's return retires it, once: the loss is not counted while it is held."""
    work = PoolWork()

    async def main() -> None:
        async with fake_pool(server, min_size=1, max_size=2, observers=[work]) as pool:
            conn = await pool.acquire()
            conn.raw.die()  # type: ignore[attr-defined]
            await _turns()
            await asyncio.sleep(SOON)
            s = pool.stats()
            assert (s.size, s.in_use, s.closed_total) == (1, 1, 0), s
            assert work.reasons == []
            await pool.release(conn)
            assert pool.stats().closed_total == 1
            assert work.reasons == ["broken"]

    run(main())


def test_a_loss_reported_as_the_same_connection_is_checked_out(server: FakeServer) -> None:
    """The report is handled a turn later: a checkout in between takes the connection (its
    holder would find it lost), and the report leaves it alone."""
    work = PoolWork()

    async def main() -> None:
        async with fake_pool(server, min_size=1, max_size=1, observers=[work]) as pool:
            raw = server.connections[0]
            driver.cleaned_up(raw)  # (as if closed:) its retirement queued for the next turn
            async with pool.acquire() as conn:
                assert conn.raw is raw
                await _turns()
                assert pool.stats().in_use == 1
            assert pool.stats().closed_total == 0
            assert work.reasons == []

    run(main())


def test_a_loss_arriving_with_a_checkout_of_that_connection(server: FakeServer) -> None:
    """Closed, then checked out in the same turn: the checkout finds it closed and replaces it,
    and the report that follows finds it retired: one close, one refill."""
    work = PoolWork()

    async def main() -> None:
        async with fake_pool(server, min_size=1, max_size=1, observers=[work]) as pool:
            server.connections[0].die()
            assert await pool.fetchval("SELECT 1") == 1
            await _turns()
            await asyncio.sleep(SOON)
            s = pool.stats()
            assert (s.size, s.closed_total, s.created_total) == (1, 1, 2), s
            assert work.reasons == ["broken"]
            assert server.logins == 2

    run(main())


def test_a_loss_during_or_after_close_is_ignored(server: FakeServer) -> None:
    work = PoolWork()

    async def main() -> None:
        pool = fake_pool(server, min_size=2, max_size=3, observers=[work])
        await pool.open()
        held = await pool.acquire()
        closing = asyncio.create_task(pool.close(timeout=1.0))
        await _turns()
        assert pool._slots.state.value == "closing"
        held.raw.die()  # type: ignore[attr-defined]  # its holder's still; then close() ends it
        await _turns()
        await pool.release(held)
        await closing
        s = pool.stats()
        assert s.closed_total == s.created_total == 2, s
        for conn in server.connections:
            driver.cleaned_up(conn)
        await _turns()
        await asyncio.sleep(SOON)
        assert server.logins == 2
        assert pool.stats().closed_total == 2
        assert pool._slots.lost_refill is None

    run(main())


def test_a_loss_just_before_terminate_starts_no_refill(server: FakeServer) -> None:
    async def main() -> None:
        pool = fake_pool(server, min_size=2, max_size=3)
        await pool.open()
        server.connections[0].die()
        pool.terminate()  # before the report's turn
        await _turns()
        await asyncio.sleep(SOON)
        s = pool.stats()
        assert (s.size, s.created_total, s.closed_total) == (0, 2, 2), s
        assert server.logins == 2
        assert pool._slots.lost_refill is None

    run(main())


def test_a_loss_on_a_closed_loop_does_nothing(server: FakeServer) -> None:
    loop = VirtualClockLoop()
    pool = fake_pool(server, min_size=1, max_size=1)
    run(pool.open(), loop=loop)
    loop.close()
    server.connections[0].die()  # (a finalizer, a close from elsewhere: no loop to run on)
    assert pool.stats().closed_total == 0  # left to the pool's terminate()
    pool.terminate()
    assert pool.stats().closed_total == 1


def test_a_refill_stopped_by_close_ends_with_it(server: FakeServer) -> None:
    """close() does not wait for a refill's delay, nor leave its task behind."""

    async def main() -> None:
        pool = fake_pool(server, min_size=1, max_size=1)
        await pool.open()
        server.connections[0].die()
        await _turns()
        refill = pool._slots.lost_refill
        assert refill is not None
        assert not refill.done()
        loop = asyncio.get_running_loop()
        began = loop.time()
        await pool.close(timeout=1.0)
        assert loop.time() - began < 0.01
        assert refill.done()
        assert server.logins == 1

    run(main())


class _Closing(FakeServer):
    """A server that closes each connection 1 ms after its login (``idle_session_timeout``
    set very low, or a pooler killing every client)."""

    async def login(self) -> FakeConnection:
        conn = await super().login()
        asyncio.get_running_loop().call_later(0.001, conn.die)
        return conn


def test_a_server_closing_every_connection_gets_no_tight_loop_of_logins() -> None:
    server = _Closing()
    seen: dict[str, Any] = {}

    async def main() -> None:
        async with fake_pool(server, min_size=1, max_size=2) as pool:
            start = server.logins
            await asyncio.sleep(10)
            seen["logins"] = server.logins - start
            seen["closed"] = pool.stats().closed_total

    run(main())
    # The refill's delays grow 0.05, 0.1, 0.2 ... to 2 s (half of each to all of it, at random):
    # about a dozen logins in 10 s, with the housekeeping's two rounds. A tight loop: thousands.
    assert 3 <= seen["logins"] <= 20, seen
    assert seen["closed"] >= seen["logins"], seen


def test_a_server_refusing_logins_gets_no_tight_loop_of_logins(server: FakeServer) -> None:
    async def main() -> None:
        async with fake_pool(server, min_size=2, max_size=2) as pool:
            server.login_mode = "refuse"
            start = server.logins
            for conn in list(server.connections):
                conn.die()
            await asyncio.sleep(10)
            assert pool.stats().size == 0
            # One refill (it logs in for each missing connection, and stops at the first
            # refusal), then one per housekeeping round.
            assert 1 <= server.logins - start <= 4, server.logins - start

    run(main())


def test_no_refill_between_a_snapshot_and_its_restore(server: FakeServer) -> None:
    async def main() -> None:
        async with fake_pool(server, min_size=1, max_size=1) as pool:
            pool._slots.restored = asyncio.Event()  # (as `snapshot._stop_checkout_times`)
            server.connections[0].die()
            await _turns()
            assert pool.stats().closed_total == 1
            assert pool._slots.lost_refill is None
            await asyncio.sleep(SOON)
            assert server.logins == 1
            pool._slots.restored.set()
            pool._slots.restored = None

    run(main())
