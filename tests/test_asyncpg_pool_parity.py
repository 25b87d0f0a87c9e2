"""asyncpg.Pool and asyncpool's pool side by side, in the situations asyncpg's own pool tests
(tests/test_pool.py, test_listeners.py) set up: each scenario runs on both against the same
PostgreSQL (or PgBouncer) and checks what a user of asyncpg's pool relies on. Where asyncpool
deliberately differs (docs/migration.md, "Behaviour that differs") the test says what each does.
"""

from __future__ import annotations

import asyncio
import contextlib
import warnings
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

import asyncpg
import pytest

import asyncpool
from asyncpool.testing import PostgresServer
from tests.conftest import Pooler

KINDS = ["asyncpg", "asyncpool"]

#: What each pool raises for a misuse (a foreign connection, a used acquire context...).
MISUSE = {"asyncpg": asyncpg.InterfaceError, "asyncpool": asyncpool.PoolError}


def _pool(kind: str, dsn: str, **options: Any) -> Any:
    """`create_pool(dsn, **options)` of asyncpg or asyncpool (not awaited)."""
    if kind == "asyncpg":
        return asyncpg.create_pool(dsn, **options)
    return asyncpool.create_pool(dsn, telemetry=False, **options)


def _raw(kind: str, conn: Any) -> Any:
    """The `asyncpg.Connection` under a pool's proxy."""
    return conn._con if kind == "asyncpg" else conn.raw


async def _until(check: Callable[[], bool], within: float = 5.0) -> bool:
    """Poll `check` (bounded): True once it holds."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    while not check():
        if loop.time() > deadline:
            return False
        await asyncio.sleep(0.02)
    return True


@pytest.mark.parametrize("kind", KINDS)
async def test_sizes_follow_checkouts_and_a_second_release_is_harmless(
        postgres: PostgresServer, kind: str) -> None:
    async with _pool(kind, postgres.dsn(), min_size=2, max_size=3) as pool:
        seen: list[tuple[int, ...]] = [
            (pool.get_min_size(), pool.get_max_size(), pool.get_size(), pool.get_idle_size())]
        first = await pool.acquire()
        async with pool.acquire(), pool.acquire():
            seen.append((pool.get_size(), pool.get_idle_size()))
        await pool.release(first)
        await pool.release(first)  # twice: nothing more happens, in both
        seen.append((pool.get_size(), pool.get_idle_size()))

        async def take() -> Any:
            return await pool.acquire()

        # Acquired in one task, released in another (a handler and its cleanup callback).
        other = await asyncio.create_task(take())
        await asyncio.create_task(pool.release(other))
        seen.append((pool.get_size(), pool.get_idle_size()))
    assert seen == [(2, 3, 2, 2), (3, 0), (3, 3), (3, 3)]
    assert pool.is_closing()


@pytest.mark.parametrize("kind", KINDS)
async def test_a_full_pool_times_out_with_a_timeout_error(
        postgres: PostgresServer, kind: str) -> None:
    async with _pool(kind, postgres.dsn(), min_size=1, max_size=1) as pool:
        async with pool.acquire():
            with pytest.raises(asyncio.TimeoutError):
                await pool.acquire(timeout=0.05)
        async with pool.acquire(timeout=1) as conn:  # the slot was not lost to the timeout
            assert await conn.fetchval("SELECT 1") == 1


@pytest.mark.parametrize("kind", KINDS)
async def test_a_foreign_connection_is_refused_and_the_real_one_stays_held(
        postgres: PostgresServer, kind: str) -> None:
    async with _pool(kind, postgres.dsn(), min_size=1, max_size=1) as mine, \
            _pool(kind, postgres.dsn(), min_size=1, max_size=1) as other:
        conn = await mine.acquire()
        for foreign in (_raw(kind, conn), None, "conn"):
            with pytest.raises(MISUSE[kind]):
                await mine.release(foreign)
        with pytest.raises(MISUSE[kind]):
            await other.release(conn)  # to the wrong pool
        assert (mine.get_size(), mine.get_idle_size(), other.get_idle_size()) == (1, 0, 1)
        assert await conn.fetchval("SELECT 2") == 2  # still its holder's
        await mine.release(conn)
        assert mine.get_idle_size() == 1


@pytest.mark.parametrize("kind", KINDS)
async def test_init_runs_once_per_connection_before_its_first_setup(
        postgres: PostgresServer, kind: str) -> None:
    class Tagged(asyncpg.Connection):
        pass

    events: list[tuple[str, int]] = []
    given_to_setup: list[Any] = []

    async def init(conn: Any) -> None:
        assert isinstance(conn, Tagged)
        events.append(("init", conn.get_server_pid()))

    async def setup(conn: Any) -> None:
        given_to_setup.append(conn)
        events.append(("setup", conn.get_server_pid()))

    async with _pool(kind, postgres.dsn(), min_size=2, max_size=4, init=init, setup=setup,
                     connection_class=Tagged) as pool:
        assert [what for what, _ in events] == ["init", "init"]  # opened, none checked out yet
        held: list[Any] = []

        async def user() -> None:
            async with pool.acquire() as conn:
                held.append(conn)
                await asyncio.sleep(0.05)

        await asyncio.gather(*(user() for _ in range(8)))
    inits = [pid for what, pid in events if what == "init"]
    setups = [pid for what, pid in events if what == "setup"]
    assert (len(inits), len(set(inits)), len(setups)) == (4, 4, 8)
    for pid in setups:  # each connection's init came before its first setup
        assert events.index(("init", pid)) < events.index(("setup", pid))
    assert all(a is b for a, b in zip(given_to_setup, held, strict=True))


@pytest.mark.parametrize("hook", ["setup", "init"])
@pytest.mark.parametrize("kind", KINDS)
async def test_a_failing_hook_closes_its_connection_and_the_next_checkout_opens_another(
        postgres: PostgresServer, kind: str, hook: str) -> None:
    class HookFailed(Exception):
        pass

    given: list[Any] = []

    async def failing_once(conn: Any) -> None:
        given.append(conn)
        if len(given) == 1:
            raise HookFailed

    options: dict[str, Any] = {hook: failing_once, "max_size": 1,
                               "min_size": 1 if hook == "setup" else 0}
    async with _pool(kind, postgres.dsn(), **options) as pool:
        with pytest.raises(HookFailed):
            await pool.acquire()
        assert given[0].is_closed()
        assert (pool.get_size(), pool.get_idle_size()) == (0, 0)
        async with pool.acquire() as conn:
            assert await conn.fetchval("SELECT 3") == 3
            assert given[1] is (conn if hook == "setup" else _raw(kind, conn))


@pytest.fixture(params=["postgres", "pgbouncer-1.18", "pgbouncer-current"])
def dsn(request: pytest.FixtureRequest) -> str:
    """PostgreSQL, then each PgBouncer (transaction mode)."""
    if request.param == "postgres":
        postgres: PostgresServer = request.getfixturevalue("postgres")
        return postgres.dsn()
    stack = request.getfixturevalue("stack")
    server: Pooler = stack.legacy if request.param == "pgbouncer-1.18" else stack.current
    return server.dsn()


@pytest.mark.parametrize("kind", KINDS)
async def test_a_connection_given_back_in_a_transaction_is_rolled_back_and_reused(
        dsn: str, kind: str) -> None:
    """Both roll back what was left uncommitted; asyncpg also reports it to the loop's
    exception handler, asyncpool does not (docs/migration.md)."""
    reported: list[str] = []
    loop = asyncio.get_running_loop()
    previous = loop.get_exception_handler()
    loop.set_exception_handler(lambda _, context: reported.append(str(context.get("message"))))
    table = f"parity_xact_{kind}"
    try:
        async with _pool(kind, dsn, min_size=1, max_size=1, statement_cache_size=0) as pool:
            await pool.execute(f"CREATE TABLE IF NOT EXISTS {table} (a int)")
            await pool.execute(f"TRUNCATE {table}")
            for begin in ("transaction()", "BEGIN"):
                async with pool.acquire() as conn:
                    raw = _raw(kind, conn)
                    if begin == "BEGIN":
                        await conn.execute("BEGIN")
                    else:
                        await conn.transaction().start()
                    await conn.execute(f"INSERT INTO {table} VALUES (1)")
                    assert conn.is_in_transaction()
                async with pool.acquire() as conn:
                    assert _raw(kind, conn) is raw
                    assert not conn.is_in_transaction()
                    assert await conn.fetchval(f"SELECT count(*) FROM {table}") == 0
            await pool.execute(f"DROP TABLE {table}")
    finally:
        loop.set_exception_handler(previous)
    assert len([m for m in reported if "active transaction" in m]) == (
        2 if kind == "asyncpg" else 0)


@pytest.mark.parametrize("kind", KINDS)
async def test_inactivity_is_counted_from_the_release(postgres: PostgresServer, kind: str) -> None:
    """A checkout longer than `max_inactive_connection_lifetime` keeps its connection; an idle
    one past it (above min_size) is closed."""
    async with _pool(kind, postgres.dsn(), min_size=0, max_size=1,
                     max_inactive_connection_lifetime=0.3) as pool:
        pids = {await pool.fetchval("SELECT pg_backend_pid()")}
        await pool.execute("SELECT pg_sleep(0.5)")
        pids.add(await pool.fetchval("SELECT pg_backend_pid()"))
        assert len(pids) == 1
        assert pool.get_size() == 1
        assert await _until(lambda: pool.get_size() == 0)
        assert await pool.fetchval("SELECT pg_backend_pid()") not in pids


@pytest.mark.parametrize("kind", KINDS)
async def test_inactivity_closes_down_to_min_size_and_keeps_that_many(
        postgres: PostgresServer, kind: str) -> None:
    """Both keep `min_size` connections however long idle (asyncpg since 0.32)."""
    async with _pool(kind, postgres.dsn(), min_size=1, max_size=2,
                     max_inactive_connection_lifetime=0.2) as pool:
        async with pool.acquire() as first, pool.acquire() as second:
            opened = (_raw(kind, first), _raw(kind, second))
        assert pool.get_size() == 2
        assert await _until(lambda: pool.get_size() == 1)
        await asyncio.sleep(0.6)  # three lifetimes more
        assert (pool.get_size(), pool.get_idle_size()) == (1, 1)
        async with pool.acquire() as conn:
            assert _raw(kind, conn) in opened  # kept, not closed and opened again
            assert await conn.fetchval("SELECT 9") == 9


@pytest.mark.parametrize("kind", KINDS)
async def test_max_queries_retires_a_connection_at_its_return(
        pooler: Pooler, kind: str) -> None:
    """max_queries=1: every checkout that ran a statement is served by a new client connection
    (asyncpg's reset query counts too: docs/migration.md), here through PgBouncer."""
    async with _pool(kind, pooler.dsn(), min_size=1, max_size=1, max_queries=1,
                     statement_cache_size=0) as pool:
        raws = []
        for _ in range(3):
            async with pool.acquire() as conn:
                assert await conn.fetchval("SELECT 1") == 1
                raws.append(_raw(kind, conn))
        assert len({id(raw) for raw in raws}) == 3
        assert await _until(lambda: all(raw.is_closed() for raw in raws[:2]))


@pytest.mark.parametrize("kind", KINDS)
async def test_expire_connections_spares_the_held_one_until_its_return(
        postgres: PostgresServer, kind: str) -> None:
    """asyncpg closes it as `release()` returns; asyncpool closes it politely just after
    (docs/migration.md)."""
    async with _pool(kind, postgres.dsn(), min_size=1, max_size=1) as pool:
        conn = await pool.acquire()
        raw = _raw(kind, conn)
        await pool.expire_connections()
        assert await conn.fetchval("SELECT 4") == 4  # still usable while held
        await pool.release(conn)
        assert (pool.get_size(), pool.get_idle_size()) == (0, 0)
        assert await _until(raw.is_closed, within=3)
        async with pool.acquire() as conn:
            assert _raw(kind, conn) is not raw


@pytest.mark.parametrize("kind", KINDS)
async def test_set_connect_args_with_keywords_only_is_used_by_the_next_logins(
        postgres: PostgresServer, kind: str) -> None:
    """asyncpg's test passes a connection spec without a DSN: the pool's DSN goes too."""
    async with _pool(kind, postgres.dsn(), min_size=1, max_size=1) as pool:
        held = await pool.acquire()
        pool.set_connect_args(host=postgres.host, port=postgres.port, user=postgres.app.name,
                              password=postgres.app.password, database=postgres.database,
                              server_settings={"application_name": f"parity-{kind}"})
        await pool.expire_connections()
        await pool.release(held)  # expired: closed, not reused
        async with pool.acquire() as conn:
            assert conn.get_settings().application_name == f"parity-{kind}"


@pytest.mark.parametrize("kind", KINDS)
async def test_close_waits_for_the_holder(postgres: PostgresServer, kind: str) -> None:
    pool = await _pool(kind, postgres.dsn(), min_size=1, max_size=1)
    inside = asyncio.Event()
    done: list[str] = []

    async def holder() -> None:
        async with pool.acquire() as conn, conn.transaction():
            inside.set()
            await asyncio.sleep(0.2)
            await conn.execute("SELECT 1")
        done.append("released")

    task = asyncio.create_task(holder())
    await inside.wait()
    await pool.close()
    assert done == ["released"]
    await task
    assert (pool.is_closing(), pool.get_size()) == (True, 0)


@pytest.mark.parametrize("kind", KINDS)
async def test_terminate_ends_a_held_connection_and_nothing_is_handed_out_after(
        postgres: PostgresServer, kind: str) -> None:
    refused = {"asyncpg": asyncpg.InterfaceError, "asyncpool": asyncpool.PoolClosedError}[kind]
    pool = await _pool(kind, postgres.dsn(), min_size=1, max_size=2)
    held = await pool.acquire()
    assert not pool.is_closing()
    pool.terminate()
    assert (pool.is_closing(), pool.get_size(), pool.get_idle_size()) == (True, 0, 0)
    with pytest.raises(refused):
        await held.fetchval("SELECT 1")
    await pool.release(held)  # harmless
    with pytest.raises(refused):
        await pool.acquire()
    await pool.close()  # after terminate(): nothing left to do


@pytest.mark.parametrize("kind", KINDS)
async def test_a_close_cut_short_by_a_deadline_still_closes_the_pool(
        postgres: PostgresServer, kind: str) -> None:
    refused = {"asyncpg": asyncpg.InterfaceError, "asyncpool": asyncpool.PoolClosedError}[kind]
    pool = await _pool(kind, postgres.dsn(), min_size=1, max_size=1)
    inside = asyncio.Event()

    async def holder() -> None:
        async with pool.acquire() as conn:
            inside.set()
            await asyncio.sleep(0.4)
            with pytest.raises(refused):
                await conn.fetchval("SELECT 1")

    task = asyncio.create_task(holder())
    await inside.wait()
    with pytest.raises(asyncio.TimeoutError):
        await asyncio.wait_for(pool.close(), 0.1)
    assert (pool.is_closing(), pool.get_size()) == (True, 0)
    await task
    with pytest.raises(refused):
        await pool.acquire()


@pytest.mark.parametrize("kind", KINDS)
async def test_acquire_while_close_waits_is_refused_as_closing(
        postgres: PostgresServer, kind: str) -> None:
    """close() may wait seconds for a holder: a checkout meanwhile is refused, saying the pool
    is closing (not closed: asyncpool said "is closed" while the close was still under way)."""
    refused = {"asyncpg": asyncpg.InterfaceError, "asyncpool": asyncpool.PoolClosedError}[kind]
    pool = await _pool(kind, postgres.dsn(), min_size=1, max_size=2)
    held = await pool.acquire()
    closing = asyncio.create_task(pool.close())
    await asyncio.sleep(0.05)
    assert not closing.done()
    assert pool.is_closing()
    attempts: list[Callable[[], Awaitable[Any]]] = [
        lambda: pool.acquire(timeout=1), lambda: pool.fetchval("SELECT 1")]
    if kind == "asyncpool":  # (asyncpg's `await pool` gives the closing pool back)
        attempts.append(pool.open)
    for attempt in attempts:
        with pytest.raises(refused, match="is closing"):
            await attempt()
    assert await held.fetchval("SELECT 5") == 5  # the holder goes on
    await pool.release(held)
    await closing
    with pytest.raises(refused, match="is closed"):
        await pool.acquire()


@pytest.mark.parametrize("kind", KINDS)
async def test_a_holder_s_listeners_go_with_its_checkout(
        postgres: PostgresServer, kind: str) -> None:
    """Notification and log listeners added while held stop at the release, in both (asyncpg
    warns when it drops them, asyncpool does not; asyncpool drops query loggers and
    termination listeners too: docs/migration.md)."""
    heard: list[tuple[Any, ...]] = []
    logged: list[str] = []
    async with _pool(kind, postgres.dsn(), min_size=1, max_size=1) as pool:
        dropped = pytest.warns(asyncpg.InterfaceWarning, match="active (notification|log) listener")
        with dropped if kind == "asyncpg" else _no_warning():
            async with pool.acquire() as conn:
                await conn.add_listener("parity", lambda *args: heard.append(args))
                conn.add_log_listener(lambda _, message: logged.append(message.message))
                await conn.execute("NOTIFY parity, 'held'")
                await conn.execute("DO $$BEGIN RAISE NOTICE 'held'; END$$")
                assert await _until(lambda: len(heard) == 1 and len(logged) == 1)
                assert heard[0][0] is conn  # the callback gets what the holder holds
        async with pool.acquire() as conn:
            await conn.execute("NOTIFY parity, 'after'")
            await conn.execute("DO $$BEGIN RAISE NOTICE 'after'; END$$")
            assert await conn.fetchval("SELECT count(*) FROM pg_listening_channels()") == 0
        await asyncio.sleep(0.1)
    assert ([args[-1] for args in heard], logged) == (["held"], ["held"])


@contextlib.contextmanager
def _no_warning() -> Iterator[None]:
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        yield
    assert [str(warning.message) for warning in seen] == []


@pytest.mark.parametrize("kind", KINDS)
async def test_a_cancelled_holder_gives_its_connection_back(
        postgres: PostgresServer, kind: str) -> None:
    async with _pool(kind, postgres.dsn(), min_size=1, max_size=1) as pool:
        running = asyncio.Event()

        async def sleeper() -> None:
            async with pool.acquire(timeout=30) as conn:
                running.set()
                await conn.execute("SELECT pg_sleep(10)")

        task = asyncio.create_task(sleeper())
        await running.wait()
        await asyncio.sleep(0.05)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert await _until(lambda: pool.get_idle_size() == 1)
        loop = asyncio.get_running_loop()
        started = loop.time()
        assert await pool.fetchval("SELECT 6", timeout=5) == 6
        assert loop.time() - started < 2  # not left running pg_sleep(10)


@pytest.mark.parametrize("kind", KINDS)
async def test_a_held_connection_killed_by_the_server_frees_its_slot(
        postgres: PostgresServer, kind: str) -> None:
    async with _pool(kind, postgres.dsn(), min_size=1, max_size=1) as pool:
        async with pool.acquire() as conn:
            pid = conn.get_server_pid()
            assert await postgres.terminate_backend(pid)
            await asyncio.sleep(0.2)  # the holder does nothing more with it
        async with pool.acquire(timeout=2) as conn:
            assert conn.get_server_pid() != pid
            assert await conn.fetchval("SELECT 7") == 7


@pytest.mark.parametrize("kind", KINDS)
async def test_close_discards_in_asyncpg_gives_back_in_asyncpool_and_terminate_discards_in_both(
        postgres: PostgresServer, kind: str) -> None:
    """A holder's ``await conn.close()``: asyncpg closes the server connection (the next holder
    gets a new session), asyncpool gives it back, session settings and all
    (docs/migration.md). ``conn.terminate()`` discards it in both."""
    async with _pool(kind, postgres.dsn(), min_size=1, max_size=1) as pool:
        async with pool.acquire() as conn:
            pid = conn.get_server_pid()
            await conn.execute("SET search_path = pg_catalog")
            await conn.close()
        async with pool.acquire() as conn:
            kept = conn.get_server_pid() == pid
            assert (await conn.fetchval("SHOW search_path") == "pg_catalog") is kept
            assert kept is (kind == "asyncpool")
            pid = conn.get_server_pid()
            await conn.execute("SET search_path = pg_catalog")
            conn.terminate()
            assert (pool.get_size(), pool.get_idle_size()) == (0, 0)
        async with pool.acquire() as conn:
            assert conn.get_server_pid() != pid
            assert await conn.fetchval("SHOW search_path") == '"$user", public'


@pytest.mark.parametrize("kind", KINDS)
async def test_an_acquire_context_serves_one_connection(
        postgres: PostgresServer, kind: str) -> None:
    async with _pool(kind, postgres.dsn(), min_size=1, max_size=2) as pool:
        context = pool.acquire()
        async with context:
            with pytest.raises(MISUSE[kind]):
                await context.__aenter__()
        with pytest.raises(MISUSE[kind]):
            await context.__aenter__()  # not again after the block either
        assert (pool.get_size(), pool.get_idle_size()) == (1, 1)


@pytest.mark.parametrize("kind", KINDS)
async def test_a_released_reference_refuses_statements_prepared_ones_and_cursors(
        postgres: PostgresServer, kind: str) -> None:
    """asyncpg raises its InterfaceError for all of them; asyncpool a PoolError for the
    connection's own, asyncpg's InterfaceError for what was obtained through it."""
    async with _pool(kind, postgres.dsn(), min_size=1, max_size=1) as pool:
        async with pool.acquire() as conn:
            statement = await conn.prepare("SELECT 1")
            transaction = conn.transaction()
            async with conn.transaction():
                cursor = await conn.cursor("SELECT 1")
        assert "released" in repr(conn)
        with pytest.raises(MISUSE[kind], match="released back to the pool"):
            await conn.execute("SELECT 1")
        with pytest.raises(MISUSE[kind], match="released back to the pool"):
            conn.get_server_pid()
        later: list[Callable[[], Awaitable[Any]]] = [
            statement.fetchval, lambda: cursor.fetch(1), lambda: cursor.forward(1),
            transaction.start]
        for step in later:
            with pytest.raises(asyncpg.InterfaceError, match="released back to the pool"):
                await step()


@pytest.mark.parametrize(("kind", "mode"), [
    ("asyncpg", "unnamed"), ("asyncpool", "unnamed"), ("asyncpool", "off"), ("asyncpool", "on")])
async def test_a_connection_class_s_methods_answer_on_the_held_connection(
        postgres: PostgresServer, kind: str, mode: str) -> None:
    """Its own methods and its overrides, on what `acquire()` gives, which is an instance of it
    (asyncpool in each statement mode). Its `reset()` is asyncpg's pool's to call at each
    release; asyncpool sends no reset and never calls it (docs/migration.md)."""
    resets: list[int] = []

    class Custom(asyncpg.Connection):
        async def answer(self) -> int:
            return 42

        async def fetchval(self, query: str, *args: Any, **options: Any) -> Any:
            return (await super().fetchval(query, *args, **options)) + 1

        async def reset(self, *, timeout: float | None = None) -> None:
            resets.append(1)
            await super().reset(timeout=timeout)

    options: dict[str, Any] = {} if kind == "asyncpg" else {"prepared_statements": mode}
    async with _pool(kind, postgres.dsn(), min_size=1, max_size=1, connection_class=Custom,
                     **options) as pool:
        for _ in range(2):
            async with pool.acquire() as conn:
                assert isinstance(conn, Custom)
                assert await conn.answer() == 42
                assert await conn.fetchval("SELECT 1") == 2
        assert await pool.fetchval("SELECT 1") == 2
    assert len(resets) == (3 if kind == "asyncpg" else 0)


@pytest.mark.parametrize("kind", KINDS)
async def test_the_record_class_reaches_helpers_connections_and_cursors(
        postgres: PostgresServer, kind: str) -> None:
    class Row(asyncpg.Record):
        pass

    async with _pool(kind, postgres.dsn(), min_size=1, max_size=1, record_class=Row) as pool:
        assert type(await pool.fetchrow("SELECT 1 AS a")) is Row
        assert type((await pool.fetch("SELECT 1 AS a"))[0]) is Row
        async with pool.acquire() as conn, conn.transaction():
            assert type(await conn.fetchrow("SELECT 1 AS a")) is Row
            assert [type(row) async for row in conn.cursor("SELECT 1 AS a")] == [Row]


async def test_get_size_counts_a_login_under_way(postgres: PostgresServer) -> None:
    """asyncpool's `get_size()` is connections open or being opened (asyncpg's counts a login
    once it is done): a slot being logged in is taken, not idle."""
    started, go = asyncio.Event(), asyncio.Event()

    async def init(conn: Any) -> None:
        started.set()
        await go.wait()

    async with asyncpool.create_pool(postgres.dsn(), min_size=0, max_size=2, init=init,
                                     telemetry=False) as pool:
        query = asyncio.create_task(pool.fetchval("SELECT 8"))
        await started.wait()
        assert (pool.get_size(), pool.get_idle_size()) == (1, 0)
        go.set()
        assert await query == 8
        assert (pool.get_size(), pool.get_idle_size()) == (1, 1)


@pytest.mark.parametrize("kind", KINDS)
async def test_idle_connections_the_server_closed_are_replaced_up_to_min_size(
        postgres: PostgresServer, kind: str) -> None:
    """asyncpg logs in again as it reads the close; asyncpool at its upkeep (within 5 s: its
    counts include the dead ones until then, docs/migration.md). Either way the server ends
    with min_size live sessions of the pool, and no caller sees an error."""
    name = f"parity-killed-{kind}"
    async with _pool(kind, postgres.dsn(), min_size=2, max_size=3,
                     server_settings={"application_name": name}) as pool:
        async with pool.acquire() as first, pool.acquire() as second:
            killed = {first.get_server_pid(), second.get_server_pid()}
        for pid in killed:
            assert await postgres.terminate_backend(pid)
        admin = await asyncpg.connect(postgres.admin_dsn)
        try:
            live: list[int] = []

            async def sessions() -> list[int]:
                return [row["pid"] for row in await admin.fetch(
                    "SELECT pid FROM pg_stat_activity WHERE application_name = $1", name)]

            loop = asyncio.get_running_loop()
            # asyncpool's upkeep period (5 s), then logins on a loaded 2-core machine. The
            # server lists a session once logged in, before the pool has it idle: both waited.
            deadline = loop.time() + 15
            while loop.time() < deadline:
                live = await sessions()
                if len(live) == 2 and not killed & set(live) and pool.get_idle_size() == 2:
                    break
                await asyncio.sleep(0.1)
            assert len(live) == 2, live
            assert not killed & set(live), live
            assert (pool.get_size(), pool.get_idle_size()) == (2, 2)
            assert await pool.fetchval("SELECT pg_backend_pid()") in live
        finally:
            await admin.close()


@pytest.mark.parametrize("kind", KINDS)
async def test_a_generator_s_transaction_left_open_by_the_block_s_error_is_undone(
        postgres: PostgresServer, kind: str) -> None:
    """An async generator holding ``conn.transaction()`` open, abandoned by an error in the
    block: the error reaches the caller, and the connection comes back out of the transaction
    (finalized after the release or not)."""

    class Stop(Exception):
        pass

    async def rows(conn: Any) -> Any:
        async with conn.transaction():
            for row in await conn.fetch("SELECT generate_series(1, 3) AS n"):
                yield row

    async with _pool(kind, postgres.dsn(), min_size=1, max_size=1) as pool:
        with pytest.raises(Stop):
            async with pool.acquire() as conn:
                raw = _raw(kind, conn)
                async for _ in rows(conn):
                    raise Stop
        await asyncio.sleep(0)  # (the loop's asyncgen hook may finalize it now)
        async with pool.acquire() as conn:
            assert not conn.is_in_transaction()
            assert await conn.fetchval("SELECT 10") == 10
        assert await _until(lambda: pool.get_idle_size() == 1)
        assert raw.is_closed() or not raw.is_in_transaction()
