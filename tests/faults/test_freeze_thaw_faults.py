"""A process holding a pool is frozen (SIGSTOP, as Lambda freezes an environment between
invocations), its connection meets a fault meanwhile, then it is thawed (SIGCONT).

The next transaction must commit with no error seen by the caller: the pool notices the dead or
expired connection at checkout and replaces it. tests/test_freeze_thaw.py covers PgBouncer's
client_idle_timeout with the Powertools handler; these cover what else happens to a frozen
connection: a reset, a peer that vanished without a word, a pooler restart, its lifetime ending.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from asyncpool import ConnectError, Pool
from asyncpool.testing import PgBouncerServer, PostgresServer, ServerStack
from asyncpool.testing.binaries import system_pgbouncer
from asyncpool.testing.faultproxy import FaultProxy
from asyncpool.testing.ledger import Ledger

WORKER = Path(__file__).with_name("frozen_worker.py")


class FrozenWorker:
    """The worker process and its command channel."""

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc

    @classmethod
    async def start(cls) -> FrozenWorker:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, str(WORKER),
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
        )
        return cls(proc)

    async def call(self, **command: Any) -> dict[str, Any]:
        assert self.proc.stdin is not None
        assert self.proc.stdout is not None
        self.proc.stdin.write(json.dumps(command).encode() + b"\n")
        await self.proc.stdin.drain()
        line = await asyncio.wait_for(self.proc.stdout.readline(), 30)
        assert line, f"the worker exited (code {self.proc.returncode})"
        reply: dict[str, Any] = json.loads(line)
        return reply

    async def freeze(self) -> None:
        os.kill(self.proc.pid, signal.SIGSTOP)
        while _state(self.proc.pid) != "T":  # stopped for sure before the fault
            await asyncio.sleep(0.01)

    def thaw(self) -> None:
        os.kill(self.proc.pid, signal.SIGCONT)

    async def stop(self) -> None:
        if self.proc.returncode is None:
            self.thaw()
            try:
                await asyncio.wait_for(self.call(op="close"), 10)
            except (AssertionError, TimeoutError, BrokenPipeError, ConnectionResetError):
                self.proc.kill()
            await self.proc.wait()


def _state(pid: int) -> str:
    stat = Path(f"/proc/{pid}/stat").read_text()
    return stat.rsplit(")", 1)[1].split()[0]


@pytest.fixture
async def worker() -> AsyncIterator[FrozenWorker]:
    w = await FrozenWorker.start()
    try:
        yield w
    finally:
        await w.stop()


FAULTS = ["reset", "half-open", "pgbouncer-restart", "lifetime-ended"]


@pytest.mark.parametrize("fault", FAULTS)
async def test_thawed_pool_replaces_the_connection_unseen(
    worker: FrozenWorker, fault_stack: ServerStack, ledger: Ledger, fault: str
) -> None:
    pooler = fault_stack.legacy
    async with FaultProxy(pooler.host, pooler.port) as proxy:
        options = {
            "name": "frozen", "min_size": 1, "max_size": 1, "validate_after": 0.2,
            "connect_timeout": 1, "acquire_timeout": 5, "telemetry": False,
            "max_lifetime": 0.5 if fault == "lifetime-ended" else None, "lifetime_jitter": 0,
        }
        assert await worker.call(op="open", dsn=proxy.dsn(pooler.dsn()), options=options)
        await _write(worker, ledger)
        before = await worker.call(op="stats")

        await worker.freeze()
        if fault == "reset":
            proxy.set_mode("reset")
            proxy.set_mode("pass")
        elif fault == "half-open":
            proxy.set_mode("half-open")  # the connection open now stays deaf
            proxy.set_mode("pass")
        elif fault == "pgbouncer-restart":
            await asyncio.to_thread(pooler.restart)
        # Frozen longer than validate_after (and max_lifetime): no timer fires meanwhile.
        await asyncio.sleep(0.6)
        worker.thaw()

        await _write(worker, ledger)  # no error reaches the caller
        after = await worker.call(op="stats")
        assert after["created_total"] == before["created_total"] + 1, (before, after)
        assert after["closed_total"] == before["closed_total"] + 1
        failed_checks = after["validation_failures_total"] - before["validation_failures_total"]
        if fault == "lifetime-ended":
            assert failed_checks == 0
        elif fault == "half-open":
            assert failed_checks == 1  # (nothing comes to say it is gone: only the check can)
        else:
            # The close is read at the thaw: retired as it arrives (`lost_idle`), or by the
            # checkout's check if that came first.
            assert failed_checks in (0, 1)
        assert (after["in_use"], after["size"]) == (0, 1)
        check = await ledger.verify()
        assert check.committed == 2


async def _write(worker: FrozenWorker, ledger: Ledger) -> None:
    ident = ledger.new_id()
    reply = await worker.call(op="write", table=ledger.table, id=ident)
    assert reply == {"outcome": "committed"}, reply
    ledger.committed.add(ident)


async def test_a_login_the_pooler_timed_out_before_tls_is_transient_and_says_so(
    postgres: PostgresServer,
) -> None:
    """A client frozen (here: its bytes lost) before its SSLRequest reached PgBouncer: after
    client_login_timeout PgBouncer sends an ErrorResponse where asyncpg awaits the TLS answer
    ("server sent an error response during SSL exchange"). It was reported as "TLS failed ...
    check the ssl mode and CA bundle" and not retried; it is the pooler's login timeout."""
    with PgBouncerServer(system_pgbouncer(), postgres, {"client_login_timeout": 1}) as bouncer:
        async with FaultProxy.to_dsn(bouncer.dsn()) as proxy:
            proxy.set_mode("half-open", direction="requests")
            pool = Pool(dsn=proxy.dsn(bouncer.dsn()), min_size=1, max_size=1, connect_timeout=10)
            try:
                with pytest.raises(ConnectError) as info:
                    await pool.open()
            finally:
                await pool.close()
    message = str(info.value)
    assert "error response during SSL exchange" in message
    assert "TLS failed" not in message
    assert "client_login_timeout" in message
    assert info.value.transient
