"""The row class a `Pool` subclass declares (``class RowPool(Pool[Row])``), held to the record
class the pool is made with.

Type checkers cannot refuse ``RowPool(dsn)`` without ``record_class=Row``: a ``Pool[Row]`` is a
``Pool[asyncpg.Record]`` (the pool is covariant in its rows, so a function taking a bare ``Pool``
takes it), and so satisfies the signature that makes a pool of Records. Its rows would be
asyncpg's Records while its type says ``Row``: the first use of a Row attribute would fail far
from the cause. So the pool refuses it when it is made, naming what to give. Only a class that
names its rows is held to them: a subclass generic in its rows (``class MyPool(Pool[R])``), one
that names none (``class MyPool(Pool)``), and a pool made from ``Pool[Row](dsn)`` (which type
checkers already refuse) are not checked.
"""

from __future__ import annotations

from typing import Any, TypeVar, get_args, get_origin


def of(cls: type, pool_class: type) -> object:
    """What `cls` declares its rows to be: the argument of the first ``Pool[...]`` (or of a
    generic subclass of it) among its own bases, resolved through that subclass's type
    parameters; else what its parent declared (None: nothing)."""
    for base in cls.__dict__.get("__orig_bases__", ()):
        origin = get_origin(base)
        if isinstance(origin, type) and issubclass(origin, pool_class):
            parameters: tuple[Any, ...] = getattr(origin, "__parameters__", ())
            # (Pool's own rows are its type parameter; a subclass's, what it declared.)
            rows: object = (parameters[0] if origin is pool_class
                            else getattr(origin, "_declared_rows", None))
            if isinstance(rows, TypeVar) and rows in parameters:
                arguments = get_args(base)
                index = parameters.index(rows)
                return arguments[index] if index < len(arguments) else rows
            return rows
    return getattr(cls, "_declared_rows", None)


def refuse_other_rows(cls: type, declared: object, connect_kwargs: Any) -> None:
    """Raise `PoolConfigError` if `cls` declares rows of a record class (`declared`) that the
    pool's record class (`connect_kwargs`' ``record_class``, asyncpg's Record if none) is not."""
    import asyncpg

    from asyncpool.errors import PoolConfigError

    if not (isinstance(declared, type) and issubclass(declared, asyncpg.Record)):
        return  # a type variable, a string, Any...: nothing the pool can hold it to
    record_class = connect_kwargs.get("record_class", asyncpg.Record)
    if isinstance(record_class, type) and issubclass(record_class, declared):
        return
    given = ("asyncpg.Record" if record_class is asyncpg.Record
             else getattr(record_class, "__qualname__", repr(record_class)))
    made = (f"made with record_class={given}" if "record_class" in connect_kwargs
            else "made without record_class=")
    raise PoolConfigError(
        f"{cls.__qualname__} is a Pool[{declared.__qualname__}] but was {made}: its rows would "
        f"be {given}, not {declared.__qualname__}. Give record_class={declared.__qualname__} "
        f"(or a subclass of it) to {cls.__qualname__}(), or have {cls.__qualname__}.__init__ "
        "pass it to Pool.__init__")
