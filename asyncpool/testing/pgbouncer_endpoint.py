"""The DSNs of a PgBouncer started here, one process or a fleet on one port."""

from __future__ import annotations

from asyncpool.testing.admin import AdminConsole
from asyncpool.testing.postgres import PostgresServer, Role


class PgBouncerEndpoint(AdminConsole):
    """A PgBouncer on `host`:`port` pooling `postgres`: how a client and the console reach it."""

    postgres: PostgresServer
    host: str
    port: int

    def dsn(self, role: Role | None = None, database: str | None = None, **params: str) -> str:
        role = role or self.postgres.app
        return role.dsn(self.host, self.port, database or self.postgres.database, **params)

    @property
    def admin_dsn(self) -> str:  # type: ignore[override]
        return self.postgres.pgb_admin.dsn(self.host, self.port, "pgbouncer")
