"""`asyncpool bench`: the load engine over a matrix of clients, drivers and modes."""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import os
import platform
import sys
from dataclasses import dataclass
from typing import Any, TextIO

from asyncpool import __version__
from asyncpool.cli.output import ProgressDisplay, number, table
from asyncpool.config import PreparedStatements
from asyncpool.connect.dsn import DsnError, parse_target, redact
from asyncpool.errors import PoolConfigError
from asyncpool.load import DEFAULT_QUERY, LoadError, LoadSpec, LoadSpecError, LoadTarget, run_load
from asyncpool.load.logins import GuardedLogin
from asyncpool.load.result import run_problems
from asyncpool.load.servers import LocalServers
from asyncpool.load.spec import Driver, Telemetry

SCHEMA = "asyncpool-bench/1"


@dataclass(frozen=True)
class Case:
    """One cell of the matrix."""

    clients: int
    driver: Driver
    prepared_statements: PreparedStatements
    telemetry: Telemetry

    @property
    def name(self) -> str:
        extra = f" telemetry={self.telemetry}" if self.driver == "asyncpool" else ""
        return f"{self.driver} prepared_statements={self.prepared_statements}{extra}"


def cases(clients: list[int], drivers: list[Driver], modes: list[PreparedStatements],
          telemetry: list[Telemetry]) -> list[Case]:
    """Every meaningful combination, in the order given ("unnamed" and telemetry are
    asyncpool options, so other drivers run only with their own settings; `skipped` says
    which combinations that leaves out)."""
    out: list[Case] = []
    for n in clients:
        for driver in drivers:
            for mode in modes:
                if mode == "unnamed" and driver != "asyncpool":
                    continue
                tels: list[Telemetry] = telemetry if driver == "asyncpool" else ["off"]
                for tel in tels:
                    case = Case(n, driver, mode, tel)
                    if case not in out:
                        out.append(case)
    return out


def skipped(drivers: list[Driver], modes: list[PreparedStatements],
            telemetry: list[Telemetry]) -> list[dict[str, str]]:
    """The combinations asked for that `cases` does not run as asked, and why."""
    others = [d for d in drivers if d != "asyncpool"]
    out: list[dict[str, str]] = []
    if "unnamed" in modes:
        out += [{"run": f"{d} prepared_statements=unnamed",
                 "reason": "'unnamed' is an asyncpool mode"} for d in others]
    tels = [t for t in telemetry if t != "off"]
    if tels:
        out += [{"run": f"{d} telemetry={','.join(tels)}",
                 "reason": f"telemetry is an asyncpool option; {d} runs without it"}
                for d in others]
    return out


def check_matrix(args: argparse.Namespace) -> list[dict[str, str]]:
    """The matrix's skipped combinations; `LoadSpecError` when it leaves nothing to run.

    Checked before any server starts. Modes left to their default ("on" or "off") suit every
    driver, so "off" stands for them here."""
    modes: list[PreparedStatements] = args.prepared_statements or ["off"]
    left_out = skipped(args.driver, modes, args.telemetry)
    if not cases(args.clients, args.driver, modes, args.telemetry) and not args.pgbench:
        raise LoadSpecError(
            "nothing to run: " + "; ".join(f"{s['run']} ({s['reason']})" for s in left_out)
            + ". Add --driver asyncpool, or choose --prepared-statements off or on"
        )
    return left_out


def run(args: argparse.Namespace) -> int:
    from asyncpool.testing import HarnessError

    try:
        return asyncio.run(bench(args, sys.stdout, sys.stderr))
    except (HarnessError, DsnError, PoolConfigError, LoadSpecError) as exc:
        print(f"asyncpool bench: {redact(str(exc))}", file=sys.stderr)
        return 2


async def bench(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    """Run the matrix; exit 0 when every run finished with zero errors, else 1."""
    servers: LocalServers | None = None
    left_out = check_matrix(args)
    for skip in left_out:
        err.write(f"skipped: {skip['run']} ({skip['reason']})\n")
    for given in (args.dsn, args.admin_dsn, args.postgres_dsn):
        if given:
            # The DSN guard (never quoted) and the pool's credential rules, which the
            # contenders' and samplers' logins follow too: refused before anything starts.
            GuardedLogin(given)
    if args.dsn:
        where = parse_target(args.dsn)
        target = LoadTarget(
            label=f"{where.host}:{where.port}",
            dsn=args.dsn,
            kind="pgbouncer" if args.admin_dsn else "postgres",
            admin_dsn=args.admin_dsn,
            postgres_dsn=args.postgres_dsn,
        )
    else:
        err.write("Starting a throwaway PostgreSQL (max_connections=100) and PgBouncer "
                  "(default_pool_size=50) on 127.0.0.1 ...\n")
        servers = await asyncio.to_thread(
            LocalServers.start,
            pgbouncer="legacy" if args.target == "pgbouncer-legacy" else "current",
            max_client_conn=max(1000, max(args.clients) * args.pool_size + 100),
        )
        for note in servers.notes:
            err.write(f"note: {note}\n")
        target = servers.postgres_target() if args.target == "postgres" else (
            servers.pgbouncer_target()
        )
    session = BenchSession(args, target, err)
    try:
        await session.run_all()
    finally:
        if servers is not None:
            await asyncio.to_thread(servers.stop)
    document = report(target, session.query, session.runs, session.failures, left_out,
                      started_locally=servers is not None)
    if args.json:
        out.write(json.dumps(document, indent=2) + "\n")
    else:
        out.write("\n" + text_report(document) + "\n")
    if args.chart:
        from asyncpool.cli.chart import draw_chart

        draw_chart(document, args.chart)
        err.write(f"chart written to {args.chart}\n")
    return 0 if document["ok"] else 1


class BenchSession:
    """Runs the cases of one `asyncpool bench` invocation and keeps what they measured."""

    def __init__(self, args: argparse.Namespace, target: LoadTarget, err: TextIO) -> None:
        self.args = args
        self.target = target
        self.err = err
        self.query: str = args.query or DEFAULT_QUERY
        # Unless told, run the mode `asyncpool doctor` would recommend for a known target.
        default: PreparedStatements = "on" if target.named_statements else "off"
        self.modes: list[PreparedStatements] = args.prepared_statements or [default]
        self.runs: list[dict[str, Any]] = []
        self.failures: list[dict[str, str]] = []

    async def run_all(self) -> None:
        args = self.args
        for case in cases(args.clients, args.driver, self.modes, args.telemetry):
            await self.run_case(case)
        if args.pgbench:
            await self.run_pgbench()

    def _fail(self, run: str, error: str) -> None:
        self.failures.append({"run": run, "error": error})
        self.err.write(f"failed: {run}: {error}\n")

    async def run_case(self, case: Case) -> None:
        args = self.args
        title = f"{case.name} x{case.clients}"
        try:
            spec = LoadSpec(
                dsn=self.target.dsn,
                clients=case.clients,
                processes=min(args.processes, case.clients),
                duration=args.duration,
                query=self.query,
                driver=case.driver,
                prepared_statements=case.prepared_statements,
                pool_size=args.pool_size,
                telemetry=case.telemetry,
                acquire_timeout=args.acquire_timeout,
            )
        except LoadSpecError as exc:
            self._fail(title, str(exc))
            return
        display = ProgressDisplay(self.err, title, case.clients)
        try:
            result = await run_load(spec, self.target, display)
        except LoadError as exc:
            display.done()
            self._fail(title, str(exc))
            return
        display.done()
        self.runs.append(result.to_json())

    async def run_pgbench(self) -> None:
        from asyncpool.load.pgbench import PgbenchError, run_pgbench

        # pgbench knows unnamed (extended) and named (prepared) statements; "unnamed" is
        # compared with the unnamed ones.
        pg_modes: list[PreparedStatements] = []
        for mode in self.modes:
            pg_mode: PreparedStatements = "on" if mode == "on" else "off"
            if pg_mode not in pg_modes:
                pg_modes.append(pg_mode)
        duration = self.args.duration
        for clients in self.args.clients:
            for mode in pg_modes:
                title = f"pgbench prepared_statements={mode} x{clients}"
                self.err.write(f"{title}: {duration:g}s ...\n")
                try:
                    result = await run_pgbench(
                        self.target.dsn, target=self.target.label, clients=clients,
                        duration=duration, query=self.query, prepared_statements=mode,
                    )
                except PgbenchError as exc:
                    self._fail(title, str(exc))
                    continue
                self.runs.append(result.to_json())


def report(target: LoadTarget, query: str, runs: list[dict[str, Any]],
           failures: list[dict[str, str]], skipped: list[dict[str, str]], *,
           started_locally: bool) -> dict[str, Any]:
    """The bench JSON document (schema ``asyncpool-bench/1``, described in docs/cli.md)."""
    return {
        "schema": SCHEMA,
        "asyncpool_version": __version__,
        "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "machine": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "platform": platform.platform(),
            "load_average": [round(x, 2) for x in os.getloadavg()],
        },
        "target": {
            "label": target.label,
            "kind": target.kind,
            "started_locally": started_locally,
            "server_connections_limit": target.server_limit,
        },
        "query": query,
        "runs": runs,
        "failures": failures,
        "skipped": skipped,
        "ok": not failures and not any(run_problems(r) for r in runs),
    }


def text_report(document: dict[str, Any]) -> str:
    """The runs as a table; "vs first" compares queries/s with the first run at that size.
    Under it, every run that went wrong and how, then the failures and skipped combinations."""
    first: dict[int, float] = {}
    rows = []
    went_wrong = []
    for r in document["runs"]:
        lat = r["latency_ms"]
        base = first.setdefault(r["clients"], r["queries_per_s"])
        name = _run_name(r)
        rows.append([
            name,
            number(r["clients"]),
            number(r["queries_per_s"]),
            f"{r['queries_per_s'] / base:.2f}x" if base else "-",
            _ms(lat["p50"]),
            _ms(lat["p95"]),
            _ms(lat["p99"]),
            _ms(lat["mean"]),
            _ms(r["client_cpu_us_per_query"]),
            number(r["error_count"]),
            "-" if r["server_connections_max"] is None else str(r["server_connections_max"]),
        ])
        problems = run_problems(r)
        if problems:
            went_wrong.append(f"errors: {name} x{r['clients']}: " + "; ".join(problems))
    target = document["target"]
    machine = document["machine"]
    head = (f"{target['label']}, query {document['query']!r}; {machine['cpus']} CPUs, "
            f"load average {machine['load_average'][0]} at start")
    body = table(["run", "clients", "queries/s", "vs first", "p50 ms", "p95 ms", "p99 ms",
                  "mean ms", "CPU µs/query", "errors", "server conns"], rows)
    lines = [head, "", body, *went_wrong]
    for failure in document["failures"]:
        lines.append(f"failed: {failure['run']}: {failure['error']}")
    for skip in document["skipped"]:
        lines.append(f"skipped: {skip['run']} ({skip['reason']})")
    return "\n".join(lines)


def _run_name(r: dict[str, Any]) -> str:
    name = f"{r['driver']} {r['prepared_statements']}"
    if r["driver"] == "asyncpool" and r["telemetry"] != "off":
        name += f" telemetry={r['telemetry']}"
    return name


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:,.1f}"
