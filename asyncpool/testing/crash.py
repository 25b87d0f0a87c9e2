"""Crashing a test server: the abrupt stop the harness's polite restart() does not do."""

from __future__ import annotations

from asyncpool.testing.harness_error import HarnessError
from asyncpool.testing.pgbouncer import PgBouncerServer
from asyncpool.testing.ports import wait_for_port


def crash_and_restart(server: PgBouncerServer) -> None:
    """SIGKILL PgBouncer (no goodbye to any client), then start it again on the same port."""
    server.kill()
    assert server.process is not None
    server.process.start()
    if not wait_for_port(server.host, server.port, 20):
        raise HarnessError(f"{server.label} did not come back:\n{server.process.log_tail()}")
