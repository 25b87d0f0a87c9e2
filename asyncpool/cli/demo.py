"""`asyncpool demo`: many function instances through PgBouncer, then the same load directly."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from typing import Literal, TextIO

from asyncpool.cli.output import ProgressDisplay, millis, number, table
from asyncpool.config import PreparedStatements
from asyncpool.connect.dsn import redact
from asyncpool.load import LoadError, LoadResult, LoadSpec, LoadSpecError, LoadTarget, run_load
from asyncpool.load.servers import LocalServers


def run(args: argparse.Namespace) -> int:
    from asyncpool.testing import HarnessError

    # With --json, stdout carries only the document; the narration goes to stderr.
    try:
        return asyncio.run(demo(args, sys.stderr if args.json else sys.stdout, sys.stdout))
    except (HarnessError, LoadError, LoadSpecError) as exc:
        print(f"asyncpool demo: {redact(str(exc))}", file=sys.stderr)
        return 2


async def demo(args: argparse.Namespace, out: TextIO, results: TextIO) -> int:
    """Run both phases and print the comparison (narration to `out`, the table or JSON to
    `results`); exit 1 if the pooled phase had any error or an instance never got through."""
    servers: LocalServers | None = None
    if args.dsn:
        pooled = LoadTarget("PgBouncer", args.dsn, "pgbouncer", admin_dsn=args.admin_dsn,
                            postgres_dsn=args.direct_dsn)
        direct = (None if args.no_direct or not args.direct_dsn
                  else LoadTarget("PostgreSQL, direct", args.direct_dsn, "postgres"))
        # The pool's own default: it works through any transaction pooler.
        mode: PreparedStatements = (
            "unnamed" if args.prepared_statements == "auto" else args.prepared_statements
        )
    else:
        _say(out, "Starting a throwaway PostgreSQL (max_connections=100) and PgBouncer "
             "(transaction mode, default_pool_size=50) on 127.0.0.1 ...")
        servers = await asyncio.to_thread(
            LocalServers.start, pgbouncer=args.pgbouncer,
            max_client_conn=max(1000, args.clients * args.pool_size + 100),
        )
        for note in servers.notes:
            _say(out, f"note: {note}")
        pooled = servers.pgbouncer_target()
        direct = None if args.no_direct else servers.postgres_target()
        mode = _auto_mode(args.prepared_statements, pooled)
    try:
        _say(out, f"\n{number(args.clients)} simulated function instances in {args.processes} "
             f"processes, each with its own asyncpool pool (max_size={args.pool_size}, "
             f"prepared_statements={mode!r}), each running SELECT $1::int + 1 back to back "
             f"for {args.duration:g}s; {args.leaks} of them leak a connection.\n")
        first = await _phase(args, pooled, mode, out)
        second = None
        if direct is not None:
            if servers is not None:
                # PgBouncer's idle server connections would take PostgreSQL slots from the
                # direct run; a world without the pooler has none.
                await asyncio.to_thread(servers.stop_pgbouncer)
            _say(out, "\nThe same load, straight at PostgreSQL:")
            second = await _phase(args, direct, mode, out)
    finally:
        if servers is not None:
            await asyncio.to_thread(servers.stop)
    if args.json:
        _say(results, json.dumps({"runs": [r.to_json() for r in (first, second) if r]},
                                 indent=2))
    else:
        _say(results, "\n" + summary_table(first, second))
        _say(results, "\n" + conclusion(first, second))
    # What the closing line calls a problem (failed queries or logins, instances never served).
    return 1 if first.problems(warmup=False) else 0


def _auto_mode(choice: PreparedStatements | Literal["auto"], target: LoadTarget
               ) -> PreparedStatements:
    if choice != "auto":
        return choice
    return "on" if target.named_statements else "unnamed"


async def _phase(args: argparse.Namespace, target: LoadTarget, mode: PreparedStatements,
                 out: TextIO) -> LoadResult:
    spec = LoadSpec(
        dsn=target.dsn,
        clients=args.clients,
        processes=min(args.processes, args.clients),
        duration=args.duration,
        pool_size=args.pool_size,
        prepared_statements=mode,
        leaks=min(args.leaks, args.clients),
        leak_timeout=args.leak_timeout,
        acquire_timeout=args.acquire_timeout,
    )
    display = ProgressDisplay(out, target.label, spec.clients)
    try:
        return await run_load(spec, target, display)
    finally:
        display.done()


def summary_table(first: LoadResult, second: LoadResult | None) -> str:
    results = [first] if second is None else [first, second]
    error_names = sorted({name for r in results for name in r.errors})

    def cells(fn: object) -> list[str]:
        return [fn(r) for r in results]  # type: ignore[operator]

    rows = [
        ["function instances", *cells(lambda r: f"{number(r.spec.clients)} in "
                                                f"{r.spec.processes} processes")],
        ["queries/s", *cells(lambda r: number(r.queries_per_second))],
        ["latency p50 / p95 / p99 (ms)", *cells(_latencies)],
        ["errors", *cells(lambda r: number(r.error_count))],
        *[[f"  {name}", *cells(lambda r, n=name: number(r.errors.get(n, 0)))]
          for name in error_names],
        ["failed logins (refused, timed out)", *cells(lambda r: number(r.connect_errors))],
        ["instances never served", *cells(lambda r: f"{number(r.clients_never_served)} of "
                                                    f"{number(r.spec.clients)}")],
        ["server connections used (max)", *cells(_server_use)],
        ["clients queued in PgBouncer (max)",
         *cells(lambda r: number(r.server.clients_waiting_max)
                if r.server and r.server.clients_waiting_max is not None else "-")],
        ["leaks reclaimed", *cells(lambda r: f"{r.leaks_reclaimed} of {r.leaks_injected}")],
    ]
    return table(["", *[r.target for r in results]], rows)


def _latencies(r: LoadResult) -> str:
    if not r.latency.count:
        return "-"
    return " / ".join(millis(r.latency.percentile(q)) for q in (0.5, 0.95, 0.99))


def _server_use(r: LoadResult) -> str:
    if r.server is None:
        return "not sampled"
    limit = f" of {r.server_limit}" if r.server_limit else ""
    return f"{r.server.server_connections_max}{limit}"


def conclusion(first: LoadResult, second: LoadResult | None) -> str:
    """One line per phase, saying no more and no less than the table above it."""
    lines = []
    problems = first.problems(warmup=False)
    if problems:
        lines.append(f"{first.target}, {number(first.spec.clients)} instances: "
                     f"{'; '.join(problems)}; {number(first.queries_per_second)} queries/s.")
    else:
        used = f"{first.server.server_connections_max} server connections" if first.server else (
            "the pooler's server connections"
        )
        lines.append(f"{first.target}: {number(first.spec.clients)} instances shared {used} "
                     f"with no errors, {number(first.queries_per_second)} queries/s.")
    if second is not None:
        refused = second.clients_never_served
        lines.append(
            f"{second.target}: {number(refused)} of {number(second.spec.clients)} instances "
            f"never got a connection; {number(second.error_count)} failed queries, "
            f"{number(second.connect_errors)} failed logins, "
            f"{number(second.queries_per_second)} queries/s."
        )
    return "\n".join(lines)


def _say(out: TextIO, text: str) -> None:
    out.write(text + "\n")
    out.flush()
