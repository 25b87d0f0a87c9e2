"""A pool used where it cannot be, against the fake driver: refused at once, with what to do
instead, and nothing changed."""

from __future__ import annotations

import asyncio
import logging
from decimal import Decimal
from typing import Any

import pytest

from asyncpool import Pool, PoolConfig, PoolConfigError, PoolError
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
    pending: list[asyncio.Future[Any]] = []

    async def main() -> None:
        await pool.open()
        await pool.acquire()
        pending.append(asyncio.ensure_future(pool.fetchval("SELECT 1")))  # waits in line
        pending.append(asyncio.ensure_future(pool.open()))  # (no-op once open)
        await asyncio.sleep(0.01)
        assert pool.stats().waiting == 1

    run(main())  # closes the loop, its tasks still pending
    if how == "terminate":
        pool.terminate()
    else:
        asyncio.run(pool.close())
    assert pool.closed
    assert server.open_connections() == []


def test_a_login_left_pending_on_a_closed_loop_is_let_go_quietly(
        server: FakeServer, caplog: pytest.LogCaptureFixture) -> None:
    """The pool's own login (a min_size fill) pending when its loop was closed: terminate()
    lets it go, and the coroutine closed later (by the garbage collector, any time) raised
    KeyError from the login's bookkeeping: "Exception ignored in: <coroutine object run>" (a
    housekeeping refill, a CI run on Python 3.12), or a WARNING that the background fill
    failed (an ``open(wait=False)``'s, here)."""
    server.login_mode = "hang"
    pool = fake_pool(server, min_size=1, max_size=1)
    pending: list[asyncio.Task[Any]] = []

    async def main() -> None:
        await pool.open(wait=False)
        await asyncio.sleep(0.01)
        assert pool.stats().connecting == 1
        pending.extend(t for t in asyncio.all_tasks() if t is not asyncio.current_task())

    run(main())  # closes the loop, the login still pending
    pool.terminate()
    assert pool.closed
    with caplog.at_level(logging.WARNING, logger="asyncpool"):
        for task in pending:  # (what the garbage collector does with them)
            task.get_coro().close()
    assert [r.getMessage() for r in caplog.records] == []


# -- bad option values ------------------------------------------------------------------------

_HUGE = 2**1100  # an int past a float's range


def test_an_int_time_past_a_floats_range_means_no_limit(server: FakeServer) -> None:
    """Taken by Pool(), such an int failed at open() with a bare OverflowError (or, given to
    acquire(timeout=), in the caller waiting in line). It means what float("inf") does."""
    pool = fake_pool(server, min_size=1, max_size=1, acquire_timeout=_HUGE, max_lifetime=_HUGE,
                     max_idle=_HUGE, validate_after=_HUGE, leak_timeout=_HUGE,
                     command_timeout=_HUGE, statement_cache_ttl=_HUGE)
    assert pool.config.acquire_timeout is None
    assert pool.config.leak_timeout is None
    with pytest.raises(PoolConfigError, match="connect_timeout=inf: a login must have a time"):
        fake_pool(server, connect_timeout=_HUGE)

    async def main() -> None:
        await pool.open()
        held = await pool.acquire()

        async def waiter() -> Any:
            async with pool.acquire(timeout=_HUGE) as conn:
                return await conn.fetchval("SELECT 1")

        waiting = asyncio.ensure_future(waiter())
        await asyncio.sleep(0.01)
        assert pool.stats().waiting == 1
        await pool.release(held, timeout=_HUGE)
        assert await waiting == 1
        await pool.close(timeout=_HUGE)

    run(main())


def test_a_statement_timeout_past_a_floats_range_is_refused_before_it_is_sent(
        server: FakeServer) -> None:
    """asyncpg reads a statement's timeout with float(): it overflowed once the connection was
    taken (OverflowError, or a TimeoutError at once from a query helper)."""
    async def main() -> None:
        async with fake_pool(server, min_size=1) as pool:
            with pytest.raises(PoolConfigError, match=r"fetchval\(timeout=.*within a float's range"):
                await pool.fetchval("SELECT 2", timeout=_HUGE)
            async with pool.acquire() as conn:
                with pytest.raises(PoolConfigError, match="within a float's range"):
                    await conn.fetchval("SELECT 2", timeout=_HUGE)
                await conn.fetchval("SELECT 3", timeout=float("inf"))
            sent = [q for c in server.connections for q in c.queries]
            assert "SELECT 3" in sent
            assert "SELECT 2" not in sent

    run(main())


@pytest.mark.parametrize("options", [{"max_inactive_connection_lifetime": False},
                                     {"max_cached_statement_lifetime": False},
                                     {"statement_cache_size": 0.0}])
def test_asyncpgs_zero_is_taken_as_an_int_only(server: FakeServer, options: dict[str, Any]
                                               ) -> None:
    """asyncpg's 0 ("no limit", "no statement cache") was read from False and 0.0 too: False
    turned max_idle off, 0.0 the statement cache."""
    with pytest.raises(PoolConfigError, match=r"=(False|0\.0): must be"):
        fake_pool(server, **options)


@pytest.mark.parametrize("bad", [True, "5", [], Decimal("NaN"), -1])
def test_terminate_with_a_bad_cancel_within_terminates_then_refuses(
        server: FakeServer, bad: Any) -> None:
    """A bare TypeError ("'>=' not supported...") before anything was closed, or taken (True,
    a Decimal NaN): in a shutdown path, the connections stayed open."""
    async def main() -> None:
        pool = fake_pool(server, min_size=2)
        await pool.open()
        with pytest.raises(PoolConfigError, match=r"terminate\(cancel_within=.*terminated without"):
            pool.terminate(cancel_within=bad)
        assert pool.closed
        assert server.open_connections() == []

    run(main())


@pytest.mark.parametrize("bad", [1, -1, [], b"require", float("nan")])
def test_an_ssl_value_that_is_no_mode_is_refused_by_pool(server: FakeServer, bad: Any) -> None:
    """Only a string was checked when the pool was made: anything else waited for open(), and
    a PoolConfig held it as valid."""
    with pytest.raises(PoolConfigError, match=r"ssl=.*: choose one of disable"):
        fake_pool(server, ssl=bad)


@pytest.mark.parametrize("variable", ["ASYNCPOOL_MAX_SIZE", "ASYNCPOOL_MAX_QUERIES",
                                      "ASYNCPOOL_STATEMENT_CACHE_SIZE"])
def test_a_whole_number_variable_too_long_for_a_float_is_read(variable: str) -> None:
    """Its NaN check converted it to a float: a bare OverflowError naming no variable."""
    config = PoolConfig.from_env({variable: "9" * 400, "ASYNCPOOL_DSN": "postgresql://u@h/d"})
    assert max(config.max_size, config.max_queries or 0, config.statement_cache_size) == 10**400 - 1


@pytest.mark.parametrize(("arguments", "match"), [
    ({"config": {"max_size": 5}}, r"config=\{'max_size': 5\}: must be a PoolConfig"),
    ({"observers": 5}, "observers=5: must be a list of PoolObserver"),
])
def test_pools_own_arguments_are_checked_as_options_are(arguments: dict[str, Any], match: str
                                                        ) -> None:
    """A bare AttributeError ("'dict' object has no attribute 'replace'") or TypeError ("'int'
    object is not iterable") that named neither argument."""
    with pytest.raises(PoolConfigError, match=match):
        Pool("postgresql://u@h/d", **arguments)


@pytest.mark.parametrize("bad", [[], {}, {"on"}, Decimal("sNaN")])
def test_a_statement_mode_that_cannot_be_looked_up_is_refused_as_any_other(bad: Any) -> None:
    """The look-up of a former mode's name ran before the check: a bare ``TypeError:
    unhashable type: 'list'`` (``Cannot hash a signaling NaN value``) naming no option."""
    with pytest.raises(PoolConfigError, match=r"prepared_statements=.*: choose one of 'off'"):
        Pool("postgresql://u@h/d", prepared_statements=bad)
    with pytest.raises(PoolConfigError, match=r"prepared_statements=.*: choose one of 'off'"):
        PoolConfig(dsn="postgresql://u@h/d", prepared_statements=bad)


@pytest.mark.parametrize(("query", "match"), [
    ("?port=6432", r"the DSN cannot be used: it gives the port twice"),
    ("?sslmode=verify_full", r"the DSN's sslmode='verify_full': choose one of disable"),
    ("?channel_binding=yes", r"the DSN's channel_binding='yes': choose one of disable"),
    ("?sslnegotiation=tls", r"the DSN's sslnegotiation='tls': choose one of postgres, direct"),
    ("?ssl_min_protocol_version=1.2", r"the DSN's ssl_min_protocol_version='1.2': write one "
                                      r"of TLSv1"),
    ("?require_auth=scram", r"the DSN's require_auth='scram': write a comma-separated list"),
])
def test_a_dsn_the_pool_will_not_read_is_refused_when_the_pool_is_made(query: str, match: str
                                                                         ) -> None:
    """Accepted by Pool(), PoolConfig() and lambda_config(), and refused only at open() (with
    these words): on Lambda, at the first invocation rather than at INIT."""
    dsn = f"postgresql://app@db.example:5432/app{query}"
    with pytest.raises(PoolConfigError, match=match):
        Pool(dsn)
    with pytest.raises(PoolConfigError, match=match):
        PoolConfig.from_env({"ASYNCPOOL_DSN": dsn})


@pytest.mark.parametrize("names", [("asyncpool", "asyncpool"), ("orders", "reports")])
def test_a_connection_given_to_another_pools_release_names_that_pool(
        server: FakeServer, names: tuple[str, str]) -> None:
    """Two pools left with the default name said "pool 'asyncpool': release() was given a
    connection of pool 'asyncpool'", as if one pool refused its own connection."""
    mine, theirs = names

    async def main() -> str:
        pool = fake_pool(server, name=mine, min_size=0, max_size=1)
        other = fake_pool(server, name=theirs, min_size=0, max_size=1)
        async with pool, other:
            conn = await other.acquire()
            try:
                with pytest.raises(PoolError) as refused:
                    await pool.release(conn)
            finally:
                await other.release(conn)
            assert (pool.stats().in_use, other.stats().in_use) == (0, 0)
        return str(refused.value)

    message = run(main())
    assert "release it to the pool it came from" in message
    if mine == theirs:
        assert f"another pool, also named {theirs!r} (give each pool its own name=)" in message
    else:
        assert f"a connection of pool {theirs!r}" in message


def test_a_connections_method_on_an_acquire_not_awaited_says_to_await_it(
        server: FakeServer) -> None:
    """``conn = pool.acquire()`` with the `await` forgotten, then ``await conn.fetchval(...)``,
    was "AttributeError: 'AcquireContext' object has no attribute 'fetchval'"."""
    async def main() -> None:
        async with fake_pool(server, name="orders", min_size=0, max_size=1) as pool:
            conn: Any = pool.acquire()
            with pytest.raises(AttributeError, match=r"pool 'orders': pool\.acquire\(\) gives a "
                               r"connection, it is not one \(no \.fetchval\): write `async with "
                               r"pool\.acquire\(\) as conn:` or `conn = await pool\.acquire\(\)`, "
                               r"then conn\.fetchval") as refused:
                await conn.fetchval("SELECT 1")
            assert (refused.value.name, refused.value.obj) == ("fetchval", conn)
            assert not hasattr(conn, "execute")  # (a missing attribute, as before)
            tx: Any = pool.transaction()
            with pytest.raises(AttributeError, match=r"pool\.transaction\(\) gives a connection.*"
                               r"write `async with pool\.transaction\(\) as conn:`, then "
                               r"conn\.execute"):
                await tx.execute("SELECT 1")
            assert pool.stats().in_use == 0  # nothing was taken
            async with pool.acquire() as held:  # the context itself still works
                assert await held.fetchval("SELECT 1") == 1

    run(main())
