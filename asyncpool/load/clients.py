"""One simulated function instance's database handle, for each driver the engine compares.

Each client owns what a Lambda execution environment would own: its own small pool (or, for
raw asyncpg, one connection). `query()` is one invocation's database work.
"""

from __future__ import annotations

import asyncio
from typing import Any, Protocol

from asyncpool.connect import driver
from asyncpool.connect.reads import cap_reads
from asyncpool.load.logins import GuardedLogin
from asyncpool.load.spec import LoadSpec, psycopg_query
from asyncpool.pool.backoff import Backoff

# asyncpg's statement cache size when a driver is told to use prepared statements.
_CACHE_SIZE = 100


class LoadClient(Protocol):
    async def open(self) -> None:
        """Create the pool (or nothing, for drivers that connect on first query)."""

    async def query(self, args: tuple[int, ...]) -> None:
        """Run the query once: acquire, execute, fetch, release."""

    async def after_error(self) -> None:
        """Pause before the next try, if the driver does not pace its own reconnects."""

    async def leak(self) -> None:
        """Acquire a connection and never give it back (simulated bug)."""

    async def close(self) -> None: ...

    def connect_errors(self) -> int:
        """Logins that failed (refused, timed out...) so far."""

    def leaks_reclaimed(self) -> int: ...


class AsyncpoolClient:
    """An asyncpool `Pool` per instance, as a Lambda handler module would create it."""

    def __init__(self, spec: LoadSpec, instance: int) -> None:
        from asyncpool.pool import Pool

        self._query = spec.query
        self._leaked: object = None
        self._pool = Pool(
            spec.dsn,
            name=f"load-{instance}",
            min_size=0,
            max_size=spec.pool_size,
            prepared_statements=spec.prepared_statements,
            telemetry=spec.telemetry != "off",
            leak_timeout=spec.leak_timeout,
            acquire_timeout=spec.acquire_timeout,
            connect_timeout=spec.acquire_timeout,
        )

    async def open(self) -> None:
        await self._pool.open()

    async def query(self, args: tuple[int, ...]) -> None:
        async with self._pool.acquire() as conn:
            await conn.fetchval(self._query, *args)

    async def after_error(self) -> None:
        # The pool already backs off between failed logins inside acquire().
        return

    async def leak(self) -> None:
        # Stashed like a handler that keeps a connection in a global; the pool reclaims it after
        # leak_timeout by cancelling this task and closing the connection.
        self._leaked = await self._pool.acquire()
        await asyncio.Event().wait()

    async def close(self) -> None:
        await self._pool.close(timeout=1.0)

    def connect_errors(self) -> int:
        return self._pool.stats().connect_errors_total

    def leaks_reclaimed(self) -> int:
        return self._pool.stats().leaked_total


class AsyncpgClient:
    """One raw asyncpg connection per instance, reconnected after a failure."""

    #: Read the socket as a pool connection does (`asyncpool.connect.reads`): `CappedAsyncpgClient`.
    caps_reads = False

    def __init__(self, spec: LoadSpec, instance: int) -> None:
        self._spec = spec
        self._login = GuardedLogin(spec.dsn)
        self._conn: Any = None
        self._connect_errors = 0
        self._backoff = Backoff()

    async def open(self) -> None:
        return

    async def _connection(self) -> Any:
        conn = self._conn
        if conn is None or conn.is_closed():
            spec = self._spec
            try:
                conn = await self._login.connect_asyncpg(
                    statement_cache_size=0 if spec.prepared_statements == "off" else _CACHE_SIZE,
                    timeout=spec.acquire_timeout,
                )
            except BaseException:
                self._connect_errors += 1
                raise
            if self.caps_reads:
                cap_reads(driver.transport_of(conn))
            self._conn = conn
            self._backoff = Backoff()
        return conn

    async def query(self, args: tuple[int, ...]) -> None:
        conn = await self._connection()
        await conn.fetchval(self._spec.query, *args)

    async def after_error(self) -> None:
        await asyncio.sleep(self._backoff.next_delay())

    async def leak(self) -> None:
        raise NotImplementedError("raw connections have no pool to leak from")

    async def close(self) -> None:
        if self._conn is not None:
            await self._conn.close(timeout=1.0)

    def connect_errors(self) -> int:
        return self._connect_errors

    def leaks_reclaimed(self) -> int:
        return 0


class AsyncpgPoolClient:
    """An `asyncpg.Pool` per instance, with its default reset on release."""

    def __init__(self, spec: LoadSpec, instance: int) -> None:
        self._spec = spec
        self._login = GuardedLogin(spec.dsn)
        self._pool: Any = None
        self._connect_errors = 0
        self._backoff = Backoff()

    async def _connect(self, *args: Any, loop: Any = None, **kwargs: Any) -> Any:
        """asyncpg.Pool's ``connect=``: each login with its own guard, which wraps the running
        loop (the pool's `loop`)."""
        return await self._login.connect_asyncpg(**kwargs)

    async def open(self) -> None:
        import asyncpg

        spec = self._spec
        self._pool = asyncpg.create_pool(
            connect=self._connect,
            min_size=0,
            max_size=spec.pool_size,
            statement_cache_size=0 if spec.prepared_statements == "off" else _CACHE_SIZE,
            timeout=spec.acquire_timeout,
        )
        await self._pool

    async def query(self, args: tuple[int, ...]) -> None:
        try:
            conn = await self._pool.acquire(timeout=self._spec.acquire_timeout)
        except BaseException:
            self._connect_errors += 1
            raise
        try:
            await conn.fetchval(self._spec.query, *args)
        finally:
            await self._pool.release(conn)
        self._backoff = Backoff()

    async def after_error(self) -> None:
        await asyncio.sleep(self._backoff.next_delay())

    async def leak(self) -> None:
        raise NotImplementedError("asyncpg.Pool cannot reclaim a leaked connection")

    async def close(self) -> None:
        if self._pool is not None:
            await asyncio.wait_for(self._pool.close(), 2.0)

    def connect_errors(self) -> int:
        return self._connect_errors

    def leaks_reclaimed(self) -> int:
        return 0


class PsycopgPoolClient:
    """A psycopg 3 `AsyncConnectionPool` per instance, autocommit like the asyncpg drivers."""

    def __init__(self, spec: LoadSpec, instance: int) -> None:
        self._spec = spec
        self._query = psycopg_query(spec.query)
        self._pool: Any = None
        self._backoff = Backoff()
        self._connect_errors = 0

    async def open(self) -> None:
        from psycopg_pool import AsyncConnectionPool

        spec = self._spec
        conninfo, login = GuardedLogin(spec.dsn).psycopg_args()
        self._pool = AsyncConnectionPool(
            conninfo,
            min_size=0,
            max_size=spec.pool_size,
            # prepare_threshold=None never prepares (pooler-safe); psycopg's default 5 prepares a
            # statement on its fifth use.
            kwargs={
                "autocommit": True,
                "prepare_threshold": None if spec.prepared_statements == "off" else 5,
                **login,
            },
            timeout=spec.acquire_timeout,
            num_workers=1,
            open=False,
        )
        await self._pool.open(wait=False)

    async def query(self, args: tuple[int, ...]) -> None:
        from psycopg_pool import PoolTimeout

        try:
            async with self._pool.connection() as conn:
                cur = await conn.execute(self._query, args)
                await cur.fetchone()
        except PoolTimeout:
            self._connect_errors += 1
            raise
        self._backoff = Backoff()

    async def after_error(self) -> None:
        await asyncio.sleep(self._backoff.next_delay())

    async def leak(self) -> None:
        raise NotImplementedError("psycopg_pool cannot reclaim a leaked connection")

    async def close(self) -> None:
        if self._pool is not None:
            await self._pool.close(timeout=1.0)

    def connect_errors(self) -> int:
        return self._connect_errors

    def leaks_reclaimed(self) -> int:
        return 0


class CappedAsyncpgClient(AsyncpgClient):
    """Raw asyncpg with its socket read at most 64 KiB per recv(), as asyncpool reads its own
    connections': against it, asyncpool's extra is its bookkeeping alone."""

    caps_reads = True


_CLIENTS: dict[str, type[AsyncpoolClient | AsyncpgClient | AsyncpgPoolClient | PsycopgPoolClient]]
_CLIENTS = {
    "asyncpool": AsyncpoolClient,
    "asyncpg": AsyncpgClient,
    "asyncpg-capped": CappedAsyncpgClient,
    "asyncpg-pool": AsyncpgPoolClient,
    "psycopg-pool": PsycopgPoolClient,
}


def make_client(spec: LoadSpec, instance: int) -> LoadClient:
    return _CLIENTS[spec.driver](spec, instance)
