"""SQLAlchemy ORM sessions through PgBouncer 1.18: on asyncpool against SQLAlchemy's own pool.

    PYTHONPATH=$PWD .venv/bin/python benchmarks/bench_sqlalchemy.py [--instances 500]
        [--duration 10] [--repeat 2] [--processes 4] [--json results.json]

Starts a throwaway PostgreSQL (max_connections=100) with PgBouncer 1.18 (default_pool_size=50)
and simulates `instances` function instances spread over `processes` processes. Each instance
has its own engine holding at most one connection, and runs "invocations" back to back: an ORM
session that reads one row by primary key (BEGIN, SELECT, ROLLBACK when the session closes).

Contenders (all pooler-safe through PgBouncer 1.18):
  asyncpool-unnamed  asyncpool.integrations.sqlalchemy on Pool(prepared_statements="unnamed")
  asyncpool-off      the same on Pool(prepared_statements="off")
  sqlalchemy-off     SQLAlchemy's own pool (pool_size=1) on asyncpg with both statement caches
                     off: connect_args statement_cache_size=0, prepared_statement_cache_size=0
  sqlalchemy-lru     the same with SQLAlchemy's prepared-statement LRU left on (100): repeats
                     reuse the unnamed statement without describing it again (reported only;
                     nothing checks that its description is still right after DDL)

Runs are interleaved (A B C D, then D C B A) so a busy neighbour slows every contender alike;
each figure is the median over the repeats. The password never appears on a command line.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import time
from typing import TYPE_CHECKING, Any, cast

if TYPE_CHECKING:
    from asyncpool.config import PreparedStatements

CONTENDERS = ("asyncpool-unnamed", "asyncpool-off", "sqlalchemy-off", "sqlalchemy-lru")
ROWS = 1000


# -- one worker process ---------------------------------------------------------------------------


async def worker(contender: str, instances: int, duration: float, seed: int) -> dict[str, Any]:
    import sqlalchemy as sa
    from sqlalchemy.ext.asyncio import async_sessionmaker
    from sqlalchemy.ext.asyncio import create_async_engine as sa_create_async_engine

    from asyncpool import Pool
    from asyncpool.integrations.sqlalchemy import create_async_engine

    dsn = os.environ["BENCH_DSN"]
    table = sa.table("bench_items", sa.column("id", sa.Integer), sa.column("name", sa.String),
                     sa.column("data", sa.JSON))
    statement = sa.select(table.c.name, table.c.data).where(table.c.id == sa.bindparam("k"))
    engines: list[Any] = []
    pools: list[Any] = []
    for _ in range(instances):
        if contender.startswith("asyncpool-"):
            mode = cast("PreparedStatements", contender.removeprefix("asyncpool-"))
            pool = Pool(dsn, prepared_statements=mode,
                        min_size=0, max_size=1, acquire_timeout=60, leak_timeout=None,
                        telemetry=False)
            pools.append(pool)
            engines.append(create_async_engine(pool))
        else:
            engines.append(sa_create_async_engine(
                dsn.replace("postgresql://", "postgresql+asyncpg://", 1), pool_size=1,
                max_overflow=0, pool_timeout=60,
                connect_args={"statement_cache_size": 0, "prepared_statement_cache_size":
                              0 if contender == "sqlalchemy-off" else 100}))
    sessions = [async_sessionmaker(engine) for engine in engines]
    errors: dict[str, int] = {}
    latencies: list[float] = []
    counts = [0] * instances

    async def invoke(i: int, k: int) -> None:
        started = time.perf_counter()
        try:
            async with sessions[i]() as session:
                row = (await session.execute(statement, {"k": k})).one()
                assert row.data == {"k": k}
        except Exception as exc:
            name = type(exc).__name__
            errors[name] = errors.get(name, 0) + 1
            return
        latencies.append(time.perf_counter() - started)

    gate = asyncio.Semaphore(25)  # connect at a bounded rate, as instances start

    async def warm(i: int) -> None:
        async with gate:
            await invoke(i, 1)

    await asyncio.gather(*(warm(i) for i in range(instances)))
    latencies.clear()
    warm_errors = dict(errors)
    errors.clear()
    deadline = time.perf_counter() + duration
    cpu = time.process_time()

    async def run(i: int) -> None:
        k = (seed * 7919 + i) % ROWS + 1
        while time.perf_counter() < deadline:
            await invoke(i, k)
            counts[i] += 1
            k = k % ROWS + 1

    started = time.perf_counter()
    await asyncio.gather(*(run(i) for i in range(instances)))
    elapsed = time.perf_counter() - started
    cpu = time.process_time() - cpu
    for engine in engines:
        await engine.dispose()
    for pool in pools:
        await pool.close()
    latencies.sort()
    done = sum(counts)
    return {
        "invocations": done, "elapsed": elapsed, "cpu": cpu,
        "errors": errors, "warm_up_errors": warm_errors,
        "p50": latencies[len(latencies) // 2] if latencies else None,
        "p99": latencies[int(len(latencies) * 0.99)] if latencies else None,
    }


# -- the driver -------------------------------------------------------------------------------------


async def prepare(dsn: str) -> None:
    import asyncpg

    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute("DROP TABLE IF EXISTS bench_items")
        await conn.execute("CREATE TABLE bench_items (id int PRIMARY KEY, name text, data jsonb)")
        await conn.execute("INSERT INTO bench_items SELECT k, 'item ' || k, "
                           "jsonb_build_object('k', k) FROM generate_series(1, $1::int) k", ROWS)
    finally:
        await conn.close()


def measure(contender: str, dsn: str, args: argparse.Namespace) -> dict[str, Any]:
    per = [args.instances // args.processes + (1 if n < args.instances % args.processes else 0)
           for n in range(args.processes)]
    env = {**os.environ, "BENCH_DSN": dsn}
    procs = [subprocess.Popen(
        [sys.executable, __file__, "--worker", contender, "--instances", str(count),
         "--duration", str(args.duration), "--seed", str(n)],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for n, count in enumerate(per)]
    parts = []
    for proc in procs:
        out, err = proc.communicate(timeout=args.duration * 3 + 300)
        if proc.returncode != 0:
            raise RuntimeError(f"{contender} worker failed:\n{err[-3000:]}")
        parts.append(json.loads(out.strip().splitlines()[-1]))
    invocations = sum(p["invocations"] for p in parts)
    errors: dict[str, int] = {}
    for p in parts:
        for key, value in {**p["errors"], **p["warm_up_errors"]}.items():
            errors[key] = errors.get(key, 0) + value
    return {
        "contender": contender,
        "invocations_per_s": invocations / max(p["elapsed"] for p in parts),
        "client_cpu_us_per_invocation": 1e6 * sum(p["cpu"] for p in parts) / max(invocations, 1),
        "p50_ms": 1e3 * statistics.median(p["p50"] for p in parts if p["p50"] is not None),
        "p99_ms": 1e3 * max(p["p99"] for p in parts if p["p99"] is not None),
        "errors": errors,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--instances", type=int, default=500)
    parser.add_argument("--duration", type=float, default=10.0)
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--processes", type=int, default=4)
    parser.add_argument("--only", default=",".join(CONTENDERS))
    parser.add_argument("--json", help="also write every run's result to this file")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--seed", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(asyncio.run(worker(args.worker, args.instances, args.duration,
                                            args.seed))))
        return

    from asyncpool.load.servers import LocalServers

    contenders = [c for c in CONTENDERS if c in args.only.split(",")]
    servers = LocalServers.start(pgbouncer="legacy", max_client_conn=max(1000, 2 * args.instances))
    results: dict[str, list[dict[str, Any]]] = {}
    try:
        target = servers.pgbouncer_target()
        print(f"== {target.label}, {args.instances} instances in {args.processes} processes, "
              f"{args.duration:g} s per run", flush=True)
        asyncio.run(prepare(servers.postgres.dsn()))
        order = list(contenders)
        for repeat in range(args.repeat):
            for contender in order:
                result = measure(contender, target.dsn, args)
                results.setdefault(contender, []).append(result)
                print(f"  [{repeat + 1}/{args.repeat}] {contender}: "
                      f"{result['invocations_per_s']:,.0f} sessions/s, p50 "
                      f"{result['p50_ms']:.1f} ms, p99 {result['p99_ms']:.1f} ms, client CPU "
                      f"{result['client_cpu_us_per_invocation']:.0f} µs/session, "
                      f"errors {sum(result['errors'].values())} {result['errors'] or ''}",
                      flush=True)
            order.reverse()
    finally:
        servers.stop()
    print("\nmedian over the repeats")
    base = statistics.median(r["invocations_per_s"] for r in results.get("sqlalchemy-off", []))\
        if "sqlalchemy-off" in results else None
    for contender, runs in results.items():
        qps = statistics.median(r["invocations_per_s"] for r in runs)
        ratio = f" = {qps / base:.2f}x sqlalchemy-off" if base else ""
        print(f"{contender}: {qps:,.0f} sessions/s{ratio}, client CPU "
              f"{statistics.median(r['client_cpu_us_per_invocation'] for r in runs):.0f} "
              f"µs/session, p99 {statistics.median(r['p99_ms'] for r in runs):.1f} ms, errors "
              f"{sum(sum(r['errors'].values()) for r in runs)}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
