"""Fit a pool to one Lambda execution environment: its sizing defaults and its close at shutdown."""

from __future__ import annotations

import asyncio
import atexit
import logging
import os
import signal
import threading
from collections.abc import Callable, Mapping
from types import FrameType
from typing import TYPE_CHECKING, Any

from asyncpool.config import ENV_PREFIX, PoolConfig

if TYPE_CHECKING:
    from asyncpool.pool import Pool

logger = logging.getLogger("asyncpool.integrations.aws_lambda")

# Lambda gives the runtime 300-500 ms between SIGTERM and the end of the environment when an
# extension is registered (none at all without one): closing must fit well inside that.
SHUTDOWN_BUDGET = 0.25


def running_on_lambda(environ: Mapping[str, str] | None = None) -> bool:
    """True inside a Lambda execution environment (or an emulator that sets its variables)."""
    env = os.environ if environ is None else environ
    return bool(env.get("AWS_LAMBDA_FUNCTION_NAME"))


def lambda_config(
    *,
    function_timeout: float | None = None,
    environ: Mapping[str, str] | None = None,
    **overrides: Any,
) -> PoolConfig:
    """A `PoolConfig` for a pool that lives in one Lambda execution environment.

    An environment serves one invocation at a time, so one connection is enough
    (``max_size=1``; raise it if a handler runs queries concurrently). It is opened on the first
    invocation and kept (``min_size=1``). Between invocations the environment may be frozen for
    minutes while the pooler drops idle clients, so a connection idle over ``validate_after=0.5``
    is checked before use. ``acquire_timeout`` and ``connect_timeout`` are short (5 s) so a missing
    database fails the invocation rather than running into the Lambda timeout.

    `function_timeout` (seconds) is your function's configured timeout: ``leak_timeout`` becomes
    that, since a connection held longer than an invocation can last was left checked out by an
    earlier one, and ``acquire_timeout`` at most half of it.

    Precedence: `overrides`, then ``ASYNCPOOL_*`` environment variables, then these defaults.
    """
    defaults: dict[str, Any] = {
        "min_size": 1,
        "max_size": 1,
        "acquire_timeout": 5.0,
        "connect_timeout": 5.0,
        "validate_after": 0.5,
    }
    if function_timeout is not None:
        if function_timeout <= 0:
            raise ValueError(f"function_timeout={function_timeout!r}: must be > 0 seconds")
        defaults["leak_timeout"] = float(function_timeout)
        defaults["acquire_timeout"] = min(5.0, function_timeout / 2)
    env = os.environ if environ is None else environ
    defaults = {k: v for k, v in defaults.items() if ENV_PREFIX + k.upper() not in env}
    return PoolConfig.from_env(env, **{**defaults, **overrides})


def close_on_shutdown(
    pool: Pool, loop: asyncio.AbstractEventLoop, *, budget: float = SHUTDOWN_BUDGET
) -> Callable[[], None]:
    """Close `pool` on SIGTERM and at interpreter exit; returns a function that undoes this.

    A Lambda environment can be destroyed without its sockets ever being closed, which leaves the
    pooler holding the client slot until its idle timeout. Lambda sends SIGTERM first when an
    extension is registered: the pool is then closed on `loop` (the loop it was opened on), each
    connection saying goodbye to the pooler, within `budget` seconds, and the signal goes on to
    the previous handler (by default the process ends as SIGTERM would have ended it).

    The SIGTERM handler is installed only from the main thread (Python's rule); the exit hook
    always.
    """
    done = threading.Event()

    def close_now() -> None:
        if done.is_set():
            return
        done.set()
        _close_pool(pool, loop, budget)

    previous: Any = signal.getsignal(signal.SIGTERM)

    def on_sigterm(signum: int, frame: FrameType | None) -> None:
        close_now()
        _pass_on(signum, frame, previous)

    atexit.register(close_now)
    in_main_thread = threading.current_thread() is threading.main_thread()
    if in_main_thread:
        signal.signal(signal.SIGTERM, on_sigterm)

    def undo() -> None:
        atexit.unregister(close_now)
        # Only if nobody installed a handler of their own since.
        if in_main_thread and signal.getsignal(signal.SIGTERM) is on_sigterm:
            signal.signal(signal.SIGTERM, previous)

    return undo


def _close_pool(pool: Pool, loop: asyncio.AbstractEventLoop, budget: float) -> None:
    if pool.closed or loop.is_closed():
        return
    if loop.is_running():
        # SIGTERM landed in the middle of an invocation, on top of the running loop: nothing can
        # be awaited here. Drop the connections; the sockets close as the process ends.
        pool.terminate()
        return

    async def close() -> None:
        try:
            async with asyncio.timeout(budget):
                await pool.close(timeout=budget / 2)
        except TimeoutError:
            pool.terminate()
            await asyncio.sleep(0)  # let the aborted transports close their sockets

    try:
        loop.run_until_complete(close())
    except Exception:
        logger.exception("pool %r: closing at shutdown failed", pool.name)


def _pass_on(signum: int, frame: FrameType | None, previous: Any) -> None:
    """Give the signal to whoever handled it before us, or to the default action."""
    if callable(previous):
        previous(signum, frame)
    elif previous in (signal.SIG_DFL, None):
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)
