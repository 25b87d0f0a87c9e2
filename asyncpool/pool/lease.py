"""A lease: one checkout of a connection, from acquire to release."""

from __future__ import annotations

import asyncio
import contextvars
import enum
import os
import sys
import traceback
from collections.abc import Callable
from types import CodeType, FrameType
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from asyncpool.pool.record import ConnectionRecord


class LeaseState(enum.Enum):
    ACTIVE = "active"
    RELEASED = "released"
    LEAKED = "leaked"  # reclaimed by the pool: the holder must not touch the connection again
    CLOSED = "closed"  # terminated by pool.close() while still held
    # Closed under its holder, for good: ``conn.terminate()``, or held by a task past the end of
    # the Lambda invocation that started it (`asyncpool.pool.stragglers`).
    TERMINATED = "terminated"
    # Held when the process forked, seen in the child: the connection is the parent's, and the
    # holder there must neither use it nor give it back (a reset would write to its socket).
    INHERITED = "inherited"
    # Handed to a caller in line whose task had not yet run to take it when a SnapStart
    # snapshot closed the connection: never a checkout; the slot is that caller's, to log in
    # in after the restore (`asyncpool.pool.snapshot`).
    WITHDRAWN = "withdrawn"


# Module constants for the checkout path: looking a member up on an Enum class costs ~70 ns on
# Python 3.11, and a checkout compares states several times.
ACTIVE = LeaseState.ACTIVE
RELEASED = LeaseState.RELEASED
LEAKED = LeaseState.LEAKED
CLOSED = LeaseState.CLOSED
TERMINATED = LeaseState.TERMINATED
INHERITED = LeaseState.INHERITED
WITHDRAWN = LeaseState.WITHDRAWN

# A coroutine chain deeper than this is cut in leak reports.
_MAX_FRAMES = 200
#: Where asyncpool's own code is (the package's folder, with a separator).
_OWN_CODE = os.path.dirname(os.path.dirname(os.path.abspath(__file__))) + os.sep

if sys.version_info >= (3, 12):
    #: The task running on `loop` (the holder a checkout records).
    task_of: Callable[[asyncio.AbstractEventLoop], asyncio.Task[Any] | None] = asyncio.current_task
else:  # asyncio.current_task is Python code before 3.12 (~0.3 µs); this is what it reads
    task_of = asyncio.tasks._current_tasks.get  # type: ignore[attr-defined]


class Site:
    """An acquire site kept as code objects and instruction offsets, from the acquiring frame
    out (up to `depth` frames), not as frames: the frames' locals stay free. For a checkout that
    may outlive the function that made it (SQLAlchemy's: a session dropped without close() is
    closed by SQLAlchemy when it is collected, which a kept frame, holding the session, stops)."""

    __slots__ = ("calls",)

    def __init__(self, frame: FrameType, depth: int = 8) -> None:
        calls: list[tuple[CodeType, int]] = []
        current: FrameType | None = frame
        while current is not None and len(calls) < depth:
            calls.append((current.f_code, current.f_lasti))
            current = current.f_back
        self.calls: list[tuple[CodeType, int]] = calls

    def summaries(self) -> list[traceback.FrameSummary]:
        """Outermost call first."""
        return [traceback.FrameSummary(code.co_filename, _line_at(code, lasti), code.co_name)
                for code, lasti in reversed(self.calls)]


class Lease:
    """Who holds which connection since when, and where they took it.

    Capturing the acquire site costs one frame reference and an int; the stack is formatted only
    if the lease is reported as a leak.
    """

    __slots__ = ("acquired_at", "cancel_requests", "context", "frame", "holder_cancelled", "lasti",
                 "record", "reported", "running", "scoped", "state", "task", "user")

    def __init__(self, record: ConnectionRecord, now: float, frame: FrameType | None,
                 task: asyncio.Task[Any] | None, context: contextvars.Context | None) -> None:
        self.record: ConnectionRecord = record
        self.acquired_at: float = now
        # The holding task (a waiter's lease is made by whoever hands it the connection: it passes
        # the waiter's own).
        self.task: asyncio.Task[Any] | None = task
        # The task that last ran a statement through the holder's `PooledConnection` (None:
        # none yet): another than `task` when a block in an async generator is driven by
        # another task than the one that entered it (`holder`).
        self.user: asyncio.Task[Any] | None = None
        # The holder's context (its current span): a leak is reported in it, not in the timer's.
        # None when the pool does not track leaks.
        self.context: contextvars.Context | None = context
        self.frame: FrameType | Site | None = frame
        # The innermost frame keeps running after acquire(); remember the instruction it was on
        # (f_lineno would map it to a line now, ~0.2 µs; only a leak report needs the line).
        self.lasti: int = frame.f_lasti if frame is not None else 0
        self.state: LeaseState = ACTIVE
        self.reported: bool = False  # logged as a leak under leak_action="log"
        # Taken by `async with` (the block's exit turns a reclaim into ConnectionLeakedError), not
        # by `conn = await pool.acquire()`, whose task a reclaim must not cancel.
        self.scoped: bool = False
        # When a leak reclaim cancelled the holder's task: the task's count of cancel requests
        # (`Task.cancelling()`) before it, which the reclaim's is withdrawn against.
        self.holder_cancelled: int | None = None
        # The holding task's count of cancel requests when its block took the connection (set
        # by `async with`): a reclaimed block ends in the holder's own cancellation only if more
        # are left than this, as `asyncio.timeout()` decides whether a cancellation is its own.
        # None: not counted (a query helper's statement; a block another task drives since).
        self.cancel_requests: int | None = None
        # Statements the holder started through its `PooledConnection`, and steps of the
        # cursors made through it (`loop_bound._said_by_pool`), that have not ended (those that
        # asyncpg's own lock, `driver.returned`, does not see).
        self.running: int = 0

    @property
    def active(self) -> bool:
        return self.state is ACTIVE

    def task_name(self) -> str | None:
        return self.task.get_name() if self.task is not None else None

    def holder(self) -> asyncio.Task[Any] | None:
        """The task a leak reclaim cancels: the one that took the connection while the
        acquiring function is in its awaits (or nothing says otherwise); else the task that
        last ran a statement on it, if that one still runs (the block is in an async generator
        another task drives now: the task that entered it has gone on to other things)."""
        task, user = self.task, self.user
        if user is None or user is task or user.done() or task is None:
            return task
        frame = self.frame
        if not isinstance(frame, FrameType) or frame in task_frames(task):
            return task
        return user

    def acquire_site(self, *, holder_now: bool = True) -> str:
        """The stack where the connection was acquired, outermost call first.

        Only a frame reference and an instruction offset are kept at checkout. The callers are
        read when a report needs them, from the holding task's chain of suspended coroutines:
        while the acquiring function still runs, each of its callers waits on the very line that
        leads to it. If it has returned, or is a generator suspended at a yield, the task's
        current stack is shown after it (unless not `holder_now`: a holder that dropped the
        connection is elsewhere for reasons of its own).
        """
        frame = self.frame
        chain = task_frames(self.task)
        # Where the holding task is now, in its own code: asyncpool's frames say nothing of
        # it, and a task reporting its own checkout (the end of a Lambda invocation) is in
        # asyncpool's code alone.
        now = [] if not holder_now or self.task is _current_task() else _users(chain)
        if isinstance(frame, Site):
            text = _format(frame.summaries())
            if now:
                text += "(the holding task is now at:)\n" + _format(_summaries(now))
            return text
        lasti = self.lasti
        if frame is None and self.state is ACTIVE:
            # pool.fetchval() and the other query helpers keep no frame: their statement is
            # still running, so the caller waits on it in the holding task's chain.
            frame = _helper_caller(chain)
            lasti = frame.f_lasti if frame is not None else 0
            if frame is None and chain and chain[0].f_code in STATEMENT_RUNNERS:
                # ``asyncio.create_task(pool.fetchval(...))``, gather(): no caller to show.
                return ("(a query helper, pool.fetchval() or another, run as a task of its own: "
                        "the line that created the task is not known; the task is at:)\n"
                        + _format(_summaries(chain)))
        if frame is None:
            return "<acquire site not captured>\n"
        code = frame.f_code
        inner = traceback.FrameSummary(code.co_filename, _line_at(code, lasti), code.co_name)
        if frame in chain:
            outer = chain[: chain.index(frame)]
            return _format([*_summaries(outer), inner])
        text = _format([inner])
        if _line_at(code, frame.f_lasti) != inner.lineno:
            # Not in the task's chain of awaits: returned, or a generator suspended at a yield
            # (a FastAPI dependency holding the connection while the endpoint runs, an async
            # generator kept past a Lambda invocation), which no frame of the chain leads to.
            text += ("(the function that acquired it is not in the holding task's awaits: it "
                     "has returned, or it is a generator suspended at a yield, as a FastAPI "
                     "dependency is; it last ran at:)\n")
            text += _format([traceback.FrameSummary(
                code.co_filename, _line_at(code, frame.f_lasti), code.co_name)])
        if now:
            text += "(the holding task is now at:)\n" + _format(_summaries(now))
        return text

    def forget_site(self) -> None:
        """Drop the frame reference so the holder's locals are not kept alive."""
        self.frame = None


def spare_lease(record: ConnectionRecord) -> Lease:
    """A lease on `record` to keep as its spare (`ConnectionRecord.spare`): Lease(record, now,
    None, task, context) without the Python call to __init__, with what stays the same from one
    clean checkout to the next; whoever takes it sets the rest (`acquired_at`, `task`,
    `context`, `state`, and the acquire site). tests/unit/test_lease.py checks that every slot
    is set, on a new lease and on a spare taken again."""
    lease = object.__new__(Lease)
    lease.record = record
    lease.frame = None
    lease.lasti = 0
    lease.reported = False
    lease.scoped = True
    lease.holder_cancelled = None
    lease.cancel_requests = None
    lease.running = 0
    lease.user = None
    return lease


def _given_back() -> Lease:
    lease = spare_lease(None)  # type: ignore[arg-type]  # (of no connection)
    lease.acquired_at = 0.0
    lease.task = None
    lease.context = None
    lease.state = RELEASED
    return lease


#: What a proxy handed out by ``async with pool.acquire()`` refers to once its block gave the
#: connection back and its own lease went to the record as the spare, to be taken again: a
#: released lease of no connection (``record`` is None), so that a reference kept past the block
#: is refused as released whoever holds the connection next.
GIVEN_BACK = _given_back()


#: The code of the functions that run a query helper's statement (the statement runners...), registered
#: by their modules: in a holding task's chain, the frame just out from one of them is the one
#: that called the helper...
STATEMENT_RUNNERS: set[CodeType] = set()
#: ...unless it is one of these (``Pool.fetchval`` called through the class, or overridden and
#: calling ``super()``): then the frame out from that one.
HELPER_METHODS: set[CodeType] = set()


def _helper_caller(chain: list[FrameType]) -> FrameType | None:
    for i, frame in enumerate(chain):
        if frame.f_code in STATEMENT_RUNNERS:
            j = i - 1
            if j >= 0 and chain[j].f_code in HELPER_METHODS:
                j -= 1
            return chain[j] if j >= 0 else None
    return None


def task_frames(task: asyncio.Task[Any] | None) -> list[FrameType]:
    """The frames of `task`'s suspended coroutines, outermost first."""
    frames: list[FrameType] = []
    if task is None or task.done():
        return frames
    coro: Any = task.get_coro()
    while coro is not None and len(frames) < _MAX_FRAMES:
        frame = getattr(coro, "cr_frame", None) or getattr(coro, "gi_frame", None)
        if frame is None:
            break
        frames.append(frame)
        coro = getattr(coro, "cr_await", None) or getattr(coro, "gi_yieldfrom", None)
    return frames


def _current_task() -> asyncio.Task[Any] | None:
    try:
        return asyncio.current_task()
    except RuntimeError:  # (no loop running in this thread)
        return None


def _users(frames: list[FrameType]) -> list[FrameType]:
    """`frames` less asyncpool's own."""
    return [frame for frame in frames if not frame.f_code.co_filename.startswith(_OWN_CODE)]


def _summaries(frames: list[FrameType]) -> list[traceback.FrameSummary]:
    return [traceback.FrameSummary(f.f_code.co_filename, f.f_lineno, f.f_code.co_name)
            for f in frames]


def _format(summaries: list[traceback.FrameSummary]) -> str:
    return "".join(traceback.StackSummary.from_list(summaries).format())


def _line_at(code: CodeType, lasti: int) -> int:
    """The source line of the instruction at byte offset `lasti` in `code`."""
    for start, end, line in code.co_lines():
        if start <= lasti < end and line is not None:
            return line
    return code.co_firstlineno
