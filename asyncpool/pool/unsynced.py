"""Statements asyncpg describes and then does not run, whose Parse waits for a Sync.

asyncpg describes a new statement with Parse, Describe and Flush, and sends the Sync with the
statement's Bind and Execute. When no Bind follows (no argument sets to run, or an argument
its codec refuses), the server stays inside that message sequence: PostgreSQL keeps the
implicit transaction the Parse began, with its locks, and a transaction-mode pooler keeps the
server connection assigned to this client, until a Sync comes. The pool notes such a call on
the connection's record, and the return sends one if no statement has since
(`ConnectionRecord.note_unsynced_parse`).
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Sized
from typing import Any, TypeVar

import asyncpg

from asyncpool.errors import PoolConfigError

T = TypeVar("T")

#: The statements run once per argument set (a connection's and a prepared statement's).
RUN_PER_ARGUMENT_SET = frozenset({"executemany", "fetchmany"})


def left_unsynced(exc: BaseException) -> bool:
    """Whether a statement that failed with `exc` may have left its Parse without a Sync: any
    failure but the server's answer (asyncpg follows an ErrorResponse with a Sync). asyncpg
    raises some of its own errors as `PostgresError` subclasses too (``DataError``: an argument
    its codec refused); only the server's carry a severity. A `PoolConfigError` is the pool
    refusing an argument (a statement's ``timeout=``) before anything was sent."""
    if isinstance(exc, asyncpg.PostgresError):
        return getattr(exc, "severity", None) is None
    return not isinstance(exc, PoolConfigError)


def argument_sets(sets: Iterable[T]) -> tuple[bool, Iterable[T]]:
    """Whether `sets` (the argument sets of an ``executemany()`` or ``fetchmany()``) holds any,
    and what to pass on in its place: `sets` itself if it has a length, else an iterator over
    the same sets (the first one read here, before anything is sent: an error reading it
    leaves nothing on the wire)."""
    if isinstance(sets, Sized):
        return len(sets) > 0, sets
    iterator = iter(sets)
    for first in iterator:
        return True, itertools.chain((first,), iterator)
    return False, ()


def call_with_argument_sets(position: int, args: tuple[Any, ...], kwargs: dict[str, Any]
                            ) -> tuple[bool, tuple[Any, ...], dict[str, Any]]:
    """Whether a call whose argument sets are its positional argument `position` (or
    ``args=``) is given any, and its `args` and `kwargs` with the sets passed on in their place
    (`argument_sets`). Given none at all, it is left to asyncpg's own error."""
    if len(args) > position:
        given, sets = argument_sets(args[position])
        return given, (*args[:position], sets, *args[position + 1:]), kwargs
    if "args" in kwargs:
        given, sets = argument_sets(kwargs["args"])
        return given, args, {**kwargs, "args": sets}
    return True, args, kwargs
