"""Warm Lambda invocations: one kept pool on a LambdaRunner vs a loop and a connection each time.

    .venv/bin/python benchmarks/bench_lambda_invocation.py [--invocations 300] [--rounds 3] [--dsn DSN]

Both handlers run one parameterized query per invocation, called synchronously as the Lambda
runtime calls them:

- ``asyncio.run`` per invocation with a fresh asyncpg connection (what a handler without a kept
  loop must do);
- `async_handler`-style invocation through `pooled_connection` on one `LambdaRunner`, with the
  pool from `lambda_config` (one connection, kept);
- the runner alone, with an empty handler, next to an ``asyncio.run`` of an empty coroutine.

Rounds are interleaved so a busy neighbour slows every contender alike. Prints median and p99
milliseconds per invocation and the ratio. Without --dsn a throwaway PostgreSQL with PgBouncer in
front is started on 127.0.0.1.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from typing import Any

Handler = Callable[[Any, Any], Any]


def naive_handler(dsn: str) -> Handler:
    import asyncpg

    async def work() -> Any:
        conn = await asyncpg.connect(dsn, statement_cache_size=0)
        try:
            return await conn.fetchval("SELECT $1::int", 1)
        finally:
            await conn.close()

    def handler(event: Any, context: Any) -> Any:
        return asyncio.run(work())

    return handler


@contextmanager
def kept_pool_handler(dsn: str) -> Iterator[Handler]:
    from asyncpool import Pool
    from asyncpool.integrations.aws_lambda import lambda_config
    from asyncpool.integrations.lambda_runner import LambdaRunner
    from asyncpool.integrations.powertools import current_connection, pooled_connection

    runner = LambdaRunner()
    pool = Pool(config=lambda_config(environ={}, dsn=dsn))

    @pooled_connection(pool, runner=runner)
    async def handler(event: Any, context: Any) -> Any:
        return await current_connection().fetchval("SELECT $1::int", 1)

    try:
        yield handler
        stats = pool.stats()
        print(f"kept pool: created_total={stats.created_total} acquired_total={stats.acquired_total}")
    finally:
        runner.run(pool.close())
        runner.close()


@contextmanager
def empty_runner_handler() -> Iterator[Handler]:
    from asyncpool.integrations.lambda_runner import LambdaRunner, async_handler

    with LambdaRunner() as runner:

        @async_handler(runner=runner)
        async def handler(event: Any, context: Any) -> None:
            return None

        yield handler


def empty_asyncio_run(event: Any, context: Any) -> None:
    async def nothing() -> None:
        return None

    asyncio.run(nothing())


def timed(handler: Handler, invocations: int) -> list[float]:
    from asyncpool.integrations.invocation import LocalContext

    seconds = []
    for _ in range(invocations):
        context = LocalContext()
        started = time.perf_counter()
        handler({}, context)
        seconds.append(time.perf_counter() - started)
    return seconds


def report(name: str, seconds: list[float]) -> float:
    median = statistics.median(seconds) * 1e3
    p99 = statistics.quantiles(seconds, n=100)[98] * 1e3
    print(f"{name:48s} median {median:8.3f} ms   p99 {p99:8.3f} ms")
    return median


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--invocations", type=int, default=300)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--dsn", help="a PgBouncer (or server) DSN; default: start one locally")
    args = parser.parse_args()
    from asyncpool.testing.local_pgbouncer import local_pgbouncer

    with local_pgbouncer() if args.dsn is None else nullcontext(args.dsn) as dsn:
        naive = naive_handler(dsn)
        results: dict[str, list[float]] = {}
        with kept_pool_handler(dsn) as kept, empty_runner_handler() as empty:
            contenders = {
                "asyncio.run + new connection per invocation": naive,
                "LambdaRunner + pooled_connection (kept)": kept,
                "asyncio.run, empty coroutine": empty_asyncio_run,
                "LambdaRunner, empty handler": empty,
            }
            for handler in contenders.values():
                handler({}, None)  # the cold start is not what is measured
            for _ in range(args.rounds):
                for name, handler in contenders.items():
                    results.setdefault(name, []).extend(timed(handler, args.invocations))
        medians = {name: report(name, seconds) for name, seconds in results.items()}
    names = list(medians)
    print(f"kept pool is {medians[names[0]] / medians[names[1]]:.1f}x faster per warm invocation")
    print(f"runner alone is {medians[names[2]] / medians[names[3]]:.1f}x cheaper than asyncio.run")


if __name__ == "__main__":
    main()
