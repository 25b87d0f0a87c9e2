"""What idle pools cost a process: CPU while hundreds of pools wait between requests.

    .venv/bin/python benchmarks/bench_idle.py [--pools 500] [--seconds 20] [--rounds 2]

Each round, in a fresh interpreter per contender (taking turns): `--pools` pools (min_size=1,
telemetry off) or raw asyncpg connections through PgBouncer 1.18, each used once, then left idle
for `--seconds` while the process's CPU time (`time.process_time()`, every thread) is measured.
What an idle pool does is housekeeping (a round every 5 s: reap, keep min_size) and waiting for
its leak deadline; the hand-over of each due timer from the alarm thread to the loop wakes both.
Reports the share of one core per contender.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time

CHILD = """
import asyncio, sys, time
async def main(kind, dsn, n, seconds):
    if kind == "asyncpool":
        import asyncpool
        things = [await asyncpool.create_pool(dsn, min_size=1, max_size=1, telemetry=False,
                                              prepared_statements="off", name=f"idle-{i}")
                  for i in range(n)]
    else:
        import asyncpg
        things = [await asyncpg.connect(dsn, statement_cache_size=0) for _ in range(n)]
    for thing in things:
        await thing.fetchval("SELECT 1")
    await asyncio.sleep(6)  # past the first housekeeping round of every pool
    started = time.process_time()
    await asyncio.sleep(seconds)
    print(time.process_time() - started)
    for thing in things:
        await thing.close()
asyncio.run(main(sys.argv[1], sys.argv[2], int(sys.argv[3]), float(sys.argv[4])))
"""


def measure(kind: str, dsn: str, pools: int, seconds: float) -> float:
    done = subprocess.run([sys.executable, "-c", CHILD, kind, dsn, str(pools), str(seconds)],
                          capture_output=True, text=True, check=False, timeout=seconds + 300)
    if done.returncode != 0:
        raise SystemExit(f"{kind}: the child failed:\n{done.stderr[-2000:]}")
    return float(done.stdout.split()[-1]) / seconds * 100


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--pools", type=int, default=500)
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()

    from asyncpool.testing import ServerStack

    stack = ServerStack.start(max_connections=80,
                              pgbouncer_overrides={"max_client_conn": args.pools * 2 + 100})
    shares: dict[str, list[float]] = {"asyncpool": [], "asyncpg": []}
    try:
        for r in range(args.rounds):
            for kind in shares if r % 2 == 0 else reversed(list(shares)):
                shares[kind].append(measure(kind, stack.legacy.dsn(), args.pools, args.seconds))
                print(f"  [{r + 1}/{args.rounds}] {kind}: {shares[kind][-1]:.2f}% of a core",
                      flush=True)
    finally:
        stack.stop()
    print(f"\n== {args.pools} idle pools (asyncpool) or connections (raw asyncpg) in one process, "
          f"{time.strftime('%H:%M UTC', time.gmtime())}: share of one core, median of {args.rounds}")
    for kind, values in shares.items():
        print(f"  {kind:<10} {statistics.median(values):6.2f}%  ({min(values):.2f}-{max(values):.2f})")


if __name__ == "__main__":
    main()
