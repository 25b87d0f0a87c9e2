"""A PostgreSQL server that answers every login with 57P03 (``CannotConnectNowError``): a
standby without hot standby, as a replica still catching up or a server in crash recovery does.

asyncpg goes on to the next host after that answer (and after a network error), and raises the
last such error it saw, which tells nothing of the host it came from."""

from __future__ import annotations

import asyncio
import time

import asyncpg

from asyncpool.testing import PostgresServer
from asyncpool.testing.harness_error import HarnessError
from asyncpool.testing.ports import wait_for_port
from asyncpool.testing.process import chown_tree
from asyncpool.testing.sync import run_sync


class ColdStandby(PostgresServer):
    """Started as a primary (roles and database made), then restarted in standby mode with
    ``hot_standby = off`` and nothing to recover from: it stays in recovery and refuses every
    login before authentication ("the database system is not accepting connections")."""

    def start(self) -> ColdStandby:
        super().start()
        assert self.process is not None
        self.process.stop()
        (self.datadir / "standby.signal").touch()
        with open(self.datadir / "postgresql.conf", "a") as conf:
            conf.write("hot_standby = off\n")
        chown_tree(self.datadir)
        self.process.start()
        if not wait_for_port(self.host, self.port, 30) or not self._refusing(30):
            tail = self.process.log_tail()
            self.stop()
            raise HarnessError(f"PostgreSQL did not come up as a cold standby:\n{tail}")
        return self

    def _refusing(self, timeout: float) -> bool:
        """Whether a login is answered with 57P03 within `timeout` seconds."""
        async def probe() -> bool:
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                try:
                    conn = await asyncpg.connect(self.admin_dsn, timeout=2)
                except asyncpg.CannotConnectNowError:
                    return True
                except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError):
                    await asyncio.sleep(0.05)
                    continue
                await conn.close()  # logged in: not in standby mode
                return False
            return False

        return run_sync(probe())
