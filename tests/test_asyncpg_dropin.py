"""What asyncpg 0.32's own pool tests expect of a pool, on asyncpool's: the differences a
drop-in user would otherwise meet (found by running asyncpg's tests/test_pool.py against
asyncpool), against a real PostgreSQL."""

from __future__ import annotations

import asyncio

import pytest

import asyncpool
from asyncpool import PoolConfigError
from asyncpool.testing import PostgresServer


async def _backends(postgres: PostgresServer, application_name: str) -> int:
    """The server's count of sessions with this application name (the pool's, not the
    probe's own)."""
    async with asyncpool.create_pool(postgres.admin_dsn, min_size=0, max_size=1,
                                     telemetry=False) as admin:
        count = await admin.fetchval(
            "SELECT count(*) FROM pg_stat_activity WHERE application_name = $1",
            application_name)
        assert isinstance(count, int)
        return count


async def test_init_size_opens_that_many_and_the_extra_ones_expire_to_min_size(
        postgres: PostgresServer) -> None:
    """asyncpg 0.32's ``init_size``: `open()` opens that many, `get_init_size()` says so, and
    those beyond `min_size` go once idle past `max_inactive_connection_lifetime`."""
    name = "dropin-init-size"
    async with asyncpool.create_pool(
            postgres.dsn(), init_size=3, min_size=1, max_size=5,
            max_inactive_connection_lifetime=0.2, server_settings={"application_name": name},
            telemetry=False) as pool:
        assert (pool.get_init_size(), pool.get_min_size(), pool.get_max_size()) == (3, 1, 5)
        assert (pool.get_size(), pool.get_idle_size()) == (3, 3)
        assert await _backends(postgres, name) == 3
        # Housekeeping reaps idle connections past max_idle: bounded wait, min_size stays.
        for _ in range(200):
            if pool.get_size() == 1:
                break
            await asyncio.sleep(0.05)
        assert pool.get_size() == 1
        assert await pool.fetchval("SELECT 1") == 1


async def test_init_size_is_opened_in_the_background_by_open_wait_false(
        postgres: PostgresServer) -> None:
    pool = asyncpool.Pool(postgres.dsn(), init_size=2, min_size=0, max_size=3, telemetry=False)
    await pool.open(wait=False)
    try:
        for _ in range(200):
            if pool.get_size() == 2:
                break
            await asyncio.sleep(0.05)
        assert pool.get_size() == 2
    finally:
        await pool.close()


async def test_init_size_none_or_absent_is_min_size(postgres: PostgresServer) -> None:
    async with asyncpool.create_pool(postgres.dsn(), init_size=None, min_size=2, max_size=3,
                                     telemetry=False) as pool:
        assert (pool.get_init_size(), pool.get_size()) == (2, 2)


@pytest.mark.parametrize(("sizes", "message"), [
    ({"init_size": 1, "min_size": 2, "max_size": 5}, "init_size=1 is smaller than min_size=2"),
    ({"init_size": 5, "min_size": 1, "max_size": 3}, "init_size=5 is greater than max_size=3"),
    ({"init_size": -1, "min_size": 0, "max_size": 3}, "init_size=-1: must be a whole number"),
    ({"init_size": 1.5, "min_size": 0, "max_size": 3}, "init_size=1.5: must be a whole number"),
])
def test_init_size_out_of_range_is_refused_as_asyncpg_refuses_it(
        sizes: dict[str, float], message: str) -> None:
    """As asyncpg's pool: a `ValueError` (`PoolConfigError` is one) at construction."""
    with pytest.raises(PoolConfigError, match=message) as caught:
        asyncpool.Pool("postgresql://app@127.0.0.1:5432/app", **sizes)  # type: ignore[call-overload]
    assert isinstance(caught.value, ValueError)


async def test_the_connection_a_failing_setup_hook_was_given_reads_as_closed(
        postgres: PostgresServer) -> None:
    """asyncpg's pool closes the connection a failing ``setup=`` was given and its
    ``is_closed()`` then says True (asyncpg's test_pool_exception_in_setup_and_init); a
    hook's error handler may ask it. The next acquire gets a new connection."""
    given: list[asyncpool.PooledConnection] = []

    class SetupFailed(Exception):
        pass

    async def setup(conn: asyncpool.PooledConnection) -> None:
        given.append(conn)
        if len(given) == 1:
            raise SetupFailed

    async with asyncpool.create_pool(postgres.dsn(), min_size=1, max_size=1, setup=setup,
                                     telemetry=False) as pool:
        with pytest.raises(SetupFailed):
            await pool.acquire()
        assert given[0].is_closed() is True
        with pytest.raises(asyncpool.PoolError, match="released back to the pool"):
            await given[0].fetchval("SELECT 1")  # closed: usable no more, as before
        async with pool.acquire() as conn:
            assert conn.is_closed() is False
            assert given[1] is conn
        # Given back open (the next holder's now): still refused, as asyncpg refuses it.
        with pytest.raises(asyncpool.PoolError, match="released back to the pool"):
            conn.is_closed()


# -- loop= ------------------------------------------------------------------------------------


async def test_loop_given_as_the_running_loop_is_taken(postgres: PostgresServer) -> None:
    """asyncpg's ``create_pool(dsn, loop=loop)``, the loop that opens the pool: taken (asyncpool
    refused any loop before), by create_pool() and Pool()."""
    loop = asyncio.get_running_loop()
    async with asyncpool.create_pool(postgres.dsn(), loop=loop, max_size=1,
                                     telemetry=False) as pool:
        assert await pool.fetchval("SELECT 1") == 1
    async with asyncpool.Pool(postgres.dsn(), loop=loop, max_size=1, telemetry=False) as pool:
        assert await pool.fetchval("SELECT 2") == 2


def test_loop_given_before_it_runs_is_taken_by_the_open_it_runs(postgres: PostgresServer) -> None:
    """asyncpg's older style: the pool made outside any loop with ``loop=``, then opened and used
    by ``loop.run_until_complete()``."""
    loop = asyncio.new_event_loop()
    try:
        pool = asyncpool.Pool(postgres.dsn(), loop=loop, max_size=1, telemetry=False)
        loop.run_until_complete(pool.open())
        try:
            assert loop.run_until_complete(pool.fetchval("SELECT 3")) == 3
        finally:
            loop.run_until_complete(pool.close())
    finally:
        loop.close()


@pytest.mark.parametrize("state", ["another", "a closed"])
async def test_loop_given_as_another_loop_is_refused_at_open_before_connecting(
        postgres: PostgresServer, state: str) -> None:
    """A ``loop=`` that is not the loop running open() (asyncpg's connections would be bound to
    one loop and used from the other): refused by open(), before any login, and the pool stays
    new (it opens on the loop given)."""
    name = f"dropin-other-loop-{state.rsplit(maxsplit=1)[-1]}"
    other = asyncio.new_event_loop()
    if state == "a closed":
        other.close()
    try:
        pool = asyncpool.Pool(postgres.dsn(), loop=other, min_size=1, max_size=1,
                              server_settings={"application_name": name}, telemetry=False)
        for _ in range(2):  # (open() again: refused again, nothing left behind)
            with pytest.raises(PoolConfigError, match=(
                    rf"^pool 'asyncpool': loop= names {state} event loop, not the one running "
                    r"open\(\): a pool uses the loop it is opened on; open it on the loop given")):
                await pool.open()
        with pytest.raises(PoolConfigError, match=f"loop= names {state} event loop"):
            await asyncpool.create_pool(postgres.dsn(), loop=other, telemetry=False)
        assert (pool.get_size(), repr(pool).split()[2]) == (0, "new")
        assert await _backends(postgres, name) == 0
        await pool.close()
    finally:
        other.close()
