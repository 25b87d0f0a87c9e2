"""Values a changed reply sent in one format, turned by the server into the format asyncpg reads.

A changed reply's rows arrive in the formats the statement's old Bind asked for. When asyncpg
reads a retyped column in the other format (``money``, ``tsvector``, an extension type such as
``citext`` or ``hstore``: types asyncpg has no binary codec for), only the type's own receive
and output functions can turn a value, and only the server has them for every type. Each
distinct value goes back in a ``SELECT $1`` typed with the column's type, bound in the format it
arrived in, its result asked for in the format wanted: one round trip, only on that path, and
nothing of the user's tables is read.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence

from asyncpool.unnamed.messages import DATA_ROW, SYNC_MESSAGE, typed_parse

_INT16 = struct.Struct("!h")
_INT32 = struct.Struct("!i")
_EXECUTE_UNNAMED_PORTAL = b"E" + _INT32.pack(9) + b"\0" + _INT32.pack(0)
_PARSE_COMPLETE, _BIND_COMPLETE, _COMMAND_COMPLETE = ord("1"), ord("2"), ord("C")

#: (type OID, format sent, format wanted, value bytes): one value to turn.
Value = tuple[int, int, int, bytes]


class Conversion:
    """The request turning a reply's values (`request`) and how to put its answers back."""

    __slots__ = ("columns", "request", "values")

    def __init__(self, columns: dict[int, tuple[int, int, int]], values: list[Value]) -> None:
        self.columns = columns  # index -> (type OID, format sent, format wanted)
        self.values = values  # in the order the request asks for them
        parts: list[bytes] = []
        oid = None
        for value in values:
            if value[0] != oid:
                oid = value[0]
                parts.append(typed_parse("SELECT $1", (oid,)))
            parts.append(_bind(value[3], value[1], value[2]))
            parts.append(_EXECUTE_UNNAMED_PORTAL)
        parts.append(SYNC_MESSAGE)
        self.request: bytes = b"".join(parts)

    def rows(self, recorded: list[bytes], reply: list[bytes]) -> list[bytes] | None:
        """`recorded` with the values turned, from the server's `reply` to `request`; None if
        it refused one (an ErrorResponse) or answered something else."""
        answers: list[bytes] = []
        for message in reply:
            if message[0] == DATA_ROW:
                fields = data_row_values(message)
                if len(fields) != 1 or fields[0] is None:
                    return None
                answers.append(fields[0])
            elif message[0] not in (_PARSE_COMPLETE, _BIND_COMPLETE, _COMMAND_COMPLETE,
                                    ord("Z")):
                return None
        if len(answers) != len(self.values):
            return None
        turned = dict(zip(self.values, answers, strict=True))
        out: list[bytes] = []
        for message in recorded:
            if message[0] == DATA_ROW:
                fields = data_row_values(message)
                for index, (oid, was, want) in self.columns.items():
                    value = fields[index]
                    if value is not None:
                        fields[index] = turned[(oid, was, want, value)]
                out.append(data_row(fields))
            else:
                out.append(message)
        return out


def conversion(recorded: list[bytes], types: Sequence[int], sent: Sequence[int],
               wanted: Sequence[int]) -> Conversion | None:
    """What turns the columns of `recorded` (a reply's messages) `sent` in one format into
    the `wanted` ones; None when no value needs turning (no such column, or only NULLs)."""
    columns = {index: (oid, was, want) for index, (oid, was, want)
               in enumerate(zip(types, sent, wanted, strict=True)) if was != want}
    if not columns:
        return None
    distinct: dict[Value, None] = {}  # ordered, without repeats
    for message in recorded:
        if message[0] != DATA_ROW:
            continue
        fields = data_row_values(message)
        for index, (oid, was, want) in columns.items():
            value = fields[index]
            if value is not None:
                distinct[(oid, was, want, value)] = None
    if not distinct:
        return None
    return Conversion(columns, sorted(distinct, key=lambda value: value[0]))


def _bind(value: bytes, param_format: int, result_format: int) -> bytes:
    """Bind of the unnamed portal and statement: one parameter, one result column."""
    body = b"".join((b"\0\0", _INT16.pack(1), _INT16.pack(param_format), _INT16.pack(1),
                     _INT32.pack(len(value)), value, _INT16.pack(1),
                     _INT16.pack(result_format)))
    return b"B" + _INT32.pack(len(body) + 4) + body


def data_row_values(row: bytes) -> list[bytes | None]:
    """The values of a whole DataRow message (None: NULL)."""
    (count,) = _INT16.unpack_from(row, 5)
    values: list[bytes | None] = []
    pos = 7
    for _ in range(count):
        (length,) = _INT32.unpack_from(row, pos)
        pos += 4
        if length < 0:
            values.append(None)
            continue
        values.append(row[pos:pos + length])
        pos += length
    return values


def data_row(values: Sequence[bytes | None]) -> bytes:
    """A whole DataRow message of `values` (None: NULL)."""
    parts = [_INT16.pack(len(values))]
    for value in values:
        parts.append(_INT32.pack(-1) if value is None else _INT32.pack(len(value)) + value)
    body = b"".join(parts)
    return b"D" + _INT32.pack(len(body) + 4) + body
