"""Cached statement descriptions of one connection: bounded, optionally timed, invalidated together."""

from __future__ import annotations

import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

from asyncpool.stats import StatementCacheStats
from asyncpool.unnamed.fits import Guard, guards
from asyncpool.unnamed.messages import (
    Column,
    parameter_description,
    typed_parse,
)

#: (query text, record class, ignore_custom_codec): what asyncpg keys its own statement cache on.
Key = tuple[str, type, bool]


class Generation:
    """Bumped by `invalidate_all`; a cache filled under an older generation is dropped on next use."""

    value = 0


def invalidate_all() -> None:
    """Forget every cached description in this process (each is described afresh on next use)."""
    Generation.value += 1


class Description:
    """What one statement looked like when asyncpg described it, and how to check it still does.

    `statement` is asyncpg's unnamed, "unprepared" statement state (its codecs are reused);
    `prefix` is the typed Parse sent ahead of each reuse (a Describe of the portal follows
    asyncpg's Bind); `columns` is what the server must answer to that Describe for the rows to be
    decoded with `statement`; `param_message` describes the parameters, to build the statement
    again when a reply shows a changed result.
    """

    __slots__ = ("columns", "expires_at", "guards", "param_message", "per_column_formats",
                 "prefix", "row_message", "statement", "text_params", "type_names")

    def __init__(self, statement: Any, expires_at: float | None,
                 enums: frozenset[int] | set[int] = frozenset()) -> None:
        params = [t.oid for t in statement._get_parameters()]
        attributes = statement._get_attributes()
        self.statement: Any = statement
        # An enum's binary form is its label, the same bytes as its text form. Sent as text with
        # the type left to the server, a label still means the same after the enum type was
        # dropped and recreated (a new OID the Parse could not name) and can never be misread.
        self.text_params: tuple[int, ...] = tuple(i for i, oid in enumerate(params) if oid in enums)
        declared = [0 if oid in enums else oid for oid in params]
        self.prefix: bytes = typed_parse(statement.query, declared)
        self.param_message: bytes = parameter_description(params)
        #: The checks an argument passes to be encoded by a cached type without loss (`fits`).
        self.guards: tuple[tuple[int, Guard], ...] | None = guards(params)
        self.columns: tuple[Column, ...] = tuple((a.name, a.type.oid) for a in attributes)
        # A RowDescription already found to match `columns`: later ones are compared as bytes.
        self.row_message: bytes | None = None
        self.expires_at: float | None = expires_at
        #: asyncpg's Bind names each result column's format (some column is read as text):
        #: the server refuses it at Bind once the number of columns changed. Learned from the
        #: first Bind sent (`Wire`); None until then (taken as True in a transaction block).
        self.per_column_formats: bool | None = None
        self.type_names: dict[int, str] = {a.type.oid: a.type.name for a in attributes}


@dataclass(frozen=True, slots=True)
class DescribeCacheStats:
    """Counters of one connection's description cache."""

    size: int
    max_size: int
    hits: int
    misses: int
    stale: int
    evicted: int


class CacheTotals:
    """One pool's counts over all its connections' caches, kept as they happen so closing a
    connection loses none of them."""

    __slots__ = ("evicted", "hits", "misses", "stale")
    hits: int
    misses: int
    stale: int
    evicted: int

    def __init__(self) -> None:
        self.hits = self.misses = self.stale = self.evicted = 0

    def snapshot(self) -> StatementCacheStats:
        return StatementCacheStats(self.hits, self.misses, self.stale, self.evicted)


class DescriptionCache:
    """Least-recently-used descriptions, at most `max_size`, each kept at most `ttl` seconds.

    Counts go to the connection's own counters and to its pool's `totals`.
    """

    __slots__ = (
        "_entries", "_generation", "evicted", "hits", "max_size", "misses", "stale", "totals", "ttl",
    )
    hits: int
    misses: int
    stale: int
    evicted: int

    def __init__(self, max_size: int, ttl: float | None, totals: CacheTotals) -> None:
        self.max_size: int = max_size
        self.ttl: float | None = ttl
        self.totals: CacheTotals = totals
        self._entries: OrderedDict[Key, Description] = OrderedDict()
        self._generation = Generation.value
        self.hits = self.misses = self.stale = self.evicted = 0

    def get(self, key: Key) -> Description | None:
        if self._generation != Generation.value:
            self.clear()
            self._generation = Generation.value
        entry = self._entries.get(key)
        if entry is not None and entry.expires_at is not None and time.monotonic() >= entry.expires_at:
            del self._entries[key]
            entry = None
        if entry is None:
            self.misses += 1
            self.totals.misses += 1
            return None
        self._entries.move_to_end(key)
        self.hits += 1
        self.totals.hits += 1
        return entry

    def peek(self, key: Key) -> Description | None:
        """The entry just put (not counted as a hit or a miss)."""
        return self._entries.get(key)

    def generation(self) -> int:
        """Pass to `put`: a description made while `invalidate_all` ran must not be kept."""
        return Generation.value

    def put(self, key: Key, statement: Any, generation: int,
            enums: frozenset[int] | set[int] = frozenset()) -> None:
        if generation != Generation.value:
            return
        expires_at = None if self.ttl is None else time.monotonic() + self.ttl
        self._entries[key] = Description(statement, expires_at, enums)
        self._entries.move_to_end(key)
        while len(self._entries) > self.max_size:
            self._entries.popitem(last=False)
            self.evicted += 1
            self.totals.evicted += 1

    def count_miss(self) -> None:
        self.misses += 1
        self.totals.misses += 1

    def count_stale(self) -> None:
        self.stale += 1
        self.totals.stale += 1

    def discard(self, key: Key) -> None:
        self._entries.pop(key, None)

    def clear(self) -> None:
        self._entries.clear()

    def __len__(self) -> int:
        return len(self._entries)

    def stats(self) -> DescribeCacheStats:
        return DescribeCacheStats(len(self._entries), self.max_size, self.hits, self.misses,
                                  self.stale, self.evicted)
