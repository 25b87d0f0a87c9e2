"""Whether a call's arguments fit its cached parameter types without loss.

A reuse fixes the cached parameter types in its Parse, and asyncpg encodes each argument with
the cached type's codec, which converts what it is given: ``Decimal("9.99")`` for an ``int4``
becomes 9, an aware datetime for a ``timestamp`` loses its offset, a datetime for a ``date`` its
time. Where the column was retyped since (``int4`` to ``numeric``), the call described afresh
would have encoded the value whole. So an argument of a kind the cached type does not hold
sends the call to be described afresh (one round trip more); what asyncpg then does with it is
what it does without a cache.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from datetime import datetime
from typing import Any

# PostgreSQL's type OIDs (pg_type.dat).
_INTEGERS = frozenset((20, 21, 23, 26))  # int8, int2, int4, oid
_FLOATS = frozenset((700, 701))  # float4, float8
_TIMESTAMP = 1114  # without time zone
_DATE = 1082

Guard = Callable[[Any], bool]


def _integral(value: Any) -> bool:
    # Python's int (bool too) and integer types that say so (numpy's): not float, not Decimal.
    return hasattr(type(value), "__index__")


def _real(value: Any) -> bool:
    return isinstance(value, float) or hasattr(type(value), "__index__")


def _naive(value: Any) -> bool:
    return not isinstance(value, datetime) or value.tzinfo is None


def _day(value: Any) -> bool:
    return not isinstance(value, datetime)


def guards(param_oids: Sequence[int]) -> tuple[tuple[int, Guard], ...] | None:
    """(position, check) for each parameter whose type can lose part of a value of another
    kind; None when no parameter can."""
    found = []
    for position, oid in enumerate(param_oids):
        if oid in _INTEGERS:
            found.append((position, _integral))
        elif oid in _FLOATS:
            found.append((position, _real))
        elif oid == _TIMESTAMP:
            found.append((position, _naive))
        elif oid == _DATE:
            found.append((position, _day))
    return tuple(found) or None


def fits(checks: tuple[tuple[int, Guard], ...], executor: Any, many: bool) -> bool:
    """Whether the arguments asyncpg's `executor` (the function it hands `_do_execute`) will
    bind pass `checks`; with `many`, each of executemany's rows (rows given as an iterator are
    not looked at: reading them would consume them). True when the arguments cannot be found
    (another asyncpg version's executor). On every reuse of a statement with such parameters:
    kept to a few hundred nanoseconds (an int passes any check without a call)."""
    code = executor.__code__
    index = _ARGS_CELL.get(code, -1)
    if index == -1:
        names = code.co_freevars
        index = _ARGS_CELL[code] = names.index("args") if "args" in names else None
    if index is None:
        return True
    args = executor.__closure__[index].cell_contents
    if not many:
        return _row_fits(checks, args)
    if not isinstance(args, list | tuple):
        return True
    return all(_row_fits(checks, row) for row in args)


def _row_fits(checks: tuple[tuple[int, Guard], ...], row: Any) -> bool:
    try:
        for position, check in checks:
            value = row[position]
            if type(value) is not int and value is not None and not check(value):
                return False
    except (TypeError, IndexError, KeyError):
        pass  # not a sequence of that length: asyncpg's own error will say so
    return True


#: Where asyncpg's executor keeps the arguments, by its code object (None: it does not).
_ARGS_CELL: dict[Any, int | None] = {}
