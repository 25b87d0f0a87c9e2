"""Invoke powertools_handler.handler as the Lambda runtime does: one process, one event at a time.

    python examples/lambda_powertools/run_powertools_locally.py events/hello.json events/missing_name.json
    python examples/lambda_powertools/run_powertools_locally.py --repeat 5 events/hello.json
    python examples/lambda_powertools/run_powertools_locally.py --stdin < events.jsonl   # one event per line

Uses ASYNCPOOL_DSN when set; otherwise starts a throwaway PostgreSQL and PgBouncer (needs their
binaries, see asyncpool.testing). After each invocation it prints one JSON line,
``{"local_invocation": n, "response": ..., "error": ..., "pool": {...}}``, among Powertools' logs:
the pool's ``created_total`` staying at 1 shows the connection surviving across invocations.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from asyncpool.integrations.invocation import LocalContext
from asyncpool.integrations.lambda_runner import get_runner
from asyncpool.testing.local_pgbouncer import asyncpool_dsn_or_local

HERE = Path(__file__).resolve().parent
FUNCTION_NAME = "greetings-local"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("events", nargs="*", type=Path, help="API Gateway event files")
    parser.add_argument("--repeat", type=int, default=1, help="invoke each event this many times")
    parser.add_argument("--stdin", action="store_true", help="read one JSON event per line")
    parser.add_argument("--timeout", type=float, default=10.0, help="function timeout, seconds")
    args = parser.parse_args(argv)
    if not args.stdin and not args.events:
        parser.error("give event files or --stdin")
    with asyncpool_dsn_or_local():
        # What the Lambda runtime sets, so the code under test takes its Lambda paths.
        os.environ.setdefault("AWS_LAMBDA_FUNCTION_NAME", FUNCTION_NAME)
        sys.path.insert(0, str(HERE))
        function = importlib.import_module("powertools_handler")
        try:
            for n, event in enumerate(read_events(args), 1):
                response, error = invoke(function.handler, event, args.timeout)
                stats = dataclasses.asdict(function.pool.stats())
                line = {"local_invocation": n, "response": response, "error": error, "pool": stats}
                print(json.dumps(line), flush=True)
        finally:
            get_runner().run(function.pool.close())
    return 0


def read_events(args: argparse.Namespace) -> Iterator[dict[str, Any]]:
    if args.stdin:
        while line := sys.stdin.readline():
            if line.strip():
                yield json.loads(line)
        return
    for _ in range(args.repeat):
        for path in args.events:
            yield json.loads((path if path.is_absolute() else _resolve(path)).read_text())


def _resolve(path: Path) -> Path:
    return path if path.exists() else HERE / path


def invoke(handler: Any, event: dict[str, Any], timeout: float) -> tuple[Any, Any]:
    """Call the handler as Lambda would; an exception becomes Lambda's error payload."""
    context = LocalContext(function_name=os.environ["AWS_LAMBDA_FUNCTION_NAME"], timeout=timeout)
    try:
        return handler(event, context), None
    except Exception as exc:
        return None, {"errorType": type(exc).__name__, "errorMessage": str(exc)}


if __name__ == "__main__":
    sys.exit(main())
