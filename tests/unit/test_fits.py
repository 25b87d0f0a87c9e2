"""Which arguments a cached parameter type would convert with a loss (`asyncpool.unnamed.fits`):
those send the call to be described afresh; the others keep the one round trip."""

from __future__ import annotations

import array
import datetime as dt
import sys
from collections.abc import Callable, Iterator, Sequence
from decimal import Decimal
from fractions import Fraction
from typing import Any, overload

import pytest

from asyncpool.unnamed.fits import fits, guards

INT4, INT8, FLOAT4, FLOAT8, NUMERIC, TEXT, DATE, TIMESTAMP = 23, 20, 700, 701, 1700, 25, 1082, 1114

try:  # numpy's scalars, where installed (the main venv; not the 3.12/3.13 test venvs)
    import numpy as np

    NUMPY: list[Any] = [(INT4, np.int64(7), True), (FLOAT8, np.float32(1.5), True),
                        (FLOAT8, np.int32(5), True), (INT4, np.float64(2.5), False)]
except ImportError:
    NUMPY = []


def executor_of(args: Any) -> Any:
    """A function shaped as asyncpg's executor: its arguments in a closure cell named `args`."""
    return lambda stmt, timeout: (stmt, args, timeout)


def _calls(check: Callable[[], bool]) -> tuple[bool, int]:
    """What `check()` returns, and how many Python calls it made the second time: the first
    fills the ABCs' caches for the value's type (`isinstance(value, Mapping)` walks every
    registered subclass once: 129 calls for a numpy array in the whole suite's process)."""
    check()
    calls = 0

    def count(frame: Any, event: str, arg: Any) -> None:
        nonlocal calls
        calls += event == "call"

    sys.setprofile(count)
    try:
        fit = check()
    finally:
        sys.setprofile(None)
    return fit, calls


@pytest.mark.parametrize(
    ("oid", "value", "fit"),
    [
        *NUMPY,
        (INT4, 7, True), (INT4, True, True), (INT4, None, True),
        (INT4, Decimal("9"), True), (INT4, Fraction(4, 2), True),
        (INT4, Decimal("9.99"), False), (INT4, 9.0, False), (INT4, Decimal("NaN"), False),
        (INT4, Decimal("Infinity"), False), (INT4, "7", False),
        (INT8, Decimal("1e1000000"), False),  # (int() of it builds a million digits: 41 s)
        (INT8, Decimal("9.0"), True), (INT8, Fraction(1, 3), False),
        (FLOAT8, 0.1, True), (FLOAT8, 2**53, True),
        (FLOAT8, 2**53 + 1, False), (FLOAT8, -(2**53) - 1, False), (FLOAT8, Decimal("1.5"), False),
        (DATE, dt.date(2024, 6, 1), True), (DATE, dt.datetime(2024, 6, 1, 12), False),
        (TIMESTAMP, dt.datetime(2024, 6, 1, 12), True),
        (TIMESTAMP, dt.datetime(2024, 6, 1, 12, tzinfo=dt.UTC), False),
    ],
)
def test_an_argument_fits_its_cached_type_or_not(oid: int, value: Any, fit: bool) -> None:
    checks = guards([TEXT, oid])
    assert checks is not None
    assert fits(checks, executor_of(("text", value)), many=False) is fit


def test_types_that_lose_nothing_have_no_checks() -> None:
    assert guards([TEXT, NUMERIC, 16, 3802]) is None


def test_executemany_rows_are_checked_when_given_as_a_list_or_tuple() -> None:
    checks = guards([INT4])
    assert checks is not None
    assert fits(checks, executor_of([(1,), (2,)]), many=True)
    assert not fits(checks, executor_of([(1,), (Decimal("4.5"),)]), many=True)
    assert not fits(checks, executor_of(((1,), (2.5,))), many=True)
    # An iterator is not read (it would be consumed): taken as it is.
    rows = iter([(Decimal("4.5"),)])
    assert fits(checks, executor_of(rows), many=True)
    assert next(rows) == (Decimal("4.5"),)


def test_arguments_that_cannot_be_found_or_read_are_left_to_asyncpg() -> None:
    checks = guards([INT4, INT4])
    assert checks is not None
    assert fits(checks, lambda stmt, timeout: None, many=False)  # no `args` cell
    assert fits(checks, executor_of((1,)), many=False)  # too few: asyncpg says so


FLOAT4_ARRAY, INT4_ARRAY, DATE_ARRAY, TIMESTAMP_ARRAY = 1021, 1007, 1182, 1115


@pytest.mark.parametrize(
    ("oid", "value", "fit"),
    [
        (FLOAT4_ARRAY, [0.1, None, 2], True), (FLOAT4_ARRAY, [[0.5], [1.5]], True),
        (FLOAT4_ARRAY, [0.1, Decimal("0.1")], False), (FLOAT4_ARRAY, [[1.0], [2**53 + 1]], False),
        (FLOAT4_ARRAY, (Fraction(1, 3),), False), (FLOAT4_ARRAY, [], True),
        (INT4_ARRAY, [1, 2, None], True), (INT4_ARRAY, [[1], [Decimal("9.99")]], False),
        (INT4_ARRAY, [1.5], False),
        (INT4_ARRAY, iter([Decimal("9.99")]), True),  # not read: it would be consumed
        (DATE_ARRAY, [dt.date(2024, 6, 1)], True), (DATE_ARRAY, [dt.datetime(2024, 6, 1)], False),
        (INT4_ARRAY, [1, 2, 3, Decimal("9.99")], False), (INT4_ARRAY, [True, None, 2], True),
        (FLOAT4_ARRAY, [0.5, 2**53 + 1], False), (FLOAT4_ARRAY, [0.5, None], True),
        (TIMESTAMP_ARRAY, [dt.datetime(2024, 6, 1)], True),
        (TIMESTAMP_ARRAY, [dt.datetime(2024, 6, 1, tzinfo=dt.UTC)], False),
    ],
)
def test_array_elements_are_checked_as_scalars_are(oid: int, value: Any, fit: bool) -> None:
    checks = guards([oid])
    assert checks is not None
    assert fits(checks, executor_of((value,)), many=False) is fit


@pytest.mark.parametrize(("oid", "value"), [
    (INT4_ARRAY, list(range(10_000))), (INT4_ARRAY, [*range(5_000), None, True]),
    (FLOAT4_ARRAY, [0.5] * 10_000), (DATE_ARRAY, [dt.date(2024, 6, 1)] * 10_000),
])
def test_a_long_array_of_plain_values_costs_no_call_per_element(oid: int, value: Any) -> None:
    """``= ANY($1::int[])`` with thousands of ints is checked on every reuse: elements whose
    type the check passes whatever their value make no Python call each (one per element
    cost 0.4 ms per 1,000 ints on the success path)."""
    checks = guards([oid])
    assert checks is not None
    fit, calls = _calls(lambda: fits(checks, executor_of((value,)), many=False))
    assert fit
    assert calls < 10


class Values(Sequence[Any]):
    """A sequence of our own: asyncpg's array codec takes any sized iterable."""

    def __init__(self, *items: Any) -> None:
        self._items = list(items)

    def __len__(self) -> int:
        return len(self._items)

    @overload
    def __getitem__(self, index: int) -> Any: ...
    @overload
    def __getitem__(self, index: slice) -> Values: ...
    def __getitem__(self, index: int | slice) -> Any:
        return Values(*self._items[index]) if isinstance(index, slice) else self._items[index]


@pytest.mark.parametrize(
    ("oid", "value", "fit"),
    [
        (INT4_ARRAY, array.array("d", [1.5]), False), (INT4_ARRAY, array.array("i", [1, 2]), True),
        (FLOAT4_ARRAY, array.array("q", [1, 2**53 + 1]), False),
        (FLOAT4_ARRAY, array.array("f", [0.5]), True),
        (INT4_ARRAY, Values(1, Decimal("9.99")), False), (INT4_ARRAY, Values(1, None), True),
        (INT4_ARRAY, [Values(1), Values(Decimal("9.99"))], False),
        (INT4_ARRAY, Values([1], Values(2.5)), False),
        (DATE_ARRAY, Values(dt.datetime(2024, 6, 1)), False),
        (INT4_ARRAY, [(1,), (2,)], False),  # nested tuples are records to asyncpg, not arrays
    ],
)
def test_arrays_of_any_kind_asyncpg_takes_are_checked(oid: int, value: Any, fit: bool) -> None:
    """Not only lists and tuples: an ``array.array`` or a sequence of one's own is encoded as an
    array by asyncpg (any sized iterable but text, bytes and mappings), and was not looked at:
    ``array.array("d", [1.5])`` for a cached ``int4[]`` (now ``numeric[]``) was stored as 1."""
    checks = guards([oid])
    assert checks is not None
    assert fits(checks, executor_of((value,)), many=False) is fit


def test_an_iterable_asyncpg_refuses_is_not_read() -> None:
    """A generator (or another iterator) is not sized: asyncpg refuses it as an array, with its
    own error; the check leaves it unread for asyncpg to say so."""
    checks = guards([INT4_ARRAY])
    assert checks is not None
    read: list[Any] = []

    def values() -> Iterator[Any]:
        read.append(True)
        yield Decimal("9.99")

    generator = values()
    assert fits(checks, executor_of((generator,)), many=False)
    assert read == []
    assert next(generator) == Decimal("9.99")


@pytest.mark.skipif(not NUMPY, reason="numpy is not installed")
def test_numpy_arrays_are_checked_by_dtype_or_element() -> None:
    """A numpy array of integers (or floats for a float type) passes on its dtype, without a
    call per element; floats for an integer type, or objects that do not fit, are refused."""
    checks, real = guards([INT4_ARRAY]), guards([FLOAT4_ARRAY])
    assert checks is not None
    assert real is not None
    fit, calls = _calls(lambda: fits(checks, executor_of((np.arange(10_000),)), many=False))
    assert fit
    assert calls < 100  # (the ABC checks' own, at most; one per element would be 10,000)
    assert fits(checks, executor_of((np.array([[1, 2], [3, 4]]),)), many=False)
    assert fits(real, executor_of((np.linspace(0, 1, 10_000),)), many=False)
    assert not fits(checks, executor_of((np.array([1.5, 2.0]),)), many=False)
    assert not fits(checks, executor_of((np.array([1, Decimal("9.99")], dtype=object),)),
                    many=False)
    assert not fits(real, executor_of((np.array([2**53 + 1], dtype=np.int64),)), many=False)
