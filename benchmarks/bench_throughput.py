"""Throughput through PgBouncer (default_pool_size=50): asyncpool against the alternatives.

    .venv/bin/python benchmarks/bench_throughput.py [--clients 500] [--duration 10] [--repeat 2]
        [--processes N] [--only GROUP,...] [--json results.json]

Starts a throwaway PostgreSQL (max_connections=100) with PgBouncer 1.18, then with a current
PgBouncer (>= 1.21, max_prepared_statements=200), and runs the load engine of `asyncpool bench`
(simulated function instances in several processes, one small pool each). Runs are repeated and
interleaved (A B C, then C B A...) so a busy neighbour slows every contender alike; each figure
is the median over the repeats and every ratio compares runs of this one invocation.

Groups and targets:
  raw          asyncpool vs raw asyncpg connections, same statement mode   >= 0.97x, no errors
               (and vs raw asyncpg reading as the pool does, asyncpg-capped: reported)
  prepared     prepared_statements="on" vs "off" on the current PgBouncer  >= 2x
  describe     "unnamed" vs "off" on PgBouncer 1.18                 >= 1.5x
               (and vs psycopg_pool, reported)
  telemetry    OpenTelemetry SDK installed and exporting vs telemetry off  >= 0.95x
               (checkout times aggregated in the pool, export_checkout_times();
               recorded through the SDK on every checkout: reported)
  ceiling      asyncpool vs pgbench (C) through the same PgBouncer         reported
  scale        2,000 clients through 50 server connections                 no errors
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
from dataclasses import asdict, dataclass
from typing import Any, Literal

from asyncpool.config import PreparedStatements
from asyncpool.load import DEFAULT_QUERY, LoadSpec, LoadTarget, run_load
from asyncpool.load.pgbench import run_pgbench
from asyncpool.load.servers import LocalServers
from asyncpool.load.spec import Driver, Telemetry

Bouncer = Literal["legacy", "current"]
GROUPS = ("raw", "prepared", "describe", "telemetry", "ceiling", "scale")


@dataclass(frozen=True)
class Run:
    """One contender: a driver and its settings, or pgbench."""

    bouncer: Bouncer
    driver: Driver | Literal["pgbench"]
    mode: PreparedStatements
    clients: int
    telemetry: Telemetry = "off"

    @property
    def name(self) -> str:
        extra = f", telemetry={self.telemetry}" if self.telemetry != "off" else ""
        return f"{self.driver} ({self.mode}{extra}) x{self.clients}"


@dataclass(frozen=True)
class Comparison:
    group: str
    a: Run
    b: Run
    target: float | None  #: the ratio a/b must reach, or None when it is only reported


def comparisons(clients: int, scale_clients: int) -> list[Comparison]:
    def run(bouncer: Bouncer, driver: Any, mode: PreparedStatements, tel: Telemetry = "off",
            n: int = clients) -> Run:
        return Run(bouncer, driver, mode, n, tel)

    return [
        Comparison("raw", run("current", "asyncpool", "on"), run("current", "asyncpg", "on"), 0.97),
        Comparison("raw", run("legacy", "asyncpool", "off"), run("legacy", "asyncpg", "off"), 0.97),
        # The same against raw asyncpg reading its socket as the pool does (64 KiB per recv()):
        # the pool's own cost, reported.
        Comparison("raw", run("current", "asyncpool", "on"), run("current", "asyncpg-capped", "on"),
                   None),
        Comparison("raw", run("legacy", "asyncpool", "off"), run("legacy", "asyncpg-capped", "off"),
                   None),
        Comparison("prepared", run("current", "asyncpool", "on"),
                   run("current", "asyncpool", "off"), 2.0),
        Comparison("describe", run("legacy", "asyncpool", "unnamed"),
                   run("legacy", "asyncpool", "off"), 1.5),
        Comparison("describe", run("legacy", "asyncpool", "unnamed"),
                   run("legacy", "psycopg-pool", "off"), None),
        Comparison("telemetry", run("current", "asyncpool", "on", "sdk-aggregated"),
                   run("current", "asyncpool", "on"), 0.95),
        Comparison("telemetry", run("current", "asyncpool", "on", "sdk"),
                   run("current", "asyncpool", "on"), None),
        Comparison("ceiling", run("current", "asyncpool", "on"), run("current", "pgbench", "on"),
                   None),
        Comparison("ceiling", run("legacy", "asyncpool", "off"), run("legacy", "pgbench", "off"),
                   None),
        Comparison("scale", run("current", "asyncpool", "on", n=scale_clients),
                   run("current", "asyncpool", "on"), None),
    ]


async def measure(run: Run, target: LoadTarget, args: argparse.Namespace) -> dict[str, Any]:
    if run.driver == "pgbench":
        result = await run_pgbench(target.dsn, target=target.label, clients=run.clients,
                                   duration=args.duration, query=DEFAULT_QUERY,
                                   prepared_statements=run.mode)
        return result.to_json()
    spec = LoadSpec(dsn=target.dsn, clients=run.clients, processes=min(args.processes, run.clients),
                    duration=args.duration, driver=run.driver, prepared_statements=run.mode,
                    telemetry=run.telemetry)
    return (await run_load(spec, target)).to_json()


async def run_bouncer(bouncer: Bouncer, runs: list[Run], args: argparse.Namespace,
                      results: dict[Run, list[dict[str, Any]]]) -> None:
    most = max(r.clients for r in runs)
    servers = await asyncio.to_thread(LocalServers.start, pgbouncer=bouncer,
                                      max_client_conn=max(1000, 2 * most + 100))
    try:
        target = servers.pgbouncer_target()
        print(f"== {target.label} ({', '.join(servers.notes) or 'as asked'})", flush=True)
        order = list(runs)
        for repeat in range(args.repeat):
            for run in order:
                result = await measure(run, target, args)
                results.setdefault(run, []).append(result)
                print(f"  [{repeat + 1}/{args.repeat}] {run.name}: "
                      f"{result['queries_per_s']:,.0f} q/s, client CPU "
                      f"{result['client_cpu_us_per_query'] or '-'} µs/query, "
                      f"errors {result['error_count']}, "
                      f"server connections {result['server_connections_max']}", flush=True)
            order.reverse()
    finally:
        await asyncio.to_thread(servers.stop)


def median_qps(results: list[dict[str, Any]]) -> float:
    return statistics.median(float(r["queries_per_s"]) for r in results)


def median_cpu(results: list[dict[str, Any]]) -> str:
    """Client CPU per query: steadier than queries/s on a busy machine (pgbench: not measured)."""
    values = [r["client_cpu_us_per_query"] for r in results if r["client_cpu_us_per_query"]]
    return f"{statistics.median(values):.0f}" if values else "-"


def report(chosen: list[Comparison], results: dict[Run, list[dict[str, Any]]]) -> None:
    print("\nmedian queries/s over the repeats; ratio = first / second")
    for c in chosen:
        a, b = median_qps(results[c.a]), median_qps(results[c.b])
        errors = [sum(r["error_count"] for r in results[x]) for x in (c.a, c.b)]
        ratio = a / b if b else float("inf")
        verdict = "" if c.target is None else (
            f"  target >= {c.target:g}x: {'met' if ratio >= c.target else 'MISSED'}"
        )
        if c.group in ("raw", "scale") and errors[0]:
            verdict += "  ERRORS"
        print(f"[{c.group}] {c.a.name} vs {c.b.name} on PgBouncer {c.a.bouncer}: "
              f"{a:,.0f} vs {b:,.0f} = {ratio:.2f}x, client CPU µs/query "
              f"{median_cpu(results[c.a])} vs {median_cpu(results[c.b])}, "
              f"errors {errors[0]}/{errors[1]}{verdict}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--clients", type=int, default=500)
    parser.add_argument("--scale-clients", type=int, default=2000)
    parser.add_argument("--duration", type=float, default=10.0)
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--only", default=",".join(GROUPS),
                        help=f"comma-separated groups: {', '.join(GROUPS)}")
    parser.add_argument("--json", help="also write every run's result to this file")
    args = parser.parse_args()
    wanted = set(args.only.split(","))
    chosen = [c for c in comparisons(args.clients, args.scale_clients) if c.group in wanted]
    results: dict[Run, list[dict[str, Any]]] = {}
    for bouncer in ("legacy", "current"):
        runs = list(dict.fromkeys(r for c in chosen for r in (c.a, c.b) if r.bouncer == bouncer))
        if runs:
            asyncio.run(run_bouncer(bouncer, runs, args, results))
    report(chosen, results)
    if args.json:
        with open(args.json, "w") as f:
            json.dump([{"run": asdict(run), "results": res} for run, res in results.items()], f,
                      indent=2)


if __name__ == "__main__":
    main()
