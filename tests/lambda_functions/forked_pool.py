"""A pool opened, then the process forked: the child must neither use nor close the parent's
connections, and a pool of its own works there. Prints one JSON line; run by
tests/test_lambda_managed_instances.py with the DSN as the argument."""

from __future__ import annotations

import json
import os
import sys
from typing import Any

from asyncpool import Pool, PoolError
from asyncpool.integrations.aws_lambda import close_on_shutdown
from asyncpool.integrations.lambda_runner import get_runner

QUERY = "SELECT pg_backend_pid()"


def child(pool: Pool, dsn: str) -> dict[str, Any]:
    runner = get_runner()  # the same object, with a loop of the child's own now
    report: dict[str, Any] = {"fresh_loop": runner.loop is not parent_loop}
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


def main() -> int:
    dsn = sys.argv[1]
    runner = get_runner()
    pool = runner.attach(Pool(dsn=dsn, min_size=1, max_size=1))
    runner.run(pool.open())
    close_on_shutdown(pool, runner.loop)
    before = runner.run(pool.fetchval(QUERY))
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(read)
        code = 0
        try:
            os.write(write, json.dumps(child(pool, dsn)).encode())
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
    stats = pool.stats()
    runner.run(pool.close())
    print(json.dumps({
        "child": child_report, "child_status": status, "before": before, "after": after,
        "parent_created_total": stats.created_total, "parent_closed_total": stats.closed_total,
    }))
    return 0


parent_loop = get_runner().loop

if __name__ == "__main__":
    sys.exit(main())
