"""Migrations under concurrent load: every value read or returned is right, and no call fails.

Workers read and write a table through PgBouncer (some of them inside transaction blocks) while a
migration adds, drops and retypes columns (same-width int4 <-> float4 and int8 <-> float8
included), adds an enum value, moves a column between domains, and drops and recreates the enum
type (the rename-create-convert-drop recipe for removing an enum value). The same workload runs
with ``"off"`` as the control: it shows the workload itself gives no error without any cache
(and that asyncpg's own path can decode wrong values here; see the note at the end).
"""

from __future__ import annotations

import asyncio
import random
import re
import time

import asyncpg
import pytest

from asyncpool import Pool, StaleStatementError
from asyncpool.config import PreparedStatements
from asyncpool.testing import PostgresServer
from tests.conftest import Pooler

WORKERS = 8
MIGRATIONS = [
    "ALTER TABLE {t} ADD COLUMN extra int DEFAULT 7",
    "ALTER TABLE {t} ALTER COLUMN v TYPE float4",
    "ALTER TABLE {t} ALTER COLUMN w TYPE float8",
    "ALTER TYPE {mood} ADD VALUE 'meh'",
    "ALTER TABLE {t} ALTER COLUMN v TYPE int4",
    "ALTER TABLE {t} DROP COLUMN extra",
    "ALTER TABLE {t} ALTER COLUMN d TYPE {pos8}",
    "ALTER TABLE {t} ALTER COLUMN w TYPE int8",
    # Removing an enum value: the type is dropped and recreated under the same name (new OID).
    """ALTER TYPE {mood} RENAME TO {mood}_old;
       CREATE TYPE {mood} AS ENUM ('ok', 'sad');
       ALTER TABLE {t} ALTER COLUMN m TYPE {mood} USING m::text::{mood};
       DROP TYPE {mood}_old""",
    "ALTER TABLE {t} ALTER COLUMN d TYPE {pos}",
    "ALTER TABLE {t} ADD COLUMN late text DEFAULT 'x'",
]


def _expected(row_id: int) -> tuple[int, int, str, int]:
    return row_id, row_id * 10, "ok" if row_id % 2 else "sad", row_id + 1


class Workload:
    def __init__(self, pool: Pool, table: str) -> None:
        self.pool = pool
        self.table = table
        self.next_id = 1000
        self.checked = 0
        self.wrong: list[str] = []
        self.errors: list[str] = []
        # Rows asyncpg could not decode with the description it used (a column retyped to another
        # width between the describe and the execute): the same race as `wrong`, seen as an error.
        self.misdecoded: list[str] = []

    def check(self, row: asyncpg.Record | None, row_id: int, kind: int = -1) -> None:
        assert row is not None
        v, w, m, d = _expected(row_id)
        got = (row["v"], row["w"], row["m"], row["d"])
        # Numeric equality holds across int/float retypes; a misdecoded same-width value fails.
        if got[0] != v or got[1] != w or got[2] != m or got[3] != d:
            self.wrong.append(f"kind {kind} id {row_id}: expected {(v, w, m, d)}, got {got}")
        self.checked += 1

    async def run(self, deadline: float) -> None:
        t = self.table
        select = f"SELECT * FROM {t} WHERE id = $1"
        columns = f"SELECT id, v, w, m, d FROM {t} WHERE id = ANY($1::int[]) ORDER BY id"
        insert = f"INSERT INTO {t} (id, v, w, m, d) VALUES ($1, $2, $3, $4, $5) RETURNING *"
        update = f"UPDATE {t} SET v = $2, w = $3 WHERE id = $1 RETURNING v, w, m, d"
        rng = random.Random()
        while time.monotonic() < deadline:
            try:
                kind = rng.randrange(4)
                if kind == 0:
                    row_id = rng.randrange(1, 100)
                    self.check(await self.pool.fetchrow(select, row_id), row_id, 0)
                elif kind == 1:
                    ids = rng.sample(range(1, 100), 5)
                    for row in await self.pool.fetch(columns, ids):
                        self.check(row, row["id"], 1)
                elif kind == 2:
                    self.next_id += 1
                    row_id = self.next_id
                    async with self.pool.transaction() as conn:
                        self.check(await conn.fetchrow(insert, row_id, *_expected(row_id)[:1],
                                                       *_expected(row_id)[1:]), row_id, 2)
                        self.check(await conn.fetchrow(select, row_id), row_id, 3)
                else:
                    row_id = rng.randrange(1, 100)
                    async with self.pool.transaction() as conn:
                        updated = await conn.fetchrow(update, row_id, *_expected(row_id)[:2])
                        assert updated is not None
                        self.check(await conn.fetchrow(select, row_id), row_id, 4)
            except (asyncpg.PostgresError, asyncpg.InterfaceError, AssertionError) as exc:
                self.errors.append(f"{type(exc).__name__}: {exc}")
            except StaleStatementError as exc:
                # A row that did not fit the description asyncpg decoded it with ("off", asyncpg
                # as is): a column retyped to another width, or added, between asyncpg's describe
                # and its execute (asyncpg's BufferError, AssertionError or ProtocolError, seen in
                # CI on 2026-12-04 and 2026-12-07, said as the pool's error).
                self.misdecoded.append(f"kind {kind}: {exc.__cause__!r}")


@pytest.mark.parametrize("mode", ["unnamed", "off"])
async def test_migrations_under_concurrent_load(pooler: Pooler, postgres: PostgresServer,
                                                mode: PreparedStatements) -> None:
    suffix = re.sub(r"\W", "_", f"{pooler.label}_{mode}")
    table, mood = f"ddl_load_{suffix}", f"ddl_mood_{suffix}"
    pos, pos8 = f"ddl_pos_{suffix}", f"ddl_pos8_{suffix}"
    names = {"t": table, "mood": mood, "pos": pos, "pos8": pos8}
    admin = await asyncpg.connect(postgres.dsn())
    try:
        await admin.execute(f"""
            DROP TABLE IF EXISTS {table}; DROP TYPE IF EXISTS {mood}; DROP TYPE IF EXISTS {mood}_old;
            DROP DOMAIN IF EXISTS {pos}; DROP DOMAIN IF EXISTS {pos8};
            CREATE TYPE {mood} AS ENUM ('ok', 'sad');
            CREATE DOMAIN {pos} AS int4 CHECK (VALUE > 0);
            CREATE DOMAIN {pos8} AS int8 CHECK (VALUE > 0);
            CREATE TABLE {table} (id int PRIMARY KEY, v int4, w int8, m {mood}, d {pos});
            INSERT INTO {table}
                SELECT i, i, i * 10, CASE WHEN i % 2 = 1 THEN 'ok' ELSE 'sad' END::{mood}, i + 1
                FROM generate_series(1, 100) i;
        """)
        async with Pool(pooler.dsn(), name=f"ddl-{mode}", prepared_statements=mode, min_size=3,
                        max_size=3, telemetry=False) as pool:
            work = Workload(pool, table)
            migrations_done = 0

            async def migrate() -> None:
                nonlocal migrations_done
                await asyncio.sleep(0.3)
                for ddl in MIGRATIONS:
                    await admin.execute(ddl.format(**names))
                    migrations_done += 1
                    await asyncio.sleep(0.25)

            deadline = time.monotonic() + 0.6 + 0.25 * len(MIGRATIONS) + 0.5
            await asyncio.gather(migrate(), *(work.run(deadline) for _ in range(WORKERS)))
            if mode == "unnamed":
                async with pool.acquire() as conn:
                    totals = pool.stats().statement_cache
                    assert totals is not None
                    changed = totals.stale
                    assert conn.describe_cache_stats().hits > 0
                assert changed > 0, "no cached description ever met a changed table"
        assert migrations_done == len(MIGRATIONS)
        assert work.errors == [], work.errors[:5]
        if mode == "unnamed":
            assert work.wrong == [], work.wrong[:5]
            assert work.misdecoded == [], work.misdecoded[:5]
        # With "off" (asyncpg as is) wrong values do occur, in about half the runs: asyncpg
        # describes a statement, introspects a type it has not seen (a separate transaction, so
        # a migration can land), then parses it again and decodes with the first description.
        # When the retype changed the width (int4 <-> int8) or added a column, that decode fails
        # instead, as the pool's StaleStatementError (tests/test_unnamed_vs_off.py makes each
        # case happen). The control only shows that the workload gives no other error without a
        # cache.
        assert work.checked > 200
    finally:
        await admin.execute(f"DROP TABLE IF EXISTS {table}; DROP TYPE IF EXISTS {mood};"
                            f"DROP DOMAIN IF EXISTS {pos}; DROP DOMAIN IF EXISTS {pos8}")
        await admin.close()
