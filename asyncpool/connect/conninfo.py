"""libpq's ``key=value`` connection strings (``host=db port=5432 dbname=app``), split as libpq
splits them (``conninfo_parse`` in libpq's fe-connect.c), for `asyncpool.connect.dsn` to read as
it reads a URL's query.

The grammar: keywords and values are separated by whitespace; spaces may surround ``=``; a value
is either unquoted (up to the next whitespace) or in single quotes (up to the next unescaped
``'``, spaces and ``=`` included, and may run into the next keyword); in both a backslash takes
the next character literally (``\\'``, ``\\\\``, ``\\ ``). A keyword given twice: the last counts,
as in libpq. Errors never quote the string: a piece of it may be a password.
"""

from __future__ import annotations

#: C's isspace() in the C locale, which libpq uses: not Unicode's wider set.
_SPACE = frozenset(" \t\n\v\f\r")


class ConninfoSyntaxError(ValueError):
    """The string is not ``key=value`` as libpq reads it. The message quotes none of it."""


def is_conninfo(text: str) -> bool:
    """Whether `text` is a ``key=value`` string: it holds an ``=`` and is not a URL (libpq's
    ``recognized_connection_string``; a ``://`` before the first ``=`` is taken for a URL of
    another scheme, to be refused as one, where libpq would find no keyword)."""
    return "=" in text and "://" not in text.partition("=")[0]


def split_conninfo(text: str) -> list[tuple[str, str]]:
    """The (keyword, value) pairs of `text` in order, repeats included, unescaped."""
    pairs: list[tuple[str, str]] = []
    i, n = _skip_space(text, 0), len(text)
    while i < n:
        start = i
        while i < n and text[i] != "=" and text[i] not in _SPACE:
            i += 1
        keyword = text[start:i]
        i = _skip_space(text, i)
        if i >= n or text[i] != "=":
            # libpq names the word; it may be the part of a password after an unquoted space.
            raise ConninfoSyntaxError(
                f"a word in it (keyword number {len(pairs) + 1}) is not followed by '=' (a "
                "value with a space in it must be in single quotes: 'a b')")
        i = _skip_space(text, i + 1)
        quoted = i < n and text[i] == "'"
        value, i = _quoted(text, i + 1) if quoted else _unquoted(text, i)
        pairs.append((keyword, value))
        i = _skip_space(text, i)
    return pairs


def _skip_space(text: str, i: int) -> int:
    while i < len(text) and text[i] in _SPACE:
        i += 1
    return i


def _unquoted(text: str, i: int) -> tuple[str, int]:
    """The value from `i` to the next whitespace, and where it ends."""
    value: list[str] = []
    while i < len(text) and text[i] not in _SPACE:
        if text[i] == "\\":
            i += 1  # a backslash takes the next character (nothing, at the end)
        value.append(text[i : i + 1])
        i += 1
    return "".join(value), i


def _quoted(text: str, i: int) -> tuple[str, int]:
    """The value from `i` (after the opening quote) to the closing one, and where it ends."""
    value: list[str] = []
    while i < len(text) and text[i] != "'":
        if text[i] == "\\":
            i += 1
        value.append(text[i : i + 1])
        i += 1
    if i >= len(text):
        raise ConninfoSyntaxError(
            "a quoted value is not closed (a ' inside a quoted value is written \\')")
    return "".join(value), i + 1
