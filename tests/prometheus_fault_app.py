"""Pools that fail on purpose, their metrics served for Prometheus like examples/telemetry's
(used by test_telemetry_prometheus.py). argv[1]: a DSN of a PostgreSQL the app may terminate its
own backends on. METRICS_PORT, SECONDS as for the example. Prints a JSON summary at the end."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import statistics
import sys
from pathlib import Path

import psycopg

sys.path.insert(0, str(Path(__file__).parent.parent / "examples" / "telemetry"))
sys.path.insert(0, str(Path(__file__).parent.parent))
from prometheus_setup import serve_metrics

import asyncpool
from tests.backends import ended_unread


async def hold_half_a_second(pool: asyncpool.Pool, holds: list[float], stop: float) -> None:
    """The issue's case: holds of 0.5 s, whose p50 coarse buckets reported as 0.75 s."""
    loop = asyncio.get_running_loop()
    while loop.time() < stop:
        async with pool.acquire():
            started = loop.time()
            await asyncio.sleep(0.5)
            holds.append(loop.time() - started)


async def time_out(pool: asyncpool.Pool, stop: float) -> None:
    """Hold the only connection while another caller's acquire times out."""
    loop = asyncio.get_running_loop()
    while loop.time() < stop:
        # The holder may wait: its checkout checks the connection (validate_after=0), a round
        # trip that can take longer than the pool's 0.05 s on a busy machine.
        async with pool.acquire(timeout=10):
            with contextlib.suppress(asyncpool.PoolTimeoutError):
                await pool.fetchval("SELECT 1")
        await asyncio.sleep(0.2)


async def kill_idle_backends(pool: asyncpool.Pool, dsn: str, stop: float) -> None:
    """Terminate the idle connection's backend, unseen: the next checkout's check fails and
    replaces it."""
    loop = asyncio.get_running_loop()
    with psycopg.connect(dsn, autocommit=True) as side:
        while loop.time() < stop:
            pid = await pool.fetchval("SELECT pg_backend_pid()")
            ended_unread(side, pid)
            await pool.fetchval("SELECT 1")
            await asyncio.sleep(0.3)


async def leak(pool: asyncpool.Pool, stop: float) -> None:
    loop = asyncio.get_running_loop()
    while loop.time() < stop:
        with contextlib.suppress(asyncpool.ConnectionLeakedError):
            async with pool.acquire():
                await asyncio.sleep(3600)  # reclaimed after leak_timeout


async def fail_logins(dsn: str, stop: float) -> int:
    loop = asyncio.get_running_loop()
    failures = 0
    async with asyncpool.Pool(dsn, name="badlogin", min_size=0, acquire_timeout=1.0) as pool:
        while loop.time() < stop:
            try:
                await pool.fetchval("SELECT 1")
            except asyncpool.AuthenticationError:
                failures += 1
            await asyncio.sleep(0.3)
    return failures


async def main(dsn: str, wrong_dsn: str, seconds: float) -> None:
    provider = serve_metrics(int(os.environ["METRICS_PORT"]), "asyncpool-faults")
    loop = asyncio.get_running_loop()
    stop = loop.time() + seconds
    holds: list[float] = []
    try:
        async with (
            asyncpool.Pool(dsn, name="holds", min_size=2, max_size=2) as holding,
            asyncpool.Pool(dsn, name="faults", min_size=1, max_size=1, acquire_timeout=0.05,
                           validate_after=0) as failing,
            asyncpool.Pool(dsn, name="checked", min_size=1, max_size=1, validate_after=0) as checked,
            asyncpool.Pool(dsn, name="leaky", min_size=1, max_size=1, leak_timeout=0.5) as leaky,
        ):
            _, _, _, _, _, failures = await asyncio.gather(
                hold_half_a_second(holding, holds, stop), hold_half_a_second(holding, holds, stop),
                time_out(failing, stop), kill_idle_backends(checked, dsn, stop), leak(leaky, stop),
                fail_logins(wrong_dsn, stop),
            )
            summary = {
                "holds": len(holds), "holds_median": statistics.median(holds),
                "holds_sorted": sorted(holds),
                "timeouts": failing.stats().timeouts_total,
                "validation_failures": checked.stats().validation_failures_total,
                "leaks": leaky.stats().leaked_total, "login_failures": failures,
            }
        print(json.dumps(summary), flush=True)
    finally:
        provider.shutdown()


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], sys.argv[2], float(os.environ.get("SECONDS", "30"))))
