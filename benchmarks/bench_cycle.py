"""Acquire + release with no query: what a pool costs per checkout.

    .venv/bin/python benchmarks/bench_cycle.py [--cycles 20000] [--rounds 7] [--dsn DSN]

Each contender holds one connection (max_size=1) and cycles it `--cycles` times per round;
rounds are interleaved across contenders so a busy neighbour slows them all alike. Reports the
best and median microseconds per cycle, then the ratios the README quotes:

- asyncpool with leak tracking on vs off (target: at most 2 µs apart);
- asyncpool vs psycopg_pool (target: no slower);
- asyncpool vs asyncpg.Pool, with its default reset on release and with a no-op ``reset=``;
- asyncpool reporting to an exporting OpenTelemetry SDK, wait/use times recorded through the SDK
  or aggregated in the pool (`export_checkout_times`), against telemetry off.

Without --dsn a throwaway PostgreSQL is started on 127.0.0.1.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Any, Protocol

Cycle = Callable[[], Awaitable[None]]
Contender = Callable[[str], AbstractAsyncContextManager[Cycle]]


class _Closable(Protocol):
    async def close(self) -> Any: ...


@asynccontextmanager
async def _cycling(pool: _Closable,
                   checkout: Callable[[], AbstractAsyncContextManager[Any]]) -> AsyncIterator[Cycle]:
    """A cycle that takes `checkout()` and gives it straight back; `pool` is closed after."""

    async def cycle() -> None:
        async with checkout():
            pass

    try:
        yield cycle
    finally:
        await pool.close()


@asynccontextmanager
async def asyncpool_pool(dsn: str, **options: Any) -> AsyncIterator[Cycle]:
    import asyncpool

    pool = await asyncpool.create_pool(dsn, min_size=1, max_size=1, **options)
    async with _cycling(pool, pool.acquire) as cycle:
        yield cycle


@asynccontextmanager
async def asyncpg_pool(dsn: str, *, noop_reset: bool) -> AsyncIterator[Cycle]:
    import asyncpg

    async def no_reset(conn: Any) -> None:
        return

    pool = await asyncpg.create_pool(dsn, min_size=1, max_size=1, statement_cache_size=0,
                                     reset=no_reset if noop_reset else None)
    async with _cycling(pool, pool.acquire) as cycle:
        yield cycle


@asynccontextmanager
async def psycopg_pool(dsn: str) -> AsyncIterator[Cycle]:
    from psycopg_pool import AsyncConnectionPool

    pool = AsyncConnectionPool(dsn, min_size=1, max_size=1, open=False,
                               kwargs={"autocommit": True, "prepare_threshold": None})
    await pool.open(wait=True)
    async with _cycling(pool, pool.connection) as cycle:
        yield cycle


@asynccontextmanager
async def asyncpool_sdk(dsn: str, *, aggregated: bool) -> AsyncIterator[Cycle]:
    """asyncpool reporting to an OpenTelemetry SDK that exports (encodes) every 10 s."""
    from asyncpool.load.telemetry_sdk import exporting_meter_provider
    from asyncpool.telemetry import CheckoutTimes, TelemetryObserver

    times = CheckoutTimes() if aggregated else None
    provider = exporting_meter_provider(times)
    observer = TelemetryObserver(meter_provider=provider, checkout_times=times or True)
    try:
        async with asyncpool_pool(dsn, telemetry=False, observers=[observer]) as cycle:
            yield cycle
    finally:
        provider.shutdown()


CONTENDERS: dict[str, Contender] = {
    "asyncpool, leak tracking on": lambda dsn: asyncpool_pool(dsn, telemetry=False),
    "asyncpool, leak tracking off": lambda dsn: asyncpool_pool(dsn, telemetry=False,
                                                               leak_timeout=None),
    "asyncpool, defaults (telemetry on, no SDK)": asyncpool_pool,
    "asyncpool, SDK exporting": lambda dsn: asyncpool_sdk(dsn, aggregated=False),
    "asyncpool, SDK exporting, checkout times aggregated":
        lambda dsn: asyncpool_sdk(dsn, aggregated=True),
    "asyncpg.Pool, default reset": lambda dsn: asyncpg_pool(dsn, noop_reset=False),
    "asyncpg.Pool, no-op reset=": lambda dsn: asyncpg_pool(dsn, noop_reset=True),
    "psycopg_pool": psycopg_pool,
}


async def time_round(cycle: Cycle, cycles: int) -> float:
    """Microseconds per cycle over one round."""
    started = time.perf_counter()
    for _ in range(cycles):
        await cycle()
    return (time.perf_counter() - started) / cycles * 1e6


async def measure(dsn: str, cycles: int, rounds: int) -> dict[str, list[float]]:
    samples: dict[str, list[float]] = {name: [] for name in CONTENDERS}
    async with _all_open(dsn) as opened:
        for cycle in opened.values():
            await time_round(cycle, min(cycles, 2000))  # warm up
        for _ in range(rounds):
            for name, cycle in opened.items():
                samples[name].append(await time_round(cycle, cycles))
    return samples


@asynccontextmanager
async def _all_open(dsn: str) -> AsyncIterator[dict[str, Cycle]]:
    from contextlib import AsyncExitStack

    async with AsyncExitStack() as stack:
        yield {name: await stack.enter_async_context(make(dsn))
               for name, make in CONTENDERS.items()}


def report(samples: dict[str, list[float]]) -> None:
    best = {name: min(values) for name, values in samples.items()}
    median = {name: statistics.median(values) for name, values in samples.items()}
    width = max(map(len, samples))
    print(f"{'contender':<{width}}  {'best µs':>8}  {'median µs':>9}")
    for name in samples:
        print(f"{name:<{width}}  {best[name]:8.2f}  {median[name]:9.2f}")
    # Leak tracking on is asyncpool's default, with telemetry off: the baseline of every ratio.
    ours = median["asyncpool, leak tracking on"]
    print()
    print(f"leak tracking cost: {ours - median['asyncpool, leak tracking off']:+.2f} µs per cycle "
          "(target <= 2 µs)")
    for sdk in ("asyncpool, SDK exporting", "asyncpool, SDK exporting, checkout times aggregated"):
        print(f"{sdk}: {median[sdk] - ours:+.2f} µs per cycle over telemetry off")
    for other in ("psycopg_pool", "asyncpg.Pool, no-op reset=", "asyncpg.Pool, default reset"):
        print(f"asyncpool / {other}: {ours / median[other]:.2f}x the time per cycle"
              + (" (target <= 1.00x)" if other == "psycopg_pool" else ""))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dsn", help="PostgreSQL to connect to (default: start one)")
    parser.add_argument("--cycles", type=int, default=20_000)
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args()
    if args.dsn:
        samples = asyncio.run(measure(args.dsn, args.cycles, args.rounds))
    else:
        from asyncpool.testing import PostgresServer

        with PostgresServer() as server:
            samples = asyncio.run(measure(server.dsn(), args.cycles, args.rounds))
    report(samples)


if __name__ == "__main__":
    main()
