"""Cancellation and timeouts at every await point of a checkout.

Each test parks a task at one await point (a fault proxy holds its bytes, or the pool is full),
cancels it there, or lets an `asyncio.timeout` expire there, then proves: the task ends with
exactly that cancellation or timeout, no slot or server connection is lost, every connection
runs transactions again, and the ledger holds what the writers were told.
"""

from __future__ import annotations

import asyncio
import random
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, Literal

import asyncpg
import pytest

from asyncpool import Pool, PoolClosedError, PooledConnection, PoolTimeoutError
from asyncpool.testing import PgBouncerServer, PostgresServer
from asyncpool.testing.faultproxy import FaultProxy
from asyncpool.testing.invariants import assert_clear, full_width, settled
from asyncpool.testing.ledger import Ledger

POINTS = [
    "queued",  # waiting for a connection another task holds
    "connecting",  # opening a new connection
    "validating",  # the checkout round trip on an idle connection
    "beginning",  # BEGIN of pool.transaction()
    "querying",  # a statement running on the server
    "rolling-back",  # pool.transaction() rolling back after an error in the block
    "resetting",  # release() rolling back a transaction the caller left open
    "committing",  # COMMIT of pool.transaction()
]


class Boom(Exception):
    pass


@pytest.fixture
async def proxy(legacy: PgBouncerServer) -> AsyncIterator[FaultProxy]:
    async with FaultProxy(legacy.host, legacy.port) as proxy:
        yield proxy


async def _until(check: Callable[[], Awaitable[bool]], what: str, within: float = 10.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    while not await check():
        assert loop.time() < deadline, f"the task never reached the {what} point"
        await asyncio.sleep(0.01)


class Sleeper:
    """A long statement tagged with a token, to find (and end) on the server."""

    def __init__(self, postgres: PostgresServer) -> None:
        self.postgres = postgres
        self.token = f"sleeper_{uuid.uuid4().hex[:12]}"
        self.sql = f"SELECT pg_sleep(60) /* {self.token} */"

    async def _backends(self, action: str) -> int:
        conn = await asyncpg.connect(self.postgres.admin_dsn)
        try:
            count: int = await conn.fetchval(
                f"SELECT count({action}) FROM pg_stat_activity WHERE state = 'active' "
                "AND query LIKE '%' || $1 || '%' AND pid <> pg_backend_pid()",
                self.token,
            )
        finally:
            await conn.close()
        return count

    async def running(self) -> bool:
        return await self._backends("*") == 1

    async def end(self) -> None:
        """A backend whose client vanished sleeps on until it next writes: end it now."""
        await self._backends("pg_terminate_backend(pid)")


@pytest.mark.parametrize("how", ["cancel", "timeout"])
@pytest.mark.parametrize("point", POINTS)
async def test_interrupted_at_every_await_point(
    point: str, how: str, *, proxy: FaultProxy, legacy: PgBouncerServer,
    postgres: PostgresServer, ledger: Ledger,
) -> None:
    options: dict[str, Any] = {
        "queued": {"max_size": 1},
        "connecting": {"min_size": 0},
        "validating": {"validate_after": 0},
    }.get(point, {})
    config: dict[str, Any] = {"min_size": 1, "max_size": 2, "validate_after": None, "acquire_timeout": 10,
              "connect_timeout": 10, "telemetry": False, **options}
    async with Pool(proxy.dsn(legacy.dsn()), name=f"cancel-{point}", **config) as pool:
        if point != "connecting":
            await pool.fetchval("SELECT 1")  # an idle connection, used just now
        held = await pool.acquire() if point == "queued" else None
        sleeper = Sleeper(postgres)
        stall = proxy.set_mode

        async def stall_then_fail(conn: PooledConnection) -> None:
            stall("stall")
            raise Boom

        async def stall_before_commit(conn: PooledConnection) -> None:
            stall("stall")

        async def reset_on_release() -> None:
            async with pool.acquire() as conn:
                await conn.execute("BEGIN")
                await conn.execute(f"INSERT INTO {ledger.table} (id) VALUES (-1)")
                stall("stall")

        async def idle_check() -> None:
            stall("stall")
            await pool.fetchval("SELECT 1")

        operation: dict[str, Callable[[], Awaitable[object]]] = {
            "queued": lambda: pool.fetchval("SELECT 1"),
            "connecting": lambda: (stall("stall"), pool.fetchval("SELECT 1"))[1],
            "validating": idle_check,
            "beginning": lambda: (stall("stall"), ledger.write(pool))[1],
            "querying": lambda: pool.execute(sleeper.sql),
            "rolling-back": lambda: ledger.write(pool, before_commit=stall_then_fail),
            "resetting": reset_on_release,
            "committing": lambda: ledger.write(pool, before_commit=stall_before_commit),
        }
        at_point: dict[str, Callable[[], Awaitable[bool]]] = {
            "queued": lambda: _now(pool.stats().waiting == 1),
            "connecting": lambda: _now(pool.stats().connecting == 1 and proxy.connections == 1),
            "validating": lambda: _now(pool.stats().connecting == 1 and proxy.held == 1),
            "querying": sleeper.running,
        }
        ready = at_point.get(point, lambda: _now(proxy.held == 1))

        timeouts: list[asyncio.Timeout] = []

        async def run() -> None:
            if how == "cancel":
                await operation[point]()
                return
            async with asyncio.timeout(None) as cm:
                timeouts.append(cm)
                await operation[point]()

        task = asyncio.create_task(run())
        await _until(ready, point)
        if how == "cancel":
            task.cancel()
        else:
            timeouts[0].reschedule(asyncio.get_running_loop().time())
        await asyncio.sleep(0.05)
        proxy.set_mode("pass")
        expected = asyncio.CancelledError if how == "cancel" else TimeoutError
        with pytest.raises(expected) as info:
            await asyncio.wait_for(task, 15)
        # The caller sees its own interruption, not an error of the pool's making.
        assert not isinstance(info.value, PoolTimeoutError)
        if held is not None:
            await pool.release(held)
        await sleeper.end()

        await settled(pool, legacy)
        await full_width(pool)
        # Every connection runs transactions again (none kept a half-started one).
        errors = await asyncio.gather(*[ledger.write(pool) for _ in range(2 * pool.config.max_size)])
        assert errors == [None] * len(errors)
        await ledger.verify()
        assert await _count(postgres, ledger, -1) == 0


async def _now(value: bool) -> bool:
    return value


async def _count(postgres: PostgresServer, ledger: Ledger, ident: int) -> int:
    conn = await asyncpg.connect(postgres.dsn())
    try:
        n: int = await conn.fetchval(f"SELECT count(*) FROM {ledger.table} WHERE id = $1", ident)
    finally:
        await conn.close()
    return n


async def test_cancelled_task_ends_cancelled_when_its_connection_dies_too(
    legacy: PgBouncerServer, postgres: PostgresServer
) -> None:
    sleeper = Sleeper(postgres)
    async with Pool(legacy.dsn(), name="doubly-doomed", max_size=1, telemetry=False) as pool:
        holding: list[PooledConnection] = []

        async def hold() -> None:
            async with pool.acquire() as conn:
                holding.append(conn)
                await conn.execute(sleeper.sql)

        task = asyncio.create_task(hold())
        await _until(sleeper.running, "querying")
        holding[0].raw.terminate()  # the connection dies...
        task.cancel()  # ...as the task is cancelled
        with pytest.raises(asyncio.CancelledError):
            await task
        await sleeper.end()
        await settled(pool, legacy)
        assert await pool.fetchval("SELECT 1") == 1


async def test_cancelled_task_ends_cancelled_when_its_rollback_fails(
    proxy: FaultProxy, legacy: PgBouncerServer, postgres: PostgresServer
) -> None:
    """Cancelled mid-statement, pool.transaction() rolls back; the connection dies during that
    rollback. The task must still end with its CancelledError, not the rollback's error."""
    sleeper = Sleeper(postgres)
    async with Pool(proxy.dsn(legacy.dsn()), name="rollback-dies", max_size=1,
                    telemetry=False) as pool:

        async def sleep_in_transaction() -> None:
            async with pool.transaction() as conn:
                await conn.execute(sleeper.sql)

        task = asyncio.create_task(sleep_in_transaction())
        await _until(sleeper.running, "querying")
        proxy.set_mode("stall")  # the cancel request and the ROLLBACK wait at the partition
        task.cancel()
        await _until(lambda: _now(proxy.connections == 2), "cancel request")
        proxy.set_mode("reset")  # ... and the connection dies under them
        with pytest.raises(asyncio.CancelledError):
            await asyncio.wait_for(task, 15)
        proxy.set_mode("pass")
        await sleeper.end()
        await settled(pool, legacy)
        assert await pool.fetchval("SELECT 1") == 1


async def test_pool_closed_under_an_open_transaction_says_it_was_not_committed(
    legacy: PgBouncerServer, ledger: Ledger
) -> None:
    pool = await Pool(legacy.dsn(), name="closing", max_size=1, telemetry=False).open()

    async def close_the_pool(conn: PooledConnection) -> None:
        await pool.close(timeout=0)

    error = await ledger.write(pool, before_commit=close_the_pool)
    assert isinstance(error, PoolClosedError)
    assert "not committed" in str(error)
    check = await ledger.verify()
    # Raised after the block, the ledger counts it as ambiguous; the row must be absent.
    assert (check.committed, check.ambiguous_absent) == (0, 1)


async def _storm(pool: Pool, rng: random.Random,
                 writes: list[Callable[[Pool], Awaitable[BaseException | None]]]) -> None:
    """Four rounds of 24 writers (each write one of `writes`, with or without a short time
    limit), 120 of them cancelled at random moments and then all: each must end cancelled."""

    async def writer() -> None:
        while True:
            budget = rng.choice([None, rng.uniform(0.0005, 0.02)])
            write = writes[0] if len(writes) == 1 else rng.choice(writes)
            try:
                async with asyncio.timeout(budget):
                    await write(pool)
            except TimeoutError:
                pass

    for _round in range(4):
        tasks = [asyncio.create_task(writer()) for _ in range(24)]
        for _ in range(120):
            await asyncio.sleep(rng.uniform(0, 0.004))
            rng.choice(tasks).cancel()
        for task in tasks:
            task.cancel()
        results = await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), 30)
        assert all(isinstance(r, asyncio.CancelledError) for r in results), results


async def _writes_go_through_after_the_storm(
        pool: Pool, pooler: PgBouncerServer,
        write: Callable[[Pool], Awaitable[BaseException | None]]) -> None:
    """Once the storm has settled, the pool opens to its full width and 16 writes at once all
    commit."""
    await settled(pool, pooler)
    await full_width(pool)
    errors = await asyncio.gather(*[write(pool) for _ in range(16)])
    assert errors == [None] * 16


async def test_cancellation_storm_loses_nothing(fault_pooler: PgBouncerServer,
                                                ledger: Ledger) -> None:
    """Writers cancelled or timed out at random moments, hundreds of times.

    On PgBouncer 1.18 this also checks the pool never closes a connection while asyncpg's
    cancel request for it is in flight: that crashes 1.18 (pgbouncer#801), taking every
    client down.
    """
    rng = random.Random(20240611)
    pooler = fault_pooler
    async with Pool(pooler.dsn(), name="storm", min_size=1, max_size=4, acquire_timeout=10,
                    validate_after=0.0, telemetry=False) as pool:

        await _storm(pool, rng, [ledger.write])
        check = await ledger.verify()
        # Interruptions reached writers before and during COMMIT, and some writes got through.
        assert check.committed > 0
        assert check.failed > 0
        assert check.ambiguous_present + check.ambiguous_absent > 0
        assert_clear(ledger.errors, asyncio.CancelledError, TimeoutError)
        await _writes_go_through_after_the_storm(pool, pooler, ledger.write)
        assert pooler.running()


async def test_cancellation_storm_through_the_query_helpers_loses_nothing(
        fault_pooler: PgBouncerServer, ledger: Ledger) -> None:
    """The storm again with single statements through `pool.execute` mixed in: the helpers'
    inline checkout and return, and the lease they take again, interrupted at random moments."""
    rng = random.Random(20261205)
    pooler = fault_pooler
    async with Pool(pooler.dsn(), name="storm-helpers", min_size=1, max_size=4,
                    acquire_timeout=10, telemetry=False) as pool:

        await _storm(pool, rng, [ledger.write, ledger.write_one, ledger.write_one])
        check = await ledger.verify()
        assert check.committed > 0
        assert check.ambiguous_present + check.ambiguous_absent > 0
        assert_clear(ledger.errors, asyncio.CancelledError, TimeoutError)
        await _writes_go_through_after_the_storm(pool, pooler, ledger.write_one)
        for _ in range(3):  # one at a time: the inline way, leaving a lease to be taken again
            assert await ledger.write_one(pool) is None
        assert any(record.spare is not None for record in pool._slots.records)
        assert pooler.running()


class _ReplyHolder(FaultProxy):
    """A fault proxy that holds the first reply holding `tag` (a CommandComplete's, such as
    ``LISTEN``: the server has run the statement) until `release` is set."""

    def __init__(self, host: str, port: int) -> None:
        super().__init__(host, port)
        self.tag: bytes | None = None
        self.holding = asyncio.Event()
        self.release = asyncio.Event()

    async def _pump(self, link: Any, src: asyncio.StreamReader, dst: asyncio.StreamWriter,
                    direction: Any) -> None:
        if direction == "replies":
            src = _Holding(src, self)  # type: ignore[assignment]
        await super()._pump(link, src, dst, direction)


class _Holding:
    def __init__(self, src: asyncio.StreamReader, proxy: _ReplyHolder) -> None:
        self.src, self.proxy = src, proxy

    async def read(self, n: int) -> bytes:
        data = await self.src.read(n)
        if self.proxy.tag is not None and self.proxy.tag in data:
            self.proxy.tag = None
            self.proxy.holding.set()
            await self.proxy.release.wait()
        return data


@pytest.mark.parametrize("mode", ["unnamed", "off"])
@pytest.mark.parametrize("call", ["add_listener", "explain", "explain_analyze"])
async def test_a_call_cancelled_and_caught_in_its_block_leaves_the_next_holder_a_clean_session(
        postgres: PostgresServer, call: str, mode: Literal["unnamed", "off"]) -> None:
    """The holder's own cancellation (or time limit) cuts a call short and the block catches it
    and ends: the next holder of that server connection finds no channel listened to, no
    transaction open and no stray reply. ``add_listener()`` cancelled once its LISTEN had run on
    the server (the reply held back by the proxy) left the session listening: asyncpg had
    registered no callback, so the return sent no UNLISTEN (on RDS Proxy, LISTEN pins the
    session; every later holder's connection received the channel's notifications)."""
    proxy = _ReplyHolder(postgres.host, postgres.port)
    async with proxy:
        dsn = proxy.dsn(postgres.dsn())
        async with Pool(dsn, min_size=1, max_size=1, prepared_statements=mode,
                        telemetry=False) as pool:
            me = asyncio.current_task()
            assert me is not None
            async with pool.acquire() as conn:
                pid = conn.get_server_pid()
                if call == "add_listener":
                    proxy.tag = b"LISTEN\x00"
                    holding = asyncio.ensure_future(proxy.holding.wait())
                    holding.add_done_callback(lambda _: me.cancel())
                    with pytest.raises(asyncio.CancelledError):
                        await conn.add_listener("cut_short", lambda *_: None)
                    me.uncancel()  # caught: the block goes on
                else:
                    statement = await conn.prepare("SELECT pg_sleep(0.5), $1::int")
                    with pytest.raises(TimeoutError):
                        async with asyncio.timeout(0.1 if call == "explain_analyze" else 0):
                            await statement.explain(1, analyze=call == "explain_analyze")
                proxy.release.set()
            assert me.cancelling() == 0
            async with pool.acquire() as conn:
                assert conn.get_server_pid() == pid  # the same session
                assert await conn.fetch("SELECT pg_listening_channels()") == []
                assert not conn.is_in_transaction()
                assert await conn.fetchval("SELECT $1::int", 7) == 7
                assert await conn.fetchval("SELECT 8") == 8
