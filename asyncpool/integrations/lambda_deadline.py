"""The time a Lambda invocation has: its work is cancelled a margin before the deadline.

Shared by the two ways asyncpool serves an invocation: `asyncpool.integrations.lambda_runner`'s
`LambdaRunner` (plain handlers, Powertools) and `asyncpool.integrations.fastapi.LambdaDeadline`
(FastAPI under Mangum). Cut short in time, a holder rolls its connection back and returns it,
rather than being frozen mid-transaction when Lambda stops the environment at its timeout.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
from collections.abc import AsyncIterator
from typing import Any

from asyncpool.pool.alarms import Deadline
from asyncpool.pool.forks import pools_on_loop
from asyncpool.pool.resets import RELEASE_TIMEOUT, RESETS_END, ResetsEnd, settle_loop
from asyncpool.pool.stragglers import end_kept_checkouts, end_suspended_blocks, free_stragglers

logger: logging.Logger = logging.getLogger("asyncpool.integrations.lambda_deadline")


class HandlerTimeoutError(TimeoutError):
    """The invocation was cancelled just before the Lambda timeout, so its connections went back."""


#: How long before the Lambda deadline an invocation is cancelled, by default (`LambdaRunner`).
TIMEOUT_MARGIN = 0.5
#: The least time an invocation's end leaves for the response, whatever the margin (half of
#: it, otherwise): with ``timeout_margin=0`` it waited for a task left holding a connection up
#: to the deadline, and Lambda timed out an invocation whose handler had returned.
RESPONSE_RESERVE = 0.1


def checked_margin(margin: float) -> float:
    """`margin` (``timeout_margin``) as seconds, or a clear error: NaN passed a ``< 0`` check
    and cut every invocation short at once, as infinity does."""
    if isinstance(margin, bool) or not isinstance(margin, (int, float)):
        raise TypeError(f"timeout_margin={margin!r}: must be a number of seconds")
    if not 0 <= margin < math.inf:
        raise ValueError(f"timeout_margin={margin!r}: must be a finite number of seconds >= 0")
    return float(margin)


@contextlib.asynccontextmanager
async def invocation_deadline(context: Any, margin: float, request_id: str) -> AsyncIterator[None]:
    """Run the block as a Lambda invocation's work, within its time (`LambdaRunner`, and
    `asyncpool.integrations.fastapi.LambdaDeadline` under Mangum).

    The block is cancelled `margin` seconds before the deadline the Lambda context
    (``get_remaining_time_in_millis()``) gives, and `HandlerTimeoutError` raised; a holder cut
    short resets its connection within half the margin, which leaves the other half for the
    response (`RESPONSE_RESERVE` at least, whatever the margin: with none, the end's waits ran
    to the deadline, and Lambda timed out an invocation whose handler had returned). On the way
    out, whatever the outcome: tasks the block started and left holding a connection give it
    back or are cancelled, and resets left running end, so nothing holds a connection (or the
    pooler's server connection) while the environment is frozen. An invocation that starts
    with no more than `margin` left runs with no margin (`usable_margin`).
    """
    # When it began (the pools' clock): what is taken since, by any task, is the invocation's.
    since = asyncio.get_running_loop().time()
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
        None if remaining is None
        else asyncio.get_running_loop().time() + remaining - max(margin / 2, RESPONSE_RESERVE))
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
            await _free_stragglers(context, margin, request_id, resets_end, since)
        finally:
            resets_end.at = None
            RESETS_END.reset(token)
            # Resets holders left early (an anyio cancel scope does not wait for them) end
            # within what is left of the invocation's time, the margin left for the response;
            # cut short by the deadline, within the half of the margin they were given.
            wait = settle_timeout(context, margin, RELEASE_TIMEOUT)
            if resets_by is not None and deadline.expired():
                wait = max(wait, min(RELEASE_TIMEOUT, resets_by - asyncio.get_running_loop().time()))
            # Connections already retired (a cancel request in flight, a goodbye) keep nothing
            # for the next invocation: the answer waits for them half the margin at most, the
            # time a holder cut short has for its reset.
            await settle_loop(wait, closes_within=margin / 2)


async def _free_stragglers(context: Any, margin: float, request_id: str, end: ResetsEnd,
                           since: float) -> None:
    """Tasks the invocation started and left holding a connection give it back within what is
    left of its time (at most `RELEASE_TIMEOUT`), or are cancelled, within the time its resets
    have (`free_stragglers`); blocks no task runs any more (an async generator kept past the
    invocation) have their connections closed (`end_suspended_blocks`), and so do connections
    taken without ``async with`` since `since` and kept, unless a running task refers to them
    (`end_kept_checkouts`: last, for those of the tasks just cancelled)."""
    end_suspended_blocks(pools_on_loop(), request_id, end, since)
    give = settle_timeout(context, margin, RELEASE_TIMEOUT)
    bound = give + RELEASE_TIMEOUT
    if end.at is not None:
        bound = min(bound, end.at - asyncio.get_running_loop().time())
    await free_stragglers(pools_on_loop(), request_id, give, bound)
    end_kept_checkouts(pools_on_loop(), request_id, end, since)


def settle_timeout(context: Any, margin: float, unknown: float) -> float:
    """How long the end of an invocation may wait for resets its holders left running: what is
    left of its time less `margin` (at least `RESPONSE_RESERVE`), at most `RELEASE_TIMEOUT`;
    `unknown` if the context (None, say) does not tell."""
    left = _time_budget(context, max(margin, RESPONSE_RESERVE))
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
