"""Local PostgreSQL + PgBouncer for the demo and benchmarks, tuned like a production pooler."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

from asyncpool.load.runner import LoadTarget

if TYPE_CHECKING:
    from asyncpool.testing import PgBouncerServer, PostgresServer

#: PostgreSQL's connection limit, and the server connections PgBouncer may open to it.
MAX_CONNECTIONS = 100
POOL_SIZE = 50

PgBouncerChoice = Literal["current", "legacy"]


@dataclass
class LocalServers:
    """A throwaway PostgreSQL and one PgBouncer in front of it (harness servers, loopback only).

    `notes` says what differs from what was asked (no current PgBouncer could be found...).
    """

    postgres: PostgresServer
    pgbouncer: PgBouncerServer | None
    notes: list[str] = field(default_factory=list)

    @classmethod
    def start(cls, *, pgbouncer: PgBouncerChoice = "current", max_client_conn: int = 1000,
              pool_size: int = POOL_SIZE, max_connections: int = MAX_CONNECTIONS,
              pgbouncer_port: int | None = None) -> LocalServers:
        from asyncpool.testing import HarnessError, PgBouncerServer, PostgresServer
        from asyncpool.testing.binaries import current_pgbouncer, system_pgbouncer

        notes: list[str] = []
        if pgbouncer == "current":
            try:
                binary = current_pgbouncer()
            except HarnessError as exc:
                binary = system_pgbouncer()
                notes.append(f"no PgBouncer >= 1.21 available ({exc}); using PgBouncer "
                             f"{binary.version_text}")
        else:
            binary = system_pgbouncer()
        postgres = PostgresServer(max_connections=max_connections).start()
        try:
            bouncer = PgBouncerServer(
                binary,
                postgres,
                {
                    "default_pool_size": pool_size,
                    "max_db_connections": pool_size,
                    "max_client_conn": max_client_conn,
                },
                port=pgbouncer_port,
            ).start()
        except BaseException:
            postgres.stop()
            raise
        return cls(postgres, bouncer, notes)

    def pgbouncer_target(self) -> LoadTarget:
        if self.pgbouncer is None:
            raise RuntimeError("PgBouncer was stopped")
        return LoadTarget(
            label=f"PgBouncer {self.pgbouncer.binary.version_text}",
            dsn=self.pgbouncer.dsn(),
            kind="pgbouncer",
            admin_dsn=self.pgbouncer.admin_dsn,
            postgres_dsn=self.postgres.dsn(),
            server_limit=self.pgbouncer.pool_size,
            named_statements=self.pgbouncer.supports_prepared_statements,
        )

    def postgres_target(self) -> LoadTarget:
        return LoadTarget(
            label="PostgreSQL, direct",
            dsn=self.postgres.dsn(),
            kind="postgres",
            # The superuser keeps a reserved slot: sampling works while the server refuses others.
            postgres_dsn=self.postgres.dsn(self.postgres.superuser),
            server_limit=self.postgres.max_connections,
            named_statements=True,
        )

    def stop_pgbouncer(self) -> None:
        """Stop PgBouncer so its server connections no longer count against max_connections."""
        if self.pgbouncer is not None:
            self.pgbouncer.stop()
            self.pgbouncer = None

    def stop(self) -> None:
        self.stop_pgbouncer()
        self.postgres.stop()

    def __enter__(self) -> LocalServers:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
