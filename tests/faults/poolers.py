"""Private PgBouncers of both versions with settings of a test module's own."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping

from asyncpool.testing import PgBouncerServer, ServerStack
from asyncpool.testing.binaries import current_pgbouncer, system_pgbouncer


@contextlib.contextmanager
def both_pgbouncers(stack: ServerStack,
                    settings: Mapping[str, str | int]) -> Iterator[dict[str, PgBouncerServer]]:
    """PgBouncer 1.18 ("legacy") and the current one with `settings`, in front of `stack`'s
    PostgreSQL, stopped when the block ends (those started, if one fails to start)."""
    servers = {
        "legacy": PgBouncerServer(system_pgbouncer(), stack.postgres, dict(settings)),
        "current": PgBouncerServer(current_pgbouncer(), stack.postgres, dict(settings)),
    }
    started: list[PgBouncerServer] = []
    try:
        for server in servers.values():
            started.append(server.start())
        yield servers
    finally:
        for server in started:
            server.stop()
