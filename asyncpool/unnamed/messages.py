"""The few PostgreSQL wire messages the "unnamed" mode writes or reads, built and parsed in Python."""

from __future__ import annotations

import struct
from collections.abc import Sequence

#: One result column as a cached description knows it: name and type OID. Those two decide how
#: asyncpg decodes a value and which key a record gives it; typmods and table OIDs do not.
Column = tuple[str, int]

_INT32 = struct.Struct("!i")
_INT16 = struct.Struct("!h")
# After a column's name in a RowDescription: table OID, attnum, type OID, typlen, typmod, format.
_FIELD = struct.Struct("!IhIhih")

# Describe the unnamed portal (after its Bind): the server answers RowDescription or NoData, with
# the format each column will be sent in.
DESCRIBE_UNNAMED_PORTAL = b"D" + _INT32.pack(6) + b"P\0"

PARSE_COMPLETE = ord("1")
BIND_COMPLETE = ord("2")
PARAMETER_DESCRIPTION = ord("t")
ROW_DESCRIPTION = ord("T")
NO_DATA = ord("n")
DATA_ROW = ord("D")
ERROR_RESPONSE = ord("E")
READY_FOR_QUERY = ord("Z")
PARSE = ord("P")
# Messages the server may send at any moment; they say nothing about the statement.
ASYNCHRONOUS = frozenset((ord("N"), ord("S"), ord("A")))


#: ParseComplete, as the server sends it.
PARSE_COMPLETE_MESSAGE = b"1\0\0\0\x04"
BIND_COMPLETE_MESSAGE = b"2\0\0\0\x04"
FLUSH_MESSAGE = b"H\0\0\0\x04"
SYNC_MESSAGE = b"S\0\0\0\x04"


def bind_result_formats(data: bytes | bytearray, columns: int) -> tuple[int, ...] | None:
    """The result format code of each of `columns` columns asked for by the first Bind in
    `data` (a run of whole messages), or None if there is no Bind or its codes do not fit."""
    pos = 0
    while pos + 5 <= len(data):
        (size,) = _INT32.unpack_from(data, pos + 1)
        end = pos + 1 + size
        if data[pos] == ord("B"):
            codes = bind_result_codes(data, pos)
            count = len(codes)
            if count == 0:
                return (0,) * columns
            if count == 1:
                return codes * columns
            return codes if count == columns else None
        pos = end
    return None


def bind_result_codes(data: bytes | bytearray, pos: int = 0) -> tuple[int, ...]:
    """The result format codes of the Bind message at `pos` in `data`, as written: none (all
    text), one (for every column), or one per column."""
    at = data.index(b"\0", pos + 5) + 1  # portal
    at = data.index(b"\0", at) + 1  # statement
    (formats,) = _INT16.unpack_from(data, at)
    at += 2 + 2 * formats
    (params,) = _INT16.unpack_from(data, at)
    at += 2
    for _ in range(params):
        (length,) = _INT32.unpack_from(data, at)
        at += 4 + max(length, 0)
    (count,) = _INT16.unpack_from(data, at)
    return struct.unpack_from(f"!{count}h", data, at + 2)


def bind_with_text_params(bind: bytes | bytearray | memoryview, params: int,
                          text: tuple[int, ...]) -> bytes:
    """A Bind of the unnamed portal and statement (one whole message) with the parameters at
    indexes `text` sent in text format; their bytes are unchanged."""
    data = bytes(bind)
    (count,) = _INT16.unpack_from(data, 7)
    codes = list(struct.unpack_from(f"!{count}h", data, 9))
    if count == 0:
        codes = [0] * params
    elif count == 1:
        codes = codes * params
    elif count != params:
        raise ValueError(f"Bind has {count} parameter formats for {params} parameters")
    for index in text:
        codes[index] = 0
    body = b"\0\0" + struct.pack(f"!h{params}h", params, *codes) + data[9 + 2 * count:]
    return b"B" + _INT32.pack(len(body) + 4) + body


def typed_parse(query: str, param_oids: Sequence[int]) -> bytes:
    """Parse of the unnamed statement with every parameter's type given.

    Fixing the types means the server reads the binary values asyncpg encodes as the types they
    were encoded for: after a retype it casts them (or refuses), never misreads them.
    """
    body = b"".join((
        b"\0",
        query.encode("utf-8"),
        b"\0",
        _INT16.pack(len(param_oids)),
        struct.pack(f"!{len(param_oids)}I", *param_oids),
    ))
    return b"P" + _INT32.pack(len(body) + 4) + body


def parameter_description(param_oids: Sequence[int]) -> bytes:
    """A ParameterDescription message for these types."""
    body = _INT16.pack(len(param_oids)) + struct.pack(f"!{len(param_oids)}I", *param_oids)
    return b"t" + _INT32.pack(len(body) + 4) + body


def row_columns(message: bytes | bytearray | memoryview) -> tuple[Column, ...]:
    """The columns of a whole RowDescription message (type byte and length included)."""
    data = bytes(message)
    (count,) = _INT16.unpack_from(data, 5)
    columns: list[Column] = []
    pos = 7
    for _ in range(count):
        end = data.index(b"\0", pos)
        type_oid = _FIELD.unpack_from(data, end + 1)[2]
        columns.append((data[pos:end].decode("utf-8", "replace"), type_oid))
        pos = end + 1 + _FIELD.size
    return tuple(columns)


def row_formats(message: bytes) -> tuple[int, ...]:
    """The format code of each column of a whole RowDescription (NoData: none)."""
    if message[:1] != b"T":
        return ()
    (count,) = _INT16.unpack_from(message, 5)
    formats: list[int] = []
    pos = 7
    for _ in range(count):
        end = message.index(b"\0", pos)
        formats.append(_FIELD.unpack_from(message, end + 1)[5])
        pos = end + 1 + _FIELD.size
    return tuple(formats)


#: Types whose binary form is the same bytes as their text form (json, text, varchar, bpchar,
#: name: the send functions write the text in the client encoding).
_BINARY_IS_TEXT = frozenset((114, 25, 1043, 1042, 19))
#: jsonb's binary form is its text after a version byte.
_JSONB = 3802
_JSONB_VERSION = 1


def rows_in_formats(recorded: list[bytes], types: Sequence[int], sent: Sequence[int],
                    wanted: Sequence[int]) -> list[bytes] | None:
    """A recorded reply whose DataRows' values were `sent` in one format per column, as the
    `wanted` formats read them; None when one cannot be turned without the server (only a
    binary value whose text is the same bytes, or jsonb's after its version byte, can)."""
    strip: list[int] = []
    for index, (was, want, oid) in enumerate(zip(sent, wanted, types, strict=True)):
        if was == want:
            continue
        if (was, want) != (1, 0):
            return None
        if oid == _JSONB:
            strip.append(index)
        elif oid not in _BINARY_IS_TEXT:
            return None
    if not strip:
        return recorded
    turned: list[bytes] = []
    for message in recorded:
        row = _jsonb_as_text(message, strip) if message[0] == DATA_ROW else message
        if row is None:
            return None
        turned.append(row)
    return turned


def _jsonb_as_text(row: bytes, columns: list[int]) -> bytes | None:
    """A whole DataRow with the binary jsonb values at `columns` in text form."""
    (count,) = _INT16.unpack_from(row, 5)
    parts = [row[5:7]]
    pos = 7
    for index in range(count):
        (length,) = _INT32.unpack_from(row, pos)
        value = row[pos + 4:pos + 4 + max(length, 0)]
        pos += 4 + max(length, 0)
        if length > 0 and index in columns:
            if value[0] != _JSONB_VERSION:
                return None
            value = value[1:]
            length -= 1
        parts.append(_INT32.pack(length) + value)
    body = b"".join(parts)
    return b"D" + _INT32.pack(len(body) + 4) + body


def error_sqlstate(message: bytes | bytearray | memoryview) -> str | None:
    """The SQLSTATE (field ``C``) of a whole ErrorResponse message."""
    return _error_field(message, b"C")


def error_is_fatal(message: bytes | bytearray | memoryview) -> bool:
    """Whether a whole ErrorResponse message ends the session (severity FATAL or PANIC): the
    server or pooler closes the connection after it. Field ``V`` (never localized) if present,
    else ``S`` (PgBouncer sends only ``S``)."""
    severity = _error_field(message, b"V") or _error_field(message, b"S")
    return severity in ("FATAL", "PANIC")


def _error_field(message: bytes | bytearray | memoryview, code: bytes) -> str | None:
    for field in bytes(message[5:]).split(b"\0"):
        if field[:1] == code:
            return field[1:].decode("ascii", "replace")
    return None


def message_header(buf: bytes | bytearray, pos: int) -> tuple[int, int] | None:
    """(type, end offset) of the message starting at `pos`, or None until it is all there."""
    if len(buf) - pos < 5:
        return None
    (size,) = _INT32.unpack_from(buf, pos + 1)
    if size < 4:
        raise ValueError(f"malformed message length {size}")
    end = pos + 1 + size
    return (buf[pos], end) if len(buf) >= end else None
