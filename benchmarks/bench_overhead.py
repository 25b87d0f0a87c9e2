"""Client CPU per query: a query through the pool against the same query on a raw asyncpg connection.

    .venv/bin/python benchmarks/bench_overhead.py [--rounds 5] [--queries 4000] [--block 100]
                                   [--instances 500] [--seconds 3] [--only single|fleet]

`SELECT $1::int + 1`, statement caches off everywhere (asyncpg ``statement_cache_size=0``,
asyncpool ``prepared_statements="off"``: the same messages on the wire), client CPU measured with
``time.process_time()`` over a window and divided by the queries run in it: steadier than
throughput on a shared machine. Two cases:

- single: one connection (or pool of one) direct to PostgreSQL, queries back to back;
- fleet: `--instances` connections (or pools with max_size=1) in one process through PgBouncer
  1.18, every instance querying in a loop for `--seconds` after a warm-up.

Contenders take turns (single: blocks of `--block` queries on connections all open at once;
fleet: one contender's instances at a time, rounds in reversed order each time), so a busy
neighbour slows them all alike; the report gives medians, the extra µs per query over raw asyncpg
(targets: <= 3 µs single, <= 5 µs fleet) and ratios against asyncpg.Pool and psycopg_pool measured
in the same run. asyncpool's default mode ("unnamed") is shown too, for information: it sends
fewer messages, so it is not the same work as raw asyncpg.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import statistics
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from asyncpool.config import PreparedStatements

QUERY = "SELECT $1::int + 1"
Query = Callable[[int], Awaitable[Any]]
# An instance: a way to run one query, inside an async context that owns its connection(s).
Instance = Callable[[str], Any]

RAW = "raw asyncpg"
POOL_FETCHVAL = "asyncpool pool.fetchval"
POOL_ACQUIRE = "asyncpool acquire + fetchval"
UNNAMED = "asyncpool pool.fetchval, unnamed (default mode)"
ASYNCPG_POOL = "asyncpg.Pool acquire + fetchval"
PSYCOPG_POOL = "psycopg_pool connection + fetchone"


@asynccontextmanager
async def raw(dsn: str) -> AsyncIterator[Query]:
    import asyncpg

    conn = await asyncpg.connect(dsn, statement_cache_size=0)
    try:
        yield lambda i: conn.fetchval(QUERY, i)
    finally:
        await conn.close()


@asynccontextmanager
async def asyncpool_instance(dsn: str, *, mode: PreparedStatements, scoped: bool) -> AsyncIterator[Query]:
    import asyncpool

    pool = await asyncpool.create_pool(dsn, min_size=1, max_size=1, prepared_statements=mode,
                                       telemetry=False)
    try:
        if scoped:
            async def query(i: int) -> Any:
                async with pool.acquire() as conn:
                    return await conn.fetchval(QUERY, i)

            yield query
        else:
            yield lambda i: pool.fetchval(QUERY, i)
    finally:
        await pool.close()


@asynccontextmanager
async def asyncpg_pool(dsn: str) -> AsyncIterator[Query]:
    import asyncpg

    pool = await asyncpg.create_pool(dsn, min_size=1, max_size=1, statement_cache_size=0)

    async def query(i: int) -> Any:
        async with pool.acquire() as conn:
            return await conn.fetchval(QUERY, i)

    try:
        yield query
    finally:
        await pool.close()


@asynccontextmanager
async def psycopg_pool(dsn: str) -> AsyncIterator[Query]:
    from psycopg_pool import AsyncConnectionPool

    # prepare_threshold=None: no server-side prepared statements (PgBouncer 1.18 cannot keep them).
    pool = AsyncConnectionPool(dsn, min_size=1, max_size=1, open=False,
                               kwargs={"prepare_threshold": None, "autocommit": True})
    await pool.open(wait=True)

    async def query(i: int) -> Any:
        async with pool.connection() as conn:
            cur = await conn.execute("SELECT %s::int + 1", (i,))
            return (await cur.fetchone())[0]  # type: ignore[index]

    try:
        yield query
    finally:
        await pool.close()


CONTENDERS: dict[str, Instance] = {
    RAW: raw,
    POOL_FETCHVAL: lambda dsn: asyncpool_instance(dsn, mode="off", scoped=False),
    POOL_ACQUIRE: lambda dsn: asyncpool_instance(dsn, mode="off", scoped=True),
    UNNAMED: lambda dsn: asyncpool_instance(dsn, mode="unnamed", scoped=False),
    ASYNCPG_POOL: asyncpg_pool,
    PSYCOPG_POOL: psycopg_pool,
}


async def single_case(dsn: str, args: argparse.Namespace) -> dict[str, list[float]]:
    """µs of client CPU per query for each contender, one instance each, queries back to back.

    All contenders are open at once and take turns in short blocks (`--block` queries), so load
    from elsewhere on the machine falls on them alike; each block is one sample.
    """
    samples: dict[str, list[float]] = {name: [] for name in CONTENDERS}
    async with AsyncExitStack() as stack:
        queries = {name: await stack.enter_async_context(make(dsn)) for name, make in CONTENDERS.items()}
        for query in queries.values():  # warm-up: first executions, allocator, caches
            for i in range(200):
                await query(i)
        order = list(queries)
        blocks = max(1, args.queries // args.block)
        for r in range(args.rounds):
            for _ in range(blocks):
                for name in order:
                    query = queries[name]
                    started = time.process_time()
                    for i in range(args.block):
                        await query(i)
                    samples[name].append((time.process_time() - started) / args.block * 1e6)
                order.reverse()
            print(f"  [single {r + 1}/{args.rounds}] "
                  + ", ".join(f"{n}: {statistics.median(v[-blocks:]):.1f}" for n, v in samples.items()),
                  flush=True)
    return samples


async def fleet_round(make: Instance, dsn: str, instances: int, seconds: float) -> tuple[float, int]:
    """µs of client CPU per query and queries run, `instances` instances querying at once."""
    async with AsyncExitStack() as stack:
        opened = await asyncio.gather(*(stack.enter_async_context(make(dsn)) for _ in range(instances)))
        counts = [0] * instances
        measuring = asyncio.Event()
        stop = asyncio.Event()

        async def loop(n: int, query: Query) -> None:
            i = 0
            while not stop.is_set():
                await query(i)
                i += 1
                if measuring.is_set():
                    counts[n] += 1

        tasks = [asyncio.create_task(loop(n, q)) for n, q in enumerate(opened)]
        await asyncio.sleep(min(1.0, seconds / 3))  # warm-up
        gc.collect()
        started = time.process_time()
        measuring.set()
        await asyncio.sleep(seconds)
        measuring.clear()
        used = time.process_time() - started
        stop.set()
        await asyncio.gather(*tasks)
        total = sum(counts)
        return used / total * 1e6, total


async def fleet_case(dsn: str, args: argparse.Namespace) -> dict[str, list[float]]:
    samples: dict[str, list[float]] = {name: [] for name in CONTENDERS}
    order = list(CONTENDERS)
    for r in range(args.rounds):
        for name in order:
            value, total = await fleet_round(CONTENDERS[name], dsn, args.instances, args.seconds)
            samples[name].append(value)
            print(f"  [fleet {r + 1}/{args.rounds}] {name}: {value:.1f} µs/query "
                  f"({total / args.seconds:,.0f} q/s)", flush=True)
        order.reverse()
    return samples


def report(case: str, samples: dict[str, list[float]], target: float) -> None:
    median = {name: statistics.median(values) for name, values in samples.items()}
    spread = {name: (min(v), max(v)) for name, v in samples.items()}
    base = median[RAW]
    print(f"\n== {case}: median client CPU µs per query (min-max over the rounds)")
    for name in samples:
        lo, hi = spread[name]
        print(f"  {name:<48} {median[name]:7.1f}  ({lo:.1f}-{hi:.1f})  extra {median[name] - base:+6.1f}")
    for name in (POOL_FETCHVAL, POOL_ACQUIRE):
        extra = median[name] - base
        verdict = "met" if extra <= target else "MISSED"
        print(f"  {name}: {extra:+.1f} µs/query over raw asyncpg (target <= {target:g}): {verdict}; "
              f"raw / it = {base / median[name]:.2f}x")
    for other in (ASYNCPG_POOL, PSYCOPG_POOL):
        print(f"  {POOL_ACQUIRE} / {other}: {median[POOL_ACQUIRE] / median[other]:.2f}x the CPU per query")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--queries", type=int, default=4000, help="single: queries per round")
    parser.add_argument("--block", type=int, default=100, help="single: queries per sample")
    parser.add_argument("--instances", type=int, default=500, help="fleet: instances per process")
    parser.add_argument("--seconds", type=float, default=3.0, help="fleet: measured window per round")
    parser.add_argument("--only", choices=["single", "fleet"])
    args = parser.parse_args()

    from asyncpool.testing import ServerStack

    stack = ServerStack.start(max_connections=80,
                              pgbouncer_overrides={"max_client_conn": args.instances + 200})
    try:
        results = {}
        if args.only in (None, "single"):
            results["single"] = asyncio.run(single_case(stack.postgres.dsn(), args))
        if args.only in (None, "fleet"):
            results["fleet"] = asyncio.run(fleet_case(stack.legacy.dsn(), args))
    finally:
        stack.stop()
    titles = {"single": "1 pool, direct to PostgreSQL",
              "fleet": f"{args.instances} pools per process through PgBouncer 1.18"}
    targets = {"single": 3.0, "fleet": 5.0}
    for case, samples in results.items():
        report(f"{case} ({titles[case]})", samples, targets[case])


if __name__ == "__main__":
    main()
