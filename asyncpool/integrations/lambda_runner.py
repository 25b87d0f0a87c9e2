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
rolled back and returned, rather than frozen mid-transaction when Lambda stops the environment.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import math
import os
import threading
import weakref
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from typing import TYPE_CHECKING, Any, TypeVar, overload

from asyncpool.integrations.invocation import ColdStart, invocation_scope
from asyncpool.pool.alarms import Deadline
from asyncpool.pool.forks import pools_on_loop
from asyncpool.pool.resets import RELEASE_TIMEOUT, RESETS_END, ResetsEnd, settle_loop
from asyncpool.pool.stragglers import free_stragglers

if TYPE_CHECKING:
    from asyncpool.pool import Pool

logger: logging.Logger = logging.getLogger("asyncpool.integrations.lambda_runner")

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


class HandlerTimeoutError(TimeoutError):
    """The invocation was cancelled just before the Lambda timeout, so its connections went back."""


#: How long before the Lambda deadline an invocation is cancelled, by default (`LambdaRunner`).
TIMEOUT_MARGIN = 0.5


def checked_margin(margin: float) -> float:
    """`margin` (``timeout_margin``) as seconds, or a clear error: NaN passed a ``< 0`` check
    and cut every invocation short at once, as infinity does."""
    if isinstance(margin, bool) or not isinstance(margin, (int, float)):
        raise TypeError(f"timeout_margin={margin!r}: must be a number of seconds")
    if not 0 <= margin < math.inf:
        raise ValueError(f"timeout_margin={margin!r}: must be a finite number of seconds >= 0")
    return float(margin)


class LambdaRunner:
    """One event loop for the life of a Lambda execution environment.

    `run` many coroutines on it, one at a time, from one thread (the runtime's). `timeout_margin`
    is how long before the Lambda deadline an invocation is cancelled (default 0.5 s).
    """

    def __init__(self, *, timeout_margin: float = TIMEOUT_MARGIN,
                 debug: bool | None = None) -> None:
        self.timeout_margin = checked_margin(timeout_margin)
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
        return self._own().run(coro)

    def invoke(self, call: Callable[[], Awaitable[T]], context: Any) -> T:
        """Serve one invocation: await ``call()`` within the invocation's scope and time budget."""
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


@contextlib.asynccontextmanager
async def invocation_deadline(context: Any, margin: float, request_id: str) -> AsyncIterator[None]:
    """Run the block as a Lambda invocation's work, within its time (`LambdaRunner`, and
    `asyncpool.integrations.fastapi.LambdaDeadline` under Mangum).

    The block is cancelled `margin` seconds before the deadline the Lambda context
    (``get_remaining_time_in_millis()``) gives, and `HandlerTimeoutError` raised; a holder cut
    short resets its connection within half the margin, which leaves the other half for the
    response. On the way out, whatever the outcome: tasks the block started and left holding a
    connection give it back or are cancelled, and resets left running end, so nothing holds
    a connection (or the pooler's server connection) while the environment is frozen. An
    invocation that starts with no more than `margin` left runs with no margin (`usable_margin`).
    """
    task = asyncio.current_task()
    if task is not None:
        # Leak reports name the holder's task: in any log format, this says which invocation
        # took the connection.
        task.set_name(f"lambda-invocation-{request_id}")
    remaining = _remaining_seconds(context)  # (read once: the margin and the budget agree)
    margin = usable_margin(remaining, margin)
    budget = None if remaining is None else max(0.0, remaining - margin)
    # asyncio.timeout(budget), without a timer in the loop's heap during the invocation.
    deadline = Deadline(budget)
    resets_end = ResetsEnd(
        None if budget is None else asyncio.get_running_loop().time() + budget + margin / 2)
    token = RESETS_END.set(resets_end)
    try:
        async with deadline:
            yield
    except TimeoutError as exc:
        if not deadline.expired():
            raise
        raise HandlerTimeoutError(
            f"invocation {request_id} was cancelled {margin:g}s before the Lambda timeout so "
            "its connections could be rolled back and returned; make the handler faster or "
            "raise the function timeout"
        ) from exc
    finally:
        resets_by = resets_end.at
        try:
            await _free_stragglers(context, margin, request_id, resets_end)
        finally:
            resets_end.at = None
            RESETS_END.reset(token)
            # Resets holders left early (an anyio cancel scope does not wait for them) end
            # within what is left of the invocation's time, the margin left for the response;
            # cut short by the deadline, within the half of the margin they were given.
            wait = settle_timeout(context, margin, RELEASE_TIMEOUT)
            if resets_by is not None and deadline.expired():
                wait = max(wait, min(RELEASE_TIMEOUT, resets_by - asyncio.get_running_loop().time()))
            await settle_loop(wait)


async def _free_stragglers(context: Any, margin: float, request_id: str, end: ResetsEnd) -> None:
    """Tasks the invocation started and left holding a connection give it back within what is
    left of its time (at most `RELEASE_TIMEOUT`), or are cancelled, within the time its resets
    have (`free_stragglers`)."""
    give = settle_timeout(context, margin, RELEASE_TIMEOUT)
    bound = give + RELEASE_TIMEOUT
    if end.at is not None:
        bound = min(bound, end.at - asyncio.get_running_loop().time())
    await free_stragglers(pools_on_loop(), request_id, give, bound)


def settle_timeout(context: Any, margin: float, unknown: float) -> float:
    """How long the end of an invocation may wait for resets its holders left running: what is
    left of its time less `margin`, at most `RELEASE_TIMEOUT`; `unknown` if the context (None,
    say) does not tell."""
    left = _time_budget(context, margin)
    return unknown if left is None else min(RELEASE_TIMEOUT, left)


# The processes that have said their margin is too large (a forked worker says it again).
_margin_warned_in: list[int] = []


def usable_margin(remaining: float | None, margin: float) -> float:
    """`margin`, or 0 for an invocation whose whole time when it starts (`remaining` seconds;
    None: the context does not say) is no more than it.

    Invocations start with about the function timeout left, so such a margin is at or above the
    timeout: cutting each invocation short at once would fail every one (a 504 each under
    `LambdaDeadline`), and none could have its work protected anyway. Those invocations run up
    to the Lambda timeout instead, and a WARNING (once per process) says which margin, how much
    time there was, and what to change.
    """
    if margin == 0 or remaining is None or remaining > margin:
        return margin
    if os.getpid() not in _margin_warned_in:
        _margin_warned_in.append(os.getpid())
        logger.warning(
            "timeout_margin=%gs is at or above the %.3gs this invocation had when it started "
            "(about the function timeout): cut that early, every invocation would fail at once, "
            "so invocations that start with no more than the margin run up to the Lambda "
            "timeout, unprotected. Set timeout_margin (LambdaRunner, LambdaDeadline) well below "
            "the function timeout, or raise the timeout. Said once per process.",
            margin, remaining)
    return 0.0


def _time_budget(context: Any, margin: float) -> float | None:
    """Seconds the invocation may still run, or None if the context does not say."""
    seconds = _remaining_seconds(context)
    return None if seconds is None else max(0.0, seconds - margin)


def _remaining_seconds(context: Any) -> float | None:
    """Seconds left before the Lambda deadline, or None if the context does not say."""
    remaining = getattr(context, "get_remaining_time_in_millis", None)
    if remaining is None:
        return None
    millis = remaining()
    try:
        seconds = float(millis) / 1000
    except (TypeError, ValueError):
        seconds = math.nan
    if math.isnan(seconds):
        # (NaN would read as no time left: every invocation cut short at once.)
        raise TypeError(
            f"the Lambda context's get_remaining_time_in_millis() returned {millis!r}: it must "
            "return the milliseconds the invocation has left (in tests, pass a "
            "asyncpool.integrations.invocation.LocalContext)")
    return seconds


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
