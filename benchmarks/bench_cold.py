"""First executions ("cold" statements) through PgBouncer 1.18: how many round trips they cost.

Every statement text is new to the connection (``SELECT $1::int + k`` with a different k each
time), so nothing can be reused. Contenders, one connection each, sequential, in interleaved
rounds:

* asyncpool ``off``: asyncpg's Parse/Describe/Flush, then Parse/Bind/Execute/Sync (two trips).
* asyncpool ``unnamed``: the same describe, then the one-trip message (two trips).
* psycopg 3 with ``prepare_threshold=None``: Parse/Bind/Describe/Execute/Sync with the server
  inferring parameter types from text parameters (one trip).
* asyncpool ``unnamed``, repeated statements (the warm case, for scale).

Prints wall µs per statement and client CPU µs per statement (median of the rounds), and the
load average. Run: ``.venv/bin/python benchmarks/bench_cold.py [--statements 2000] [--rounds 3]``
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import os
import statistics
import time
from collections.abc import Awaitable, Callable

import psycopg

from asyncpool import Pool
from asyncpool.config import PreparedStatements
from asyncpool.testing import ServerStack

Runner = Callable[[str, int, int], Awaitable[tuple[float, float]]]
_offset = itertools.count(1_000_000)  # statement texts never repeat across runs


async def _asyncpool(dsn: str, n: int, mode: PreparedStatements, warm: bool) -> tuple[float, float]:
    async with Pool(dsn, name=f"cold-{mode}", prepared_statements=mode,
                    min_size=1, max_size=1, telemetry=False) as pool, pool.acquire() as conn:
        base = next(_offset) * 10_000
        wall, cpu = time.perf_counter(), time.process_time()
        for i in range(n):
            k = 0 if warm else base + i
            await conn.fetchval(f"SELECT $1::int + {k}", i)
        return (time.perf_counter() - wall) / n * 1e6, (time.process_time() - cpu) / n * 1e6


async def _psycopg(dsn: str, n: int) -> tuple[float, float]:
    async with await psycopg.AsyncConnection.connect(dsn, prepare_threshold=None,
                                                     autocommit=True) as conn:
        cur = conn.cursor()
        base = next(_offset) * 10_000
        wall, cpu = time.perf_counter(), time.process_time()
        for i in range(n):
            await cur.execute(f"SELECT %s::int + {base + i}", (i,))
            await cur.fetchone()
        return (time.perf_counter() - wall) / n * 1e6, (time.process_time() - cpu) / n * 1e6


async def main(statements: int, rounds: int) -> None:
    stack = ServerStack.start()
    try:
        dsn = stack.legacy.dsn()
        contenders: dict[str, Callable[[], Awaitable[tuple[float, float]]]] = {
            "asyncpool off, cold": lambda: _asyncpool(dsn, statements, "off", False),
            "asyncpool unnamed, cold": lambda: _asyncpool(dsn, statements, "unnamed", False),
            "psycopg (server-inferred types), cold": lambda: _psycopg(dsn, statements),
            "asyncpool unnamed, warm": lambda: _asyncpool(dsn, statements, "unnamed", True),
        }
        results: dict[str, list[tuple[float, float]]] = {name: [] for name in contenders}
        for _ in range(rounds):
            for name, run in contenders.items():
                results[name].append(await run())
        print(f"{statements} statements per run, {rounds} interleaved rounds, PgBouncer 1.18, "
              f"load average {os.getloadavg()[0]:.2f}")
        print(f"{'contender':40} {'wall µs/stmt':>13} {'client CPU µs/stmt':>19}")
        for name, values in results.items():
            wall = statistics.median(v[0] for v in values)
            cpu = statistics.median(v[1] for v in values)
            print(f"{name:40} {wall:13.0f} {cpu:19.0f}")
    finally:
        stack.stop()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--statements", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    asyncio.run(main(args.statements, args.rounds))
