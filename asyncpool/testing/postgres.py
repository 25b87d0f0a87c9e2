"""A throwaway PostgreSQL server: initdb in a temp dir, SCRAM-SHA-256 auth, a free loopback port."""

from __future__ import annotations

import secrets
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import quote

from asyncpool.testing.binaries import postgres_bindir
from asyncpool.testing.harness_error import HarnessError
from asyncpool.testing.ports import free_port, wait_for_port
from asyncpool.testing.process import (
    ServerProcess,
    chown_tree,
    make_workdir,
    remove_tree,
    run_as_service,
)
from asyncpool.testing.scram import scram_secret
from asyncpool.testing.sync import run_sync

HOST = "127.0.0.1"


@dataclass(frozen=True)
class Role:
    """A login role with a password generated for this server's lifetime."""

    name: str
    password: str = field(repr=False)

    def dsn(self, host: str, port: int, database: str, **params: str) -> str:
        query = "&".join(f"{k}={quote(v)}" for k, v in params.items())
        auth = f"{quote(self.name)}:{quote(self.password, safe='')}"
        return f"postgresql://{auth}@{host}:{port}/{database}" + (f"?{query}" if query else "")


class PostgresServer:
    """PostgreSQL from the machine's binaries.

    Roles: `postgres` (superuser), `app` (owns database `app`; what the pool logs in as) and
    `pgb_admin` (PgBouncer admin-console user). Passwords are random per server.
    """

    def __init__(
        self,
        *,
        max_connections: int = 60,
        settings: dict[str, str] | None = None,
        hba_lines: list[str] | None = None,
        port: int | None = None,
    ) -> None:
        self.max_connections = max_connections
        self.extra_settings: dict[str, str] = dict(settings or {})
        self.extra_hba: list[str] = list(hba_lines or [])
        self.host = HOST
        self.port: int = port or free_port()
        self.superuser: Role = Role("postgres", secrets.token_urlsafe(18))
        self.app: Role = Role("app", secrets.token_urlsafe(18))
        self.pgb_admin: Role = Role("pgb_admin", secrets.token_urlsafe(18))
        self.database = "app"
        self.workdir: Path | None = None
        self.process: ServerProcess | None = None

    @property
    def roles(self) -> list[Role]:
        return [self.superuser, self.app, self.pgb_admin]

    @property
    def datadir(self) -> Path:
        assert self.workdir is not None
        return self.workdir / "data"

    def dsn(self, role: Role | None = None, database: str | None = None, **params: str) -> str:
        return (role or self.app).dsn(self.host, self.port, database or self.database, **params)

    @property
    def admin_dsn(self) -> str:
        return self.dsn(self.superuser, "postgres")

    # -- lifecycle ---------------------------------------------------------------------------

    def start(self) -> PostgresServer:
        bindir = postgres_bindir()
        self.workdir = make_workdir("postgres")
        pwfile = self.workdir / "pwfile"
        pwfile.write_text(self.superuser.password + "\n")
        chown_tree(self.workdir)
        run_as_service(
            [
                str(bindir / "initdb"),
                "-D", str(self.datadir),
                "-U", "postgres",
                "--auth=scram-sha-256",
                f"--pwfile={pwfile}",
                "--encoding=UTF8",
                "--locale=C",
                "--no-sync",
            ]
        )
        pwfile.unlink()
        self._write_config()
        self._bootstrap_roles(bindir)
        self.process = ServerProcess(
            "postgres",
            [str(bindir / "postgres"), "-D", str(self.datadir)],
            self.workdir / "postgres.log",
            self.workdir,
            # SIGQUIT: PostgreSQL's immediate shutdown, which also stops its backends.
            death_signal=signal.SIGQUIT,
        )
        self._launch()
        return self

    def _launch(self) -> None:
        assert self.process is not None
        self.process.start()
        if not wait_for_port(self.host, self.port, 30) or not self._accepting(30):
            tail = self.process.log_tail()
            self.stop()
            raise HarnessError(f"PostgreSQL did not start on {self.host}:{self.port}:\n{tail}")

    def _accepting(self, timeout: float) -> bool:
        """The port can be open while the server still says 'starting up'; wait for a real login."""
        import asyncio

        import asyncpg

        async def probe() -> bool:
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                try:
                    conn = await asyncpg.connect(self.admin_dsn, timeout=2)
                except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError):
                    await asyncio.sleep(0.05)
                    continue
                await conn.close()
                return True
            return False

        return run_sync(probe())

    def _write_config(self) -> None:
        settings = {
            "listen_addresses": f"'{self.host}'",
            "port": str(self.port),
            "max_connections": str(self.max_connections),
            "superuser_reserved_connections": "3",
            "unix_socket_directories": f"'{self.workdir}'",
            "password_encryption": "'scram-sha-256'",
            # A throwaway server: durability is not the point, speed of the suite is.
            "fsync": "off",
            "synchronous_commit": "off",
            "full_page_writes": "off",
            "shared_buffers": "'64MB'",
            "log_min_messages": "warning",
            "log_connections": "off",
        }
        settings.update(self.extra_settings)
        with open(self.datadir / "postgresql.conf", "a") as conf:
            conf.write("\n# asyncpool test harness\n")
            for key, value in settings.items():
                conf.write(f"{key} = {value}\n")
        hba = [
            *self.extra_hba,
            "local all all scram-sha-256",
            f"host all all {self.host}/32 scram-sha-256",
        ]
        (self.datadir / "pg_hba.conf").write_text("\n".join(hba) + "\n")

    def _bootstrap_roles(self, bindir: Path) -> None:
        """Create roles with pre-computed SCRAM secrets, in single-user mode (no password needed)."""
        statements = [
            f"CREATE ROLE app LOGIN CREATEDB PASSWORD '{scram_secret(self.app.password)}';",
            f"CREATE ROLE pgb_admin LOGIN PASSWORD '{scram_secret(self.pgb_admin.password)}';",
        ]
        run_as_service(
            [str(bindir / "postgres"), "--single", "-D", str(self.datadir), "-j", "postgres"],
            input="\n".join(statements) + "\n",
        )
        run_as_service(
            [str(bindir / "postgres"), "--single", "-D", str(self.datadir), "-j", "postgres"],
            input="CREATE DATABASE app OWNER app;\n",
        )

    async def terminate_backend(self, pid: int) -> bool:
        """Kill one backend (pg_terminate_backend), as an administrator or a failover would."""
        import asyncpg

        conn = await asyncpg.connect(self.admin_dsn)
        try:
            killed: bool = await conn.fetchval("SELECT pg_terminate_backend($1)", pid)
        finally:
            await conn.close()
        return killed

    async def running_statements(self, marker: str) -> int:
        """How many other sessions are running a statement whose text holds `marker`."""
        import asyncpg

        conn = await asyncpg.connect(self.admin_dsn)
        try:
            count: int = await conn.fetchval(
                "SELECT count(*) FROM pg_stat_activity WHERE state = 'active' "
                "AND query LIKE '%' || $1 || '%' AND pid <> pg_backend_pid()", marker)
        finally:
            await conn.close()
        return count

    async def end_statements(self, marker: str) -> None:
        """Terminate every other session whose last statement holds `marker` (test clean-up)."""
        import asyncpg

        conn = await asyncpg.connect(self.admin_dsn)
        try:
            await conn.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                "WHERE query LIKE '%' || $1 || '%' AND pid <> pg_backend_pid()", marker)
        finally:
            await conn.close()

    def secret_of(self, role: Role) -> str:
        """The SCRAM verifier PgBouncer's auth_file needs for `role` (read from pg_authid)."""
        import asyncpg

        async def read() -> str:
            conn = await asyncpg.connect(self.admin_dsn)
            try:
                value: str = await conn.fetchval(
                    "SELECT rolpassword FROM pg_authid WHERE rolname = $1", role.name
                )
            finally:
                await conn.close()
            return value

        return run_sync(read())

    def running(self) -> bool:
        return self.process is not None and self.process.running()

    def kill(self) -> None:
        """Crash the server (SIGKILL): for fault tests."""
        if self.process is not None:
            self.process.stop(signal.SIGKILL)

    def restart(self, down_for: float = 0.0) -> None:
        """Stop (fast shutdown) and start again on the same port and data."""
        assert self.process is not None
        self.process.stop()
        if down_for:
            time.sleep(down_for)
        self._launch()

    def stop(self) -> None:
        if self.process is not None:
            self.process.stop()
        if self.workdir is not None:
            remove_tree(self.workdir)
            self.workdir = None

    def __enter__(self) -> PostgresServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

