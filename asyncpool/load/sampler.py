"""Watch the server side while load runs: how many server connections are really used."""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any, Protocol

from asyncpool.connect.dsn import parse_target, redact
from asyncpool.load.logins import GuardedLogin
from asyncpool.load.result import ServerUse

SAMPLE_INTERVAL = 0.25
# Server connections in any state: in a transaction, idle, just used, being tested, logging in.
_SERVER_STATES = ("sv_active", "sv_idle", "sv_used", "sv_tested", "sv_login")


class Sampler(Protocol):
    source: str

    async def open(self) -> None: ...

    async def sample(self) -> tuple[int, int | None]:
        """(server connections now, clients waiting now or None)."""

    async def close(self) -> None: ...


class PgBouncerSampler:
    """`SHOW POOLS` on PgBouncer's admin console, for the target's database and user.

    The console speaks only the simple query protocol: this uses psycopg's client-side cursor,
    or, where psycopg is not installed (`pip install asyncpool-pg` alone, which `asyncpool demo`
    runs with), reads the rows on asyncpg's transport as `asyncpool doctor` does.
    """

    source = "pgbouncer SHOW POOLS"

    def __init__(self, admin_dsn: str, database: str, user: str) -> None:
        # Parsed by the guard (never quoted); libpq gets it rebuilt, the password as a keyword,
        # with the pool's TLS and credential rules.
        self._login = GuardedLogin(admin_dsn)
        self._database = database
        self._user = user
        self._conn: Any = None
        self._transport: Any = None  # asyncpg's, when the rows are read on it

    async def open(self) -> None:
        try:
            import psycopg
        except ImportError:
            await self._open_with_asyncpg()
            return
        conninfo, kwargs = self._login.psycopg_args()
        self._conn = await psycopg.AsyncConnection.connect(
            conninfo, autocommit=True, cursor_factory=psycopg.AsyncClientCursor,
            connect_timeout=5, **kwargs,
        )

    async def _open_with_asyncpg(self) -> None:
        from asyncpool.cli.admin_console import INSTALL_HINT, ConsoleUnavailable, transport_of

        conn = await self._login.connect_asyncpg(timeout=5, statement_cache_size=0)
        transport = transport_of(conn)
        if transport is None:
            conn.terminate()
            raise ConsoleUnavailable("this asyncpg cannot return rows from PgBouncer's admin "
                                     f"console and psycopg is not installed: {INSTALL_HINT}")
        self._conn, self._transport = conn, transport

    async def sample(self) -> tuple[int, int | None]:
        for row in await self._rows():
            if row["database"] == self._database and row["user"] == self._user:
                servers = sum(int(row.get(key) or 0) for key in _SERVER_STATES)
                return servers, int(row.get("cl_waiting") or 0)
        return 0, 0

    async def _rows(self) -> list[dict[str, Any]]:
        if self._transport is not None:
            from asyncpool.cli.admin_console import simple_query

            return list(await simple_query(self._transport, "SHOW POOLS", 5.0))
        cur = await self._conn.execute(b"SHOW POOLS")
        assert cur.description is not None
        names = [col.name for col in cur.description]
        return [dict(zip(names, values, strict=True)) for values in await cur.fetchall()]

    async def close(self) -> None:
        if self._transport is not None:
            # Never handed back to asyncpg's protocol after reading on its transport.
            self._conn.terminate()
        elif self._conn is not None:
            await self._conn.close()


class PostgresSampler:
    """Backends of the target's user and database in `pg_stat_activity`.

    Opened before the load starts, so it holds its slot even when the server is full. With
    `beyond_baseline`, backends that existed before the run (a pooler's idle server
    connections, other clients) are not counted: only what the run added.
    """

    source = "pg_stat_activity"

    def __init__(self, dsn: str, database: str, user: str, *, beyond_baseline: bool) -> None:
        self._login = GuardedLogin(dsn)
        self._database = database
        self._user = user
        self._beyond_baseline = beyond_baseline
        self._baseline = 0
        self._conn: Any = None

    async def open(self) -> None:
        self._conn = await self._login.connect_asyncpg(timeout=5, statement_cache_size=0)
        if self._beyond_baseline:
            self._baseline = await self._count()

    async def _count(self) -> int:
        count: int = await self._conn.fetchval(
            "SELECT count(*) FROM pg_stat_activity WHERE usename = $1 AND datname = $2 "
            "AND pid <> pg_backend_pid()",
            self._user,
            self._database,
        )
        return count

    async def sample(self) -> tuple[int, int | None]:
        return max(0, await self._count() - self._baseline), None

    async def close(self) -> None:
        if self._conn is not None:
            await self._conn.close(timeout=2)


def make_sampler(kind: str, dsn: str, admin_dsn: str | None,
                 postgres_dsn: str | None) -> Sampler | None:
    """The best sampler for a target: PgBouncer's console, else PostgreSQL's view, else none."""
    where = parse_target(dsn)
    if kind == "pgbouncer" and admin_dsn:
        return PgBouncerSampler(admin_dsn, where.database, where.user)
    direct = postgres_dsn or (dsn if kind == "postgres" else None)
    if direct:
        # Behind a pooler its pre-existing server connections are what the run reuses: count
        # them; straight at PostgreSQL, count only the backends the run opened.
        return PostgresSampler(direct, where.database, where.user,
                               beyond_baseline=kind == "postgres")
    return None


class SamplingTask:
    """Samples in the background and keeps the maxima; a failing sampler just stops."""

    def __init__(self, sampler: Sampler) -> None:
        self.sampler = sampler
        self.server_connections_max: int = 0
        self.clients_waiting_max: int | None = None
        self.latest: tuple[int, int | None] | None = None
        self.samples = 0
        self.error: str | None = None
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        try:
            await self.sampler.open()
        except Exception as exc:
            self.error = f"{type(exc).__name__}: {redact(str(exc))}"
            return
        self._task = asyncio.create_task(self._loop())

    async def _loop(self) -> None:
        while True:
            try:
                servers, waiting = await self.sampler.sample()
            except Exception as exc:
                self.error = f"{type(exc).__name__}: {redact(str(exc))}"
                return
            self.latest = (servers, waiting)
            self.samples += 1
            self.server_connections_max = max(self.server_connections_max, servers)
            if waiting is not None:
                self.clients_waiting_max = max(self.clients_waiting_max or 0, waiting)
            await asyncio.sleep(SAMPLE_INTERVAL)

    async def stop(self) -> ServerUse | None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        with contextlib.suppress(Exception):
            await self.sampler.close()
        if not self.samples:
            return None
        return ServerUse(self.server_connections_max, self.clients_waiting_max, self.samples,
                         self.sampler.source)
