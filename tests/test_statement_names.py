"""Named statements (cursors, ``conn.prepare()``) through a pooler that does not track them
(PgBouncer 1.18, transaction mode): a statement asyncpg leaves prepared on a server connection
must not collide with one another process prepares there later. asyncpg numbers its statement
names from 1 in every process; the pool's connections name them with a per-process token."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from asyncpool.testing import PgBouncerServer, ServerStack

ROOT = Path(__file__).resolve().parents[1]

# One process: cursors, each in its own transaction, as docs/troubleshooting.md advises.
_CURSORS = textwrap.dedent("""
    import asyncio, sys
    from asyncpool import Pool

    async def main(dsn: str, mode: str) -> None:
        async with Pool(dsn, max_size=1, prepared_statements=mode, telemetry=False) as pool:
            for _ in range(5):
                async with pool.transaction() as conn:
                    rows = [r async for r in conn.cursor(
                        "SELECT g FROM generate_series(1, $1) g", 50, prefetch=10)]
                    assert len(rows) == 50

    asyncio.run(main(sys.argv[1], sys.argv[2]))
""")


@pytest.mark.parametrize("mode", ["unnamed", "off"])
def test_processes_one_after_another_share_a_server_connection_without_collisions(
        stack: ServerStack, tmp_path: Path, mode: str) -> None:
    bouncer = PgBouncerServer(stack.legacy.binary, stack.postgres,
                              {"default_pool_size": 4}).start()
    try:
        script = tmp_path / "cursors.py"
        script.write_text(_CURSORS)
        for run in range(3):
            done = subprocess.run(
                [sys.executable, str(script), bouncer.dsn(), mode], cwd=ROOT,
                capture_output=True, text=True, timeout=60, check=False)
            assert done.returncode == 0, f"process {run + 1}: {done.stderr[-2000:]}"
    finally:
        bouncer.stop()


def test_a_forked_child_names_its_statements_apart_from_its_parent() -> None:
    """Workers forked from one parent (uvicorn/gunicorn --workers, a managed instance's
    processes) would otherwise count from the same point with the same token."""
    import os

    from asyncpool.connect import driver

    connection_class = driver.cancel_aware_class(None, cancels=True)
    parents = connection_class._get_unique_id(None, "stmt")
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: write its name, leave at once
        os.write(write, connection_class._get_unique_id(None, "stmt").encode())
        os._exit(0)
    os.close(write)
    try:
        childs = os.read(read, 200).decode()
    finally:
        os.close(read)
        os.waitpid(pid, 0)
    assert parents.startswith("__asyncpg_stmt_")
    assert childs.startswith("__asyncpg_stmt_")
    assert parents.split("_")[4] != childs.split("_")[4]  # the token
