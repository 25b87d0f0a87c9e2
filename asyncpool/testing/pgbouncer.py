"""A throwaway PgBouncer in transaction mode with SCRAM-SHA-256, in front of a PostgresServer."""

from __future__ import annotations

import configparser
import signal
import time
from importlib import resources
from pathlib import Path

from asyncpool.testing.binaries import PgBouncerBinary
from asyncpool.testing.harness_error import HarnessError
from asyncpool.testing.pgbouncer_endpoint import PgBouncerEndpoint
from asyncpool.testing.ports import free_port, wait_for_port
from asyncpool.testing.postgres import PostgresServer
from asyncpool.testing.process import ServerProcess, chown_tree, make_workdir, remove_tree

# Settings that only PgBouncer >= 1.21 understands.
_PREPARED_ONLY = {"max_prepared_statements"}


def shared_settings() -> dict[str, str]:
    """The tuning in asyncpool/testing/pgbouncer.ini, shared with compose.yaml and Terraform."""
    parser = configparser.ConfigParser(interpolation=None)
    parser.read_string(resources.files("asyncpool.testing").joinpath("pgbouncer.ini").read_text())
    return dict(parser["pgbouncer"])


class PgBouncerServer(PgBouncerEndpoint):
    """PgBouncer from `binary`, pooling every database of `postgres`.

    `overrides` replace entries of the shared settings (for example a small `default_pool_size` so a
    test can saturate it). `upstream_port`: its server connections go there instead (a
    `FaultProxy` in front of `postgres`). `admin_dsn` reaches the admin console as `pgb_admin`.
    """

    def __init__(
        self,
        binary: PgBouncerBinary,
        postgres: PostgresServer,
        overrides: dict[str, str | int] | None = None,
        port: int | None = None,
        *,
        socket_dir: Path | None = None,
        extra_ini: list[str] | None = None,
        stats_only: bool = False,
        upstream_port: int | None = None,
    ) -> None:
        self.binary = binary
        self.postgres = postgres
        self.host: str = postgres.host
        self.port: int = port or free_port()
        settings = shared_settings()
        settings.update({k: str(v) for k, v in (overrides or {}).items()})
        if not binary.supports_prepared_statements:
            for key in _PREPARED_ONLY:
                settings.pop(key, None)
        self.settings = settings
        #: Where its Unix socket lives (default: its workdir); a fleet's peers reach it there.
        self.socket_dir = socket_dir
        #: Lines after the [pgbouncer] section (a fleet's [peers]).
        self.extra_ini: list[str] = list(extra_ini or ())
        #: The console user may only read (SHOW), as pgb_stats in compose and Terraform.
        self.stats_only = stats_only
        #: Where its server connections go: `postgres`'s port, or a proxy's in front of it.
        self.upstream_port = upstream_port or postgres.port
        self.workdir: Path | None = None
        self.process: ServerProcess | None = None

    @property
    def version(self) -> tuple[int, int]:
        return self.binary.version

    @property
    def label(self) -> str:
        return f"pgbouncer-{self.binary.version_text}"

    @property
    def supports_prepared_statements(self) -> bool:
        return (
            self.binary.supports_prepared_statements
            and int(self.settings.get("max_prepared_statements", "0")) > 0
        )

    @property
    def pool_size(self) -> int:
        return int(self.settings["default_pool_size"])

    controllable = True

    # -- lifecycle ---------------------------------------------------------------------------

    def start(self) -> PgBouncerServer:
        self.workdir = make_workdir("pgbouncer")
        auth_lines = [
            f'"{role.name}" "{self.postgres.secret_of(role)}"' for role in self.postgres.roles
        ]
        (self.workdir / "userlist.txt").write_text("\n".join(auth_lines) + "\n")
        self._write_ini()
        chown_tree(self.workdir)
        self.process = ServerProcess(
            self.label,
            [*self.binary.command, str(self.workdir / "pgbouncer.ini")],
            self.workdir / "pgbouncer.log",
            self.workdir,
        )
        self._launch()
        return self

    def _write_ini(self) -> None:
        assert self.workdir is not None
        pg = self.postgres
        lines = [
            "[databases]",
            f"* = host={pg.host} port={self.upstream_port}",
            "[pgbouncer]",
            f"listen_addr = {self.host}",
            f"listen_port = {self.port}",
            f"unix_socket_dir = {self.socket_dir or self.workdir}",
            f"auth_file = {self.workdir / 'userlist.txt'}",
            f"pidfile = {self.workdir / 'pgbouncer.pid'}",
            f"admin_users = {'' if self.stats_only else pg.pgb_admin.name}",
            f"stats_users = {pg.pgb_admin.name}",
        ]
        lines += [f"{key} = {value}" for key, value in self.settings.items()]
        lines += self.extra_ini
        (self.workdir / "pgbouncer.ini").write_text("\n".join(lines) + "\n")

    def _launch(self) -> None:
        assert self.process is not None
        self.process.start()
        if not self._wait_until_listening(20):
            tail = self.process.log_tail()
            self.stop()
            raise HarnessError(f"{self.label} did not start on {self.host}:{self.port}:\n{tail}")

    def _wait_until_listening(self, timeout: float) -> bool:
        if self.socket_dir is None:
            return wait_for_port(self.host, self.port, timeout)
        # A fleet shares its TCP port: the first member already answers there, so wait for
        # this one's own socket.
        sock = self.socket_dir / f".s.PGSQL.{self.port}"
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if sock.exists():
                return True
            if self.process is not None and not self.process.running():
                return False
            time.sleep(0.05)
        return False

    def running(self) -> bool:
        return self.process is not None and self.process.running()

    def restart(self, down_for: float = 0.0) -> None:
        """Stop immediately (SIGINT) and start again on the same port, as a crash-and-restart would."""
        assert self.process is not None
        self.process.stop(signal.SIGINT)
        if down_for:
            time.sleep(down_for)
        self._launch()

    def kill(self) -> None:
        if self.process is not None:
            self.process.stop(signal.SIGKILL)

    def stop(self) -> None:
        if self.process is not None:
            self.process.stop(signal.SIGINT)
        if self.workdir is not None:
            remove_tree(self.workdir)
            self.workdir = None

    def __enter__(self) -> PgBouncerServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
