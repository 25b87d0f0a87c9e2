"""What the pool tells its watchers. Telemetry and logs watch the pool; they never run it."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from types import TracebackType
from typing import TYPE_CHECKING, Literal

#: A per-checkout hook: `PoolObserver.acquired` or `.released`, given seconds.
Hook = Callable[[float], None]

#: What became of a leaked connection (`LeakReport.action`, the telemetry's ``asyncpool.leak.action``).
LeakOutcome = Literal["reclaim", "log", "dropped"]

if TYPE_CHECKING:
    from asyncpool.connect.dsn import Target
    from asyncpool.stats import PoolStats


@dataclass(frozen=True, slots=True)
class ConnectAttempt:
    """One try at opening a connection, with wall-clock nanosecond times for spans."""

    target: Target
    started_ns: int
    ended_ns: int
    credentials_started_ns: int | None
    credentials_ended_ns: int | None
    #: What went wrong, as the driver or the runtime raised it (None: the attempt succeeded).
    error: BaseException | None = None
    #: The class of the error the pool's caller is given for it: `ConnectError` and its
    #: subclasses for refused logins, `PoolClosedError` when close() stopped the login,
    #: `PoolTimeoutError` when the caller's acquire ran out of time first, `CancelledError`
    #: when the caller itself was cancelled (`abandoned`).
    caller_error: type[BaseException] | None = None
    #: The class of the exception the credentials provider's step raised, or the caller's
    #: error when the login was stopped during the step (a timeout, close()); None: it gave a
    #: password, did not run, or its caller went away (`abandoned`).
    credentials_error: type[BaseException] | None = None

    @property
    def seconds(self) -> float:
        return (self.ended_ns - self.started_ns) / 1e9

    @property
    def abandoned(self) -> bool:
        """Stopped because the caller that waited for it was cancelled (a request whose client
        went away), not by the pool: nothing went wrong with the connection."""
        return (isinstance(self.error, asyncio.CancelledError)
                and self.caller_error in (None, asyncio.CancelledError))


@dataclass(frozen=True, slots=True)
class LeakReport:
    """A connection held past `leak_timeout` (`reclaimed`: the pool took it back, under
    ``leak_action="reclaim"``), or dropped by its holder without being given back (`dropped`:
    found by the garbage collector; the pool has it back, and no holder is left to tell)."""

    pool_name: str
    held_seconds: float
    task_name: str | None
    acquire_site: str
    reclaimed: bool
    target: Target
    dropped: bool = False

    @property
    def action(self) -> LeakOutcome:
        """What became of the connection: the telemetry's ``asyncpool.leak.action``."""
        if self.dropped:
            return "dropped"
        return "reclaim" if self.reclaimed else "log"


class PoolObserver:
    """Base watcher: every hook does nothing, so the pool calls them without checking."""

    def attach(self, pool_name: str, stats: Callable[[], PoolStats]) -> None:
        """Called when the pool opens; `stats()` reads the pool's live numbers. An open() that
        fails (or is cancelled) calls `detach`, and the next open() calls this again."""

    def detach(self) -> None:
        """Called once when the pool has closed, or its open() has failed."""

    def pool_statement(self, purpose: str) -> contextlib.AbstractContextManager[object]:
        """Wraps a statement the pool sends on its own (`purpose`: "validate", the checkout
        check; "reset", finishing a cancelled query and rolling back), so a tracer can mark it."""
        return _NOTHING

    def connect_attempted(self, attempt: ConnectAttempt) -> None:
        """A connection attempt ended (`attempt.error` is None when it succeeded; see
        `attempt.abandoned` for a login its caller stopped waiting for)."""

    def connection_closed(self, reason: str) -> None:
        """A connection left the pool: expired, idle, broken, leaked, failed validation, closing."""

    def acquired(self, wait_seconds: float) -> None:
        """A caller got a connection after waiting `wait_seconds` (including connect/validate)."""

    def released(self, use_seconds: float) -> None:
        """A checkout ended after `use_seconds`: returned, or ended by the pool (a leak
        reclaim, close() or terminate() under its holder, its setup hook failing). Once per
        `acquired`: the holder's later return does not call it again."""

    def checkout_hooks(self) -> tuple[Hook | None, Hook | None]:
        """What the pool calls on every checkout for `acquired` and `released`, or None for a
        hook that does nothing: the pool then skips the call. Asked after `attach`, then again
        at each housekeeping round (`TelemetryObserver` starts recording once an SDK is
        installed).

        By default the bound methods, or None where a subclass does not override them; an
        observer whose hooks may do nothing (telemetry with checkout times not recorded) says so
        here, or hands over the callable they would forward to.
        """
        cls = type(self)
        acquired = self.acquired if cls.acquired is not PoolObserver.acquired else None
        released = self.released if cls.released is not PoolObserver.released else None
        return acquired, released

    def timed_out(self) -> None:
        """An acquire gave up after `acquire_timeout`."""

    def validation_failed(self) -> None:
        """An idle connection failed its checkout check and was replaced."""

    def leaked(self, report: LeakReport) -> None:
        """A connection was held past `leak_timeout` (reclaimed or only reported), or its holder
        was collected without giving it back (a SQLAlchemy session never closed)."""


class ObserverGroup(PoolObserver):
    """Several observers seen as one."""

    def __init__(self, observers: list[PoolObserver]) -> None:
        self.observers = observers

    def attach(self, pool_name: str, stats: Callable[[], PoolStats]) -> None:
        for obs in self.observers:
            obs.attach(pool_name, stats)

    def detach(self) -> None:
        for obs in self.observers:
            obs.detach()

    @contextlib.contextmanager
    def pool_statement(self, purpose: str) -> Iterator[object]:
        with contextlib.ExitStack() as stack:
            for obs in self.observers:
                stack.enter_context(obs.pool_statement(purpose))
            yield None

    def connect_attempted(self, attempt: ConnectAttempt) -> None:
        for obs in self.observers:
            obs.connect_attempted(attempt)

    def connection_closed(self, reason: str) -> None:
        for obs in self.observers:
            obs.connection_closed(reason)

    def acquired(self, wait_seconds: float) -> None:
        for obs in self.observers:
            obs.acquired(wait_seconds)

    def checkout_hooks(self) -> tuple[Hook | None, Hook | None]:
        pairs = [obs.checkout_hooks() for obs in self.observers]
        return (_together([a for a, _ in pairs if a is not None]),
                _together([r for _, r in pairs if r is not None]))

    def released(self, use_seconds: float) -> None:
        for obs in self.observers:
            obs.released(use_seconds)

    def timed_out(self) -> None:
        for obs in self.observers:
            obs.timed_out()

    def validation_failed(self) -> None:
        for obs in self.observers:
            obs.validation_failed()

    def leaked(self, report: LeakReport) -> None:
        for obs in self.observers:
            obs.leaked(report)


_NOTHING = contextlib.nullcontext()

logger: logging.Logger = logging.getLogger("asyncpool.pool")


class GuardedObserver(PoolObserver):
    """An observer given to the pool (`Pool(observers=[...])`), kept from breaking it: what one
    of its hooks raises is logged, once per hook, and the pool goes on as if it had returned.
    Raised in the middle of a checkout or a return, it would otherwise leave a connection
    counted in use that nobody holds, or a slot lost."""

    def __init__(self, inner: PoolObserver) -> None:
        self.inner = inner
        self._pool_name = ""
        self._reported: set[str] = set()

    def failed(self, hook: str) -> None:
        """Log the exception being handled, raised by the observer's `hook` (the first time)."""
        if hook in self._reported:
            return
        self._reported.add(hook)
        logger.warning(
            "pool %r: observer %s raised in %s(); the pool went on as if it had returned "
            "(later failures of this hook are not logged)", self._pool_name,
            type(self.inner).__qualname__, hook, exc_info=True)

    def _call(self, hook: str, method: Callable[..., object], *args: object) -> None:
        try:
            method(*args)
        except Exception:
            self.failed(hook)

    def attach(self, pool_name: str, stats: Callable[[], PoolStats]) -> None:
        self._pool_name = pool_name
        self._call("attach", self.inner.attach, pool_name, stats)

    def detach(self) -> None:
        self._call("detach", self.inner.detach)

    def pool_statement(self, purpose: str) -> contextlib.AbstractContextManager[object]:
        try:
            return _GuardedContext(self, self.inner.pool_statement(purpose))
        except Exception:
            self.failed("pool_statement")
            return _NOTHING

    def connect_attempted(self, attempt: ConnectAttempt) -> None:
        self._call("connect_attempted", self.inner.connect_attempted, attempt)

    def connection_closed(self, reason: str) -> None:
        self._call("connection_closed", self.inner.connection_closed, reason)

    def acquired(self, wait_seconds: float) -> None:
        self._call("acquired", self.inner.acquired, wait_seconds)

    def released(self, use_seconds: float) -> None:
        self._call("released", self.inner.released, use_seconds)

    def checkout_hooks(self) -> tuple[Hook | None, Hook | None]:
        try:
            acquired, released = self.inner.checkout_hooks()
        except Exception:
            self.failed("checkout_hooks")
            return None, None
        # Only the hooks the observer has (None stays None: the pool then skips the call).
        return (None if acquired is None else self._guard(acquired, "acquired"),
                None if released is None else self._guard(released, "released"))

    def _guard(self, hook: Hook, name: str) -> Hook:
        def guarded(seconds: float) -> None:
            self._call(name, hook, seconds)

        return guarded

    def timed_out(self) -> None:
        self._call("timed_out", self.inner.timed_out)

    def validation_failed(self) -> None:
        self._call("validation_failed", self.inner.validation_failed)

    def leaked(self, report: LeakReport) -> None:
        self._call("leaked", self.inner.leaked, report)


class _GuardedContext(contextlib.AbstractContextManager[object]):
    """An observer's `pool_statement` context, kept from failing the pool's statement: its exit
    cannot swallow the statement's error either."""

    def __init__(self, guard: GuardedObserver, inner: contextlib.AbstractContextManager[object]
                 ) -> None:
        self._guard = guard
        self._inner: contextlib.AbstractContextManager[object] | None = inner

    def __enter__(self) -> object:
        inner = self._inner
        assert inner is not None
        try:
            return inner.__enter__()
        except Exception:
            self._inner = None  # not entered: not exited
            self._guard.failed("pool_statement")
            return None

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        inner = self._inner
        if inner is None:
            return
        try:
            inner.__exit__(exc_type, exc, tb)
        except Exception:
            self._guard.failed("pool_statement")


def _together(hooks: list[Hook]) -> Hook | None:
    if not hooks:
        return None
    if len(hooks) == 1:
        return hooks[0]

    def each(seconds: float) -> None:
        for hook in hooks:
            hook(seconds)

    return each
