"""Fit a pool to one Lambda execution environment: its sizing defaults and its close at shutdown."""

from __future__ import annotations

import _thread
import asyncio
import atexit
import contextlib
import logging
import math
import numbers
import os
import signal
import socket
import sys
import threading
import time
import weakref
from collections.abc import Callable, Mapping
from types import FrameType
from typing import TYPE_CHECKING, Any, Unpack

from asyncpool.config import DefaultTimeout, PoolConfig, as_number, env_value
from asyncpool.connect.connector import close_failure
from asyncpool.credentials.provider import Preloads
from asyncpool.errors import PoolConfigError, config_errors_without_frames
from asyncpool.integrations.lambda_workers import sigterm_when_parent_ends
from asyncpool.options import PoolOptions, translate
from asyncpool.pool import shutdown
from asyncpool.pool.snapshot import empty_for_snapshot, resume_after_restore

if TYPE_CHECKING:
    from asyncpool.pool import Pool

logger: logging.Logger = logging.getLogger("asyncpool.integrations.aws_lambda")

# Lambda gives the runtime 300-500 ms between SIGTERM and the end of the environment when an
# extension is registered (none at all without one): closing must fit well inside that.
SHUTDOWN_BUDGET = 0.25
# After closing, how long the watcher thread leaves the main thread to take the signal itself
# (when it is not stuck in the runtime client's C call) before ending the process on its own.
MAIN_THREAD_GRACE = 0.05


def running_on_lambda(environ: Mapping[str, str] | None = None) -> bool:
    """True inside a Lambda execution environment (or an emulator that sets its variables)."""
    env = os.environ if environ is None else environ
    return bool(env.get("AWS_LAMBDA_FUNCTION_NAME"))


class LambdaOptions(PoolOptions, total=False):
    """`lambda_config()`'s keyword options: `Pool()`'s, and the DSN."""

    dsn: str | None


@config_errors_without_frames
def lambda_config(
    *,
    function_timeout: float | None = None,
    environ: Mapping[str, str] | None = None,
    **overrides: Unpack[LambdaOptions],
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

    `overrides` are `Pool()`'s keyword options (asyncpg's names too) and ``dsn``. Precedence:
    `overrides`, then ``ASYNCPOOL_*`` environment variables, then these defaults.

    Made at module level (the INIT phase), it also imports what the pool will need when it
    opens in the first invocation (OpenTelemetry, the statement mode): `preload_for_open`.
    """
    defaults: dict[str, Any] = {
        "min_size": 1,
        "max_size": 1,
        "acquire_timeout": 5.0,
        "connect_timeout": DefaultTimeout(5.0),  # a DSN's ?connect_timeout= wins over it
        "validate_after": 0.5,
    }
    if function_timeout is not None:
        if isinstance(function_timeout, bool) or not isinstance(function_timeout, numbers.Real):
            raise PoolConfigError(
                f"function_timeout={function_timeout!r}: must be a number of seconds, your "
                "function's configured timeout")
        # (NaN passed a `<= 0` check, and the error named leak_timeout, which the caller did
        # not give; infinity is no function's timeout either: leak_timeout=None says "none".)
        seconds = as_number(function_timeout)  # (an int past a float's range: infinity)
        if seconds is None or not 0 < seconds < math.inf:
            raise PoolConfigError(f"function_timeout={function_timeout!r}: must be a finite "
                                  "number of seconds > 0, your function's configured timeout")
        defaults["leak_timeout"] = seconds
        defaults["acquire_timeout"] = min(5.0, seconds / 2)
    env = os.environ if environ is None else environ
    defaults = {k: v for k, v in defaults.items() if env_value(env, k) is None}
    config = PoolConfig.from_env(env, **{**defaults, **_options(overrides)})
    preload_for_open(config)
    return config


def _options(overrides: Mapping[str, Any]) -> dict[str, Any]:
    """`lambda_config()`'s keywords as `PoolConfig` fields: `Pool()`'s options, and the DSN."""
    values = translate({k: v for k, v in overrides.items() if k != "dsn"}, "lambda_config()")
    if "dsn" in overrides:
        values["dsn"] = overrides["dsn"]
    return values


def preload_for_open(config: PoolConfig) -> None:
    """Import now what a pool with `config` imports when it opens and connects.

    A Lambda pool opens in the first invocation, which would pay for those imports: its
    OpenTelemetry instrumentation (``telemetry=True``; measured, 24 ms of a first invocation that
    took 7 ms without it) and the one-round-trip statement mode (``prepared_statements="unnamed"``,
    the default; 12-40 ms), and an AWS credentials provider's aiobotocore (`IamAuth`,
    `SecretsManagerAuth`: 240-330 ms; the client itself is still made at the first connection,
    after a SnapStart restore). Called at module level, as pools are made, it moves them into INIT.
    `lambda_config` and `LambdaRunner.attach` call it.
    """
    if isinstance(config.credentials, Preloads):
        # An AWS provider's aiobotocore: 240-330 ms of the first invocation otherwise.
        config.credentials.preload()
    if config.telemetry:
        import asyncpool.telemetry
    if config.prepared_statements == "unnamed":
        import asyncpool.unnamed.connection
        import asyncpool.unnamed.wire  # noqa: F401


def close_on_shutdown(
    pool: Pool, loop: asyncio.AbstractEventLoop, *, budget: float = SHUTDOWN_BUDGET
) -> Callable[[], None]:
    """Close `pool` on SIGTERM and at interpreter exit; returns a function that undoes this.

    A Lambda environment can be destroyed without its sockets ever being closed, which leaves the
    pooler holding the client slot until its idle timeout. Lambda sends SIGTERM first when an
    extension is registered: the pool is then closed on `loop` (the loop it was opened on), each
    connection saying goodbye to the pooler, within `budget` seconds, and the process ends as
    SIGTERM would have ended it (or the signal goes on to the handler installed before).

    The Lambda runtime client waits for the next event inside a C call on the main thread unless
    ``AWS_EXECUTION_ENV`` is ``AWS_Lambda_python3.12`` or later, and Python runs signal handlers
    only on the main thread, between bytecodes: a plain handler would keep the process alive until
    Lambda's SIGKILL. So the signal is also taken from a wakeup file descriptor
    (`signal.set_wakeup_fd`) by a thread of ours, which closes the pool and ends the process
    (status 143, 128 + SIGTERM) whatever the main thread is doing.

    Several pools given to `close_on_shutdown` are closed together within one budget (the largest
    of theirs, counted from the signal), their running statements cancelled at once, the pools
    of different loops at the same time; held connections get a quarter of it to come back
    before that. A loop blocked in synchronous code on another thread has its held connections'
    statements cancelled from ours.

    The SIGTERM hooks are installed only from the main thread (Python's rule); the exit hook
    always. In a process forked from this one the hooks never touch the inherited sockets.
    """
    # Checked here: inside the SIGTERM handler a bad budget would raise instead of closing.
    if not 0 <= budget < math.inf:
        raise ValueError(f"budget={budget!r}: must be a finite number of seconds >= 0")
    return _shutdown.add(_PoolHook(pool, loop, budget))


class _PoolHook:
    """One pool to close at shutdown, on its loop, once."""

    def __init__(self, pool: Pool, loop: asyncio.AbstractEventLoop, budget: float) -> None:
        # Weakly: a hook must not keep a pool (and so its loop) alive once nobody else does.
        self._pool = weakref.ref(pool)
        self.loop = loop
        self.budget = budget
        self.pid = os.getpid()
        self._lock = threading.RLock()  # (reentrant: as `_Shutdown._closing`)
        self._started = False
        self.finished = threading.Event()

    @property
    def pool(self) -> Pool | None:
        """The pool, unless collected, or inherited across a fork (its sockets are the parent's:
        saying goodbye on them would end the parent's sessions)."""
        return self._pool() if os.getpid() == self.pid else None

    def spent(self) -> bool:
        """Nothing left to close: the pool was closed, or collected (which terminated it). One
        being closed is not: its close() may wait for statements a shutdown must cancel."""
        pool = self._pool()
        return pool is None or not shutdown.unfinished(pool)

    def claim(self) -> bool:
        """True for the first caller only: it closes the pool, and sets `finished` when done."""
        with self._lock:
            first = not self._started
            self._started = True
        return first


class _Shutdown:
    """The process's SIGTERM handling, one for every pool given to `close_on_shutdown`.

    One Python-level handler and one watcher thread, whoever hears the signal first closes the
    pools (two threads must not run one loop), then the signal goes on. The pools are closed
    together within one budget, the largest of theirs, counted from when the shutdown began:
    closed one after the other, N pools took N budgets and overran Lambda's shutdown window.
    """

    def __init__(self) -> None:
        self.hooks: list[_PoolHook] = []
        self.pid = os.getpid()
        self.previous: Any = signal.SIG_DFL
        self.watcher: _SignalWatcher | None = None
        self.installed = False
        self.signal_users = 0  # hooks added from the main thread
        # Reentrant: the exit hook holds it on the main thread while it closes, and a SIGTERM then
        # runs our handler on that thread, inside it (a plain lock hung the process for good).
        self._closing = threading.RLock()
        # Set when the Python-level handler runs: the main thread then passes the signal on.
        self.main_thread_took_it = threading.Event()
        # When the shutdown under way began (time.monotonic()), and how many closes of it are
        # running: it ends with the last of them, and the next one (a SIGTERM the process
        # outlived, then the exit hook) gets a budget of its own.
        self.began: float | None = None
        self._closes = 0
        self._began_lock = threading.RLock()  # (reentrant: as `_closing`)

    def add(self, hook: _PoolHook) -> Callable[[], None]:
        # Hooks of pools closed or collected since are dropped here, so a process that makes
        # pool after pool (one per tenant, per asyncio.run, per test) keeps only the live ones.
        for spent in [h for h in self.hooks if h.spent()]:
            self.hooks.remove(spent)
        # Registered again with each pool (atexit runs the latest first): the pools close before
        # any exit handler registered before the newest of them, as when each had its own.
        atexit.unregister(self.close_all)
        atexit.register(self.close_all)
        self.hooks.append(hook)
        # Signal handlers can only be set from the main thread; a hook added elsewhere is still
        # closed on SIGTERM when one added from the main thread installed them.
        wants_signal = threading.current_thread() is threading.main_thread()
        if wants_signal:
            self.signal_users += 1
            self.install()

        def undo() -> None:
            with contextlib.suppress(ValueError):
                self.hooks.remove(hook)
            if wants_signal:
                self.signal_users -= 1
                if self.signal_users == 0:
                    self.uninstall()

        return undo

    def install(self) -> None:
        """Our handler and watcher, unless in place (again, if someone replaced the handler)."""
        current = signal.getsignal(signal.SIGTERM)
        if current != self.on_sigterm:
            if not self.installed:
                self.previous = current
            elif current is not None:
                self.previous = current  # theirs, set over ours: chained behind ours now
            signal.signal(signal.SIGTERM, self.on_sigterm)
        if self.watcher is None:
            self.watcher = _SignalWatcher.start(self.on_sigterm_elsewhere)
        self.installed = True
        # A managed-instance worker hears no SIGTERM sent to the runtime's process: it gets one
        # of its own when that process ends.
        sigterm_when_parent_ends()

    def uninstall(self) -> None:
        if not self.installed:
            return
        if self.watcher is not None:
            self.watcher.stop()
            self.watcher = None
        # Only if nobody installed a handler of their own since.
        if signal.getsignal(signal.SIGTERM) == self.on_sigterm:
            signal.signal(signal.SIGTERM, self.previous)
        self.installed = False

    def close_hooks(self, hooks: list[_PoolHook]) -> None:
        """Close `hooks`' pools within one budget, the largest of theirs, counted from when the
        shutdown under way began (whoever heard of it first: the handler, the watcher, the exit
        hook), or from now if none is."""
        with self._began_lock:
            if self.began is None:
                self.began = time.monotonic()
            self._closes += 1
            began = self.began
        try:
            _close_hooks(hooks, began + max((hook.budget for hook in hooks), default=0.0))
        finally:
            with self._began_lock:
                self._closes -= 1
                if self._closes == 0:
                    self.began = None

    def close_all(self) -> None:
        if os.getpid() != self.pid:
            return
        with self._closing:
            self.close_hooks(list(self.hooks))

    def on_sigterm(self, signum: int, frame: FrameType | None) -> None:
        """The Python-level handler: runs on the main thread, whenever it gets to run bytecode."""
        self.main_thread_took_it.set()
        if os.getpid() == self.pid:
            if _running_loop() is not None:
                # On top of a running loop the watcher may be closing on (and so waiting for):
                # do not queue behind it.
                self.close_hooks(list(self.hooks))
            else:
                self.close_all()
        _pass_on(signum, frame, self.previous)

    def on_sigterm_elsewhere(self) -> None:
        """SIGTERM seen by the watcher thread: the main thread may be stuck in C for good."""
        if os.getpid() != self.pid:
            return
        self.close_all()
        if self.main_thread_took_it.wait(MAIN_THREAD_GRACE):
            return  # it passes the signal on, as without us
        previous = self.previous
        if previous is signal.SIG_IGN:
            return
        if callable(previous):
            # Handlers expect the main thread: ask for ours to run there (it passes the signal on).
            _thread.interrupt_main(signal.SIGTERM)
            return
        # The default action: end now, as SIGTERM would (no cleanup), even if the main thread never
        # returns from the runtime client's C call. The disposition cannot be reset from here.
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(Exception):
                stream.flush()
        os._exit(128 + signal.SIGTERM)

    def forked(self) -> None:
        """In a forked child: the pools are the parent's, and so is the watcher's socket pair (a
        signal written there would reach the parent's watcher). Give the child back the SIGTERM
        handling it had before us; its own pools install their own hooks."""
        self.hooks = []
        self.began = None
        self._closes = 0
        self._began_lock = threading.RLock()
        self.watcher = None  # its thread did not survive the fork
        self.pid = os.getpid()
        self.signal_users = 0
        self.main_thread_took_it = threading.Event()
        self._closing = threading.RLock()  # a parent's thread may have held it at the fork
        if not self.installed:
            return
        self.installed = False
        with contextlib.suppress(ValueError, OSError):
            # Whatever the wakeup fd is, it was the parent's (ours or a loop's): shared, so not
            # the child's to write to.
            signal.set_wakeup_fd(-1)
            if signal.getsignal(signal.SIGTERM) == self.on_sigterm:
                signal.signal(signal.SIGTERM, self.previous)


_shutdown = _Shutdown()

if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_shutdown.forked)


class _SignalWatcher:
    """A daemon thread reading the signal numbers Python's C-level handler writes to the wakeup fd.

    That write happens as the signal arrives, in whatever thread the kernel picked, even while
    the main thread is inside a C call that retries on EINTR. Bytes are passed on to a wakeup fd
    that was set before (an event loop's), so its owner still hears of its signals.
    """

    def __init__(self, on_sigterm: Callable[[], None]) -> None:
        self._on_sigterm = on_sigterm
        self._read, self._write = socket.socketpair()
        self._write.setblocking(False)
        self._previous_fd = -1
        self._stopped = False
        self._thread = threading.Thread(target=self._run, name="asyncpool-sigterm", daemon=True)

    @classmethod
    def start(cls, on_sigterm: Callable[[], None]) -> _SignalWatcher | None:
        watcher = cls(on_sigterm)
        try:
            watcher._previous_fd = signal.set_wakeup_fd(
                watcher._write.fileno(), warn_on_full_buffer=False
            )
        except (ValueError, OSError):
            watcher._close_sockets()
            return None
        watcher._thread.start()
        return watcher

    def _run(self) -> None:
        while True:
            try:
                data = self._read.recv(512)
            except OSError:
                return
            if not data or self._stopped:
                return
            if self._previous_fd >= 0:
                with contextlib.suppress(OSError):
                    os.write(self._previous_fd, data)
            if signal.SIGTERM in data:
                try:
                    self._on_sigterm()
                except Exception:
                    logger.exception("closing the pool on SIGTERM failed")

    def stop(self) -> None:
        """Give the wakeup fd back (if it is still ours) and end the thread."""
        self._stopped = True
        with contextlib.suppress(ValueError, OSError):
            current = signal.set_wakeup_fd(-1)
            # Someone else's since ours: leave theirs in place.
            signal.set_wakeup_fd(self._previous_fd if current == self._write.fileno() else current)
        with contextlib.suppress(OSError):
            self._write.send(b"\0")
        self._thread.join(1.0)
        self._close_sockets()

    def _close_sockets(self) -> None:
        self._read.close()
        self._write.close()


# Lambda gives SnapStart's before-snapshot and after-restore hooks 10 s together.
SNAPSHOT_BUDGET = 2.0


def register_snapstart_hooks(
    pool: Pool, loop: asyncio.AbstractEventLoop, *, environ: Mapping[str, str] | None = None
) -> bool:
    """Prepare `pool` for Lambda SnapStart when ``snapshot_restore_py`` is importable.

    Before the snapshot: every connection is closed (a Terminate message to the pooler; one
    still held is closed under its holder, with a WARNING naming where it was taken), logins
    under way are stopped (a caller's logs in again after the restore), and the credentials
    provider drops what must not be cloned into many environments (its AWS client session, a
    cached secret); both come back on first use. An acquire still under way (in line, or
    logging in) goes on after the restore, its ``acquire_timeout`` counted again, whole, from
    there: the snapshot may be restored hours later. After a restore: the pool is marked stale,
    so anything opened since is checked before use whatever the clock says. Both run on `loop`,
    the loop the pool was opened on (`get_runner().loop`), which is idle during INIT.

    Returns False (and registers nothing) when ``snapshot_restore_py`` (installed with the Lambda
    Python runtimes and ``awslambdaric``) is missing, or when the environment is not being
    initialised for SnapStart (``AWS_LAMBDA_INITIALIZATION_TYPE`` is not ``snap-start``), where the
    hooks would never run. `LambdaRunner.attach` calls it.
    """
    env = os.environ if environ is None else environ
    if env.get("AWS_LAMBDA_INITIALIZATION_TYPE") != "snap-start":
        return False
    try:
        from snapshot_restore_py import register_after_restore, register_before_snapshot
    except ImportError:
        return False
    register_before_snapshot(_before_snapshot, pool, loop)
    register_after_restore(_after_restore, pool, loop)
    return True


def _before_snapshot(pool: Pool, loop: asyncio.AbstractEventLoop) -> None:
    if pool.closed or loop.is_closed() or loop.is_running():
        return
    loop.run_until_complete(_prepare_snapshot(pool))


async def _prepare_snapshot(pool: Pool) -> None:
    # (Its own state, as asyncpool.integrations.sqlalchemy reaches it: no public method for it.)
    await empty_for_snapshot(pool._slots, SNAPSHOT_BUDGET)
    credentials = pool.config.credentials
    if credentials is not None:
        try:
            async with asyncio.timeout(SNAPSHOT_BUDGET):
                await credentials.close()
        except Exception as exc:
            logger.warning("pool %r: before a snapshot, %s; ignored", pool.name,
                           close_failure(credentials, exc))
    logger.info("pool %r: connections closed for the snapshot (%d left)", pool.name, pool.stats().size)


def _after_restore(pool: Pool, loop: asyncio.AbstractEventLoop) -> None:
    if not pool.closed:
        pool.mark_stale()
    if not loop.is_closed():
        # First thing the loop runs when it runs again: the timers stopped at the snapshot
        # start again from then (the loop is idle here, in the runtime's thread).
        loop.call_soon_threadsafe(resume_after_restore, pool._slots)


def _close_hooks(hooks: list[_PoolHook], deadline: float) -> None:
    """Close the pools of `hooks` by `deadline` (``time.monotonic()``): those on one loop
    together, and the loops at the same time, each but this thread's own from a thread of its
    own (one after the other, N loops took N times as long and the last ones ran out of time)."""
    by_loop: dict[int, list[_PoolHook]] = {}
    for hook in hooks:
        by_loop.setdefault(id(hook.loop), []).append(hook)
    groups = list(by_loop.values())
    # This thread takes the group of the loop it runs (a signal handler on top of it: no other
    # thread may touch that loop), or else the last one.
    here = next((group for group in groups if group[0].loop is _running_loop()),
                groups[-1] if groups else [])
    threads = [threading.Thread(target=_close_group_logged, args=(group, deadline), daemon=True,
                                name="asyncpool-shutdown") for group in groups if group is not here]
    for thread in threads:
        thread.start()
    if here:
        _close_group(here, deadline)
    for thread in threads:
        thread.join(shutdown.time_left(deadline) + 1.0)


def _close_group_logged(hooks: list[_PoolHook], deadline: float) -> None:
    try:
        _close_group(hooks, deadline)
    except Exception:
        logger.exception("pools %s: closing at shutdown failed", _names(_unfinished(hooks)))


def _close_group(hooks: list[_PoolHook], deadline: float) -> None:
    """Close the pools of `hooks`, all on one loop, together by `deadline`. Those another thread
    started closing are waited for, unless this thread runs their loop (a signal handler on top
    of it): nothing it awaits could run, so it terminates them itself."""
    loop = hooks[0].loop
    mine = [hook for hook in hooks if hook.claim()]
    try:
        if _running_loop() is loop:
            # SIGTERM landed in the middle of an invocation, on top of the running loop: nothing
            # can be awaited here, and no task of the loop will run again. Cancel the running
            # statements from here (the server would run them on), all pools' requests at once,
            # then drop the connections; the sockets close as the process ends.
            pools = _unfinished(hooks)
            try:
                shutdown.terminate_together(pools, deadline)
            except Exception:
                logger.exception("pools %s: terminating at shutdown failed", _names(pools))
            return
        _close_pools(_unfinished(mine), loop, deadline)
        for hook in hooks:
            if hook not in mine:
                hook.finished.wait(shutdown.time_left(deadline) + 1.0)
    finally:
        for hook in mine:
            hook.finished.set()


def _close_pools(pools: list[Pool], loop: asyncio.AbstractEventLoop, deadline: float) -> None:
    """Close `pools` on `loop`, not running in this thread, together by `deadline`."""
    if not pools or loop.is_closed():
        return
    if loop.is_running():
        # An invocation is running on another thread: close on its loop, within the budget (or,
        # the loop blocked, cancel what the held connections run from here).
        shutdown.close_elsewhere(pools, loop, deadline)
        return
    try:
        loop.run_until_complete(shutdown.close_together(pools, deadline))
    except Exception:
        logger.exception("pools %s: closing at shutdown failed", _names(pools))


def _unfinished(hooks: list[_PoolHook]) -> list[Pool]:
    """The pools of `hooks` still to close (not collected, not inherited, not closed)."""
    return [pool for hook in hooks if (pool := hook.pool) is not None and shutdown.unfinished(pool)]


def _names(pools: list[Pool]) -> str:
    return ", ".join(repr(pool.name) for pool in pools)


def _running_loop() -> asyncio.AbstractEventLoop | None:
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None


def _pass_on(signum: int, frame: FrameType | None, previous: Any) -> None:
    """Give the signal to whoever handled it before us, or to the default action."""
    if callable(previous):
        previous(signum, frame)
    elif previous in (signal.SIG_DFL, None):
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)
