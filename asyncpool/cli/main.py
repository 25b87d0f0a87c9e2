"""`asyncpool` command line: parse arguments, then import only the command that runs."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence
from typing import NoReturn

from asyncpool import __version__
from asyncpool.connect.dsn import redact

_PREPARED = ("off", "on", "unnamed")
_DRIVERS = ("asyncpool", "asyncpg", "asyncpg-capped", "asyncpg-pool", "psycopg-pool")
_TELEMETRY = ("off", "api", "sdk", "sdk-aggregated")


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text}: must be at least 1")
    return value


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: write a number of seconds") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"{text}: must be > 0 seconds")
    return value


def _int_list(text: str) -> list[int]:
    try:
        values = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: write numbers separated by commas") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: each value must be at least 1")
    return values


def _choice_list(choices: Sequence[str]) -> Callable[[str], list[str]]:
    def parse(text: str) -> list[str]:
        values = [part.strip() for part in text.split(",") if part.strip()]
        # The one-round-trip mode's former name, still accepted.
        values = ["unnamed" if v == "describe-cache" else v for v in values]
        bad = [v for v in values if v not in choices]
        if bad or not values:
            raise argparse.ArgumentTypeError(
                f"{text!r}: choose from {', '.join(choices)} (comma-separated)"
            )
        return values

    return parse


def _default_processes() -> int:
    return max(2, os.cpu_count() or 1)


def _add_load_options(p: argparse.ArgumentParser, *, duration: float) -> None:
    p.add_argument("--processes", type=_positive_int, default=_default_processes(),
                   help="OS processes the instances are spread over (default: CPUs, at least 2)")
    p.add_argument("--duration", type=_seconds, default=duration,
                   help=f"seconds each measured run lasts (default {duration:g})")
    p.add_argument("--pool-size", type=_positive_int, default=2,
                   help="max_size of each instance's pool (default 2)")
    p.add_argument("--acquire-timeout", type=_seconds, default=3.0,
                   help="each instance's acquire timeout, connecting included (default 3)")


class _Parser(argparse.ArgumentParser):
    """argparse's parser, whose usage errors quote the arguments they refuse with every DSN
    password and token hidden: a mistyped option (``--dns=postgresql://app:...``) is echoed
    on stderr, which CI logs keep. Its subcommands' parsers are of this class too."""

    def error(self, message: str) -> NoReturn:
        super().error(redact(message))


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="asyncpool",
        description="asyncpool: an asyncio PostgreSQL pool for serverless code behind poolers.",
    )
    parser.add_argument("--version", action="version", version=f"asyncpool {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    demo = sub.add_parser(
        "demo",
        help="simulate 500 function instances through PgBouncer, then directly (~40 s)",
        description="Start a local PostgreSQL and PgBouncer (or use --dsn), run many simulated "
        "function instances through ~50 server connections, then the same load directly "
        "against PostgreSQL, and compare.",
    )
    demo.add_argument("--clients", type=_positive_int, default=500,
                      help="simulated function instances (default 500)")
    _add_load_options(demo, duration=10.0)
    demo.add_argument("--leaks", type=int, default=3,
                      help="instances that leak one connection, to show it reclaimed (default 3)")
    demo.add_argument("--leak-timeout", type=_seconds, default=2.0,
                      help="the pools' leak_timeout (default 2)")
    demo.add_argument("--prepared-statements", choices=(*_PREPARED, "auto"), default="auto",
                      help="asyncpool mode; auto: 'on' for a local PgBouncer >= 1.21, else "
                      "'unnamed' (the pool's default)")
    demo.add_argument("--pgbouncer", choices=("current", "legacy"), default="current",
                      help="local PgBouncer: current (>= 1.21) or the distribution's (1.18)")
    demo.add_argument("--dsn", help="use this PgBouncer instead of starting one")
    demo.add_argument("--admin-dsn", help="its admin console (dbname=pgbouncer), for SHOW POOLS")
    demo.add_argument("--direct-dsn",
                      help="PostgreSQL itself, for the direct contrast (skipped if not given)")
    demo.add_argument("--no-direct", action="store_true", help="skip the direct contrast")
    demo.add_argument("--json", action="store_true",
                      help="print both phases as bench JSON runs instead of the table")
    demo.set_defaults(run=_run_demo)

    bench = sub.add_parser(
        "bench",
        help="measure throughput and latency against clients, drivers and modes",
        description="Run the load engine over every combination of --clients, --driver, "
        "--prepared-statements and --telemetry; print a table or --json; draw --chart.",
    )
    bench.add_argument("--clients", type=_int_list, default=[500],
                       help="concurrent instances, comma-separated for a sweep (default 500)")
    _add_load_options(bench, duration=10.0)
    bench.add_argument("--driver", type=_choice_list(_DRIVERS), default=["asyncpool"],
                       help=f"comma-separated: {', '.join(_DRIVERS)} (default asyncpool)")
    bench.add_argument("--prepared-statements", type=_choice_list(_PREPARED), default=None,
                       help="comma-separated modes (default: on for a local PgBouncer >= 1.21, "
                       "else off)")
    bench.add_argument("--telemetry", type=_choice_list(_TELEMETRY), default=["off"],
                       help="asyncpool telemetry: off, api (no SDK), sdk (installed, exporting), "
                       "sdk-aggregated (sdk, checkout times aggregated in the pool)")
    bench.add_argument("--query", default=None,
                       help="SQL run by every instance; each $n gets an integer "
                       "(default SELECT $1::int + 1)")
    bench.add_argument("--pgbench", action="store_true",
                       help="also run pgbench (C) with the same clients and query: the ceiling")
    bench.add_argument("--target", choices=("pgbouncer", "pgbouncer-legacy", "postgres"),
                       default="pgbouncer",
                       help="local server to measure (default pgbouncer: a current one)")
    bench.add_argument("--dsn", help="measure this server instead of starting local ones")
    bench.add_argument("--admin-dsn", help="PgBouncer admin console of --dsn, for SHOW POOLS")
    bench.add_argument("--postgres-dsn",
                       help="PostgreSQL behind --dsn, to count server connections without "
                       "an admin console")
    bench.add_argument("--json", action="store_true",
                       help="print the results as JSON (schema in docs/cli.md)")
    bench.add_argument("--chart", metavar="PNG",
                       help="draw throughput and latency against clients (needs matplotlib)")
    bench.set_defaults(run=_run_bench)

    doctor = sub.add_parser(
        "doctor",
        help="check a pooler or database and say which settings to use",
        description="Connect to DSN, report server version, TLS, authentication, whether a "
        "PgBouncer is in front (and its pool mode and prepared-statement support), and "
        "recommend asyncpool's prepared_statements mode. Exit 0: fine; 1: problems found; "
        "2: could not check (bad DSN, unreachable, refused); 3: no problem found, but some "
        "checks could not run.",
    )
    doctor.add_argument("dsn", nargs="?", default=os.environ.get("ASYNCPOOL_DSN"),
                        help="postgresql://user[:password]@host:port/db (default $ASYNCPOOL_DSN)")
    doctor.add_argument("--admin-dsn",
                        help="PgBouncer admin console (dbname=pgbouncer); default: "
                        "$ASYNCPOOL_ADMIN_DSN when the DSN is $ASYNCPOOL_DSN, else try DSN's "
                        "credentials on it")
    doctor.add_argument("--timeout", type=_seconds, default=5.0,
                        help="seconds per connection attempt (default 5)")
    doctor.add_argument("--json", action="store_true",
                        help="print the outcome as JSON, a refused DSN included")
    doctor.set_defaults(run=_run_doctor)

    plan = sub.add_parser(
        "plan",
        help="check that a Lambda fleet's connections fit the pooler and the database",
        description="clients = instances x workers x max_size, against PgBouncer's "
        "max_client_conn and default_pool_size (per process) or RDS Proxy's share, and "
        "PostgreSQL's max_connections; limits are read through --dsn / --admin-dsn where not "
        "given. Exit 0: fits; 1: does not fit (says what to change); 3: a limit is unknown.",
    )
    from asyncpool.cli.plan import add_arguments

    add_arguments(plan)
    plan.set_defaults(run=_run_plan)

    local = sub.add_parser(
        "local-pgbouncer",
        help="run a throwaway PostgreSQL and PgBouncer until Ctrl-C, for trying the examples",
        description="Start PostgreSQL and PgBouncer (transaction mode) on 127.0.0.1 from the "
        "machine's binaries, write ASYNCPOOL_DSN=... to an env file only you can read (the "
        "password is not printed), and keep both up until Ctrl-C, which stops them and "
        "deletes the file. Exit 0 after Ctrl-C; 1: a server stopped on its own; 2: could "
        "not start, or the env file cannot be written (says what to fix).",
    )
    from asyncpool.cli.local_pgbouncer import add_arguments as add_local_arguments

    add_local_arguments(local)
    local.set_defaults(run=_run_local_pgbouncer)
    return parser


def _run_demo(args: argparse.Namespace) -> int:
    from asyncpool.cli.demo import run

    return run(args)


def _run_bench(args: argparse.Namespace) -> int:
    from asyncpool.cli.bench import run

    return run(args)


def _run_doctor(args: argparse.Namespace) -> int:
    from asyncpool.cli.doctor import run

    return run(args)


def _run_plan(args: argparse.Namespace) -> int:
    from asyncpool.cli.plan import run

    return run(args)


def _run_local_pgbouncer(args: argparse.Namespace) -> int:
    from asyncpool.cli.local_pgbouncer import run

    return run(args)


def _admin_dsn_from_env(dsn: str | None) -> str | None:
    """$ASYNCPOOL_ADMIN_DSN (what `asyncpool local-pgbouncer` writes beside $ASYNCPOOL_DSN), only
    for the server $ASYNCPOOL_DSN names: given another DSN, the doctor would otherwise read
    another PgBouncer's settings and report them as this one's."""
    from asyncpool.cli.local_pgbouncer import ADMIN_DSN_VARIABLE, DSN_VARIABLE

    if not dsn or dsn != os.environ.get(DSN_VARIABLE):
        return None
    return os.environ.get(ADMIN_DSN_VARIABLE) or None


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `asyncpool` console script; returns the exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "doctor" and not args.dsn and not args.json:
        # (With --json the doctor says it in JSON, as every other outcome.)
        parser.error("doctor: give a DSN or set ASYNCPOOL_DSN")
    if args.command == "doctor" and args.admin_dsn is None:
        args.admin_dsn = _admin_dsn_from_env(args.dsn)
    try:
        code: int = args.run(args)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return code


if __name__ == "__main__":
    sys.exit(main())
