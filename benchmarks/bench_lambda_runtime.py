"""A handler under the real Lambda runtime client: cold start, warm invocations, first after a thaw.

    PYTHONPATH=. .venv/bin/python benchmarks/bench_lambda_runtime.py [--cold 5] [--warm 200] [--thaws 5]
        [--handler pooled.handler|powertools_handler.handler] [--execution-env AWS_Lambda_python3.12]
        [--snapstart 3] [--python PATH] [--dsn DSN] [--env NAME=VALUE ...]

Runs ``python -m awslambdaric <handler>`` (PyPI ``awslambdaric``) against the Runtime API emulator
of `asyncpool.testing.lambda_runtime`, as a Lambda container image would run it, and measures
from the emulator's side:

- **cold start**, per new process: INIT (process start to the runtime's first ``GET /next``:
  interpreter, awslambdaric, handler import) and the first invocation (event out to response in,
  which opens the connection);
- **warm** invocations, one after the other on one environment (one query each; the pool checks
  its connection at every invocation boundary, see docs/serverless.md);
- **first invocation after a thaw**: the environment is frozen (SIGSTOP) for ``--pause`` seconds
  between invocations, then thawed (SIGCONT) and invoked;
- **SnapStart**: INIT opens the pool, the before-snapshot hook closes it, the process is frozen
  as the snapshot and thawed; from the restore (``/restore/next`` answered) to the first
  response (after-restore hooks, a new connection, the query). Lambda allows 10 s.

Without --dsn a throwaway PostgreSQL with PgBouncer 1.18 in front is started on 127.0.0.1.
Prints medians and ranges in milliseconds.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
PATH = [REPO / "tests" / "lambda_functions", REPO / "examples" / "lambda_powertools", REPO]


@contextmanager
def target(dsn: str | None) -> Iterator[str]:
    if dsn:
        yield dsn
        return
    from asyncpool.testing import ServerStack

    stack = ServerStack.start()
    try:
        yield stack.legacy.dsn()
    finally:
        stack.stop()


def event_for(handler: str) -> Any:
    if handler.startswith("powertools_handler"):
        import json

        return json.loads((REPO / "examples/lambda_powertools/events/hello.json").read_text())
    return {"op": "query"}


def ok(outcome: Any) -> Any:
    if outcome.kind != "response":
        raise SystemExit(f"invocation failed: {outcome.body!r}")
    return outcome


def measure(args: argparse.Namespace, dsn: str, workdir: Path) -> dict[str, list[float]]:
    from asyncpool.testing.lambda_runtime import LambdaProcess, RuntimeAPI

    event = event_for(args.handler)
    extra_env: dict[str, str | None] = dict(item.split("=", 1) for item in args.env)
    results: dict[str, list[float]] = {
        "init": [], "first": [], "warm": [], "thawed": [], "snap_init": [], "restored": [],
    }

    def environment(api: RuntimeAPI, n: int, **more: str) -> LambdaProcess:
        return LambdaProcess(
            api, args.handler, log_path=workdir / f"runtime-{n}.log", path=PATH,
            env={"ASYNCPOOL_DSN": dsn, "POWERTOOLS_METRICS_NAMESPACE": "bench", **extra_env, **more},
            execution_env=args.execution_env, python=args.python,
        )

    for n in range(args.cold):
        with RuntimeAPI() as api, environment(api, n) as proc:
            api.wait_idle(60)
            assert api.first_next_at is not None
            assert proc.started_at is not None
            results["init"].append(api.first_next_at - proc.started_at)
            results["first"].append(ok(api.invoke(event)).seconds)
            if n == 0:
                for _ in range(args.warm):
                    results["warm"].append(ok(api.invoke(event)).seconds)
                for _ in range(args.thaws):
                    api.wait_idle()
                    proc.freeze()
                    time.sleep(args.pause)
                    proc.thaw()
                    results["thawed"].append(ok(api.invoke(event)).seconds)
    snapstart = {"AWS_LAMBDA_INITIALIZATION_TYPE": "snap-start", "TEST_OPEN_AT_INIT": "1"}
    for n in range(args.snapstart):
        with RuntimeAPI() as api, environment(api, 100 + n, **snapstart) as proc:
            if not api.restore_requested.wait(60):
                raise SystemExit(f"no /restore/next:\n{proc.log()[-2000:]}")
            assert proc.started_at is not None
            results["snap_init"].append(time.monotonic() - proc.started_at)
            proc.freeze()  # the snapshot
            time.sleep(args.pause)
            proc.thaw()
            restored = time.monotonic()
            api.release_restore()
            ok(api.invoke(event))
            results["restored"].append(time.monotonic() - restored)
    return results


def summary(values: list[float]) -> str:
    ms = sorted(v * 1000 for v in values)
    if not ms:
        return "-"
    return f"median {statistics.median(ms):.2f} ms (min {ms[0]:.2f}, max {ms[-1]:.2f}, n={len(ms)})"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cold", type=int, default=5, help="cold starts (new processes)")
    parser.add_argument("--warm", type=int, default=200, help="warm invocations")
    parser.add_argument("--thaws", type=int, default=5, help="freeze/thaw cycles")
    parser.add_argument("--pause", type=float, default=1.0, help="seconds frozen per cycle")
    parser.add_argument("--snapstart", type=int, default=3,
                        help="SnapStart cycles (pool opened at INIT; pooled.handler only)")
    parser.add_argument("--handler", default="pooled.handler")
    parser.add_argument("--execution-env", default="AWS_Lambda_python3.12")
    parser.add_argument("--python", default=sys.executable)
    parser.add_argument("--dsn")
    parser.add_argument("--env", action="append", default=[], metavar="NAME=VALUE",
                        help="extra environment for the runtime process (repeatable)")
    args = parser.parse_args(argv)
    with target(args.dsn) as dsn, tempfile.TemporaryDirectory() as tmp:
        results = measure(args, dsn, Path(tmp))
    print(f"handler {args.handler}, {args.execution_env}, {args.python}")
    print(f"INIT (process start to first GET /next): {summary(results['init'])}")
    print(f"first invocation (opens the connection): {summary(results['first'])}")
    cold = [i + f for i, f in zip(results["init"], results["first"], strict=True)]
    print(f"cold start (INIT + first invocation):    {summary(cold)}")
    print(f"warm invocation:                          {summary(results['warm'])}")
    print(f"first invocation after a {args.pause:g} s freeze:    {summary(results['thawed'])}")
    print(f"SnapStart INIT (pool opened, hooks, to /restore/next): {summary(results['snap_init'])}")
    print(f"SnapStart restore to first response (after-restore hooks, connect, query): "
          f"{summary(results['restored'])}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
