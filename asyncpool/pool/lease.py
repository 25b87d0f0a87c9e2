"""A lease: one checkout of a connection, from acquire to release."""

from __future__ import annotations

import asyncio
import contextvars
import enum
import traceback
from types import CodeType, FrameType
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from asyncpool.pool.record import ConnectionRecord


class LeaseState(enum.Enum):
    ACTIVE = "active"
    RELEASED = "released"
    LEAKED = "leaked"  # reclaimed by the pool: the holder must not touch the connection again
    CLOSED = "closed"  # terminated by pool.close() while still held


# Module constants for the checkout path: looking a member up on an Enum class costs ~70 ns on
# Python 3.11, and a checkout compares states several times.
ACTIVE = LeaseState.ACTIVE
RELEASED = LeaseState.RELEASED
LEAKED = LeaseState.LEAKED
CLOSED = LeaseState.CLOSED


class Lease:
    """Who holds which connection since when, and where they took it.

    Capturing the acquire site costs one frame reference and an int; the stack is formatted only
    if the lease is reported as a leak.
    """

    __slots__ = ("acquired_at", "context", "frame", "lasti", "record", "reported", "state", "task")

    def __init__(self, record: ConnectionRecord, now: float, frame: FrameType | None) -> None:
        self.record = record
        self.acquired_at = now
        self.task = asyncio.current_task()
        # The holder's context (its current span): a leak is reported in it, not in the timer's.
        self.context = contextvars.copy_context()
        self.frame = frame
        # The innermost frame keeps running after acquire(); remember the instruction it was on
        # (f_lineno would map it to a line now, ~0.2 µs; only a leak report needs the line).
        self.lasti = frame.f_lasti if frame is not None else 0
        self.state = ACTIVE
        self.reported = False  # logged as a leak under leak_action="log"

    @property
    def active(self) -> bool:
        return self.state is ACTIVE

    def task_name(self) -> str | None:
        return self.task.get_name() if self.task is not None else None

    def acquire_site(self) -> str:
        """The stack where the connection was acquired, innermost call last."""
        frame = self.frame
        if frame is None:
            return "<acquire site not captured>"
        outer = traceback.StackSummary.extract(traceback.walk_stack(frame.f_back), lookup_lines=True)
        outer.reverse()
        code = frame.f_code
        inner = traceback.FrameSummary(code.co_filename, _line_at(code, self.lasti), code.co_name)
        return "".join(traceback.StackSummary.from_list([*outer, inner]).format())

    def forget_site(self) -> None:
        """Drop the frame reference so the holder's locals are not kept alive."""
        self.frame = None


def _line_at(code: CodeType, lasti: int) -> int:
    """The source line of the instruction at byte offset `lasti` in `code`."""
    for start, end, line in code.co_lines():
        if start <= lasti < end and line is not None:
            return line
    return code.co_firstlineno
