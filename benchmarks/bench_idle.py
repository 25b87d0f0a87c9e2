"""What idle pools cost a process: CPU while hundreds of pools wait between requests.

    .venv/bin/python benchmarks/bench_idle.py [--pools 500] [--seconds 20] [--rounds 2]

Each round, in a fresh interpreter per contender (taking turns): `--pools` pools (min_size=1,
telemetry off) or raw asyncpg connections through PgBouncer 1.18, each used once, then left idle
for `--seconds` while the process's CPU time (`time.process_time()`, every thread) is measured.
What an idle pool does is housekeeping (a round every 5 s: reap, keep min_size) and waiting for
its leak deadline; the hand-over of each due timer from the alarm thread to the loop wakes both.
Then, for `--seconds` more, the loop's lag: a task sleeping 1 ms at a time records how late each
sleep ends (what another request of that process would wait for while the pools keep house).
Reports the share of one core and the lag's p99, p99.9 and maximum per contender.
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
    cpu = time.process_time() - started
    late = []
    ends = time.monotonic() + seconds
    while (before := time.monotonic()) < ends:
        await asyncio.sleep(0.001)
        late.append(time.monotonic() - before - 0.001)
    late.sort()
    print(cpu, *(late[int(q * (len(late) - 1))] * 1000 for q in (0.99, 0.999, 1.0)))
    for thing in things:
        await thing.close()
asyncio.run(main(sys.argv[1], sys.argv[2], int(sys.argv[3]), float(sys.argv[4])))
"""


def measure(kind: str, dsn: str, pools: int, seconds: float) -> tuple[float, ...]:
    """(share of a core in %, loop lag p99, p99.9 and max in ms)."""
    done = subprocess.run([sys.executable, "-c", CHILD, kind, dsn, str(pools), str(seconds)],
                          capture_output=True, text=True, check=False, timeout=2 * seconds + 300)
    if done.returncode != 0:
        raise SystemExit(f"{kind}: the child failed:\n{done.stderr[-2000:]}")
    cpu, *lag = (float(v) for v in done.stdout.split()[-4:])
    return (cpu / seconds * 100, *lag)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--pools", type=int, default=500)
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()

    from asyncpool.testing import ServerStack

    stack = ServerStack.start(max_connections=80,
                              pgbouncer_overrides={"max_client_conn": args.pools * 2 + 100})
    results: dict[str, list[tuple[float, ...]]] = {"asyncpool": [], "asyncpg": []}
    try:
        for r in range(args.rounds):
            for kind in results if r % 2 == 0 else reversed(list(results)):
                results[kind].append(measure(kind, stack.legacy.dsn(), args.pools, args.seconds))
                cpu, p99, p999, most = results[kind][-1]
                print(f"  [{r + 1}/{args.rounds}] {kind}: {cpu:.2f}% of a core, loop lag p99 "
                      f"{p99:.2f} ms, p99.9 {p999:.2f} ms, max {most:.2f} ms", flush=True)
    finally:
        stack.stop()
    print(f"\n== {args.pools} idle pools (asyncpool) or connections (raw asyncpg) in one process, "
          f"{time.strftime('%H:%M UTC', time.gmtime())}: median of {args.rounds} (range)")
    for kind, rows in results.items():
        cells = []
        for i, (label, unit) in enumerate((("core", "%"), ("lag p99", " ms"), ("p99.9", " ms"),
                                           ("max", " ms"))):
            values = [row[i] for row in rows]
            cells.append(f"{label} {statistics.median(values):.2f}{unit} "
                         f"({min(values):.2f}-{max(values):.2f})")
        print(f"  {kind:<10} " + ", ".join(cells))


if __name__ == "__main__":
    main()
