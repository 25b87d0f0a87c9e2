"""Invoke the Mangum handler the way the Lambda runtime does: one process, one event after another.

    python examples/sqlalchemy_fastapi/run_locally.py --repeat 3 events/add_note_v2.json \
        events/find_notes_v2.json events/missing_note_v2.json

Uses ASYNCPOOL_DSN when set; otherwise starts a throwaway PostgreSQL and PgBouncer (needs their
binaries, see asyncpool.testing). Creates the table, then prints one JSON line per invocation with
the response and the pool's numbers: ``created_total`` staying at 1 shows that one pool (and one
server connection) served every invocation, and ``in_use`` 0 that each session gave it back.
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
FUNCTION_NAME = "notes-api-local"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("events", nargs="+", type=Path, help="API Gateway (HTTP API) event files")
    parser.add_argument("--repeat", type=int, default=1, help="invoke each event this many times")
    args = parser.parse_args(argv)
    with asyncpool_dsn_or_local():
        os.environ.setdefault("AWS_LAMBDA_FUNCTION_NAME", FUNCTION_NAME)
        sys.path.insert(0, str(HERE))
        create_tables()
        function = importlib.import_module("notes_app")
        try:
            events = [json.loads(_resolve(path).read_text()) for path in args.events]
            for n, event in enumerate(events * args.repeat, 1):
                response = function.handler(event, LocalContext(function_name=FUNCTION_NAME))
                stats = dataclasses.asdict(function.pool.stats())
                print(json.dumps({"local_invocation": n, "status": response["statusCode"],
                                  "body": response["body"], "pool": stats}))
        finally:
            asyncio.get_event_loop().run_until_complete(function.pool.close())
    return 0


def create_tables() -> None:
    """In a process of its own, as migrations would run (the app's pool stays unopened here)."""
    import subprocess

    subprocess.run([sys.executable, "-c", "import asyncio, notes_app; "
                    "asyncio.run(notes_app.create_tables())"], cwd=HERE, check=True)


def _resolve(path: Path) -> Path:
    return path if path.is_absolute() or path.exists() else HERE / path


if __name__ == "__main__":
    sys.exit(main())
