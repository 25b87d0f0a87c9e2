"""Values sent in one format and read in the other, turned by the server (`asyncpool.unnamed.convert`):
the request asks for each distinct value once, and the answers go back in place."""

from __future__ import annotations

import struct

from asyncpool.unnamed.convert import conversion, data_row, data_row_values

MONEY, INT4 = 790, 23
ROWS = [data_row([b"\0\0\0\x01", b"\0\0\0\0\0\0\0\x64"]), data_row([b"\0\0\0\x02", None]),
        data_row([b"\0\0\0\x03", b"\0\0\0\0\0\0\0\x64"]), b"C\0\0\0\rSELECT 3\0"]


def _messages(data: bytes) -> list[bytes]:
    out, pos = [], 0
    while pos < len(data):
        (size,) = struct.unpack_from("!i", data, pos + 1)
        out.append(data[pos:pos + 1 + size])
        pos += 1 + size
    return out


def test_each_distinct_value_is_asked_once_and_put_back() -> None:
    turn = conversion(ROWS, [INT4, MONEY], [1, 1], [1, 0])
    assert turn is not None
    kinds = [m[:1] for m in _messages(turn.request)]
    assert kinds == [b"P", b"B", b"E", b"S"]  # 100 cents twice: asked once
    reply = [b"1\0\0\0\x04", b"2\0\0\0\x04", data_row([b"$1.00"]), b"C\0\0\0\rSELECT 1\0",
             b"Z\0\0\0\x05I"]
    rows = turn.rows(ROWS, reply)
    assert rows is not None
    assert [data_row_values(r) for r in rows[:3]] == [
        [b"\0\0\0\x01", b"$1.00"], [b"\0\0\0\x02", None], [b"\0\0\0\x03", b"$1.00"]]
    assert rows[3] == ROWS[3]


def test_a_refusal_or_nothing_to_turn() -> None:
    turn = conversion(ROWS, [INT4, MONEY], [1, 1], [1, 0])
    assert turn is not None
    assert turn.rows(ROWS, [b"1\0\0\0\x04", b"E\0\0\0\x0aCXX000\0\0", b"Z\0\0\0\x05I"]) is None
    assert conversion(ROWS[1:2], [INT4, MONEY], [1, 1], [1, 0]) is None  # only a NULL
    assert conversion(ROWS, [INT4, MONEY], [1, 1], [1, 1]) is None  # formats agree
