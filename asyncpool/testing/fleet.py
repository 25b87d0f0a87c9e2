"""A PgBouncer fleet: several processes sharing one TCP port (``so_reuseport``), with or without
peering (``peer_id`` and ``[peers]``, PgBouncer >= 1.19), as run past one core.

The kernel hands each new TCP connection to one of the processes, a cancel request included. A
process that receives a cancel request for a client of another forwards it to that peer when
peering is configured, and drops it otherwise.
"""

from __future__ import annotations

from pathlib import Path
from urllib.parse import quote

from asyncpool.testing.admin import admin_command
from asyncpool.testing.binaries import PgBouncerBinary
from asyncpool.testing.harness_error import HarnessError
from asyncpool.testing.pgbouncer import PgBouncerServer
from asyncpool.testing.pgbouncer_endpoint import PgBouncerEndpoint
from asyncpool.testing.ports import free_port
from asyncpool.testing.postgres import PostgresServer
from asyncpool.testing.process import chown_tree, make_workdir, remove_tree


class PgBouncerFleet(PgBouncerEndpoint):
    """`processes` PgBouncers on one port. `overrides` apply to each (``default_pool_size`` is
    per process: a fleet of 3 with 10 each may open 30 server connections). The console user is
    a stats user only, as ``pgb_stats`` in compose and Terraform; console commands land on any
    one process."""

    def __init__(self, binary: PgBouncerBinary, postgres: PostgresServer, *, processes: int = 3,
                 peering: bool = True, overrides: dict[str, str | int] | None = None) -> None:
        if peering and binary.version < (1, 19):
            raise HarnessError(f"PgBouncer {binary.version_text} has no peering (1.19+)")
        if processes < 1:
            raise HarnessError("a fleet needs at least one process")
        self.binary = binary
        self.postgres = postgres
        self.host: str = postgres.host
        self.port: int = free_port()
        self.count = processes
        self.peering = peering
        self.overrides: dict[str, str | int] = dict(overrides or {})
        self.members: list[PgBouncerServer] = []
        self._socket_dirs: list[Path] = []

    @property
    def label(self) -> str:
        return f"pgbouncer-{self.binary.version_text}-fleet{self.count}{'-peered' if self.peering else ''}"

    @property
    def version(self) -> tuple[int, int]:
        return self.binary.version

    def member_admin_dsn(self, index: int) -> str:
        """The console of one process, through its own Unix socket."""
        sock = str(self._socket_dirs[index])
        base = self.postgres.pgb_admin.dsn("localhost", self.port, "pgbouncer")
        return f"{base}?host={quote(sock, safe='')}"

    async def member_admin(self, index: int, command: str) -> list[dict[str, object]]:
        return await admin_command(self.member_admin_dsn(index), command)

    def start(self) -> PgBouncerFleet:
        try:
            self._socket_dirs = [make_workdir("pgb-sock") for _ in range(self.count)]
            for sock in self._socket_dirs:
                chown_tree(sock)
            peers = ["[peers]"] + [
                f"{i + 1} = host={sock} port={self.port}" for i, sock in enumerate(self._socket_dirs)
            ] if self.peering else []
            for i, sock in enumerate(self._socket_dirs):
                settings: dict[str, str | int] = {**self.overrides, "so_reuseport": 1}
                if self.peering:
                    settings["peer_id"] = i + 1
                member = PgBouncerServer(self.binary, self.postgres, settings, port=self.port,
                                         socket_dir=sock, extra_ini=peers, stats_only=True)
                self.members.append(member)
                member.start()
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        for member in reversed(self.members):
            member.stop()
        self.members.clear()
        for sock in self._socket_dirs:
            remove_tree(sock)
        self._socket_dirs = []

    def pids(self) -> list[int]:
        return [m.process.pid for m in self.members if m.process is not None and m.process.pid]

    def __enter__(self) -> PgBouncerFleet:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
