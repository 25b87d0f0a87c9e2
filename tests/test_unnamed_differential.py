"""``prepared_statements="unnamed"`` against asyncpg itself, on seeded random sequences of calls.

Each case is a sequence of calls (fetch, fetchrow, fetchval, execute, executemany, a cursor in a
transaction block, ``prepare()`` and its executions, transaction blocks of several calls) with
random arguments of many types, over queries of no, one and many rows, wide rows, results that
fail part-way, and statements repeated so that cache hits and misses interleave, with schema
changes between repeats (columns retyped, added and dropped; a view and functions redefined with
other result types; enum, domain and composite types changed). The same sequence runs through
an asyncpool `Pool` in "unnamed" mode via the target (PostgreSQL, PgBouncer 1.18, the current
PgBouncer) and through a raw ``asyncpg.connect(statement_cache_size=0)`` straight to PostgreSQL
(the oracle), each on its own copy of the objects, the migrations applied to both copies by a
third connection. Every outcome must be equal: the values (with their Python types: ``1`` is not
``1.0``), the column names, the status strings, or the same exception class, SQLSTATE and
message (object names aside). After each case the pool's connection still answers and the pool
holds nothing.

The generator stays away from the differences docs/describe-cache.md documents (each place says
which). Reproduce a failure with the seed it prints: ``ASYNCPOOL_TEST_DIFF_SEED=<seed> pytest
tests/test_unnamed_differential.py -k "case3 and postgres"``; ``ASYNCPOOL_TEST_DIFF_CASES`` sets the
number of cases (per target).
"""

from __future__ import annotations

import datetime as dt
import functools
import math
import os
import random
import re
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

import asyncpg
import pytest

from asyncpool import Pool
from asyncpool.testing import PostgresServer
from tests.test_unnamed_prepare import Target, target  # noqa: F401 (a fixture)

SEED = int(os.environ.get("ASYNCPOOL_TEST_DIFF_SEED", "20261207"))
CASES = int(os.environ.get("ASYNCPOOL_TEST_DIFF_CASES", "20"))
STEPS = 80

# -- values ------------------------------------------------------------------------------------

UTC = dt.UTC
INT_EDGES = [0, 1, -1, 7, 42, 32767, -32768, 32768, 2**31 - 1, -(2**31), 2**31, 2**63 - 1,
             -(2**63), 2**63]
NUMERIC_VALUES = [Decimal("0"), Decimal("-0"), Decimal("1.5"), Decimal("-123.4500"),
                  Decimal("NaN"), Decimal("1E+400"), Decimal("-1E-300"), Decimal("9" * 600),
                  Decimal("0.000000000000000000001"), Decimal(2**70), Decimal("Infinity"),
                  Decimal("-Infinity")]
FLOAT_VALUES = [0.0, -0.0, 0.1, -2.5, math.inf, -math.inf, math.nan, 1e308, 5e-324,
                1.7976931348623157e308, 3.4028234663852886e38, 1e39, 123456789.125]
TEXT_VALUES = ["", "a", "ünïcödé", "日本語テキスト", "🐍🎉", "e\u0301", "\u200b", "a\tb\nc",
               "quote'\"\\", "x" * 5000, "\U0010ffff", "עברית", "NULL", "{1,2}", " lead"]
BYTEA_VALUES = [b"", b"\x00", b"\x00\xff" * 100, bytes(range(256)), b"\\x00"]
DATE_VALUES = [dt.date(1, 1, 1), dt.date(9999, 12, 31), dt.date.max, dt.date.min,
               dt.date(1970, 1, 1), dt.date(2000, 2, 29)]
TS_VALUES = [dt.datetime(1, 1, 1), dt.datetime(9999, 12, 31, 23, 59, 59, 999999),
             dt.datetime(2000, 1, 1, 12, 0, 0, 123456), dt.datetime(1970, 1, 1)]
TZ_VALUES = [dt.datetime(2000, 1, 1, tzinfo=UTC),
             dt.datetime(1999, 12, 31, 23, 0, tzinfo=dt.timezone(dt.timedelta(hours=14))),
             dt.datetime(2038, 1, 19, 3, 14, 8, tzinfo=dt.timezone(dt.timedelta(hours=-12))),
             dt.datetime(1, 1, 2, tzinfo=UTC), dt.datetime(9999, 12, 30, tzinfo=UTC)]
INTERVAL_VALUES = [dt.timedelta(0), dt.timedelta(microseconds=1), dt.timedelta(days=-1),
                   dt.timedelta.max, dt.timedelta.min, dt.timedelta(days=999999, seconds=5)]
JSON_VALUES = ['{"a": 1}', "[]", "null", '"\\u00e9"', '{"k": [1, 2.50, null], "k": true}',
               '  {"b":1,   "a":2}  ', "{", "1e400"]


def _int(rng: random.Random, low: int, high: int) -> int:
    """An integer mostly within [low, high], sometimes an edge past it (an error both sides)."""
    if rng.random() < 0.15:
        return rng.choice(INT_EDGES)
    return rng.choice([low, high, 0, 1, rng.randint(low, high)])


INT_RANGES = {"int2": (-(2**15), 2**15 - 1), "int4": (-(2**31), 2**31 - 1),
              "int8": (-(2**63), 2**63 - 1)}


def _int_of(limits: tuple[int, int], rng: random.Random, _: Gen) -> int:
    return _int(rng, *limits)


#: Each kind's values (a callable: drawn each time), past each type's limits at times: the
#: same error on both sides.
VALUES: dict[str, Callable[[random.Random, Gen], Any]] = {
    **{kind: functools.partial(_int_of, limits) for kind, limits in INT_RANGES.items()},
    "numeric": lambda rng, _: rng.choice([*NUMERIC_VALUES, rng.randint(-(10**30), 10**30)]),
    "float4": lambda rng, _: rng.choice([*FLOAT_VALUES, rng.uniform(-1e6, 1e6)]),
    "text": lambda rng, _: rng.choice([*TEXT_VALUES,
                                       "".join(chr(rng.randint(32, 0x2FFF)) for _ in range(12))]),
    "bytea": lambda rng, _: rng.choice([*BYTEA_VALUES, rng.randbytes(rng.randint(0, 64))]),
    "bool": lambda rng, _: rng.choice([True, False]),
    "date": lambda rng, _: rng.choice(DATE_VALUES),
    "timestamp": lambda rng, _: rng.choice(TS_VALUES),
    "timestamptz": lambda rng, _: rng.choice(TZ_VALUES),
    "interval": lambda rng, _: rng.choice(INTERVAL_VALUES),
    "uuid": lambda rng, _: uuid.UUID(int=rng.choice([0, 2**128 - 1, rng.getrandbits(128)])),
    "json": lambda rng, _: rng.choice(JSON_VALUES),
    "int4[]": lambda rng, _: rng.choice([[], [None], [1, None, 3], [[1, 2], [3, 4]], [[None]],
                                         [2**31],
                                         [rng.randint(-9, 9) for _ in range(rng.randint(0, 300))]]),
    "int8[]": lambda rng, _: rng.choice([[], [2**40, None], [[1], [2]]]),
    "text[]": lambda rng, _: rng.choice([[], ["a", None, "", "x,y", '"q"', "NULL", "🐍"],
                                         [["a", "b"], ["c", "d"]]]),
    "float8[]": lambda rng, _: rng.choice([[math.nan, math.inf, -0.0], [], [None, 1.5]]),
    # Enum parameters are not arrays here: an array of enums after its type was recreated is
    # refused inside a transaction block where asyncpg describes afresh (docs, Limits).
    "enum": lambda rng, g: rng.choice([*g.labels, "zz"]),  # "zz": not a label, an error
    "domain": lambda rng, _: rng.choice([1, 5, 2**31 - 1, -1, 0]),  # -1, 0: its CHECK refuses
    "composite": lambda rng, g: rng.choice([(1, "x", 1.5), (None, None, None),
                                            (2**31, "y", 0.0)])[:len(g.attrs)],
}
VALUES["float8"] = VALUES["float4"]
VALUES["varchar"] = VALUES["text"]
VALUES["jsonb"] = VALUES["json"]


def value(rng: random.Random, kind: str, g: Gen) -> Any:
    """A random argument for a parameter of `kind` (a SQL type name, or one of the test's types)."""
    if rng.random() < 0.08:
        return None
    return VALUES[kind](rng, g)


ECHO_KINDS = ["int2", "int4", "int8", "numeric", "float4", "float8", "text", "varchar", "bytea",
              "bool", "date", "timestamp", "timestamptz", "interval", "uuid", "json", "jsonb",
              "int4[]", "int8[]", "text[]", "float8[]", "enum", "domain", "composite"]


def sql_type(kind: str) -> str:
    return {"enum": "{e}", "domain": "{dm}", "composite": "{c}"}.get(kind, kind)


# -- steps -------------------------------------------------------------------------------------


@dataclass
class Call:
    """One call on a connection (or, for "executemany", its argument sets in `args`)."""

    method: str
    sql: str
    args: tuple[Any, ...] = ()

    def describe(self) -> str:
        return f"{self.method}({self.sql!r}, {_short(self.args)})"


@dataclass
class Cursor:
    sql: str
    args: tuple[Any, ...]
    prefetch: int
    sizes: tuple[int, ...] | None  # None: iterated; else cursor.fetch(n) for each n

    def describe(self) -> str:
        return f"cursor({self.sql!r}, {_short(self.args)}, prefetch={self.prefetch}, {self.sizes})"


@dataclass
class Prepared:
    sql: str
    calls: list[tuple[str, tuple[Any, ...]]]

    def describe(self) -> str:
        return f"prepare({self.sql!r}) then {[(m, _short(a)) for m, a in self.calls]}"


@dataclass
class Block:
    calls: list[Call]

    def describe(self) -> str:
        return "transaction[" + "; ".join(c.describe() for c in self.calls) + "]"


@dataclass
class Ddl:
    sql: str

    def describe(self) -> str:
        return f"MIGRATE {self.sql!r}"


@dataclass
class Release:
    """The subject gives its connection back and takes one again (the oracle has one)."""

    def describe(self) -> str:
        return "release and acquire again"


Step = Call | Cursor | Prepared | Block | Ddl | Release


def _short(args: Any) -> str:
    text = repr(args)
    return text if len(text) < 200 else text[:200] + "..."


@dataclass
class Template:
    """A statement the sequence runs again with new arguments (its text unchanged: a cache hit
    for the subject, when nothing changed since)."""

    sql: str
    kinds: list[str]  # parameter kinds, to draw arguments
    rows: bool  # it returns rows
    columns: frozenset[str] = frozenset()  # table columns it binds (gone when one changes)
    many: bool = False  # an INSERT fit for executemany


@dataclass
class Column:
    type: str
    kind: str | None  # what is bound to it; None: not bound (read only)


@dataclass
class Gen:
    """The sequence generator and the schema it has built so far."""

    rng: random.Random
    columns: dict[str, Column] = field(default_factory=dict)
    templates: list[Template] = field(default_factory=list)
    labels: list[str] = field(default_factory=lambda: ["a", "b", "c"])
    attrs: list[str] = field(default_factory=lambda: ["x int4", "y text"])
    view_x: str = "int4"
    view_extra: int = 0
    func_result: str = "a int4, b text"
    scalar_result: str = "int4"
    added: int = 0
    enum_generation: int = 0

    def __post_init__(self) -> None:
        self.columns = {
            "a": Column("int4", "int4"),  # widened int4 -> int8 -> numeric: still bound with ints
            "r": Column("int4", "r"),  # retyped at will: bound as an explicit $n::int4
            "s": Column("text", "text"), "f": Column("float8", "float8"),
            "b": Column("bytea", "bytea"), "ok": Column("bool", "bool"),
            "d": Column("date", "date"), "ts": Column("timestamp", "timestamp"),
            "tz": Column("timestamptz", "timestamptz"), "iv": Column("interval", "interval"),
            "u": Column("uuid", "uuid"), "j": Column("jsonb", "jsonb"),
            "arr": Column("int4[]", "int4[]"), "e": Column("{e}", "enum"),
            "dm": Column("{dm}", "domain"), "c": Column("{c}", "composite"),
        }

    # -- statements ----------------------------------------------------------------------------

    def args(self, template: Template) -> tuple[Any, ...]:
        out = []
        for kind in template.kinds:
            if kind == "id":
                out.append(self.rng.randint(1, 40))
            elif kind == "count":
                out.append(self.rng.choice([0, 1, 2, 7, 500, 3000]))
            elif kind == "r":
                out.append(_int(self.rng, -1000, 1000))
            else:
                out.append(value(self.rng, kind, self))
        return tuple(out)

    def new_template(self) -> Template:
        shapes: dict[Callable[[], Template], int] = {
            self.echo: 6, self.wide: 1, self.series: 2, self.partway: 2, self.insert: 4,
            self.select: 5, self.update: 2, self.view: 2, self.func: 2, self.scalar: 1,
        }
        return self.rng.choices(list(shapes), weights=list(shapes.values()))[0]()

    def echo(self, low: int = 1, high: int = 5) -> Template:
        kinds = [self.rng.choice(ECHO_KINDS) for _ in range(self.rng.randint(low, high))]
        body = ", ".join(f"${i + 1}::{sql_type(k)} AS c{i}" for i, k in enumerate(kinds))
        return Template("SELECT " + body, kinds, True)

    def wide(self) -> Template:
        return self.echo(30, 70)

    def series(self) -> Template:
        kind = self.rng.choice(ECHO_KINDS)
        return Template(f"SELECT g, g::text AS s, $2::{sql_type(kind)} AS v "
                        "FROM generate_series(1, $1::int) g", ["count", kind], True)

    def partway(self) -> Template:
        # Fails at row $1 (division by zero) after the rows before it were sent.
        return Template("SELECT g, 100 / (g - $1::int) AS q, repeat('z', g % 50) AS pad "
                        "FROM generate_series(1, $2::int) g", ["r", "count"], True)

    def insert(self) -> Template:
        bound = [n for n, c in self.columns.items() if c.kind is not None]
        chosen = self.rng.sample(bound, self.rng.randint(1, len(bound)))
        values = [f"${i + 2}::int4" if self.columns[n].kind == "r" else f"${i + 2}"
                  for i, n in enumerate(chosen)]
        kinds = ["id", *(str(self.columns[n].kind) for n in chosen)]
        returning = self.rng.choice(["", " RETURNING *", " RETURNING id, " + chosen[0]])
        return Template(f"INSERT INTO {{t}} (id, {', '.join(chosen)}) VALUES ($1, "
                        f"{', '.join(values)}){returning}", kinds, bool(returning),
                        frozenset(chosen), many=not returning)

    def select(self) -> Template:
        which = self.rng.randrange(4)
        if which == 0:
            return Template("SELECT * FROM {t} WHERE id = $1", ["id"], True)
        if which == 1:
            return Template("SELECT * FROM {t} WHERE id <= $1 ORDER BY id", ["id"], True)
        if which == 2:
            return Template("SELECT id, a, r, s FROM {t} WHERE a >= $1 ORDER BY id",
                            ["int4"], True, frozenset({"a", "r", "s"}))
        name = self.rng.choice([n for n, c in self.columns.items() if c.kind not in (None, "r")])
        kind = str(self.columns[name].kind)
        if kind in ("json", "jsonb", "composite"):  # no equality for json; keep it simple
            return Template(f"SELECT count(*) AS n, max(id) FROM {{t}} WHERE {name} IS NOT "
                            "DISTINCT FROM NULL AND id > $1", ["id"], True, frozenset({name}))
        return Template(f"SELECT id, {name} FROM {{t}} WHERE {name} = $1 ORDER BY id",
                        [kind], True, frozenset({name}))

    def update(self) -> Template:
        name = self.rng.choice([n for n, c in self.columns.items() if c.kind not in (None, "r")])
        returning = self.rng.choice(["", " RETURNING *"])
        return Template(f"UPDATE {{t}} SET {name} = $1 WHERE id = $2{returning}",
                        [str(self.columns[name].kind), "id"], bool(returning),
                        frozenset({name}))

    def view(self) -> Template:
        return Template("SELECT * FROM {v} WHERE id <= $1 ORDER BY id", ["id"], True)

    def func(self) -> Template:
        return Template("SELECT * FROM {f}($1::int)", ["id"], True)

    def scalar(self) -> Template:
        return Template("SELECT {g}($1::int) AS v, $2::text AS t", ["id", "text"], True)

    def template(self) -> Template:
        """A statement run before (65%), while it is still valid, or a new one."""
        live = [t for t in self.templates
                if all(n in self.columns and self.columns[n].kind is not None for n in t.columns)]
        if live and self.rng.random() < 0.65:
            # Half the time one whose result a migration can change (the stale path).
            changing = [t for t in live if any(f"{{{o}}}" in t.sql for o in "tvfg")]
            if changing and self.rng.random() < 0.5:
                return self.rng.choice(changing)
            return self.rng.choice(live)
        made = self.new_template()
        self.templates.append(made)
        return made

    def call(self, template: Template) -> Call:
        rng = self.rng
        if template.many and rng.random() < 0.3:
            rows = tuple(self.args(template) for _ in range(rng.choice([0, 1, 3, 20])))
            return Call("executemany", template.sql, rows)
        methods = ["fetch", "fetchrow", "fetchval", "execute"] if template.rows else ["execute"]
        return Call(rng.choice(methods), template.sql, self.args(template))

    def step(self) -> Step:
        rng = self.rng
        roll = rng.random()
        if roll < 0.16:
            return self.ddl()
        if roll < 0.19:
            return Release()
        template = self.template()
        if roll < 0.26 and template.rows:
            sizes = None if rng.random() < 0.5 else tuple(rng.choice([1, 5, 100])
                                                          for _ in range(3))
            return Cursor(template.sql, self.args(template), rng.choice([1, 2, 50]), sizes)
        if roll < 0.34 and (template.rows or template.many):
            methods = ["fetch", "fetchrow", "fetchval"] if template.rows else []
            calls = []
            for _ in range(rng.randint(1, 3)):
                method = rng.choice([*methods, "executemany"] if template.many else methods)
                if method == "executemany":  # its argument sets, as one argument
                    calls.append((method, (tuple(self.args(template)
                                                 for _ in range(rng.choice([0, 1, 3]))),)))
                else:
                    calls.append((method, self.args(template)))
            return Prepared(template.sql, calls)
        if roll < 0.42:
            return Block([self.call(self.template()) for _ in range(rng.randint(2, 4))])
        return self.call(template)

    # -- migrations ----------------------------------------------------------------------------

    def ddl(self) -> Ddl:
        """A migration (applied to both copies), and the schema it leaves noted."""
        migrations: list[Callable[[], Ddl | None]] = [
            self.widen, self.retype_r, self.add, self.drop, self.retype_other, self.redefine_view,
            self.redefine_view, self.redefine_func, self.redefine_scalar, self.enum_add,
            self.enum_recreate, self.domain, self.composite,
        ]
        made = self.rng.choice(migrations)()
        return made or Ddl("COMMENT ON TABLE {t} IS 'nothing that changes a result'")

    def widen(self) -> Ddl | None:
        a = self.columns.get("a")
        if a is None or a.type == "numeric":
            return None
        # Still bound with ints: a cached int4 parameter casts to int8 and numeric.
        a.type = {"int4": "int8", "int8": "numeric"}[a.type]
        return Ddl(f"ALTER TABLE {{t}} ALTER COLUMN a TYPE {a.type}")

    def retype_r(self) -> Ddl | None:
        r = self.columns.get("r")
        if r is None:
            return None
        # Bound as $n::int4 (its parameter type does not follow the column): every type here
        # takes an int4 by assignment. float4 after int4 is the same width (a stale codec
        # would read float bits as an integer).
        new = self.rng.choice([t for t in ("int4", "float4", "int8", "float8", "numeric", "text",
                                           "int2") if t != r.type])
        using = "r::numeric::" + new if r.type == "text" else f"r::{new}"
        r.type = new
        return Ddl(f"ALTER TABLE {{t}} ALTER COLUMN r TYPE {new} USING {using}")

    def add(self) -> Ddl:
        self.added += 1
        kind, default = self.rng.choice([("int4", "7"), ("text", "'added'"), ("float8", "1.5"),
                                         ("bool", "true"), ("jsonb", "'[1]'"),
                                         ("numeric", "NULL"), ("money", "12.5"),
                                         ("tsvector", "'a b'")])
        name = f"x{self.added}"
        self.columns[name] = Column(kind, None)
        return Ddl(f"ALTER TABLE {{t}} ADD COLUMN {name} {kind} DEFAULT {default}")

    def drop(self) -> Ddl | None:
        droppable = [n for n in self.columns if n not in ("a", "r", "s")]
        if not droppable:
            return None
        name = self.rng.choice(droppable)
        del self.columns[name]
        return Ddl(f"ALTER TABLE {{t}} DROP COLUMN {name}")

    def retype_other(self) -> Ddl | None:
        # Read-only afterwards: a cached parameter type the server casts to the new column type
        # stores what `off` would refuse, or refuses what it would store (docs/describe-cache.md,
        # Limits), so nothing is bound to a column retyped this way.
        options = {"j": ["json", "text"], "f": ["numeric", "float4", "text", "money"],
                   "ts": ["date", "text"], "u": ["text"], "ok": ["int4"],
                   "arr": ["int8[]", "text[]", "text"], "s": ["varchar(30)", "bytea"]}
        present = [n for n in options if n in self.columns]
        if not present:
            return None
        name = self.rng.choice(present)
        new = self.rng.choice(options[name])
        using = {"bytea": f"convert_to({name}, 'UTF8')", "int4": f"{name}::int4",
                 "money": f"{name}::numeric::money"}.get(new, f"{name}::{new}")
        self.columns[name] = Column(new, None)
        return Ddl(f"ALTER TABLE {{t}} ALTER COLUMN {name} TYPE {new} USING {using}")

    def redefine_view(self) -> Ddl:
        if self.rng.random() < 0.5:
            self.view_extra += 1  # a column added at the end: CREATE OR REPLACE takes it
            return Ddl(self.view_sql("CREATE OR REPLACE VIEW"))
        self.view_x = self.rng.choice([t for t in ("int4", "int8", "float8", "text", "numeric")
                                       if t != self.view_x])
        return Ddl("DROP VIEW {v}; " + self.view_sql("CREATE VIEW"))

    def redefine_func(self) -> Ddl:
        # A function's result type cannot be changed by CREATE OR REPLACE: dropped first.
        self.func_result = self.rng.choice([r for r in ("a int4, b text", "a int8, b text",
                                                        "a float8, b text, c bool", "a text")
                                            if r != self.func_result])
        return Ddl("DROP FUNCTION {f}(int); " + self.func_sql())

    def redefine_scalar(self) -> Ddl:
        self.scalar_result = self.rng.choice([t for t in ("int4", "int8", "numeric", "text",
                                                          "float8") if t != self.scalar_result])
        return Ddl("DROP FUNCTION {g}(int); " + self.scalar_sql())

    def enum_add(self) -> Ddl:
        label = f"n{len(self.labels)}"
        self.labels.append(label)
        return Ddl(f"ALTER TYPE {{e}} ADD VALUE '{label}'")

    def enum_recreate(self) -> Ddl | None:
        if "e" not in self.columns:
            return None
        # The usual way to remove or reorder enum values: a new type of the same name.
        self.labels.reverse()
        labels = ", ".join(f"'{label}'" for label in self.labels)
        return Ddl("ALTER TABLE {t} ALTER COLUMN e TYPE text; DROP TYPE {e}; "
                   f"CREATE TYPE {{e}} AS ENUM ({labels}); "
                   "ALTER TABLE {t} ALTER COLUMN e TYPE {e} USING e::{e}")

    def domain(self) -> Ddl | None:
        dm = self.columns.get("dm")
        if dm is None or dm.type != "{dm}":
            return None
        # Read-only afterwards, as in `retype_other`.
        self.columns["dm"] = Column("{dm}2", None)
        return Ddl("ALTER TABLE {t} ALTER COLUMN dm TYPE {dm}2 USING dm::int8")

    def composite(self) -> Ddl | None:
        if len(self.attrs) != 2:
            return None
        self.attrs.append("z float8")
        return Ddl("ALTER TYPE {c} ADD ATTRIBUTE z float8")

    def view_sql(self, verb: str) -> str:
        extra = "".join(f", (g * {i + 1})::numeric / 4 AS y{i}" for i in range(self.view_extra))
        return (f"{verb} {{v}} AS SELECT g AS id, (g * 3)::{self.view_x} AS x, g::text AS s"
                f"{extra} FROM generate_series(1, 40) g")

    def func_sql(self) -> str:
        columns = {"a int4, b text": "g, g::text", "a int8, b text": "g::int8 * 3000000000, 'b'",
                   "a float8, b text, c bool": "g / 3.0, 'c', g % 2 = 0", "a text": "'t' || g"}
        return (f"CREATE FUNCTION {{f}}(n int) RETURNS TABLE({self.func_result}) LANGUAGE sql "
                f"AS $$ SELECT {columns[self.func_result]} FROM generate_series(1, n) g $$")

    def scalar_sql(self) -> str:
        return (f"CREATE FUNCTION {{g}}(x int) RETURNS {self.scalar_result} LANGUAGE sql "
                f"AS $$ SELECT (x * 2)::{self.scalar_result} $$")

    def setup_sql(self) -> str:
        return (
            "DROP VIEW IF EXISTS {v}; DROP TABLE IF EXISTS {t};"
            "DROP FUNCTION IF EXISTS {f}(int); DROP FUNCTION IF EXISTS {g}(int);"
            "DROP TYPE IF EXISTS {e}; DROP DOMAIN IF EXISTS {dm}; DROP DOMAIN IF EXISTS {dm}2;"
            "DROP TYPE IF EXISTS {c};"
            "CREATE TYPE {e} AS ENUM ('a', 'b', 'c');"
            "CREATE DOMAIN {dm} AS int4 CHECK (VALUE > 0);"
            "CREATE DOMAIN {dm}2 AS int8 CHECK (VALUE > -5);"
            "CREATE TYPE {c} AS (x int4, y text);"
            "CREATE TABLE {t} (id int PRIMARY KEY, a int4, r int4, s text, f float8, b bytea,"
            " ok bool, d date, ts timestamp, tz timestamptz, iv interval, u uuid, j jsonb,"
            " arr int4[], e {e}, dm {dm}, c {c});"
            "INSERT INTO {t} (id, a, r, s, e, dm, c) SELECT g, g, g * 10, 'row' || g,"
            " 'b', g, ROW(g, 'c' || g)::{c} FROM generate_series(1, 20) g;"
            + self.view_sql("CREATE VIEW") + ";" + self.func_sql() + ";" + self.scalar_sql()
        )


def generate(seed: int, case: int) -> tuple[str, list[Step]]:
    gen = Gen(random.Random(f"{seed}:{case}"))
    setup = gen.setup_sql()
    steps: list[Step] = []
    for _ in range(STEPS):
        step = gen.step()
        if isinstance(step, Ddl) and steps and _unsynced(steps[-1]):
            # An executemany of no argument sets that asyncpg (or unnamed, for a statement it
            # describes afresh: one with an enum parameter) described, or a prepare() followed
            # by nothing else, leaves the describe's Parse, and its lock, until the
            # connection's next statement, in both: the migration would wait on it
            # (docs/describe-cache.md). A statement ends it first.
            steps.append(Call("execute", "SELECT 1"))
        steps.append(step)
    return setup, steps


def _unsynced(step: Step) -> bool:
    """Whether `step` sends a describe and nothing after it (so no Sync), in both."""
    if isinstance(step, Prepared):  # prepare() describes; an executemany of no rows sends nothing
        return all(method == "executemany" and not args[0] for method, args in step.calls)
    return isinstance(step, Call) and step.method == "executemany" and not step.args


# -- running and comparing ---------------------------------------------------------------------


def norm(item: Any) -> Any:
    """A value comparable with ==, keeping what == would blur: the type (1 is not 1.0 nor
    True), NaN, -0.0, a Decimal's digits, a datetime's offset, a Record's column names."""
    if isinstance(item, asyncpg.Record):
        return ("Record", tuple(item.keys()), tuple(norm(v) for v in item.values()))
    if isinstance(item, float):
        return ("float", repr(item))
    if isinstance(item, Decimal):
        return ("Decimal", str(item))
    if isinstance(item, list | tuple):
        return (type(item).__name__, tuple(norm(v) for v in item))
    if isinstance(item, dt.datetime):
        return ("datetime", item.isoformat(), repr(item.tzinfo))
    return (type(item).__name__, item)


def unnamed(text: str, names: dict[str, str]) -> str:
    """`text` with the copy's object names as their roles ("<t>" for the table...)."""
    for role, name in sorted(names.items(), key=lambda item: len(item[1]), reverse=True):
        text = text.replace(name, f"<{role}>")
    return text


def norm_error(exc: BaseException, names: dict[str, str]) -> tuple[str, str, str | None, str]:
    cls = type(exc)
    return ("error", f"{cls.__module__}.{cls.__qualname__}", getattr(exc, "sqlstate", None),
            re.sub(r"\b\d{5,}\b", "<oid>", unnamed(str(exc), names)))


def attributes(stmt: Any, names: dict[str, str]) -> list[tuple[str, str]]:
    return [(a.name, unnamed(a.type.name, names)) for a in stmt.get_attributes()]


async def run_call(conn: Any, call: Call, names: dict[str, str]) -> Any:
    sql = call.sql.format(**names)
    if call.method == "executemany":
        return norm(await conn.executemany(sql, list(call.args)))
    return norm(await getattr(conn, call.method)(sql, *call.args))


async def run_cursor(conn: Any, step: Cursor, names: dict[str, str]) -> list[Any]:
    """The rows a cursor gave (as asyncpg hands them out), then the error that ended it."""
    got: list[Any] = []
    try:
        async with conn.transaction():
            sql = step.sql.format(**names)
            if step.sizes is None:
                async for row in conn.cursor(sql, *step.args, prefetch=step.prefetch):
                    got.append(norm(row))
            else:
                opened = await conn.cursor(sql, *step.args)
                for size in step.sizes:
                    got.append(norm(await opened.fetch(size)))
                got.append(norm(await opened.fetchrow()))
    except Exception as exc:
        got.append(norm_error(exc, names))
    return got


async def run_prepared(conn: Any, step: Prepared, names: dict[str, str]) -> list[Any]:
    """The statement's columns, each execution's outcome, and its columns after them."""
    stmt = await conn.prepare(step.sql.format(**names))
    got: list[Any] = [attributes(stmt, names)]
    for method, args in step.calls:
        try:
            if method == "executemany":
                got.append(norm(await stmt.executemany(list(args[0]))))
            else:
                got.append(norm(await getattr(stmt, method)(*args)))
        except Exception as exc:
            got.append(norm_error(exc, names))
    got.append(attributes(stmt, names))
    return got


async def run_block(conn: Any, step: Block, names: dict[str, str]) -> list[Any]:
    """Each call's outcome; the first error ends the block (rolled back), as in an app."""
    got = []
    try:
        async with conn.transaction():
            for call in step.calls:
                got.append(await run_call(conn, call, names))
    except Exception as exc:
        got.append(norm_error(exc, names))
    return got


async def run_step(conn: Any, step: Step, names: dict[str, str]) -> Any:
    """`step`'s outcome on `conn`: what it returned, or the error it raised, normalized."""
    try:
        if isinstance(step, Call):
            return await run_call(conn, step, names)
        if isinstance(step, Cursor):
            return await run_cursor(conn, step, names)
        if isinstance(step, Prepared):
            return await run_prepared(conn, step, names)
        assert isinstance(step, Block)
        return await run_block(conn, step, names)
    except Exception as exc:
        return norm_error(exc, names)


def object_names(prefix: str) -> dict[str, str]:
    return {k: f"{prefix}_{k}" for k in ("t", "v", "f", "g", "e", "dm", "c")}


async def migrate(postgres: PostgresServer, sql: str, sides: list[dict[str, str]],
                  lock_timeout: str = "10s") -> Any:
    """Run `sql` on each copy's objects from a separate direct connection; its outcome on each."""
    conn = await asyncpg.connect(postgres.dsn())
    try:
        # A lock left behind by either side (a Parse never ended by a Sync) makes this fail
        # rather than hang.
        await conn.execute(f"SET lock_timeout = '{lock_timeout}'")
        outcomes: list[Any] = []
        for names in sides:
            try:
                await conn.execute(sql.format(**names))
                outcomes.append("ok")
            except asyncpg.PostgresError as exc:
                outcomes.append(norm_error(exc, names))
        return outcomes
    finally:
        await conn.close()


@pytest.fixture
async def oracle(postgres: PostgresServer) -> AsyncIterator[asyncpg.Connection]:
    conn = await asyncpg.connect(postgres.dsn(), statement_cache_size=0)
    try:
        yield conn
    finally:
        await conn.close()


Compare = Callable[[Any, Any], bool]


def _difference(got: Any, expected: Any) -> str:
    """Where two outcomes first differ, shortened."""
    path = []
    while (isinstance(got, list | tuple) and isinstance(expected, list | tuple)
           and type(got) is type(expected)):
        index = next((i for i, (a, b) in enumerate(zip(got, expected, strict=False)) if a != b), None)
        if index is None:  # one is the other cut short
            index = min(len(got), len(expected))
            path.append(index)
            got, expected = got[index:], expected[index:]
            break
        path.append(index)
        got, expected = got[index], expected[index]
    return (f"outcomes differ at {path}:\n      unnamed: {_short(got)}\n      asyncpg: "
            f"{_short(expected)}")


def _equal(left: Any, right: Any) -> bool:
    return bool(left == right)


async def differential(target: Target, postgres: PostgresServer,  # noqa: F811
                       oracle: asyncpg.Connection, *, prefix: str, setup: str,
                       steps: list[Step], what: str, equal: Compare = _equal,
                       lock_timeout: str = "10s",
                       sync_oracle: bool = True) -> list[Any]:
    """Run `steps` (after `setup`) through the pool and the oracle, on copies of the objects
    named after `prefix`; fail at the first difference, naming `what` ran. The outcomes, in
    order (a migration's: the oracle's copy's)."""
    mine, theirs = object_names(prefix + "s"), object_names(prefix + "o")
    assert await migrate(postgres, setup, [theirs, mine]) == ["ok", "ok"]
    done: list[str] = []
    outcomes: list[Any] = []

    def fail(failure: str) -> str:
        return f"{what}: {failure}; the steps so far:\n    " + "\n    ".join(done)

    async with Pool(target.dsn(), name=f"diff-{prefix}", prepared_statements="unnamed",
                    min_size=1, max_size=1, telemetry=False) as pool:
        conn = await pool.acquire()
        try:
            for step in steps:
                done.append(step.describe())
                if isinstance(step, Release):
                    await pool.release(conn)
                    conn = await pool.acquire()
                    continue
                if isinstance(step, Ddl):
                    if sync_oracle:
                        # A DataError from asyncpg's codec leaves its describe's Parse, and
                        # its lock, until the next statement (docs/describe-cache.md); unnamed
                        # ends it at once, and must leave nothing: it gets no such help.
                        await oracle.execute("SELECT 1")
                    outcome = await migrate(postgres, step.sql, [theirs, mine], lock_timeout)
                    assert outcome[0] == outcome[1], fail(f"the migration differed: {outcome}")
                    outcomes.append(outcome[0])
                    continue
                expected = await run_step(oracle, step, theirs)
                got = await run_step(conn, step, mine)
                assert equal(got, expected), fail(_difference(got, expected))
                outcomes.append(expected)
            assert await conn.fetchval("SELECT 1") == 1, fail("the connection no longer answers")
        finally:
            await pool.release(conn)
        assert await pool.fetchval("SELECT $1::int", 2) == 2, fail("the pool no longer answers")
        stats = pool.stats()
        assert (stats.in_use, stats.waiting, stats.leaked_total) == (0, 0, 0), fail(str(stats))
        # Nothing retired: no reply was unreadable, no Sync went unanswered.
        assert stats.closed_total == 0, fail(f"a connection was closed: {stats}")
        cache = stats.statement_cache
        assert cache is not None
        assert cache.hits > 0, fail(str(cache))
        assert cache.misses > 0, fail(str(cache))
        print(f"{what}: {cache}")
    await oracle.execute("SELECT 1")  # (asyncpg's describe left unsynced, as before a migration)
    assert await migrate(postgres, "DROP VIEW IF EXISTS {v}; DROP TABLE IF EXISTS {t}, {t}2;"
                  "DROP FUNCTION IF EXISTS {f}(int); DROP FUNCTION IF EXISTS {g}(int);"
                  "DROP TYPE IF EXISTS {e}; DROP DOMAIN IF EXISTS {dm};"
                  "DROP DOMAIN IF EXISTS {dm}2; DROP TYPE IF EXISTS {c}",
                  [theirs, mine]) == ["ok", "ok"]
    return outcomes


@pytest.mark.parametrize("case", range(CASES), ids=[f"case{i}" for i in range(CASES)])
async def test_unnamed_matches_asyncpg(target: Target, postgres: PostgresServer,  # noqa: F811
                                       oracle: asyncpg.Connection, case: int,
                                       request: pytest.FixtureRequest) -> None:
    label = str(request.node.callspec.params["target"])  # postgres, legacy, current
    setup, steps = generate(SEED, case)
    await differential(target, postgres, oracle, prefix=f"dfz{label[0]}{case}", setup=setup,
                       steps=steps, what=f"seed {SEED}, case {case} ({label}; reproduce with "
                       f"ASYNCPOOL_TEST_DIFF_SEED={SEED})")


def test_the_comparison_tells_apart_what_equality_blurs() -> None:
    """The outcomes compared are not Python's == of the values: that would let a wrong type
    or a lost digit through (``1 == 1.0 == True``, ``Decimal("1.0") == 1``), and never match
    a NaN."""
    assert norm(math.nan) == norm(math.nan)
    assert norm(Decimal("NaN")) == norm(Decimal("NaN"))
    blurred = [(1, 1.0), (1, True), (0.0, -0.0), (Decimal("1.0"), Decimal("1")),
               (Decimal(1), 1),
               (dt.datetime(2000, 1, 1, tzinfo=UTC),
                dt.datetime(2000, 1, 1, 1, tzinfo=dt.timezone(dt.timedelta(hours=1))))]
    for left, right in blurred:
        assert left == right
        assert norm(left) != norm(right), (left, right)
    assert norm([1]) != norm((1,))
    names = object_names("x")
    assert norm_error(asyncpg.DataError("no"), names) != norm_error(
        asyncpg.InterfaceError("no"), names)
    assert norm_error(asyncpg.PostgresError("relation x_t"), names)[3] == "relation <t>"
    assert _difference([("int", 1), ("int", 2)], [("int", 1), ("int", 3)]).startswith(
        "outcomes differ at [1, 1]")


# -- what the generator found, reduced -----------------------------------------------------------

TEARDOWN = "DROP TABLE IF EXISTS {t}; DROP TYPE IF EXISTS {c};"


async def test_a_changed_reply_whose_composite_changed_reloads_the_schema(
        target: Target, postgres: PostgresServer,  # noqa: F811
        oracle: asyncpg.Connection, request: pytest.FixtureRequest) -> None:
    """Seed 3, case 1: a cached ``SELECT *`` whose result changed (a column added) while a
    composite type in it gained an attribute. Decoding again with the reply's description hits
    the stale composite codec: asyncpg raises OutdatedSchemaCacheError and reloads its types,
    so the next call returns the rows. unnamed raised it without the reload, and kept raising
    it on every later statement reading that type."""
    label = str(request.node.callspec.params["target"])
    select = Call("fetch", "SELECT * FROM {t} ORDER BY id")
    await differential(
        target, postgres, oracle, prefix=f"dfm1{label[0]}",
        setup=TEARDOWN + "CREATE TYPE {c} AS (x int4, y text);"
        "CREATE TABLE {t} (id int, c {c}); INSERT INTO {t} VALUES (1, ROW(1, 'a'))",
        steps=[select,
         Ddl("ALTER TABLE {t} ADD COLUMN w int; ALTER TYPE {c} ADD ATTRIBUTE z float8"),
         select, select, Call("fetchval", "SELECT c FROM {t} WHERE id = $1", (1,))],
        what=f"composite changed under a changed reply ({label})")


async def test_an_executemany_of_no_rows_with_an_enum_parameter_holds_a_lock_as_asyncpg(
        target: Target, postgres: PostgresServer,  # noqa: F811
        oracle: asyncpg.Connection, request: pytest.FixtureRequest) -> None:
    """Seed 1, case 5: a migration waited on the subject's connection. ``executemany`` with an
    enum parameter is described afresh each time (asyncpg's own path, docs/describe-cache.md);
    with no argument sets no Bind and no Sync follow that describe, so its Parse's lock stays
    until the connection's next statement, as it does for asyncpg: the same in both."""
    label = str(request.node.callspec.params["target"])
    insert = "INSERT INTO {t} (id, e) VALUES ($1, $2)"
    outcomes = await differential(
        target, postgres, oracle, prefix=f"dfm2{label[0]}",
        setup="DROP TABLE IF EXISTS {t}; DROP TYPE IF EXISTS {e};"
        "CREATE TYPE {e} AS ENUM ('a', 'b'); CREATE TABLE {t} (id int, e {e})",
        steps=[Call("executemany", insert, ((1, "a"),)), Call("executemany", insert, ()),
         Ddl("ALTER TABLE {t} ADD COLUMN w int"),  # both time out
         Call("execute", "SELECT 1"), Ddl("ALTER TABLE {t} ADD COLUMN w int"),
         Call("fetch", "SELECT * FROM {t}")],
        what=f"executemany of no rows ({label})", lock_timeout="300ms", sync_oracle=False)
    assert outcomes[2][:3] == ("error", "asyncpg.exceptions.LockNotAvailableError", "55P03")
    assert outcomes[4] == "ok"


async def test_a_prepared_executemany_with_an_enum_parameter_refused_leaves_no_lock(
        target: Target, postgres: PostgresServer,  # noqa: F811
        oracle: asyncpg.Connection, request: pytest.FixtureRequest) -> None:
    """Seed 4, cases 0, 2 and 4: a migration waited on the subject's connection. A prepared
    statement's ``executemany`` with an enum parameter runs unchecked (asyncpg's own path); an
    argument asyncpg's codec refused (DataError, nothing sent) left ``prepare()``'s describe
    without a Sync, and its lock, where unnamed promises none (asyncpg keeps it: the oracle
    gets a statement first)."""
    label = str(request.node.callspec.params["target"])
    insert = "INSERT INTO {t} (id, e) VALUES ($1, $2)"
    outcomes = await differential(
        target, postgres, oracle, prefix=f"dfm3{label[0]}",
        setup="DROP TABLE IF EXISTS {t}; DROP TYPE IF EXISTS {e};"
        "CREATE TYPE {e} AS ENUM ('a', 'b'); CREATE TABLE {t} (id int, e {e})",
        # Rows that are not sequences: refused before anything is written.
        steps=[Call("fetchval", "SELECT $1::{e}", ("a",)),  # its type known: prepare() is one trip
         Prepared(insert, [("executemany", ((1, "a"),))]),
         Ddl("ALTER TABLE {t} ADD COLUMN w int"),
         Call("fetch", "SELECT * FROM {t} WHERE id = $1", (1,)),
         Call("fetch", "SELECT * FROM {t} WHERE id = $1", (1,))],
        what=f"prepared executemany refused ({label})", lock_timeout="2s")
    assert outcomes[1][1][:2] == ("error", "asyncpg.exceptions.DataError")


async def test_a_result_with_a_text_format_column_changed_inside_a_transaction_block(
        target: Target, postgres: PostgresServer,  # noqa: F811
        oracle: asyncpg.Connection, request: pytest.FixtureRequest) -> None:
    """Seed 101, case 6: a cached ``SELECT *`` of a table with a column asyncpg reads as text
    (``money`` here; ``tsvector``, ``citext``, a ``jsonb`` with the usual ``json.loads`` codec
    too) names each column's result format in its Bind, which the server refuses once a
    column was added (``bind message has 3 result formats but query has 4 columns``, 08P01).
    Outside a transaction block the call is then described afresh; inside one the refusal
    aborted the transaction where asyncpg, describing afresh, returns the rows."""
    label = str(request.node.callspec.params["target"])
    select = Call("fetch", "SELECT * FROM {t} WHERE id = $1", (1,))
    await differential(
        target, postgres, oracle, prefix=f"dfm4{label[0]}",
        setup="DROP TABLE IF EXISTS {t}; CREATE TABLE {t} (id int, m money, v int);"
        "INSERT INTO {t} VALUES (1, 12.5, 7);"
        "DROP TABLE IF EXISTS {t}2; CREATE TABLE {t}2 AS SELECT 1 AS id",
        steps=[Block([select]), Ddl("ALTER TABLE {t} ADD COLUMN w int DEFAULT 3"),
               Block([select, select]), Ddl("ALTER TABLE {t} DROP COLUMN v"),
               Block([select]), select, select,
               # The statement decoded again from a changed reply (a text-format column
               # added) has not bound yet when the next column comes: Seed 707, case 34.
               Call("fetch", "SELECT * FROM {t}2"),
               Ddl("ALTER TABLE {t}2 ADD COLUMN m money DEFAULT 1"),
               Block([Call("fetch", "SELECT * FROM {t}2")]),
               Ddl("ALTER TABLE {t}2 ADD COLUMN w int DEFAULT 2"),
               Block([Call("fetch", "SELECT * FROM {t}2")])],
        what=f"text-format column, a column added ({label})")


async def test_an_executemany_row_past_a_widened_columns_cached_type(
        target: Target, postgres: PostgresServer,  # noqa: F811
        oracle: asyncpg.Connection, request: pytest.FixtureRequest) -> None:
    """Seed 303, case 9: after ``int4`` was widened to ``int8``, an ``executemany`` whose first
    row fits the cached ``int4`` and a later one does not. asyncpg's codec refuses that row
    before anything of the statement was sent (it ends its pipeline with a ROLLBACK or a
    Sync); the call must be described afresh and run, as for a first row that does not fit,
    where unnamed raised the cached codec's DataError."""
    label = str(request.node.callspec.params["target"])
    insert = "INSERT INTO {t} (id, a) VALUES ($1, $2)"
    rows = ((2, 5), (3, 2**40), (4, 6))
    select = Call("fetch", "SELECT * FROM {t} ORDER BY id")
    await differential(
        target, postgres, oracle, prefix=f"dfm5{label[0]}",
        setup="DROP TABLE IF EXISTS {t}; CREATE TABLE {t} (id int, a int4)",
        steps=[Call("executemany", insert, ((1, 1),)),
               Ddl("ALTER TABLE {t} ALTER COLUMN a TYPE int8"),
               Call("executemany", insert, rows), select,
               Block([Call("executemany", insert, ((1, 1),))]),
               Ddl("ALTER TABLE {t} ALTER COLUMN a TYPE int4; DELETE FROM {t}"),
               Block([Call("executemany", insert, ((1, 1),))]),
               Ddl("ALTER TABLE {t} ALTER COLUMN a TYPE int8"),
               Block([Call("executemany", insert, rows), select])],
        what=f"executemany row past the cached type ({label})")
