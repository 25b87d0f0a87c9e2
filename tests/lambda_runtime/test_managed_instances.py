"""Lambda Managed Instances: awslambdaric forks one worker per concurrency slot
(``AWS_LAMBDA_MAX_CONCURRENCY``), each importing the handler, so each has its pool; and a pool
inherited across a fork never touches its parent's connections."""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

from asyncpool.testing import PgBouncerServer, PostgresServer
from asyncpool.testing.lambda_runtime import RuntimeAPI
from tests.lambda_env import app_clients
from tests.lambda_runtime.support import (
    CLEAN_CLOSE,
    FUNCTIONS,
    departures,
    environment,
    response,
    running,
)
from tests.script_support import REPO

WORKERS = 4


async def test_four_workers_each_with_one_connection(
    runtime_api: RuntimeAPI, own_pgbouncer: PgBouncerServer, tmp_path: Path
) -> None:
    env: dict[str, str | None] = {"AWS_LAMBDA_MAX_CONCURRENCY": str(WORKERS)}
    with environment(runtime_api, own_pgbouncer, tmp_path, env=env) as proc:
        for _ in range(3):
            # Every worker through INIT and waiting, so each takes one of these.
            await asyncio.to_thread(runtime_api.wait_idle, 60, runtimes=WORKERS)
            # As many at once as there are workers, each holding its worker a moment.
            ids = [runtime_api.submit({"op": "query", "hold": 0.3}) for _ in range(WORKERS)]
            bodies = [
                response(await asyncio.to_thread(runtime_api.result, rid, 30), proc) for rid in ids
            ]
            assert len({b["pid"] for b in bodies}) == WORKERS, [b["pid"] for b in bodies]
        # One pool per worker, one connection each, kept across its invocations.
        assert {b["pool"]["created_total"] for b in bodies} == {1}
        assert len(await app_clients(own_pgbouncer)) == WORKERS


async def test_sigterm_to_the_runtime_process_closes_every_workers_pool(
    runtime_api: RuntimeAPI, own_pgbouncer: PgBouncerServer, postgres: PostgresServer,
    tmp_path: Path,
) -> None:
    """SIGTERM goes to the runtime's process, which dies of it; its workers hear nothing of it
    but the kernel's SIGTERM at their parent's death (`lambda_workers`). Without that they were
    orphaned with their pools open, one of them in the middle of a statement."""
    tag = uuid.uuid4().hex
    env: dict[str, str | None] = {"AWS_LAMBDA_MAX_CONCURRENCY": "2"}
    with environment(runtime_api, own_pgbouncer, tmp_path, env=env) as proc:
        await asyncio.to_thread(runtime_api.wait_idle, 60, runtimes=2)
        ids = [runtime_api.submit({"op": "query", "hold": 0.3}) for _ in range(2)]
        for rid in ids:
            response(await asyncio.to_thread(runtime_api.result, rid, 30), proc)
        await asyncio.to_thread(runtime_api.wait_idle, 60, runtimes=2)
        assert len(await app_clients(own_pgbouncer)) == 2
        runtime_api.submit({"op": "stall", "tag": tag})  # one worker busy, one waiting
        deadline = time.monotonic() + 10
        while not await running(postgres.dsn(), tag):
            assert time.monotonic() < deadline, proc.log()[-2000:]
            await asyncio.sleep(0.05)
        proc.signal(signal.SIGTERM)
        assert await asyncio.to_thread(proc.wait, 1.0) == -signal.SIGTERM
        deadline = time.monotonic() + 2.0
        while (left := await app_clients(own_pgbouncer)) and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        assert left == [], f"workers still logged in\n{proc.log()[-2000:]}"
        assert await running(postgres.dsn(), tag) == 0
    goodbyes = [line for line in await departures(own_pgbouncer) if " C-" in line]
    assert len(goodbyes) == 2, goodbyes
    assert all(CLEAN_CLOSE in line for line in goodbyes), goodbyes


async def test_a_pool_inherited_across_fork_leaves_the_parents_connection_alone(
    legacy: PgBouncerServer,
) -> None:
    done = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, str(FUNCTIONS / "forked_pool.py"), legacy.dsn()],
        capture_output=True, text=True, timeout=60, cwd=REPO,
        env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"},
    )
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout.strip().splitlines()[-1])
    child = report["child"]
    assert report["child_status"] == 0, child
    assert child["fresh_loop"] is True
    assert "is a fork of it" in child["refused"]
    assert "forked from the one that opened the pool" in child["held_refused"]
    assert isinstance(child["own_pid"], int)
    # The parent's session survived the child's use, terminate() and close() of the pool.
    assert report["after"] == report["before"]
    # And its transaction the child's release of the connection it held (in that transaction)
    # when it forked: nothing was sent on its socket.
    assert report["held_after"] == 1
    assert (report["parent_created_total"], report["parent_closed_total"]) == (2, 0)
