"""A pool opened, then the process forked: the child must neither use nor close the parent's
connections, and a pool of its own works there. Prints one JSON line; run by
tests/lambda_runtime/test_managed_instances.py with the DSN as the argument."""

from __future__ import annotations

import json
import os
import sys
from typing import Any

from asyncpool import Pool, PoolError
from asyncpool.integrations.aws_lambda import close_on_shutdown
from asyncpool.integrations.lambda_runner import get_runner

QUERY = "SELECT pg_backend_pid()"


def child(pool: Pool, held: Any, dsn: str) -> dict[str, Any]:
    runner = get_runner()  # the same object, with a loop of the child's own now
    report: dict[str, Any] = {"fresh_loop": runner.loop is not parent_loop}
    # A connection the parent held (in a transaction) when it forked: refused here, and its
    # release must send nothing (a reset would roll the parent's transaction back).
    try:
        runner.run(held.fetchval("SELECT 1"))
        report["held_refused"] = None
    except PoolError as exc:
        report["held_refused"] = str(exc)
    runner.run(pool.release(held))
    try:
        runner.run(pool.fetchval(QUERY))
        report["refused"] = None
    except PoolError as exc:
        report["refused"] = str(exc)
    pool.terminate()  # must not touch the parent's socket
    runner.run(pool.close())
    own = Pool(dsn=dsn, min_size=0, max_size=1)
    runner.run(own.open())
    report["own_pid"] = runner.run(own.fetchval(QUERY))
    runner.run(own.close())
    return report


async def _acquire(pool: Pool) -> Any:
    return await pool.acquire()


def main() -> int:
    dsn = sys.argv[1]
    runner = get_runner()
    pool = runner.attach(Pool(dsn=dsn, min_size=1, max_size=2))
    runner.run(pool.open())
    close_on_shutdown(pool, runner.loop)
    held = runner.run(_acquire(pool))
    runner.run(held.execute("BEGIN"))
    runner.run(held.execute("CREATE TEMP TABLE forked_marker (x int) ON COMMIT DROP"))
    runner.run(held.execute("INSERT INTO forked_marker VALUES (1)"))
    before = runner.run(pool.fetchval(QUERY))  # on the pool's second connection
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(read)
        code = 0
        try:
            os.write(write, json.dumps(child(pool, held, dsn)).encode())
        except BaseException as exc:
            os.write(write, json.dumps({"error": repr(exc)}).encode())
            code = 1
        finally:
            os._exit(code)
    os.close(write)
    with os.fdopen(read) as pipe:
        child_report = json.loads(pipe.read())
    _, status = os.waitpid(pid, 0)
    after = runner.run(pool.fetchval(QUERY))
    try:  # the parent's transaction, as it left it
        held_after = runner.run(held.fetchval("SELECT count(*) FROM forked_marker"))
    except Exception as exc:
        held_after = repr(exc)
    runner.run(pool.release(held))
    stats = pool.stats()
    runner.run(pool.close())
    print(json.dumps({
        "child": child_report, "child_status": status, "before": before, "after": after,
        "held_after": held_after,
        "parent_created_total": stats.created_total, "parent_closed_total": stats.closed_total,
    }))
    return 0


parent_loop = get_runner().loop

if __name__ == "__main__":
    sys.exit(main())
