"""A Lambda function with two pools, each given to `close_on_shutdown`, for the shutdown tests.

Run by ``python -m awslambdaric two_pools.handler`` (asyncpool.testing.lambda_runtime) with
ASYNCPOOL_DSN set; TEST_SHUTDOWN_BUDGET is `close_on_shutdown`'s budget. By default the pools'
loop is `get_runner()`'s, run by the handler on the runtime's main thread (SIGTERM is then
handled on top of it); with TEST_LOOP_THREAD it runs on a thread of its own and a synchronous
handler hands it each invocation (SIGTERM then closes the pools through that loop). The
``stall`` op runs ``pg_sleep(30)`` on both pools at once, tagged ``<tag>-0`` and ``<tag>-1``.
"""

from __future__ import annotations

import asyncio
import os
import threading
from collections.abc import Callable
from typing import Any

from asyncpool import Pool
from asyncpool.integrations.aws_lambda import close_on_shutdown, lambda_config
from asyncpool.integrations.lambda_runner import async_handler, get_runner

pools = [Pool(config=lambda_config(function_timeout=10, name=f"pool-{i}")) for i in range(2)]


async def serve(event: dict[str, Any]) -> dict[str, Any]:
    for pool in pools:
        await pool.open(wait=False)
    if event.get("op") == "stall":
        await asyncio.gather(*(pool.execute(f"SELECT pg_sleep(30) /* {event['tag']}-{i} */")
                               for i, pool in enumerate(pools)))
    return {"pid": os.getpid(), "backends": [await p.fetchval("SELECT pg_backend_pid()") for p in pools]}


async def _on_runner(event: dict[str, Any], context: Any) -> dict[str, Any]:
    return await serve(event)


def _on_loop_thread(event: dict[str, Any], context: Any) -> dict[str, Any]:
    return asyncio.run_coroutine_threadsafe(serve(event), loop).result()


loop: asyncio.AbstractEventLoop
handler: Callable[[dict[str, Any], Any], dict[str, Any]]
if os.environ.get("TEST_LOOP_THREAD"):
    loop = asyncio.new_event_loop()
    threading.Thread(target=loop.run_forever, name="pools-loop", daemon=True).start()
    handler = _on_loop_thread
else:
    loop = get_runner().loop
    handler = async_handler(_on_runner)


for pool in pools:
    close_on_shutdown(pool, loop, budget=float(os.environ.get("TEST_SHUTDOWN_BUDGET", "0.25")))
