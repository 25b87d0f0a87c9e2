"""PgBouncer's admin console (SHOW POOLS, PAUSE, RESUME...), shared by started and external poolers."""

from __future__ import annotations

from typing import Any

_SERVER_STATES = ("sv_active", "sv_idle", "sv_used", "sv_tested", "sv_login")


async def admin_command(admin_dsn: str, command: str) -> list[dict[str, Any]]:
    """Run one admin-console command and return its rows as dicts (no rows for PAUSE/RESUME...)."""
    import psycopg

    # The admin console speaks only the simple query protocol: psycopg's client-side cursor uses
    # it, while asyncpg cannot fetch rows through it.
    async with await psycopg.AsyncConnection.connect(
        admin_dsn, autocommit=True, cursor_factory=psycopg.AsyncClientCursor
    ) as conn:
        cur = await conn.execute(command.encode())
        if cur.description is None:
            return []
        names = [col.name for col in cur.description]
        return [dict(zip(names, row, strict=True)) for row in await cur.fetchall()]


class AdminConsole:
    """Server-side facts a test can assert: who is connected, who waits, how many servers are used."""

    admin_dsn: str | None

    async def admin(self, command: str) -> list[dict[str, Any]]:
        if not self.admin_dsn:
            raise RuntimeError("no admin-console DSN for this PgBouncer")
        return await admin_command(self.admin_dsn, command)

    async def pool_row(self, database: str = "app", user: str = "app") -> dict[str, Any]:
        """The SHOW POOLS row of `database`/`user`; zeros if the pool does not exist yet."""
        for row in await self.admin("SHOW POOLS"):
            if row["database"] == database and row["user"] == user:
                return row
        return dict.fromkeys(("cl_active", "cl_waiting", "maxwait", *_SERVER_STATES), 0)

    async def total_queries(self, database: str = "app") -> int:
        """Queries PgBouncer has forwarded for `database` so far (SHOW STATS, updated live)."""
        rows = await self.admin("SHOW STATS")
        return int(next(r for r in rows if r["database"] == database)["total_query_count"])

    async def server_connections(self, database: str = "app", user: str = "app") -> int:
        """How many server connections PgBouncer holds for `database`/`user` right now."""
        row = await self.pool_row(database, user)
        return sum(int(row.get(key, 0)) for key in _SERVER_STATES)

    async def client_connections(self, database: str = "app", user: str = "app") -> int:
        """Clients logged in to `database`/`user` (active, waiting or idle between transactions)."""
        row = await self.pool_row(database, user)
        return int(row.get("cl_active", 0)) + int(row.get("cl_waiting", 0))
