"""How the pool tells that asyncpg may have left a Parse without a Sync (asyncpool.pool.unsynced):
the errors that can, and argument sets read without losing any. The effect on a real PgBouncer is
tested in tests/test_statement_names.py."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import asyncpg
import pytest

from asyncpool.pool.unsynced import argument_sets, call_with_argument_sets, left_unsynced


def test_only_the_servers_own_errors_come_with_a_sync() -> None:
    server = asyncpg.PostgresError.new({"S": "ERROR", "C": "22012", "M": "division by zero"})
    assert not left_unsynced(server)
    # asyncpg's own DataError is a PostgresError too, raised before anything is bound.
    assert left_unsynced(asyncpg.DataError("invalid input for query argument $1"))
    assert left_unsynced(asyncpg.InterfaceError("cannot perform operation"))
    assert left_unsynced(asyncio.CancelledError())
    assert left_unsynced(TimeoutError())


def test_argument_sets_are_passed_on_whole() -> None:
    sized = [(1,), (2,)]
    assert argument_sets(sized) == (True, sized)  # the same object, not a copy
    assert argument_sets(()) == (False, ())

    def sets() -> Iterator[tuple[int]]:
        yield (1,)
        yield (2,)

    given, passed = argument_sets(sets())
    assert given
    assert list(passed) == [(1,), (2,)]
    assert argument_sets(iter(())) == (False, ())


def test_an_error_reading_the_first_set_comes_before_anything_is_sent() -> None:
    def broken() -> Iterator[tuple[int]]:
        raise ValueError("no rows today")
        yield (1,)

    with pytest.raises(ValueError, match="no rows today"):
        argument_sets(broken())


def test_the_sets_are_found_by_position_or_by_name() -> None:
    assert call_with_argument_sets(1, ("INSERT", []), {"timeout": 1}) == (
        False, ("INSERT", []), {"timeout": 1})
    given, args, kwargs = call_with_argument_sets(1, ("INSERT",), {"args": iter([(1,)])})
    assert given
    assert args == ("INSERT",)
    assert list(kwargs["args"]) == [(1,)]
    given, args, _ = call_with_argument_sets(0, (iter(()),), {})
    assert (given, args) == (False, ((),))
    # None given at all: left to asyncpg, which says what is missing.
    assert call_with_argument_sets(1, ("INSERT",), {}) == (True, ("INSERT",), {})
