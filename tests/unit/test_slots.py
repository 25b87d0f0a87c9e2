"""The slot owner's bookkeeping, against the fake driver: checkout, return, hand-over, sizes."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from asyncpool import ConnectionLostError, PoolClosedError, PoolError, PoolTimeoutError
from asyncpool.pool.lifecycle import use_connector
from tests.provider_support import QuietProvider
from tests.unit.fakes import FakeServer, fake_pool, run


def _sizes_add_up(pool: object) -> None:
    s = pool.stats()  # type: ignore[attr-defined]
    assert s.size == s.idle + s.in_use + s.connecting <= s.max_size


def test_open_fills_min_size_and_close_closes_everything(server: FakeServer) -> None:
    async def main() -> None:
        pool = fake_pool(server, min_size=2, max_size=4)
        await pool.open()
        assert (pool.stats().size, pool.stats().idle) == (2, 2)
        await pool.close()
        s = pool.stats()
        assert (s.size, s.created_total, s.closed_total) == (0, 2, 2)
        assert server.open_connections() == []
        assert pool.closed

    run(main())


def test_checkout_takes_the_most_recently_used_and_gives_it_back(server: FakeServer) -> None:
    async def main() -> None:
        async with fake_pool(server, min_size=2, max_size=2) as pool:
            async with pool.acquire() as a:
                first = a.raw
                assert pool.stats().in_use == 1
                _sizes_add_up(pool)
            async with pool.acquire() as b:
                assert b.raw is first
            assert pool.stats().acquired_total == 2

    run(main())


def test_the_fast_path_comes_back_after_every_waiter_left(server: FakeServer) -> None:
    """A connection returned while the only waiters had been cancelled (their tasks not yet run
    to leave the line) goes idle, and the next checkout takes the fast path again: the pool's
    `fast` flag, cleared while anyone waits, is set once the line is empty whichever way it
    emptied."""

    async def main() -> None:
        async with fake_pool(server, min_size=1, max_size=1) as pool:
            slots = pool._slots
            assert slots.fast
            held = await pool.acquire()
            waiters = [asyncio.create_task(pool.fetchval("SELECT 1")) for _ in range(2)]
            await asyncio.sleep(0)
            assert len(slots.waiters) == 2
            assert not slots.fast
            for waiter in waiters:
                waiter.cancel()
            await pool.release(held)  # both waiters are done but still in line
            assert not slots.waiters
            assert slots.fast
            for waiter in waiters:
                with pytest.raises(asyncio.CancelledError):
                    await waiter
            assert slots.fast
            checkout = slots.checkout_nowait(None)
            assert checkout is not None, "the fast path was not taken"
            assert slots.checkin_nowait(checkout) is False
            assert (pool.stats().idle, pool.stats().in_use) == (1, 0)

    run(main())


def test_a_statement_longer_than_validate_after_does_not_make_the_next_checkout_validate(
    server: FakeServer,
) -> None:
    """A connection counts as used until its statement ends. Counted from the checkout, every
    statement slower than `validate_after` (a pooler's queue under load is enough) would cost
    the next checkout a validation round trip, when the server is busiest."""

    async def main() -> None:
        async with fake_pool(server, min_size=1, max_size=1, validate_after=1.0) as pool:
            await pool.fetchval("SELECT pg_sleep(2)")
            await pool.fetchval("SELECT pg_sleep(0)")
            async with pool.acquire() as held:
                await held.fetchval("SELECT pg_sleep(2)")
            await pool.fetchval("SELECT pg_sleep(0)")
            (raw,) = server.open_connections()
            assert raw.queries == ["SELECT pg_sleep(2)", "SELECT pg_sleep(0)"] * 2, raw.queries
            await asyncio.sleep(1.5)  # idle past validate_after: now it is checked
            await pool.fetchval("SELECT pg_sleep(0)")
            assert raw.queries[4:] == ["SELECT 1", "SELECT pg_sleep(0)"], raw.queries

    run(main())


def test_a_returned_connection_goes_straight_to_the_first_waiter(server: FakeServer) -> None:
    async def main() -> None:
        async with fake_pool(server, min_size=1, max_size=1) as pool:
            order: list[int] = []

            async def user(i: int) -> None:
                async with pool.acquire() as conn:
                    order.append(i)
                    await conn.fetchval("SELECT 1")

            await asyncio.gather(*(user(i) for i in range(5)))
            assert order == [0, 1, 2, 3, 4]
            assert pool.stats().created_total == 1
            _sizes_add_up(pool)

    run(main())


def test_waiting_ends_in_a_timeout_that_names_the_pool(server: FakeServer) -> None:
    async def main() -> None:
        async with fake_pool(server, min_size=1, max_size=1) as pool:
            release = asyncio.Event()

            async def holder() -> None:
                async with pool.acquire():
                    await release.wait()

            held = asyncio.create_task(holder())
            await asyncio.sleep(0.05)
            with pytest.raises(PoolTimeoutError, match=r"'unit'.*raise max_size"):
                await pool.acquire(timeout=0.5)
            release.set()
            await held
            s = pool.stats()
            assert (s.waiting, s.timeouts_total) == (0, 1)

    run(main())


def test_a_timeout_that_came_mostly_in_line_says_so_not_the_network(server: FakeServer) -> None:
    """A slot freed late (the holder's connection closed after 1.9 s of a 2 s wait) leaves the
    waiter connecting when its time runs out: the message says where the time went."""
    async def main() -> None:
        async with fake_pool(server, min_size=1, max_size=1) as pool:
            server.login_latency = 0.5

            async def holder() -> None:
                async with pool.acquire() as conn:
                    await asyncio.sleep(1.9)
                    conn.raw.die()  # type: ignore[attr-defined]  # retired on return: its slot goes to the waiter

            held = asyncio.create_task(holder())
            await asyncio.sleep(0)
            with pytest.raises(PoolTimeoutError) as caught:
                await pool.acquire(timeout=2.0)
            await held
            message = str(caught.value)
            assert "waited 1.9" in message
            assert "in line while every connection was held, then was still connecting" in message
            assert "release connections sooner, raise max_size or acquire_timeout" in message
            assert "reachable" not in message

    run(main())


def test_a_task_waiting_on_connections_it_holds_is_told_so(server: FakeServer) -> None:
    """An acquire nested in another acquire block (or pool.fetchval() inside one) of the same
    task waits for a connection only that task can give back: raising acquire_timeout or
    max_size, the usual advice, would not help. The message says what happened; a wait on
    connections other tasks hold keeps the usual advice."""
    async def main() -> None:
        async with fake_pool(server, min_size=0, max_size=2, acquire_timeout=0.2) as pool:
            async with pool.acquire(), pool.acquire():
                with pytest.raises(PoolTimeoutError) as nested:
                    await pool.acquire()
                with pytest.raises(PoolTimeoutError) as helper:
                    await pool.fetchval("SELECT 1")
            for caught in (nested, helper):
                message = str(caught.value)
                assert "the task waiting holds 2 of them itself" in message
                assert "nested in another acquire block" in message
                assert "raise max_size" not in message

            release = asyncio.Event()

            async def holder() -> None:
                async with pool.acquire():
                    await release.wait()

            async with pool.acquire():  # one held here, the other by another task
                held = asyncio.create_task(holder())
                await asyncio.sleep(0.05)
                with pytest.raises(PoolTimeoutError) as other:
                    await pool.acquire(timeout=0.2)
                release.set()
                await held
            # Another task holds one too: it may give it back, so the usual advice stays.
            assert "holds 1 of them itself: an acquire nested" in str(other.value)
            assert "raise max_size or acquire_timeout" in str(other.value)
            assert "only it could give back" not in str(other.value)
            release.clear()
            holders = [asyncio.create_task(holder()) for _ in range(2)]
            await asyncio.sleep(0.05)
            with pytest.raises(PoolTimeoutError) as others:
                await pool.acquire(timeout=0.2)
            release.set()
            await asyncio.gather(*holders)
            assert "itself" not in str(others.value)
            assert "release connections sooner, raise max_size or acquire_timeout" in str(
                others.value)
            s = pool.stats()
            assert (s.in_use, s.waiting) == (0, 0)

    run(main())


def test_a_connection_found_lost_has_the_idle_ones_checked(server: FakeServer) -> None:
    """Every connection died unnoticed (a server restart, a failover): the first statement
    meets it. The idle ones, lost with it but fresh by the clock, are checked before they are
    lent, so the retry is served on a new connection instead of failing on the next dead one."""
    async def main() -> None:
        async with fake_pool(server, min_size=3, max_size=3, validate_after=60) as pool:
            assert pool.stats().idle == 3
            for conn in server.open_connections():
                conn.die_silently()
            with pytest.raises(ConnectionLostError):
                await pool.fetchval("SELECT 1")
            assert await pool.fetchval("SELECT 2") == 1  # (the fake answers 1)
            s = pool.stats()
            # The one met, and the one checked before the retry, in whose slot it logged in.
            assert (s.in_use, s.closed_total) == (0, 2)
            before = server.logins
            assert await pool.fetchval("SELECT 3") == 1  # on the new one, as it is
            assert server.logins == before
        async with fake_pool(server, min_size=2, max_size=2, validate_after=None) as pool:
            for conn in server.open_connections():
                conn.die_silently()
            for _ in range(2):  # never checked, as asked: each caller meets a dead one
                with pytest.raises(ConnectionLostError):
                    await pool.fetchval("SELECT 1")

    run(main())


def test_a_caller_waiting_on_an_open_that_fails_is_told_so(server: FakeServer) -> None:
    """A caller in line while the first open() fails (cancelled here: a Lambda INIT deadline)
    is told the open failed and the pool can be opened again, not that it was closed."""
    async def main() -> None:
        pool = fake_pool(server, min_size=1, max_size=1)
        server.login_mode = "hang"
        opening = asyncio.create_task(pool.open())
        await asyncio.sleep(0.05)
        waiting = asyncio.create_task(pool.fetchval("SELECT 1"))
        await asyncio.sleep(0.05)
        opening.cancel()
        with pytest.raises(PoolClosedError) as caught:
            await waiting
        assert "its open() failed or was cancelled while this caller waited" in str(caught.value)
        assert "can be opened again" in str(caught.value)
        server.login_mode = "ok"
        await pool.open()
        assert await pool.fetchval("SELECT 2") == 1
        await pool.close()

    run(main())


def test_a_broken_connection_is_retired_and_its_slot_reused(server: FakeServer) -> None:
    async def main() -> None:
        async with fake_pool(server, min_size=1, max_size=1) as pool:
            async with pool.acquire() as conn:
                conn.raw.die()  # type: ignore[attr-defined]
            s = pool.stats()
            assert (s.size, s.closed_total) == (0, 1)
            assert await pool.fetchval("SELECT 1") == 1
            assert pool.stats().created_total == 2

    run(main())


def test_an_open_transaction_is_rolled_back_on_return(server: FakeServer) -> None:
    async def main() -> None:
        async with fake_pool(server, min_size=1, max_size=1) as pool:
            async with pool.acquire() as conn:
                await conn.execute("BEGIN")
                raw = conn.raw
            assert raw.queries[-1] == "ROLLBACK"  # type: ignore[attr-defined]
            assert not raw.is_in_transaction()
            assert pool.stats().idle == 1

    run(main())


def test_use_after_release_is_refused(server: FakeServer) -> None:
    async def main() -> None:
        async with fake_pool(server) as pool:
            async with pool.acquire() as conn:
                pass
            with pytest.raises(PoolError, match="released back to the pool"):
                await conn.fetchval("SELECT 1")

    run(main())


def test_acquire_on_a_closed_pool_is_refused(server: FakeServer) -> None:
    async def main() -> None:
        pool = fake_pool(server)
        with pytest.raises(PoolClosedError, match="not open yet"):
            await pool.acquire()
        await pool.open()
        await pool.close()
        with pytest.raises(PoolClosedError, match="closed"):
            await pool.acquire()

    run(main())


def test_close_cancelled_while_a_cancel_request_is_in_flight_still_closes(server: FakeServer) -> None:
    """Found by the model: close(timeout=0) terminates a connection once asyncpg's cancel request
    is through; cancelling close() then must not cancel that termination before it starts."""

    async def main() -> None:
        pool = fake_pool(server, min_size=1, max_size=1, acquire_timeout=None)
        await pool.open()

        async def user() -> None:
            async with pool.acquire() as conn:
                await conn.fetchval("SELECT 1")

        first = asyncio.ensure_future(user())
        second = asyncio.ensure_future(user())
        await asyncio.sleep(0)
        first.cancel()  # mid-query: a cancel request goes out, the return waits for it
        await asyncio.sleep(0)
        closing = asyncio.ensure_future(pool.close(timeout=0))
        for _ in range(10):  # until close() waits for its termination task
            await asyncio.sleep(0)
            if pool._slots.background:
                break
        assert pool._slots.background
        closing.cancel()
        await asyncio.gather(first, second, closing, return_exceptions=True)
        await asyncio.sleep(30)
        assert server.open_connections() == []
        s = pool.stats()
        assert (s.size, s.closed_total) == (0, s.created_total)

    run(main())


@pytest.mark.parametrize("min_size", [0, 1])
def test_close_of_a_pool_with_no_connection_left_does_not_wait(server: FakeServer,
                                                                min_size: int) -> None:
    """An empty pool (min_size=0 never used, or every login failed) closed at once: close()
    used to wait RELEASE_TIMEOUT (5 s) for a drained event nothing set."""
    async def main() -> None:
        pool = fake_pool(server, min_size=min_size, max_size=2)
        await pool.open()
        if min_size:
            async with pool.acquire() as conn:
                conn.raw.terminate()  # retired on return: size 0
        assert pool.stats().size == 0
        loop = asyncio.get_running_loop()
        started = loop.time()
        await pool.close()
        assert loop.time() - started < 0.1
        assert pool.closed

    run(main())


def test_a_pool_inherited_across_fork_refuses_use_and_leaves_its_connections_alone(
    server: FakeServer,
) -> None:
    """A fork is simulated by bumping the count os.register_at_fork keeps in the child."""
    from asyncpool.pool import forks

    async def main() -> None:
        pool = fake_pool(server, min_size=3, max_size=3)
        await pool.open()
        held = await pool.acquire()
        in_transaction = await pool.acquire()
        await in_transaction.execute("BEGIN")
        in_transaction_raw = in_transaction.raw
        # What os.register_at_fork runs in the child (this process is not forked: the count
        # is put back after the test; the modules that read it hold the list itself).
        forks._after_fork_in_child()
        with pytest.raises(PoolError, match="is a fork of it"):
            await pool.fetchval("SELECT 1")
        with pytest.raises(PoolError, match="is a fork of it"):
            await pool.acquire()
        # Held across the fork, before the inherited pool is closed: used, it is refused
        # (it would talk on the parent's socket); released in its transaction, nothing is sent
        # (a reset would send the parent's session a ROLLBACK).
        with pytest.raises(PoolError, match="forked from the one that opened the pool"):
            await in_transaction.fetchval("SELECT 1")
        await pool.release(in_transaction)
        assert in_transaction_raw.queries == ["BEGIN"]  # type: ignore[attr-defined]
        assert in_transaction_raw.is_in_transaction()
        pool.terminate()
        await pool.close()
        assert pool.closed
        # A connection held across the fork: released, nothing is sent or closed (it raised
        # KeyError); used, it is refused.
        await pool.release(held)
        with pytest.raises(PoolError):
            await held.fetchval("SELECT 1")
        # Neither closed nor terminated: the sockets are the parent's.
        assert len(server.open_connections()) == 3
        assert all(c.closed_how is None for c in server.connections)
        assert [c.queries for c in server.connections if c is not in_transaction_raw] == [[], []]

    count = forks.FORKS[0]
    try:
        run(main())
    finally:
        forks.FORKS[0] = count


# -- a pool used on another event loop: the advice fits what happened ---------------------------


async def _one_statement(pool: Any, how: str) -> Any:
    if how == "acquire":
        async with pool.acquire() as conn:
            return await conn.fetchval("SELECT 1")
    return await pool.fetchval("SELECT 1")


def _loop_factories() -> list[Any]:
    """asyncio's loop (whose `_thread_id` the checkout reads) and, if installed, uvloop's (which
    has none: the checkout asks `get_running_loop()` there)."""
    factories: list[Any] = [pytest.param(asyncio.new_event_loop, id="asyncio")]
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a test dependency
        return factories
    return [*factories, pytest.param(uvloop.new_event_loop, id="uvloop")]


BOTH_PATHS = pytest.mark.parametrize("how", ["fetchval", "acquire"])


@BOTH_PATHS
def test_a_pool_whose_loop_has_ended_says_where_to_open_it(server: FakeServer, how: str) -> None:
    pool = fake_pool(server, min_size=1)
    run(pool.open())  # that loop is closed when run() returns, as after asyncio.run()

    with pytest.raises(PoolError, match="has ended") as refused:
        run(_one_statement(pool, how))
    assert "lifespan" in str(refused.value)
    assert "same loop scope" in str(refused.value)


@BOTH_PATHS
@pytest.mark.parametrize("new_loop", _loop_factories())
def test_a_pool_used_from_another_thread_says_how_to_reach_its_loop(
        server: FakeServer, how: str, new_loop: Any) -> None:
    import threading

    pool = fake_pool(server, min_size=1)
    loop = new_loop()
    thread = threading.Thread(target=loop.run_forever, name="pool-loop", daemon=True)
    thread.start()
    try:
        asyncio.run_coroutine_threadsafe(pool.open(), loop).result(10)
        # Its loop is running (in its thread) and its connection idle: only the thread differs.
        assert pool.stats().idle == 1
        other = new_loop()
        try:
            with pytest.raises(PoolError, match="runs in thread 'pool-loop'") as refused:
                other.run_until_complete(_one_statement(pool, how))
        finally:
            other.close()
        assert "run_coroutine_threadsafe" in str(refused.value)
        assert pool.stats().in_use == 0
        # On its own loop it still works.
        assert asyncio.run_coroutine_threadsafe(_one_statement(pool, how), loop).result(10) == 1
        asyncio.run_coroutine_threadsafe(pool.close(), loop).result(10)
    finally:
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()


@BOTH_PATHS
@pytest.mark.parametrize("new_loop", _loop_factories())
def test_a_pool_used_on_a_second_loop_of_the_same_thread_says_keep_one(
        server: FakeServer, how: str, new_loop: Any) -> None:
    pool = fake_pool(server, min_size=1)
    first = new_loop()
    second = new_loop()
    try:
        first.run_until_complete(pool.open())
        with pytest.raises(PoolError, match="different event loop") as refused:
            second.run_until_complete(_one_statement(pool, how))
        assert "keep one loop" in str(refused.value)
        assert first.run_until_complete(_one_statement(pool, how)) == 1
        first.run_until_complete(pool.close())
    finally:
        second.close()
        first.close()


@pytest.mark.parametrize("how", ["acquire", "reset", "helper"])
def test_a_connection_held_when_the_pool_is_marked_stale_is_checked_before_its_next_use(
        server: FakeServer, how: str) -> None:
    """`mark_stale()` (a thaw, a restore) also reaches a connection in use: its return, plain,
    after a reset, or at the end of a query helper's statement, does not make it look fresh;
    the next checkout validates it once."""

    async def main() -> None:
        async with fake_pool(server, min_size=1, max_size=1, validate_after=None) as pool:
            [raw] = server.open_connections()
            if how == "helper":
                statement = asyncio.create_task(pool.fetchval("SELECT pg_sleep(0.05)"))
                await asyncio.sleep(0.01)
                assert pool.stats().in_use == 1
                pool.mark_stale()
                await statement
            else:
                conn = await pool.acquire()
                if how == "reset":
                    await conn.execute("BEGIN")
                pool.mark_stale()
                await pool.release(conn)
            assert (pool.stats().idle, pool.stats().closed_total) == (1, 0)
            raw.queries.clear()
            assert await pool.fetchval("SELECT 2") is not None
            assert raw.queries == ["SELECT 1", "SELECT 2"]  # validated first
            raw.queries.clear()
            await pool.fetchval("SELECT 3")
            assert raw.queries == ["SELECT 3"]  # once

    run(main())


@pytest.mark.parametrize("how", ["acquire", "helper", "between-logins"])
@pytest.mark.parametrize("alive", [True, False], ids=["alive", "died-silently"])
def test_a_stale_connection_returned_to_a_caller_in_line_is_checked_before_it_gets_it(
        server: FakeServer, how: str, alive: bool) -> None:
    """Marked stale while held, then returned while another caller waits in line (queued, or
    between two login attempts the pooler refused): the waiter validates it first
    (`slow_checkout.check_handed`); one that died silently while held is replaced, and the waiter's
    statement runs on the new connection."""
    retrying = how == "between-logins"
    if retrying:
        server.max_connections = 1  # the second caller's logins are refused (transient)

    async def main() -> None:
        async with fake_pool(server, min_size=1, max_size=2 if retrying else 1,
                             acquire_timeout=None, validate_after=None) as pool:
            [raw] = server.open_connections()
            conn = await pool.acquire()
            if how == "helper":
                waiting = asyncio.create_task(pool.fetchval("SELECT 2"))
            else:
                async def acquire_and_query() -> Any:
                    async with pool.acquire() as other:
                        return await other.fetchval("SELECT 2")
                waiting = asyncio.create_task(acquire_and_query())
            await asyncio.sleep(0.01)
            if retrying:
                assert server.logins >= 2
                assert pool.stats().connecting == 1  # refused, to retry
            else:
                assert pool.stats().waiting == 1
            pool.mark_stale()
            if not alive:
                raw.die_silently()
            raw.queries.clear()
            await pool.release(conn)
            assert await waiting is not None
            if alive:
                assert raw.queries == ["SELECT 1", "SELECT 2"]  # validated first
                assert pool.stats().closed_total == 0
            else:
                [new] = server.open_connections()
                assert new is not raw
                assert raw.is_closed()
                assert new.queries[-1] == "SELECT 2"
                assert pool.stats().validation_failures_total == 1
            # The check cleared the mark: the next statement runs without one.
            [current] = server.open_connections()
            current.queries.clear()
            await pool.fetchval("SELECT 3")
            assert current.queries == ["SELECT 3"]

    run(main())


def test_credentials_replaced_by_new_connect_arguments_are_closed_once_unused(
        server: FakeServer) -> None:
    """`Pool.set_connect_args` gives the pool a new connector; the old one's credentials
    provider, used by no login under way, is closed at once (a process rotating this way kept
    every one open until the pool closed), and the new one with the pool, each once."""
    from tests.unit.fakes import FakeCredentials

    first, second = GatedCredentials(), FakeCredentials()

    async def main() -> None:
        pool = fake_pool(server, min_size=1, connect_kwargs={"fake_server": server,
                                                             "fake_credentials": first})
        await pool.open()
        slots = pool._slots
        config = _use_credentials(pool, server, second)
        assert slots.config is config
        async with asyncio.timeout(5):
            await first.closing.wait()
        await pool.expire_connections()
        assert await pool.fetchval("SELECT 1") is not None
        assert (first.closed, second.closed) == (1, 0)
        await pool.close()
        assert (first.closed, second.closed) == (1, 1)

    run(main())


class GatedCredentials(QuietProvider):
    """A provider whose `password()` waits for `gate` (a login in flight with it), and that says
    when it is closed."""

    def __init__(self) -> None:
        self.gate = asyncio.Event()
        self.gate.set()
        self.reading = asyncio.Event()
        self.closing = asyncio.Event()
        self.closed = 0

    async def password(self, target: object) -> str:
        self.reading.set()
        await self.gate.wait()
        return "fake"

    async def close(self) -> None:
        self.closed += 1
        self.closing.set()


def _use_credentials(pool: Any, server: FakeServer, creds: object) -> Any:
    """Give `pool` a new connector whose logins read `creds` (as `set_connect_args` does);
    returns its configuration."""
    from tests.unit.fakes import FakeConnector

    slots = pool._slots
    config = pool.config.replace(connect_kwargs={"fake_server": server,
                                                 "fake_credentials": creds})
    use_connector(slots, FakeConnector(config, slots.observer))  # type: ignore[arg-type]
    return config


async def _login_reading(pool: Any, creds: GatedCredentials) -> asyncio.Task[Any]:
    """A login under way, held while it reads `creds` (until `creds.gate` is set)."""
    creds.gate.clear()
    login = asyncio.create_task(pool.fetchval("SELECT 1"))
    async with asyncio.timeout(5):
        await creds.reading.wait()
    return login


def test_a_replaced_provider_is_closed_when_its_last_login_ends(server: FakeServer) -> None:
    """Replaced while a login reads it, a provider is closed when that login ends, not before,
    and once (the pool's close does not close it again)."""
    first, second = GatedCredentials(), GatedCredentials()

    async def main() -> None:
        pool = fake_pool(server, min_size=0, max_size=2,
                         connect_kwargs={"fake_server": server, "fake_credentials": first})
        await pool.open()
        login = await _login_reading(pool, first)
        _use_credentials(pool, server, second)
        assert await pool.fetchval("SELECT 2") is not None  # a login with `second` meanwhile
        assert first.closed == 0  # the login under way still reads it
        first.gate.set()
        async with asyncio.timeout(5):
            assert await login is not None
            await first.closing.wait()
        assert (first.closed, second.closed) == (1, 0)
        await pool.close()
        assert (first.closed, second.closed) == (1, 1)

    run(main())


def test_a_provider_given_back_while_a_login_uses_it_is_not_closed(server: FakeServer) -> None:
    """`first` replaced while a login reads it, then given back before that login ends: the
    login's end does not close it (it is in use again); `second`, used by nothing, is closed
    at its replacement; the pool's close closes `first` once."""
    first, second = GatedCredentials(), GatedCredentials()

    async def main() -> None:
        pool = fake_pool(server, min_size=0, max_size=2,
                         connect_kwargs={"fake_server": server, "fake_credentials": first})
        await pool.open()
        slots = pool._slots
        login = await _login_reading(pool, first)
        for creds in (second, first):
            _use_credentials(pool, server, creds)
        async with asyncio.timeout(5):
            await second.closing.wait()
        first.gate.set()
        async with asyncio.timeout(5):
            assert await login is not None
        await asyncio.gather(*slots.background)  # any close the login's end started
        assert (first.closed, second.closed) == (0, 1)
        await pool.close()
        assert (first.closed, second.closed) == (1, 1)

    run(main())


@pytest.mark.parametrize("how", ["async with pool.acquire()", "conn = await pool.acquire()"])
def test_close_called_by_a_holder_closes_its_own_connections_and_waits_for_the_others(
        server: FakeServer, how: str, caplog: pytest.LogCaptureFixture) -> None:
    """A task that calls close() while holding a connection of the pool: that connection cannot
    come back while close() waits (with timeout=None close() waited forever). It is closed at
    once, with a warning; another task's connection is still waited for and given back."""
    async def main() -> float:
        pool = fake_pool(server, min_size=0, max_size=3)
        await pool.open()
        loop = asyncio.get_running_loop()

        async def other() -> None:
            async with pool.acquire() as conn:
                await asyncio.sleep(2)
                assert await conn.fetchval("SELECT 1") == 1

        other_task = asyncio.create_task(other())
        await asyncio.sleep(0)

        async def close_while_holding(conn: Any) -> float:
            started = loop.time()
            async with asyncio.timeout(20):  # (virtual seconds; not wait_for: a task of its own)
                await pool.close(timeout=None)
            with pytest.raises(PoolClosedError, match="was closed while this connection"):
                await conn.fetchval("SELECT 1")
            return loop.time() - started

        if how == "async with pool.acquire()":
            async with pool.acquire() as conn:
                elapsed = await close_while_holding(conn)
        else:
            conn = await pool.acquire()
            elapsed = await close_while_holding(conn)
            await pool.release(conn)  # nothing to do: closed with the pool
        await other_task  # given back within its block: not terminated
        assert pool.closed
        stats = pool.stats()
        assert (stats.size, stats.in_use) == (0, 0)
        assert stats.closed_total == stats.created_total == 2
        return elapsed

    with caplog.at_level("WARNING", logger="asyncpool.pool"):
        elapsed = run(main())
    assert 1.9 < elapsed < 2.5  # the other holder's 2 s, not its own (forever)
    assert [r.getMessage() for r in caplog.records if "close() was called by the task holding 1"
            in r.getMessage()]


def test_a_holder_calling_close_while_another_close_waits_for_it_does_not_deadlock(
        server: FakeServer) -> None:
    """Another task's close() waits for this task's connection; this task then calls close()
    too: it used to wait for the first close() to end, which waited for it."""
    async def main() -> None:
        pool = fake_pool(server, min_size=0, max_size=2)
        await pool.open()
        async with pool.acquire() as conn:
            first = asyncio.create_task(pool.close(timeout=None))
            await asyncio.sleep(1)
            assert not first.done()  # waiting for this block's connection
            async with asyncio.timeout(20):  # (virtual seconds)
                await pool.close(timeout=None)
            with pytest.raises(PoolClosedError):
                await conn.fetchval("SELECT 1")
        await first
        assert pool.closed
        assert pool.stats().closed_total == pool.stats().created_total == 1

    run(main())


@pytest.mark.parametrize(("acquire_timeout", "connect_timeout", "checked_within"),
                         [(5.0, 5.0, 2.5), (5.0, 1.0, 1.0), (None, 2.0, 2.0)])
def test_a_check_that_gets_no_answer_leaves_time_to_replace_the_connection(
        server: FakeServer, acquire_timeout: float | None, connect_timeout: float,
        checked_within: float) -> None:
    """A connection whose path vanished without a word (a NAT or proxy forgot it while the
    environment was frozen) answers its check with nothing. The check gives up within
    connect_timeout and within half of what is left of the acquire's time, so the dead one is
    replaced inside the same acquire: with Lambda's defaults (both 5 s) it used to take the whole
    acquire, which failed with PoolTimeoutError."""
    async def main() -> float:
        async with fake_pool(server, min_size=1, max_size=1, acquire_timeout=acquire_timeout,
                             connect_timeout=connect_timeout) as pool:
            [raw] = server.open_connections()
            raw.vanish()
            pool.mark_stale()  # (as after a freeze)
            loop = asyncio.get_running_loop()
            started = loop.time()
            assert await pool.fetchval("SELECT 1") == 1
            elapsed = loop.time() - started
            stats = pool.stats()
            assert (stats.validation_failures_total, stats.created_total) == (1, 2)
            [new] = server.open_connections()
            assert new is not raw
            return elapsed

    elapsed = run(main())
    assert checked_within <= elapsed < checked_within + 0.2


def test_a_slow_check_of_a_connection_not_marked_stale_is_waited_for(server: FakeServer) -> None:
    """A check due by the clock that answers slowly is a queue (a busy pooler), not a vanished
    path: the connection is waited for within the acquire's time and handed out, not replaced
    and counted as dead (only a connection marked stale, after a freeze, gets half the time)."""
    async def main() -> None:
        async with fake_pool(server, min_size=1, max_size=1, acquire_timeout=0.5,
                             validate_after=0.1) as pool:
            await asyncio.sleep(0.2)  # idle past validate_after: checked at the next checkout
            server.latency = 0.3  # each answer waits 0.3 s in the pooler's queue
            assert await pool.fetchval("SELECT 1") == 1
            stats = pool.stats()
            assert (stats.validation_failures_total, stats.created_total) == (0, 1)

    run(main())


def test_an_acquire_that_runs_out_after_a_failed_check_says_so(server: FakeServer) -> None:
    async def main() -> None:
        async with fake_pool(server, min_size=1, max_size=1, acquire_timeout=1.0) as pool:
            [raw] = server.open_connections()
            raw.vanish()
            pool.mark_stale()
            server.login_mode = "hang"  # and its replacement's login gets no answer either
            with pytest.raises(PoolTimeoutError) as caught:
                await pool.fetchval("SELECT 1")
            assert ("last error: an idle connection failed its check (no answer within 0.5s) "
                    "and was replaced") in str(caught.value)

    run(main())


def test_a_provider_given_back_after_another_is_closed_once(server: FakeServer) -> None:
    """`set_connect_args(credentials=first)`, then `second`, then `first` again, then both
    again, while a login reads each: each is both replaced and in use; each provider is closed
    once (`second` when its login ends, `first` with the pool)."""
    first, second = GatedCredentials(), GatedCredentials()

    async def main() -> None:
        pool = fake_pool(server, min_size=0, max_size=2,
                         connect_kwargs={"fake_server": server, "fake_credentials": first})
        await pool.open()
        logins = []
        for creds in (first, second):
            _use_credentials(pool, server, creds)
            logins.append(await _login_reading(pool, creds))
        for creds in (first, second, first):
            _use_credentials(pool, server, creds)
        assert (first.closed, second.closed) == (0, 0)
        first.gate.set()
        second.gate.set()
        async with asyncio.timeout(5):
            assert await asyncio.gather(*logins) == [1, 1]
            await second.closing.wait()
        assert await pool.fetchval("SELECT 1") is not None
        await pool.close()
        assert (first.closed, second.closed) == (1, 1)

    run(main())
