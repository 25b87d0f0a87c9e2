"""The real Lambda runtime in tests: helpers for the modules here, which run handlers
under awslambdaric against asyncpool.testing.lambda_runtime's Runtime API emulator."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import asyncpg

from asyncpool.testing import PgBouncerServer
from asyncpool.testing.faultproxy import FaultProxy
from asyncpool.testing.lambda_runtime import LambdaProcess, Outcome, RuntimeAPI
from tests.lambda_env import POWERTOOLS_EXAMPLE, app_clients
from tests.script_support import REPO

FUNCTIONS = REPO / "tests" / "lambda_functions"
# How PgBouncer logs a client leaving: with a Terminate message, or with the socket vanishing.
CLEAN_CLOSE = "client close request"
VANISHED = "client unexpected eof"


def environment(
    api: RuntimeAPI,
    pooler: PgBouncerServer,
    tmp_path: Path,
    *,
    handler: str = "pooled.handler",
    execution_env: str | None = "AWS_Lambda_python3.12",
    env: dict[str, str | None] | None = None,
    extra_path: list[Path] | None = None,
) -> LambdaProcess:
    return LambdaProcess(
        api,
        handler,
        log_path=tmp_path / "runtime.log",
        path=[*(extra_path or []), FUNCTIONS, POWERTOOLS_EXAMPLE, REPO],
        env={"ASYNCPOOL_DSN": pooler.dsn(), "POWERTOOLS_METRICS_NAMESPACE": "tests", **(env or {})},
        execution_env=execution_env,
    )


async def invoke(api: RuntimeAPI, event: Any, timeout: float = 30.0) -> Outcome:
    return await asyncio.to_thread(api.invoke, event, timeout=timeout)


def response(outcome: Outcome, proc: LambdaProcess) -> dict[str, Any]:
    assert outcome.kind == "response", f"{outcome.body!r}\n{proc.log()[-3000:]}"
    body: dict[str, Any] = outcome.json()
    return body


def app_disconnects(server: PgBouncerServer) -> list[str]:
    """PgBouncer's log lines about `app` clients leaving (not the admin console's own logins)."""
    assert server.process is not None
    lines = server.process.log_path.read_text(errors="replace").splitlines()
    return [line for line in lines if " app/app@" in line and "closing because" in line]


async def departures(server: PgBouncerServer, within: float = 5.0) -> list[str]:
    """`app_disconnects` once PgBouncer has noticed the client leave (it logs a moment later)."""
    deadline = time.monotonic() + within
    while not (lines := app_disconnects(server)) and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    return lines


async def wait_for_no_clients(pooler: PgBouncerServer, within: float = 15.0) -> None:
    deadline = time.monotonic() + within
    while await app_clients(pooler):
        if time.monotonic() > deadline:
            raise AssertionError(f"PgBouncer still has the client after {within}s")
        await asyncio.sleep(0.2)


async def running(dsn: str, tag: str) -> int:
    """How many server sessions (other than this check's) run the statement tagged `tag`."""
    check = await asyncpg.connect(dsn)
    try:
        count: int = await check.fetchval(
            "SELECT count(*) FROM pg_stat_activity WHERE query LIKE $1 AND state = 'active' "
            "AND pid <> pg_backend_pid()", f"%{tag}%")
        return count
    finally:
        await check.close()


async def network_dies_in_a_freeze(api: RuntimeAPI, proc: LambdaProcess, proxy: FaultProxy) -> None:
    """One invocation served (a connection kept), then the environment frozen while the network
    to the pooler dies without a word (`proxy` half-open: replies lost, on every connection
    from now on), and thawed."""
    response(await invoke(api, {"op": "query"}), proc)
    await asyncio.to_thread(api.wait_idle)
    proc.freeze()
    proxy.set_mode("half-open")
    proc.thaw()
