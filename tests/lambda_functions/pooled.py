"""A Lambda function for the runtime tests: one module-level pool, served by `async_handler`.

Run by ``python -m awslambdaric pooled.handler`` (asyncpool.testing.lambda_runtime) with
ASYNCPOOL_DSN set. The event's ``op`` picks what the invocation does; every response carries the
pool's numbers, so a test sees connections made, checked and closed across invocations.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import sys
from collections.abc import Awaitable, Callable
from typing import Any

from asyncpool import Pool
from asyncpool.integrations.aws_lambda import close_on_shutdown, lambda_config
from asyncpool.integrations.lambda_runner import async_handler, checked_margin, get_runner
from asyncpool.pool.connection import PooledConnection

pool = Pool(config=lambda_config(function_timeout=10, name="runtime-test"))
# Checked at every invocation boundary (TEST_DETACHED: the clock alone decides, to measure).
get_runner().attach(pool, check_each_invocation=not os.environ.get("TEST_DETACHED"))
if os.environ.get("TEST_IAM_POOL"):
    # A pool on IAM tokens, made at INIT and never opened here: what INIT imports for it.
    from asyncpool import IamAuth

    iam_pool = get_runner().attach(
        Pool(config=lambda_config(function_timeout=10, credentials=IamAuth(region="us-east-1"))))
if os.environ.get("TEST_POWERTOOLS_LOGGER"):
    # asyncpool's records through Powertools' JSON formatter, as its docs suggest for libraries.
    from aws_lambda_powertools import Logger
    from aws_lambda_powertools.logging.utils import copy_config_to_registered_loggers

    copy_config_to_registered_loggers(source_logger=Logger(service="runtime-test"), include={"asyncpool"})
if os.environ.get("TEST_POOL_INFO"):
    # The pool's INFO records too (a refill given up at an invocation's end).
    logging.getLogger("asyncpool.pool").setLevel(logging.INFO)
if os.environ.get("TEST_TIMEOUT_MARGIN"):
    # The runner's timeout_margin, as LambdaRunner(timeout_margin=...) would set it.
    get_runner().timeout_margin = checked_margin(float(os.environ["TEST_TIMEOUT_MARGIN"]))
if os.environ.get("TEST_OPEN_AT_INIT"):
    # Opened (and connected) during INIT: what SnapStart snapshots ("nowait": the login left
    # under way, open(wait=False)).
    get_runner().run(pool.open(wait=os.environ["TEST_OPEN_AT_INIT"] != "nowait"))
if os.environ.get("TEST_SETUP_AT_INIT"):
    # A pool with a `setup` hook, and a task INIT leaves in an acquire whose hook is still on a
    # statement when INIT ends: what SnapStart snapshots ("setup_result" awaits it).
    hook_began = asyncio.Event()

    async def _slow_setup(conn: Any) -> None:
        hook_began.set()
        await conn.execute("SELECT pg_sleep(1)")

    setup_pool = get_runner().attach(Pool(config=lambda_config(
        function_timeout=10, name="runtime-setup", setup=_slow_setup)))

    async def _leave_in_setup() -> asyncio.Task[Any]:
        await setup_pool.open()

        async def acquire() -> Any:
            async with setup_pool.acquire() as conn:
                return await conn.fetchval("SELECT 'set up'")

        task = asyncio.create_task(acquire(), name="init-acquirer")
        await hook_began.wait()
        return task

    in_setup = get_runner().run(_leave_in_setup())
if not os.environ.get("TEST_NO_SHUTDOWN_HOOK"):
    close_on_shutdown(pool, get_runner().loop)
# A second pool with its own hook (TEST_SECOND_POOL): both must close at SIGTERM.
second = Pool(config=lambda_config(function_timeout=10, name="runtime-test-2"))
if os.environ.get("TEST_SECOND_POOL"):
    close_on_shutdown(second, get_runner().loop)

background: list[asyncio.Task[Any]] = []


async def _later(after: float, hold: float) -> Any:
    """What a handler's fire-and-forget task does: wait, then use the pool a while."""
    await asyncio.sleep(after)
    async with pool.acquire() as conn:
        await asyncio.sleep(hold)
        return await conn.fetchval("SELECT 'background'")


def _outcome(task: asyncio.Task[Any]) -> Any:
    if not task.done():
        return "pending"
    if task.cancelled():
        return "cancelled"
    exc = task.exception()
    return repr(exc) if exc is not None else task.result()


async def _backend_pids() -> Any:
    """A generator kept across invocations (the "generator" op) holding its connection."""
    async with pool.acquire() as conn:
        while True:
            yield await conn.fetchval("SELECT pg_backend_pid()")


kept_generator: list[Any] = []

# Connections a handler took and did not give back (the "leak" op).
kept: list[PooledConnection] = []


class HandlerFailedError(Exception):
    """What the "raise" op raises, after using a connection."""


async def _generator(event: dict[str, Any], result: dict[str, Any]) -> None:
    # Module-level, as a cache would keep it: the block stays open between invocations.
    if not kept_generator:
        kept_generator.append(_backend_pids())
    result["backend_pid"] = await anext(kept_generator[0])


async def _try_query(event: dict[str, Any], result: dict[str, Any]) -> None:
    # A query whose failure is answered, after a while (housekeeping runs meanwhile).
    try:
        result["backend_pid"] = await pool.fetchval("SELECT pg_backend_pid()")
    except Exception as exc:
        result["error"] = type(exc).__name__
        await asyncio.sleep(float(event.get("linger", 0)))


async def _use_kept(event: dict[str, Any], result: dict[str, Any]) -> None:
    # The connection the "leak" op kept, used in a later invocation.
    try:
        result["kept"] = await kept[-1].fetchval("SELECT 1")
    except Exception as exc:
        result["error"] = f"{type(exc).__name__}: {exc}"


late_go = asyncio.Event()


async def _late_acquire() -> None:
    """Started in one invocation ("arm_late"), it acquires in a later one ("go") and ends with
    the connection kept, not released."""
    await late_go.wait()
    conn = await pool.acquire()
    await conn.fetchval("SELECT 1")
    kept.append(conn)


async def _arm_late(event: dict[str, Any], result: dict[str, Any]) -> None:
    background.append(asyncio.create_task(_late_acquire(), name="late-acquirer"))


async def _go(event: dict[str, Any], result: dict[str, Any]) -> None:
    late_go.set()
    await asyncio.wait_for(asyncio.shield(background[-1]), 5)


async def _background_results(event: dict[str, Any], result: dict[str, Any]) -> None:
    result["background"] = [_outcome(t) for t in background]


async def _modules(event: dict[str, Any], result: dict[str, Any]) -> None:
    result["preloaded_at_init"] = PRELOADED_AT_INIT
    result["aws_sdk_at_init"] = AWS_SDK_AT_INIT


async def _setup_result(event: dict[str, Any], result: dict[str, Any]) -> None:
    # What the acquire INIT left in its `setup` hook came to (TEST_SETUP_AT_INIT).
    await asyncio.wait([in_setup], timeout=10)
    result["setup_result"] = _outcome(in_setup)
    result["setup_pool"] = dataclasses.asdict(setup_pool.stats())


_MORE_OPS: dict[str, Callable[[dict[str, Any], dict[str, Any]], Awaitable[None]]] = {
    "generator": _generator, "try_query": _try_query,
    "background_results": _background_results, "modules": _modules, "use_kept": _use_kept,
    "arm_late": _arm_late, "go": _go, "setup_result": _setup_result,
}


@async_handler
async def handler(event: dict[str, Any], context: Any) -> dict[str, Any]:
    op = event.get("op", "query")
    await pool.open(wait=False)  # the first invocation opens it; a no-op after
    result: dict[str, Any] = {"request_id": context.aws_request_id, "pid": os.getpid()}
    if op == "query":
        async with pool.acquire() as conn:
            # Keep this worker busy a while (managed instances: the next event goes elsewhere).
            await asyncio.sleep(float(event.get("hold", 0)))
            result["backend_pid"] = await conn.fetchval("SELECT pg_backend_pid()")
            result["greeting"] = await conn.fetchval("SELECT 'Hello, ' || $1::text", "Ada")
        if os.environ.get("TEST_SECOND_POOL"):
            await second.open(wait=False)
            result["second"] = await second.fetchval("SELECT 2")
    elif op == "raise":
        async with pool.acquire() as conn:
            await conn.fetchval("SELECT 1")
            raise HandlerFailedError("the handler failed after its query")
    elif op == "leak":
        conn = await pool.acquire()
        await conn.fetchval("SELECT 1")
        kept.append(conn)
    elif op == "sleep":
        await asyncio.sleep(float(event["seconds"]))
    elif op == "write_then_stall":
        # A write, then a statement still running on the server when the deadline comes.
        async with pool.transaction() as conn:
            await conn.execute(f"INSERT INTO {event['table']} VALUES ('written')")
            await conn.execute(f"SELECT pg_sleep(30) /* {event['tag']} */")
    elif op == "stall":
        # A statement still running on the server when the environment is shut down.
        async with pool.acquire() as conn:
            await conn.execute(f"SELECT pg_sleep(30) /* {event['tag']} */")
    elif op == "background":
        # Started, not awaited: still running when the handler returns.
        task = _later(float(event.get("after", 0)), float(event.get("hold", 0)))
        background.append(asyncio.create_task(task, name="fire-and-forget"))
    elif op in _MORE_OPS:
        await _MORE_OPS[op](event, result)
    elif op != "stats":
        raise ValueError(f"unknown op {op!r}")
    result["pool"] = dataclasses.asdict(pool.stats())
    return result


# What INIT imported (the handler module is imported during INIT).
PRELOADED_AT_INIT = "asyncpool.telemetry" in sys.modules and "asyncpool.unnamed.wire" in sys.modules
AWS_SDK_AT_INIT = "aiobotocore.session" in sys.modules
