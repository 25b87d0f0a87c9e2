"""The "nothing lost" bookkeeping: what each writer was told, checked against what the table holds.

Every write inserts a fresh id in one transaction (an explicit one, or the implicit one of a
single statement through a query helper). A writer is told one of three things:
committed; failed before COMMIT was sent (the id must be absent); or failed at COMMIT (ambiguous:
the id may be present, at most once). The primary key turns any replay of a write into a
`UniqueViolationError` a writer would see, so "never duplicated" is checked too.
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import asyncpg

from asyncpool import ConnectError, Pool, PoolClosedError, PooledConnection, PoolTimeoutError


@dataclass(frozen=True)
class LedgerCheck:
    """Counts from a verified ledger."""

    committed: int
    failed: int
    ambiguous_present: int
    ambiguous_absent: int

    @property
    def attempted(self) -> int:
        return self.committed + self.failed + self.ambiguous_present + self.ambiguous_absent


@dataclass
class Ledger:
    """A table of unique ids and the outcome each writer saw for its own id."""

    # Direct to PostgreSQL: the check must not depend on the pooler under test.
    dsn: str = field(repr=False)
    table: str
    committed: set[int] = field(default_factory=set)
    failed: dict[int, BaseException] = field(default_factory=dict)
    ambiguous: dict[int, BaseException] = field(default_factory=dict)
    _ids: itertools.count[int] = field(default_factory=lambda: itertools.count(1))

    def __post_init__(self) -> None:
        # The name goes into SQL text: allow a plain identifier only.
        if not re.fullmatch(r"[a-z_][a-z0-9_]{0,62}", self.table):
            raise ValueError(f"ledger table name {self.table!r} is not a plain identifier")

    async def create(self) -> Ledger:
        conn = await asyncpg.connect(self.dsn)
        try:
            await conn.execute(
                f"DROP TABLE IF EXISTS {self.table};"
                f"CREATE TABLE {self.table} (id bigint PRIMARY KEY, at timestamptz DEFAULT now())"
            )
        finally:
            await conn.close()
        return self

    async def write(self, pool: Pool, *, timeout: float | None = None,
                    before_commit: Callable[[PooledConnection], Awaitable[None]] | None = None,
                    ) -> BaseException | None:
        """One transaction inserting a new id; returns the error the writer saw, if any.

        `before_commit(conn)` runs after the insert (a fault to inject there). `CancelledError` is
        recorded and re-raised: a cancelled writer stays cancelled.
        """
        ident = self.new_id()
        sent_commit = False
        try:
            async with pool.transaction() as conn:
                await conn.execute(
                    f"INSERT INTO {self.table} (id) VALUES ($1)",  # noqa: S608 - checked name
                    ident, timeout=timeout,
                )
                if before_commit is not None:
                    await before_commit(conn)
                # Anything raised from here on comes from COMMIT or the release after it.
                sent_commit = True
        except BaseException as exc:
            return self._record_error(ident, exc, ambiguous=sent_commit)
        self.committed.add(ident)
        return None

    async def write_one(self, pool: Pool, *, timeout: float | None = None) -> BaseException | None:
        """One INSERT of a new id through the pool's query helper (``pool.execute``: its own
        implicit transaction, on a connection taken and returned inline); returns the error the
        writer saw, if any.

        Failed only if the pool never got a connection to send it on (`PoolTimeoutError`,
        `ConnectError`, `PoolClosedError`); any other error may have come after the server
        committed it: ambiguous. `CancelledError` is recorded and re-raised.
        """
        ident = self.new_id()
        try:
            await pool.execute(f"INSERT INTO {self.table} (id) VALUES ($1)",  # noqa: S608 - checked name
                               ident, timeout=timeout)
        except BaseException as exc:
            unsent = isinstance(exc, (PoolTimeoutError, ConnectError, PoolClosedError))
            return self._record_error(ident, exc, ambiguous=not unsent)
        self.committed.add(ident)
        return None

    def _record_error(self, ident: int, exc: BaseException, *, ambiguous: bool) -> BaseException:
        """Note what the writer of `ident` saw and return it; a `CancelledError` (any
        non-`Exception`) is raised again: a cancelled writer stays cancelled."""
        (self.ambiguous if ambiguous else self.failed)[ident] = exc
        if not isinstance(exc, Exception):
            raise exc
        return exc

    def new_id(self) -> int:
        return next(self._ids)

    @property
    def errors(self) -> list[BaseException]:
        return [*self.failed.values(), *self.ambiguous.values()]

    async def verify(self) -> LedgerCheck:
        """Assert nothing was lost, invented or duplicated; return the counts."""
        conn = await asyncpg.connect(self.dsn)
        try:
            rows = await conn.fetch(f"SELECT id FROM {self.table}")  # noqa: S608 - checked name
            present = {row["id"] for row in rows}
        finally:
            await conn.close()
        lost = self.committed - present
        assert not lost, f"{len(lost)} committed ids are missing: {sorted(lost)[:10]}"
        ghosts = self.failed.keys() & present
        assert not ghosts, (
            f"{len(ghosts)} ids whose writer was told 'failed' were written: "
            f"{[(i, repr(self.failed[i])) for i in sorted(ghosts)[:5]]}"
        )
        strangers = present - self.committed - self.ambiguous.keys()
        assert not strangers, f"ids nobody wrote are in the table: {sorted(strangers)[:10]}"
        replays = [e for e in self.errors if isinstance(e, asyncpg.UniqueViolationError)]
        assert not replays, f"a write was replayed: {replays[:3]}"
        ambiguous_present = len(self.ambiguous.keys() & present)
        return LedgerCheck(
            committed=len(self.committed),
            failed=len(self.failed),
            ambiguous_present=ambiguous_present,
            ambiguous_absent=len(self.ambiguous) - ambiguous_present,
        )
