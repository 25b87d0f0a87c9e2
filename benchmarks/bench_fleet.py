"""5,000 simulated function instances through a PgBouncer fleet sharing 50 server connections.

    PYTHONPATH=$PWD .venv/bin/python benchmarks/bench_fleet.py [--clients 5000] [--fleet 2]
        [--duration 10] [--repeat 1] [--processes 4] [--json results.json]

Starts a throwaway PostgreSQL (max_connections=100) and, in turn, one PgBouncer 1.24 process
(default_pool_size=50) and a fleet of `--fleet` PgBouncer 1.24 processes on one port
(so_reuseport, peering on) whose server pools add up to 50 (50 // fleet each). The load engine
of `asyncpool bench` runs `--clients` instances (one pool of max_size 1 each, statement mode
"on") in `--processes` OS processes against each, interleaved over `--repeat` rounds. Everything
stays on loopback; server connections are counted in pg_stat_activity.

Reports queries/s, errors (must be 0), warm-up errors and the most server connections seen.
On a shared 2-core machine the load generator competes with the PgBouncers for the cores, so
a fleet can only show its gain where PgBouncer, not the client, is the bottleneck.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
from pathlib import Path
from typing import Any

from asyncpool.load import LoadSpec, LoadTarget, run_load
from asyncpool.testing import PgBouncerServer, PostgresServer
from asyncpool.testing.binaries import current_pgbouncer
from asyncpool.testing.fleet import PgBouncerFleet

SERVER_CONNECTIONS = 50


def _settings(clients: int, pool: int) -> dict[str, str | int]:
    return {"default_pool_size": pool, "max_db_connections": pool,
            "max_client_conn": clients + 200, "query_wait_timeout": 60}


async def measure(target: LoadTarget, args: argparse.Namespace) -> dict[str, Any]:
    spec = LoadSpec(dsn=target.dsn, clients=args.clients, processes=args.processes,
                    duration=args.duration, driver="asyncpool", prepared_statements="on",
                    pool_size=1, acquire_timeout=60.0, connect_concurrency=16)
    result: dict[str, Any] = (await run_load(spec, target)).to_json()
    return result


async def main(args: argparse.Namespace) -> int:
    postgres = PostgresServer(max_connections=100).start()
    binary = current_pgbouncer()
    results: dict[str, list[dict[str, Any]]] = {}
    try:
        single = PgBouncerServer(binary, postgres, _settings(args.clients, SERVER_CONNECTIONS))
        fleet = PgBouncerFleet(binary, postgres, processes=args.fleet, peering=True,
                               overrides=_settings(args.clients, SERVER_CONNECTIONS // args.fleet))
        targets: list[tuple[str, PgBouncerServer | PgBouncerFleet, int]] = [
            (f"1 x PgBouncer {binary.version_text}", single, SERVER_CONNECTIONS),
            (f"{args.fleet} x PgBouncer {binary.version_text} (so_reuseport, peered)", fleet,
             SERVER_CONNECTIONS // args.fleet * args.fleet),
        ]
        order = list(targets)
        for repeat in range(args.repeat):
            for label, server, limit in order:
                server.start()
                try:
                    target = LoadTarget(label=label, dsn=server.dsn(), kind="pgbouncer",
                                        postgres_dsn=postgres.dsn(postgres.superuser),
                                        server_limit=limit, named_statements=True)
                    result = await measure(target, args)
                finally:
                    server.stop()
                results.setdefault(label, []).append(result)
                print(f"  [{repeat + 1}/{args.repeat}] {label}: {result['queries_per_s']:,.0f} q/s, "
                      f"errors {result['error_count']}, warm-up errors "
                      f"{sum(result['warmup_errors'].values())}, server connections max "
                      f"{result['server_connections_max']} (limit {limit})", flush=True)
            order.reverse()
    finally:
        postgres.stop()
    summary = {label: {"median_queries_per_s": statistics.median(r["queries_per_s"] for r in rs),
                       "errors": sum(r["error_count"] for r in rs),
                       "server_connections_max": max(r["server_connections_max"] or 0 for r in rs)}
               for label, rs in results.items()}
    print(json.dumps(summary, indent=2))
    if args.json:
        text = json.dumps({"summary": summary, "runs": results}, indent=2)
        await asyncio.to_thread(Path(args.json).write_text, text)
    return 0 if all(s["errors"] == 0 for s in summary.values()) else 1


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=5000)
    parser.add_argument("--fleet", type=int, default=2, help="PgBouncer processes in the fleet")
    parser.add_argument("--duration", type=float, default=10.0)
    parser.add_argument("--repeat", type=int, default=1)
    parser.add_argument("--processes", type=int, default=4, help="load-generating processes")
    parser.add_argument("--json")
    raise SystemExit(asyncio.run(main(parser.parse_args())))
