"""A lease: one checkout of a connection, from acquire to release."""

from __future__ import annotations

import asyncio
import contextvars
import enum
import traceback
from types import FrameType
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from asyncpool.record import ConnectionRecord


class LeaseState(enum.Enum):
    ACTIVE = "active"
    RELEASED = "released"
    LEAKED = "leaked"  # reclaimed by the pool: the holder must not touch the connection again
    CLOSED = "closed"  # terminated by pool.close() while still held


class Lease:
    """Who holds which connection since when, and where they took it.

    Capturing the acquire site costs one frame reference and an int; the stack is formatted only
    if the lease is reported as a leak.
    """

    __slots__ = ("acquired_at", "context", "frame", "lineno", "record", "reported", "state", "task")

    def __init__(self, record: ConnectionRecord, now: float, frame: FrameType | None) -> None:
        self.record = record
        self.acquired_at = now
        self.task = asyncio.current_task()
        # The holder's context (its current span): a leak is reported in it, not in the timer's.
        self.context = contextvars.copy_context()
        self.frame = frame
        # The innermost frame keeps running after acquire(); remember the line it was on.
        self.lineno = frame.f_lineno if frame is not None else 0
        self.state = LeaseState.ACTIVE
        self.reported = False  # logged as a leak under leak_action="log"

    @property
    def active(self) -> bool:
        return self.state is LeaseState.ACTIVE

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
        inner = traceback.FrameSummary(code.co_filename, self.lineno, code.co_name)
        return "".join(traceback.StackSummary.from_list([*outer, inner]).format())

    def forget_site(self) -> None:
        """Drop the frame reference so the holder's locals are not kept alive."""
        self.frame = None
