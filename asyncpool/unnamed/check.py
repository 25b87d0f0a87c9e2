"""One reuse of a cached description, and what the head of its reply said."""

from __future__ import annotations

from asyncpool.unnamed.entries import Description, Key
from asyncpool.unnamed.messages import (
    BIND_COMPLETE,
    NO_DATA,
    ROW_DESCRIPTION,
    Column,
    row_columns,
)

#: Verdicts, set once the reply's head is read.
MATCH = "match"
CHANGED = "changed"  # described differently now: the rows are decoded again with the new one
REJECTED = "rejected"  # the server refused the Parse or the Bind: nothing ran
FAILED = "failed"  # an argument failed at Bind (nothing ran), or the session ended (FATAL)
UNREADABLE = "unreadable"  # not the reply the protocol promises: the connection was closed


class Check:
    """What the Wire needs to read one reply and what `_reuse` needs to finish the call."""

    __slots__ = ("bound", "description", "found", "key", "recorded", "replay", "row_reply",
                 "sent", "sqlstate", "verdict")

    def __init__(self, description: Description, key: Key, replay: bool) -> None:
        self.description: Description = description
        self.key: Key = key
        self.replay: bool = replay  # decode again after a change (False: asyncpg discards the rows)
        self.verdict: str | None = None
        self.sent: bytes | None = None  # what went on the wire (None: asyncpg sent nothing)
        self.found: tuple[Column, ...] | None = None  # the server's columns, when they differ
        self.row_reply: bytes = b""  # the reply's RowDescription (or NoData) message
        self.recorded: list[bytes] = []  # the reply after its head, when decoded again
        self.bound: bool = False  # the server answered BindComplete
        self.sqlstate: str | None = None  # of the server's refusal, before the statement ran

    def judge(self, kind: int, message: bytes) -> str | None:
        """Read one message of the reply's head; a verdict once it says enough."""
        description = self.description
        if kind == BIND_COMPLETE:
            self.bound = True  # the arguments were accepted: Execute follows
            return None
        if kind == NO_DATA:
            self.row_reply = message
            return self._compare(())
        if kind == ROW_DESCRIPTION:
            self.row_reply = message
            if message == description.row_message:
                return MATCH
            verdict = self._compare(row_columns(message))
            if verdict == MATCH:
                description.row_message = message
            return verdict
        return None  # ParseComplete

    def _compare(self, found: tuple[Column, ...]) -> str:
        if found == self.description.columns:
            return MATCH
        self.found = found
        return CHANGED

