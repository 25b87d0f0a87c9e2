"""Run async Lambda handlers on one event loop that lives as long as the execution environment.

The Lambda runtime calls handlers synchronously. ``asyncio.run()`` per invocation closes its loop at
the end, and with it every asyncpg connection opened on it, so a module-level pool would reconnect
on every invocation (or fail: a pool is bound to the loop it was opened on). A `LambdaRunner`
keeps one loop and runs each invocation on it::

    pool = asyncpool.Pool(config=lambda_config(function_timeout=10))

    @async_handler
    async def handler(event, context):
        async with pool.acquire() as conn:
            return {"statusCode": 200, "body": str(await conn.fetchval("SELECT 1"))}

Between invocations the loop does not run (Lambda freezes the environment anyway), so pool
timers wait too. A frozen environment's monotonic clock is not known to advance (nor across a
SnapStart restore), so the runner does not ask it whether a pause happened: every invocation
first lets the loop read what arrived meanwhile (a connection the pooler closed shows up as
closed, and is replaced without a round trip), then marks the pools it serves stale
(`LambdaRunner.attach`), so each connection gets one ``SELECT 1`` before its first use in the
invocation.

Each invocation is cancelled `timeout_margin` seconds before the Lambda deadline
(``context.get_remaining_time_in_millis()``) and raises `HandlerTimeoutError`: held connections are
rolled back and returned, rather than frozen mid-transaction when Lambda stops the environment
(`asyncpool.integrations.lambda_deadline`, which FastAPI's `LambdaDeadline` uses too).
"""

from __future__ import annotations

import asyncio
import functools
import os
import threading
import weakref
from collections.abc import Awaitable, Callable, Coroutine
from typing import TYPE_CHECKING, Any, TypeVar, overload

from asyncpool.integrations.invocation import ColdStart, invocation_scope
from asyncpool.integrations.lambda_deadline import (
    TIMEOUT_MARGIN,
    HandlerTimeoutError,
    checked_margin,
    invocation_deadline,
    settle_timeout,
    usable_margin,
)

if TYPE_CHECKING:
    from asyncpool.pool import Pool

# Where these were defined before asyncpool.integrations.lambda_deadline: still importable here.
__all__ = [
    "TIMEOUT_MARGIN",
    "AsyncHandler",
    "HandlerTimeoutError",
    "LambdaRunner",
    "SyncHandler",
    "async_handler",
    "checked_margin",
    "get_runner",
    "invocation_deadline",
    "settle_timeout",
    "usable_margin",
]

T = TypeVar("T")
P = TypeVar("P", bound="Pool")
# The handler's own event and context types, kept through the decorators (not widened to Any).
E = TypeVar("E")
C = TypeVar("C")

# Loop turns given at the start of an invocation to the I/O that arrived while the environment
# was frozen: one to poll the sockets, one to run the read callbacks, one for the connection-lost
# callbacks they schedule.
_SETTLE_TURNS = 3

AsyncHandler = Callable[[E, C], Awaitable[T]]
SyncHandler = Callable[[E, C], T]


class LambdaRunner:
    """One event loop for the life of a Lambda execution environment.

    `run` many coroutines on it, one at a time, from one thread (the runtime's). `timeout_margin`
    is how long before the Lambda deadline an invocation is cancelled (default 0.5 s).
    """

    def __init__(self, *, timeout_margin: float = TIMEOUT_MARGIN,
                 debug: bool | None = None) -> None:
        self.timeout_margin: float = checked_margin(timeout_margin)
        self._debug = debug
        self._runner = asyncio.Runner(debug=debug)
        self._pid = os.getpid()
        self._cold_start = ColdStart()
        # Attached pools: whether each gets the invocation-boundary check.
        self._pools: weakref.WeakKeyDictionary[Pool, bool] = weakref.WeakKeyDictionary()

    def attach(self, pool: P, *, check_each_invocation: bool = True) -> P:
        """Check `pool`'s connections at the start of every invocation; returns `pool`.

        An environment may have been frozen (or snapshotted and restored) since the last
        invocation without its clock showing it, while the pooler closed the connection. So every
        invocation first lets the loop read what arrived during the pause (a closed connection is
        then replaced without a round trip) and marks the pool stale (`Pool.mark_stale`): each
        idle connection gets one ``SELECT 1`` before its first use in the invocation.
        `pooled_connection` attaches its pool.

        ``check_each_invocation=False`` keeps the free part (reading what arrived) and drops the
        round trip: the clock alone (``validate_after``) then decides, which saves about a
        millisecond per warm invocation but trusts the clock across a freeze or a restore.

        With Lambda SnapStart (``snapshot_restore_py`` importable) it also registers the pool's
        before-snapshot and after-restore hooks (`register_snapstart_hooks`). Called during INIT,
        it imports what the pool needs when it opens (`preload_for_open`), so the first
        invocation does not.
        """
        if pool not in self._pools:
            from asyncpool.integrations.aws_lambda import preload_for_open, register_snapstart_hooks

            register_snapstart_hooks(pool, self.loop)
            preload_for_open(pool.config)
        self._pools[pool] = check_each_invocation
        return pool

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        """The runner's loop (made on first use)."""
        return self._own().get_loop()

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        """Run `coro` to completion on the runner's loop."""
        if asyncio._get_running_loop() is not None:
            coro.close()  # (not run: no "never awaited" warning on top of the error)
            raise _called_from_a_loop()
        return self._own().run(coro)

    def invoke(self, call: Callable[[], Awaitable[T]], context: Any) -> T:
        """Serve one invocation: await ``call()`` within the invocation's scope and time budget."""
        if asyncio._get_running_loop() is not None:
            raise _called_from_a_loop()
        return self._own().run(self._serve(call, context))

    def _own(self) -> asyncio.Runner:
        """This process's runner. A forked child (a Lambda managed-instance worker) gets a loop
        of its own: the inherited one's epoll set and self-pipe are shared with the parent, so
        it is left alone, not even closed. Pools opened on it refuse use in the child."""
        if os.getpid() != self._pid:
            self._runner = asyncio.Runner(debug=self._debug)
            self._pid = os.getpid()
            self._cold_start = ColdStart()
        return self._runner

    async def _serve(self, call: Callable[[], Awaitable[T]], context: Any) -> T:
        with invocation_scope(context, self._cold_start) as invocation:
            await self._after_pause()
            async with invocation_deadline(context, self.timeout_margin, invocation.request_id):
                return await call()

    async def _after_pause(self) -> None:
        """What the environment missed while it was not running: read it, and distrust the rest."""
        for _ in range(_SETTLE_TURNS):
            await asyncio.sleep(0)
        for pool, check in list(self._pools.items()):
            if check:
                pool.mark_stale()

    def close(self) -> None:
        """Cancel what is left on the loop and close it (the environment is going away)."""
        self._own().close()

    def __enter__(self) -> LambdaRunner:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _called_from_a_loop() -> RuntimeError:
    # asyncio.Runner's own words ("Runner.run() cannot be called from a running event loop")
    # name neither the handler nor what to do; the usual cause is an async test calling it.
    return RuntimeError(
        "a Lambda handler made by asyncpool (async_handler, pooled_connection) or "
        "LambdaRunner.run() was called from code that is running an event loop (an async test, "
        "or one handler calling another): it is synchronous, as Lambda calls it, and runs the "
        "coroutine on the runner's own loop. Call it from synchronous code (a plain def test), "
        "or from a thread of its own (one ThreadPoolExecutor(1) for the environment's life, "
        "with loop.run_in_executor)")


_default: list[LambdaRunner] = []
_default_lock = threading.Lock()


def get_runner() -> LambdaRunner:
    """The process's runner, made on first use: the one `async_handler` uses by default."""
    with _default_lock:
        if not _default:
            _default.append(LambdaRunner())
        return _default[0]


@overload
def async_handler(
    func: AsyncHandler[E, C, T], *, runner: LambdaRunner | None = None
) -> SyncHandler[E, C, T]:
    ...


@overload
def async_handler(
    func: None = None, *, runner: LambdaRunner | None = None
) -> Callable[[AsyncHandler[E, C, T]], SyncHandler[E, C, T]]:
    ...


def async_handler(
    func: AsyncHandler[E, C, T] | None = None, *, runner: LambdaRunner | None = None
) -> SyncHandler[E, C, T] | Callable[[AsyncHandler[E, C, T]], SyncHandler[E, C, T]]:
    """Turn ``async def handler(event, context)`` into the synchronous handler Lambda calls.

    Every invocation runs on `runner` (default: `get_runner()`), so pools opened by one invocation
    serve the next ones.
    """

    def wrap(handler: AsyncHandler[E, C, T]) -> SyncHandler[E, C, T]:
        @functools.wraps(handler)
        def sync_handler(event: E, context: C) -> T:
            return (runner or get_runner()).invoke(lambda: handler(event, context), context)

        return sync_handler

    return wrap if func is None else wrap(func)
