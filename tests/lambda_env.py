"""Stand-ins for a Lambda execution environment, for the serverless tests.

`RuntimeThread` is the runtime's thread inside the test process: every call of one environment's
handler runs on it, so the handler's event loop (a LambdaRunner's, or Mangum's) is never the
pytest session loop. `HandlerProcess` is a whole environment in a child process, the example
handler reading invocations from stdin, so a test can freeze it (SIGSTOP) or shut it down.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import queue
import signal
import subprocess
import sys
import threading
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import IO, Any, TypeVar

import asyncpg

from asyncpool import Pool, PoolObserver
from asyncpool.integrations.aws_lambda import lambda_config
from asyncpool.integrations.invocation import LocalContext
from asyncpool.integrations.lambda_runner import LambdaRunner
from asyncpool.testing.admin import AdminConsole
from tests.script_support import REPO

T = TypeVar("T")

POWERTOOLS_EXAMPLE = REPO / "examples" / "lambda_powertools"

#: The loop the suite's async tests run on: "uvloop" under ASYNCPOOL_TEST_LOOP=uvloop (tests/conftest.py).
TEST_LOOP = "uvloop" if os.environ.get("ASYNCPOOL_TEST_LOOP") == "uvloop" else "asyncio"


@contextlib.contextmanager
def loops_like_the_tests() -> Iterator[None]:
    """Under ASYNCPOOL_TEST_LOOP=uvloop, the loops made outside pytest-asyncio (a LambdaRunner's,
    Mangum's, TestClient's portal, ``asyncio.run()``) are uvloop's too, as in a process that ran
    ``uvloop.install()``. For the modules that ask: suite-wide, that policy broke the direct-TLS
    tests' helpers. Enter it from an async fixture: pytest-asyncio sets a policy of its own when
    it starts its loop, which a sync fixture set up before a module's first async test precedes
    (that test then ran on asyncio's loop)."""
    if TEST_LOOP != "uvloop":
        yield
        return
    import uvloop

    before = asyncio.get_event_loop_policy()
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    try:
        yield
    finally:
        asyncio.set_event_loop_policy(before)  # (pytest-asyncio's, with its loop set as current)


def loop_kind() -> str:
    """The running loop's kind: "uvloop" or "asyncio"."""
    return "uvloop" if "uvloop" in type(asyncio.get_running_loop()).__module__ else "asyncio"


class RuntimeThread:
    """One thread playing the Lambda runtime's: calls run there, one at a time, in order."""

    def __init__(self) -> None:
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="lambda-runtime")

    async def call(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.wrap_future(self._executor.submit(fn, *args))

    def close(self) -> None:
        self._executor.shutdown(wait=True)


class Environment:
    """One execution environment in the test process: a runtime thread, a runner, its pools."""

    def __init__(self, *, timeout_margin: float = 0.5) -> None:
        self.runtime = RuntimeThread()
        self.runner = LambdaRunner(timeout_margin=timeout_margin)
        self._pools: list[Pool] = []

    def pool(
        self, dsn: str, *, observers: list[PoolObserver] | None = None, **options: Any
    ) -> Pool:
        """A pool with the Lambda defaults; the environment closes it at the end."""
        pool = Pool(config=lambda_config(environ={}, dsn=dsn, **options), observers=observers)
        self._pools.append(pool)
        return pool

    async def invoke(
        self, handler: Callable[[Any, Any], T], event: Any = None, context: Any = None
    ) -> T:
        """Call the (synchronous) handler on the runtime thread, as Lambda would."""
        return await self.runtime.call(handler, event or {}, context or LocalContext())

    async def run(self, fn: Callable[[], Awaitable[T]]) -> T:
        """Await ``fn()`` on the environment's loop, between invocations."""

        async def call() -> T:
            return await fn()

        return await self.runtime.call(self.runner.run, call())

    async def close(self) -> None:
        for pool in self._pools:
            await self.run(pool.close)
        await self.runtime.call(self.runner.close)
        self.runtime.close()


@contextlib.asynccontextmanager
async def scratch_table(dsn: str) -> AsyncIterator[str]:
    """A one-column table of the caller's own (``body text``), dropped afterwards."""
    name = f"notes_{uuid.uuid4().hex[:12]}"
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute(f"CREATE TABLE {name} (body text NOT NULL)")
        yield name
        await conn.execute(f"DROP TABLE {name}")
    finally:
        await conn.close()


def load_event(path: Path) -> dict[str, Any]:
    event: dict[str, Any] = json.loads(path.read_text())
    return event


class HandlerProcess:
    """examples/lambda_powertools/run_powertools_locally.py --stdin in a child process, against `dsn`."""

    def __init__(self, dsn: str, stderr_path: Path) -> None:
        env = {**os.environ, "ASYNCPOOL_DSN": dsn, "POWERTOOLS_METRICS_NAMESPACE": "tests"}
        # This checkout's asyncpool, also where it is not installed (the 3.12 / 3.13 test venvs).
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
        self._stderr: IO[bytes] = open(stderr_path, "wb")  # noqa: SIM115 - closed in stop()
        self.stderr_path = stderr_path
        self.proc = subprocess.Popen(
            [sys.executable, str(POWERTOOLS_EXAMPLE / "run_powertools_locally.py"), "--stdin"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._stderr,
            text=True,
            env=env,
            cwd=REPO,
        )
        self._results: queue.Queue[dict[str, Any] | None] = queue.Queue()
        self._reader = threading.Thread(target=self._read_results, daemon=True)
        self._reader.start()

    def _read_results(self) -> None:
        """Keep the result lines; the rest of stdout is Powertools' logs and metrics."""
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            try:
                parsed = json.loads(line)
            except ValueError:
                continue
            if isinstance(parsed, dict) and "local_invocation" in parsed:
                self._results.put(parsed)
        self._results.put(None)

    async def invoke(self, event: dict[str, Any], timeout: float = 30.0) -> dict[str, Any]:
        """Send one event; return the runner's result line (response, error, pool stats)."""
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(event) + "\n")
        self.proc.stdin.flush()
        result = await asyncio.to_thread(self._results.get, timeout=timeout)
        if result is None:
            raise AssertionError(f"the handler process ended:\n{self.stderr_tail()}")
        return result

    def signal(self, sig: int) -> None:
        os.kill(self.proc.pid, sig)

    async def wait(self, timeout: float = 20.0) -> int:
        return await asyncio.to_thread(self.proc.wait, timeout)

    def stderr_tail(self, chars: int = 3000) -> str:
        return self.stderr_path.read_text(errors="replace")[-chars:]

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)
            self.proc.kill()
            self.proc.wait(10)
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        self._reader.join(10)
        self._stderr.close()


async def app_clients(pooler: AdminConsole) -> list[dict[str, Any]]:
    """PgBouncer's SHOW CLIENTS rows for the `app` user (the pool's logins)."""
    return [row for row in await pooler.admin("SHOW CLIENTS") if row["user"] == "app"]


def local_port(conn: Any) -> int:
    """The client-side port of a pooled connection: what PgBouncer's SHOW CLIENTS calls `port`."""
    port: int = conn.raw._transport.get_extra_info("sockname")[1]
    return port
