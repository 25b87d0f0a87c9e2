"""Invoke the Mangum handler the way the Lambda runtime does: one process, one event after another.

    python examples/fastapi_mangum/run_mangum_locally.py events/hello_v2.json events/divide_by_zero_v2.json
    python examples/fastapi_mangum/run_mangum_locally.py --repeat 5 events/hello_v2.json

Uses ASYNCPOOL_DSN when set; otherwise starts a throwaway PostgreSQL and PgBouncer (needs their
binaries, see asyncpool.testing). After each invocation it prints one JSON line with the response
and the pool's numbers: ``created_total`` staying at 1 shows that Mangum's per-invocation lifespan
did not reopen the pool.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import importlib
import json
import os
import sys
from pathlib import Path

from asyncpool.integrations.invocation import LocalContext
from asyncpool.testing.local_pgbouncer import asyncpool_dsn_or_local

HERE = Path(__file__).resolve().parent
FUNCTION_NAME = "greetings-api-local"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("events", nargs="+", type=Path, help="API Gateway (HTTP API) event files")
    parser.add_argument("--repeat", type=int, default=1, help="invoke each event this many times")
    parser.add_argument("--timeout", type=float, default=10.0, help="function timeout, seconds")
    args = parser.parse_args(argv)
    with asyncpool_dsn_or_local():
        # What the Lambda runtime sets: pool_lifespan keeps the pool open across invocations.
        os.environ.setdefault("AWS_LAMBDA_FUNCTION_NAME", FUNCTION_NAME)
        sys.path.insert(0, str(HERE))
        function = importlib.import_module("mangum_app")
        try:
            events = [json.loads(_resolve(path).read_text()) for path in args.events]
            for n, event in enumerate(events * args.repeat, 1):
                context = LocalContext(function_name=FUNCTION_NAME, timeout=args.timeout)
                response = function.handler(event, context)
                stats = dataclasses.asdict(function.pool.stats())
                print(json.dumps({"local_invocation": n, "response": response, "pool": stats}))
        finally:
            # Mangum's loop, which the pool was opened on.
            asyncio.get_event_loop().run_until_complete(function.pool.close())
    return 0


def _resolve(path: Path) -> Path:
    return path if path.is_absolute() or path.exists() else HERE / path


if __name__ == "__main__":
    sys.exit(main())
