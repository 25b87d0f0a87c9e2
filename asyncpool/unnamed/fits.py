"""Whether a call's arguments fit its cached parameter types without loss.

A reuse fixes the cached parameter types in its Parse, and asyncpg encodes each argument with
the cached type's codec, which converts what it is given: ``Decimal("9.99")`` for an ``int4``
becomes 9, an aware datetime for a ``timestamp`` loses its offset, a datetime for a ``date`` its
time. Where the column was retyped since (``int4`` to ``numeric``), the call described afresh
would have encoded the value whole. So an argument of a kind the cached type does not hold
sends the call to be described afresh (one round trip more); what asyncpg then does with it is
what it does without a cache.

An array of those types (``float4[]``, ``int4[]``...) is checked element by element, in
whatever asyncpg's array codec takes for one (`_array_like`: a list, a tuple, an
``array.array``, a numpy array, any sized iterable), sub-arrays included. asyncpg reads such a
value twice itself (its shape, then its elements), so a look here consumes nothing; what it
refuses (a generator, an iterator: not sized) is not looked at, and asyncpg says why.

Not caught: a ``float4`` parameter keeps a float's float4 precision after its column was widened
to ``float8`` (asyncpg's float4 codec rounds every float, so refusing floats there would describe
every call afresh), and executemany's rows given as an iterator are not looked at. After such a
migration, ``pool.invalidate_statement_cache()``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence, Sized
from datetime import date, datetime
from decimal import Decimal
from fractions import Fraction
from typing import Any

# PostgreSQL's type OIDs (pg_type.dat).
_INTEGERS = frozenset((20, 21, 23, 26))  # int8, int2, int4, oid
_FLOATS = frozenset((700, 701))  # float4, float8
_TIMESTAMP = 1114  # without time zone
_DATE = 1082
# Their array types: int8[], int2[], int4[], oid[], float4[], float8[], timestamp[], date[].
_ARRAYS = {1016: 20, 1005: 21, 1007: 23, 1028: 26, 1021: 700, 1022: 701, 1115: _TIMESTAMP,
           1182: _DATE}

Guard = Callable[[Any], bool]


def _integral(value: Any) -> bool:
    # Python's int (bool too), integer types that say so (numpy's), and a Decimal or Fraction
    # with no fractional part; not a float (its conversion to an integer type truncates).
    if hasattr(type(value), "__index__"):
        return True
    if isinstance(value, Fraction):
        return value.denominator == 1
    # Bounded first: int(Decimal("1e1000000")) builds a million digits (41 s, measured); no
    # operation that rounds in the context (abs() overflows there).
    if not isinstance(value, Decimal) or not value.is_finite():
        return False
    try:
        return value.copy_abs() < _BEYOND_INT8 and value == value.to_integral_value()
    except ArithmeticError:
        return False


#: Past every integer type of PostgreSQL (int8): such a value is refused by the codec anyway.
_BEYOND_INT8 = 2**64


#: Integers beyond this are not all representable in a float8 (53-bit significand).
_EXACT_IN_FLOAT = 2**53


def _real(value: Any) -> bool:
    # A float (numpy's too), or an integer a float8 holds exactly; not a Decimal or Fraction.
    if hasattr(type(value), "__index__"):
        return bool(-_EXACT_IN_FLOAT <= value <= _EXACT_IN_FLOAT)
    return hasattr(type(value), "__float__") and not isinstance(value, Decimal | Fraction)


def _naive(value: Any) -> bool:
    return not isinstance(value, datetime) or value.tzinfo is None


def _day(value: Any) -> bool:
    return not isinstance(value, datetime)


def _array_like(value: Any) -> bool:
    """What asyncpg's array codec encodes as an array (``_is_array_iterable`` in its
    codecs/array.pyx): sized and iterable, not text or bytes, not a mapping."""
    return (isinstance(value, Iterable) and isinstance(value, Sized)
            and not isinstance(value, str | bytes | bytearray | memoryview | Mapping))


def _element_guard(check: Guard, plain: frozenset[type], kinds: str) -> Guard:
    """`check` for every element of an array argument, sub-arrays included (as in asyncpg, a
    tuple inside an array is an element, not a sub-array). An array whose elements are all of
    the `plain` types (which `check` passes whatever their value), or a numpy array whose dtype
    is of `kinds`, is passed without a call per element: on every reuse, and
    ``= ANY($1::int[])`` lists run to thousands (a Python call each cost 0.4 ms per 1,000 ints;
    the look at their types, 20 us)."""

    def elements(value: Any) -> bool:
        if type(value) is not list and type(value) is not tuple:
            if not _array_like(value):
                return True  # refused by asyncpg (a generator: not sized), which says why
            kind = getattr(getattr(value, "dtype", None), "kind", None)
            if isinstance(kind, str) and kind in kinds:
                return True
        if plain.issuperset(map(type, value)):
            return True
        for item in value:
            if type(item) is list or (not isinstance(item, tuple) and _array_like(item)):
                if not elements(item):
                    return False
            elif item is not None and not check(item):
                return False
        return True

    return elements


def _guard(oid: int) -> Guard | None:
    if oid in _INTEGERS:
        return _integral
    if oid in _FLOATS:
        return _real
    if oid == _TIMESTAMP:
        return _naive
    if oid == _DATE:
        return _day
    return None


#: Element types each scalar guard passes whatever the value (exact types: no subclass).
_PLAIN: dict[Guard, frozenset[type]] = {
    _integral: frozenset((int, bool, type(None))),
    _real: frozenset((float, type(None))),
    _naive: frozenset((date, type(None))),
    _day: frozenset((date, type(None))),
}

#: numpy dtype kinds whose every value each scalar guard passes: integers and booleans for an
#: integer type, floats for a float type (``numpy.dtype.kind``).
_KINDS: dict[Guard, str] = {_integral: "iub", _real: "f", _naive: "", _day: ""}

#: One guard per array type (made once: `_row_fits` tells scalars' guards by identity).
_ARRAY_GUARDS: dict[int, Guard] = {
    oid: _element_guard(guard, _PLAIN[guard], _KINDS[guard]) for oid, element in _ARRAYS.items()
    if (guard := _guard(element)) is not None
}


def guards(param_oids: Sequence[int]) -> tuple[tuple[int, Guard], ...] | None:
    """(position, check) for each parameter whose type (or array's element type) can lose part
    of a value of another kind; None when no parameter can."""
    found = []
    for position, oid in enumerate(param_oids):
        check = _guard(oid) or _ARRAY_GUARDS.get(oid)
        if check is not None:
            found.append((position, check))
    return tuple(found) or None


def fits(checks: tuple[tuple[int, Guard], ...], executor: Any, many: bool) -> bool:
    """Whether the arguments asyncpg's `executor` (the function it hands `_do_execute`) will
    bind pass `checks`; with `many`, each of executemany's rows (rows given as an iterator are
    not looked at: reading them would consume them). True when the arguments cannot be found
    (another asyncpg version's executor). On every reuse of a statement with such parameters,
    so written for the common case: asyncpg's one executor, and integers (checked without a
    call)."""
    code = executor.__code__
    if code is _SEEN[0]:
        index = _SEEN[1]
    else:
        names = code.co_freevars
        index = names.index("args") if "args" in names else None
        _SEEN[:] = [code, index]  # (kept alive with it: identity stays meaningful)
    if index is None:
        return True
    args = executor.__closure__[index].cell_contents
    if many:
        if not isinstance(args, list | tuple):
            return True
        return all(_row_fits(checks, row) for row in args)
    return _row_fits(checks, args)


def _row_fits(checks: tuple[tuple[int, Guard], ...], row: Any) -> bool:
    try:
        for position, check in checks:
            value = row[position]
            if type(value) is int:  # the common case, without a call
                if check is _real and not -_EXACT_IN_FLOAT <= value <= _EXACT_IN_FLOAT:
                    return False
            elif value is not None and not check(value):
                return False
    except (TypeError, IndexError, KeyError):
        pass  # not a sequence of that length: asyncpg's own error will say so
    return True


#: The last executor code seen and where it keeps the arguments (asyncpg has one or two).
_SEEN: list[Any] = [None, None]
