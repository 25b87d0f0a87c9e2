"""Throwaway PostgreSQL and PgBouncer servers for tests, benchmarks and the demo.

Nothing here is imported by `import asyncpool`.
"""

from asyncpool.testing.harness_error import HarnessError
from asyncpool.testing.pgbouncer import PgBouncerServer
from asyncpool.testing.postgres import PostgresServer, Role
from asyncpool.testing.stack import ServerStack

__all__ = ["HarnessError", "PgBouncerServer", "PostgresServer", "Role", "ServerStack"]
