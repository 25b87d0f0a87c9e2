"""PostgreSQL plus both PgBouncers (the distribution's and a current one), started and stopped together."""

from __future__ import annotations

from dataclasses import dataclass, field

from asyncpool.testing.binaries import current_pgbouncer, system_pgbouncer
from asyncpool.testing.pgbouncer import PgBouncerServer
from asyncpool.testing.postgres import PostgresServer


@dataclass
class ServerStack:
    """The servers a test session, benchmark or demo talks to.

    `legacy` is the distribution's PgBouncer (1.18 on Debian bookworm: no prepared statements),
    `current` a PgBouncer >= 1.21 with `max_prepared_statements`.
    """

    postgres: PostgresServer
    legacy: PgBouncerServer
    current: PgBouncerServer
    _started: list[PostgresServer | PgBouncerServer] = field(default_factory=list, repr=False)

    @property
    def poolers(self) -> list[PgBouncerServer]:
        return [self.legacy, self.current]

    @classmethod
    def start(
        cls,
        *,
        max_connections: int = 60,
        pgbouncer_overrides: dict[str, str | int] | None = None,
        postgres_settings: dict[str, str] | None = None,
    ) -> ServerStack:
        postgres = PostgresServer(max_connections=max_connections, settings=postgres_settings)
        started: list[PostgresServer | PgBouncerServer] = []
        try:
            started.append(postgres.start())
            legacy = PgBouncerServer(system_pgbouncer(), postgres, pgbouncer_overrides)
            started.append(legacy.start())
            current = PgBouncerServer(current_pgbouncer(), postgres, pgbouncer_overrides)
            started.append(current.start())
        except BaseException:
            for server in reversed(started):
                server.stop()
            raise
        return cls(postgres, legacy, current, started)

    def stop(self) -> None:
        for server in reversed(self._started):
            server.stop()
        self._started.clear()

    def pids(self) -> list[int]:
        procs = [self.postgres.process, self.legacy.process, self.current.process]
        return [p.pid for p in procs if p is not None and p.pid is not None]

    def __enter__(self) -> ServerStack:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
