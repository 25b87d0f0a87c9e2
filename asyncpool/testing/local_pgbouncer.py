"""A database for the examples' local runners: ASYNCPOOL_DSN, or a throwaway PgBouncer."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager

from asyncpool.testing.binaries import system_pgbouncer
from asyncpool.testing.pgbouncer import PgBouncerServer
from asyncpool.testing.postgres import PostgresServer


@contextmanager
def local_pgbouncer() -> Iterator[str]:
    """A throwaway PostgreSQL with PgBouncer in front; yields the PgBouncer DSN."""
    with PostgresServer() as postgres, PgBouncerServer(system_pgbouncer(), postgres) as bouncer:
        # stderr: stdout carries the runner's JSON lines.
        print(f"local PostgreSQL on port {postgres.port}, PgBouncer on port {bouncer.port}",
              file=sys.stderr)
        yield bouncer.dsn()


@contextmanager
def asyncpool_dsn_or_local() -> Iterator[str]:
    """ASYNCPOOL_DSN when set; otherwise a `local_pgbouncer` for the block, its DSN set as
    ASYNCPOOL_DSN (the variable the example apps read) until the block ends."""
    given = os.environ.get("ASYNCPOOL_DSN")
    if given:
        yield given
        return
    with local_pgbouncer() as dsn:
        os.environ["ASYNCPOOL_DSN"] = dsn
        try:
            yield dsn
        finally:
            os.environ.pop("ASYNCPOOL_DSN", None)
