"""Event-loop lag while a permanently refused RDS IAM login is retried in waves.

A real PostgreSQL over TLS (verify-full) refuses role ``iam_denied`` every time, as RDS or RDS
Proxy refuses every token of a role without ``rds-db:connect``. `IamAuth()` signs real tokens
with fake static AWS credentials (nothing reaches AWS: signing is local). Each wave is
``--concurrency`` acquires at once, each refused twice (the login, and its retry after
`IamAuth.refresh`); a task sleeping 1 ms in a loop beside them records how late each wake-up
was: the time the loop was blocked for every other request of the process.

Prints, per run: the waves, the aiobotocore clients created, and the loop lag (max, p99, the
wake-ups later than 20 ms). Run:
``PYTHONPATH=$PWD .venv/bin/python benchmarks/bench_iam_refusals.py [--waves 20] [--concurrency 4]``
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import secrets
import statistics
import time

import asyncpg

from asyncpool import AuthenticationError, IamAuth, Pool
from asyncpool.testing import PostgresServer
from asyncpool.testing.aws_endpoint import aws_environment
from asyncpool.testing.pki import make_test_pki


class LagProbe:
    """Sleeps 1 ms in a loop and records how late each wake-up came (ms)."""

    def __init__(self) -> None:
        self.late: list[float] = []
        self._stop = False

    async def run(self) -> None:
        while not self._stop:
            start = time.perf_counter()
            await asyncio.sleep(0.001)
            self.late.append((time.perf_counter() - start - 0.001) * 1000)

    def stop(self) -> None:
        self._stop = True


def count_clients() -> list[int]:
    """Count aiobotocore clients created (by any session) from now on."""
    from aiobotocore.session import AioSession

    created = [0]
    original = AioSession.create_client

    def counted(self: AioSession, *args: object, **kwargs: object) -> object:
        created[0] += 1
        return original(self, *args, **kwargs)

    AioSession.create_client = counted
    return created


async def waves(dsn: str, ca: str, n: int, concurrency: int, pause: float) -> None:
    created = count_clients()
    probe = LagProbe()
    pool = Pool(dsn, credentials=IamAuth(region="us-east-1"), ssl="verify-full",
                ssl_root_cert=ca, min_size=0, max_size=concurrency, telemetry=False)
    await pool.open()  # warm(): the first client, outside the measurement
    before = created[0]
    sleeper = asyncio.create_task(probe.run())
    refused = 0
    started = time.perf_counter()
    try:
        for _ in range(n):
            results = await asyncio.gather(
                *(pool.fetchval("SELECT 1") for _ in range(concurrency)), return_exceptions=True)
            refused += sum(isinstance(r, AuthenticationError) for r in results)
            others = [r for r in results if not isinstance(r, AuthenticationError)]
            if others:
                raise RuntimeError(f"expected refusals only, got {others[0]!r}")
            await asyncio.sleep(pause)
    finally:
        elapsed = time.perf_counter() - started
        probe.stop()
        await sleeper
        await pool.close()
    late = sorted(probe.late)
    p99 = late[min(len(late) - 1, int(len(late) * 0.99))]
    print(f"waves {n} x {concurrency} acquires: {refused} refused in {elapsed:.2f} s; "
          f"aiobotocore clients created {created[0] - before}; loop lag max {late[-1]:.1f} ms, "
          f"p99 {p99:.1f} ms, median {statistics.median(late):.2f} ms, "
          f"wake-ups later than 20 ms: {sum(x > 20 for x in late)} of {len(late)} "
          f"(worst: {', '.join(f'{x:.0f}' for x in late[-5:])}); "
          f"load {os.getloadavg()[0]:.2f}")


async def create_roles(admin_dsn: str) -> None:
    conn = await asyncpg.connect(admin_dsn)
    try:
        await conn.execute(f"CREATE ROLE iam_denied LOGIN PASSWORD '{secrets.token_hex(16)}'")
    finally:
        await conn.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--waves", type=int, default=20)
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--pause", type=float, default=0.05, help="seconds between waves")
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    logging.getLogger("asyncpool").setLevel(logging.CRITICAL)  # each refusal is logged
    for name, value in aws_environment().items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value
    pki = make_test_pki(dns_names=("localhost",), ip_addresses=())
    server = PostgresServer(max_connections=20, settings=pki.postgres_settings(),
                            hba_lines=["hostnossl all all 127.0.0.1/32 reject"])
    server.start()
    try:
        asyncio.run(create_roles(server.admin_dsn))
        dsn = f"postgresql://iam_denied@localhost:{server.port}/app"
        for _ in range(args.runs):
            asyncio.run(waves(dsn, str(pki.ca_cert), args.waves, args.concurrency, args.pause))
    finally:
        server.stop()
        pki.remove()


if __name__ == "__main__":
    main()
