"""One reuse of a cached description, and what the head of its reply said."""

from __future__ import annotations

from asyncpool.describe_cache.entries import Description, Key
from asyncpool.describe_cache.messages import (
    NO_DATA,
    PARAMETER_DESCRIPTION,
    ROW_DESCRIPTION,
    Column,
    row_columns,
)

#: Verdicts, set once the reply's head is read.
MATCH = "match"
CHANGED = "changed"  # described differently now: the rows are decoded again with the new one
REJECTED = "rejected"  # the server refused to parse the statement: nothing ran
UNREADABLE = "unreadable"  # not the reply the protocol promises: the connection was closed


class Check:
    """What the Wire needs to read one reply and what `_reuse` needs to finish the call."""

    __slots__ = ("bound", "description", "found", "key", "param_reply", "recorded", "replay",
                 "row_reply", "sent", "sqlstate", "verdict")

    def __init__(self, description: Description, key: Key, replay: bool) -> None:
        self.description = description
        self.key = key
        self.replay = replay  # decode again after a change (False: asyncpg discards the rows)
        self.verdict: str | None = None
        self.sent: bytes | None = None  # what went on the wire (None: asyncpg sent nothing)
        self.found: tuple[Column, ...] | None = None  # the server's columns, when they differ
        self.param_reply = b""
        self.row_reply = b""  # the reply's RowDescription (or NoData) message
        self.recorded: list[bytes] = []  # the reply after its head, when decoded again
        self.bound = False  # the server answered BindComplete: the statement ran (or began to)
        self.sqlstate: str | None = None  # of the server's refusal, before the statement ran

    def judge(self, kind: int, message: bytes) -> str | None:
        """Read one message of the reply's head; a verdict once it says enough."""
        description = self.description
        if kind == PARAMETER_DESCRIPTION:
            self.param_reply = message
            # The Parse fixed the types (all but enum ones), so the server can only echo them.
            if message == description.param_message:
                return None
            return None if _declared_echoed(message, description) else UNREADABLE
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


def _declared_echoed(message: bytes, description: Description) -> bool:
    """Whether a ParameterDescription echoes every declared type (enum ones are inferred)."""
    expected = description.param_message
    if not description.text_params or len(message) != len(expected):
        return False
    text = set(description.text_params)
    return all(message[7 + 4 * i:11 + 4 * i] == expected[7 + 4 * i:11 + 4 * i]
               for i in range((len(message) - 7) // 4) if i not in text)
