"""A Lambda function with two pools, each given to `close_on_shutdown`, for the shutdown tests.

Run by ``python -m awslambdaric two_pools.handler`` (asyncpool.testing.lambda_runtime) with
ASYNCPOOL_DSN set; TEST_SHUTDOWN_BUDGET is `close_on_shutdown`'s budget. TEST_LOOPS says where
the pools' loop runs:

- unset: `get_runner()`'s, run by the handler on the runtime's main thread (SIGTERM is then
  handled on top of it);
- ``thread``: one loop on a thread of its own, which a synchronous handler hands each invocation
  (SIGTERM then closes the pools through that loop);
- ``per-pool``: each pool on a loop and thread of its own (one loop per worker thread, say).

The ``stall`` op runs ``pg_sleep(30)`` on both pools at once, tagged ``<tag>-0`` and ``<tag>-1``;
``stall-blocked`` then blocks the loop running them in synchronous code (``time.sleep``), as a
CPU-bound handler or a blocking client library would.
"""

from __future__ import annotations

import asyncio
import os
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

from asyncpool import Pool
from asyncpool.integrations.aws_lambda import close_on_shutdown, lambda_config
from asyncpool.integrations.lambda_runner import async_handler, get_runner

#: Written to stderr once the ``stall-blocked`` op has blocked a loop.
BLOCKED = "loop blocked"

pools = [Pool(config=lambda_config(function_timeout=10, name=f"pool-{i}")) for i in range(2)]


async def serve(event: dict[str, Any], mine: list[int]) -> list[int]:
    """`event` on the pools numbered `mine` (those of the running loop); their backends' pids."""
    for i in mine:
        await pools[i].open(wait=False)
    if event.get("op", "").startswith("stall"):
        stalls = [asyncio.ensure_future(pools[i].execute(f"SELECT pg_sleep(30) /* {event['tag']}-{i} */"))
                  for i in mine]
        if event["op"] == "stall-blocked":
            await asyncio.sleep(0.2)  # the statements sent
            print(BLOCKED, file=sys.stderr, flush=True)
            time.sleep(30)  # noqa: ASYNC251 - the loop blocked, as by a CPU-bound handler
        await asyncio.gather(*stalls)
    return [await pools[i].fetchval("SELECT pg_backend_pid()") for i in mine]


async def _on_runner(event: dict[str, Any], context: Any) -> dict[str, Any]:
    return {"pid": os.getpid(), "backends": await serve(event, [0, 1])}


def _on_loop_threads(event: dict[str, Any], context: Any) -> dict[str, Any]:
    futures = [asyncio.run_coroutine_threadsafe(serve(event, mine), loop) for loop, mine in loops]
    return {"pid": os.getpid(), "backends": [pid for future in futures for pid in future.result()]}


def _loop_thread(name: str) -> asyncio.AbstractEventLoop:
    loop = asyncio.new_event_loop()
    threading.Thread(target=loop.run_forever, name=name, daemon=True).start()
    return loop


# (Each loop, and the numbers of the pools it runs.)
loops: list[tuple[asyncio.AbstractEventLoop, list[int]]]
handler: Callable[[dict[str, Any], Any], dict[str, Any]]
where = os.environ.get("TEST_LOOPS")
if where == "thread":
    loops = [(_loop_thread("pools-loop"), [0, 1])]
    handler = _on_loop_threads
elif where == "per-pool":
    loops = [(_loop_thread(f"pool-{i}-loop"), [i]) for i in range(2)]
    handler = _on_loop_threads
else:
    loops = [(get_runner().loop, [0, 1])]
    handler = async_handler(_on_runner)


for loop, mine in loops:
    for i in mine:
        close_on_shutdown(pools[i], loop, budget=float(os.environ.get("TEST_SHUTDOWN_BUDGET", "0.25")))
