"""COMMIT that tells whether the server committed.

A COMMIT of a transaction in which a statement failed (its error caught inside the block) is
answered ``ROLLBACK``: nothing was committed. asyncpg's `Transaction.commit()` drops that
answer, so ``pool.transaction()`` would end as if it had committed. PgJDBC and pgx raise for it;
so does the pool (`TransactionRolledBackError`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from asyncpg.transaction import Transaction


class _TagKeeper:
    """The connection as asyncpg's `Transaction.commit()` sees it while it runs: the same in
    every respect, but the command tag of the statement it sends is kept."""

    __slots__ = ("_conn", "tag")

    def __init__(self, conn: Any) -> None:  # (its private members are not in asyncpg's types)
        self._conn = conn
        self.tag = ""

    # commit() unsets the connection's current top-level transaction: on the connection itself.
    @property
    def _top_xact(self) -> Any:
        return self._conn._top_xact

    @_top_xact.setter
    def _top_xact(self, value: Any) -> None:
        self._conn._top_xact = value

    async def execute(self, query: str, *args: Any, **kwargs: Any) -> str:
        self.tag = await self._conn.execute(query, *args, **kwargs)
        return self.tag

    def __getattr__(self, name: str) -> Any:
        return getattr(self._conn, name)


async def commit(tx: Transaction) -> bool:
    """`tx.commit()`; False if the server rolled the transaction back instead (it had failed)."""
    private: Any = tx  # (its connection is not in asyncpg's types)
    conn = private._connection
    keeper = _TagKeeper(conn)
    private._connection = keeper
    try:
        await tx.commit()
    finally:
        private._connection = conn
    return keeper.tag != "ROLLBACK"
