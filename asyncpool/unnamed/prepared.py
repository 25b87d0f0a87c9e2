"""``conn.prepare()`` in "unnamed" mode: a prepared statement whose executions are checked reuses.

asyncpg runs a prepared statement's executions straight on its protocol: with the unnamed
statement, an untyped Parse, Bind, Execute and Sync, decoded with the description from
``prepare()``. After a migration retyped a result column, that decodes the new column with the
old codec: wrong values (text ``'1234'`` read as the integer 825373492) or a garbled error. This
statement sends each execution through the connection's one-round-trip path instead (typed
Parse, Describe of the portal, the reply's description checked before a row is decoded), so a
changed result is decoded with the reply's own description, and the statement takes it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from asyncpg import connresource, cursor
from asyncpg.prepared_stmt import PreparedStatement

if TYPE_CHECKING:
    from asyncpool.unnamed.entries import Description

#: How a call reaches `DescribeCacheConnection._do_execute` or `_run_prepared`: rows decoded
#: (fetch, fetchrow, fetchval), rows discarded (executemany), asyncpg's own path (the
#: connection's fetchmany), rows of many argument sets (a prepared statement's fetchmany).
ROWS, DISCARD, PLAIN, MANY_ROWS = 0, 1, 2, 3

# asyncpg's class is generic to type checkers only (asyncpg-stubs), not at run time.
if TYPE_CHECKING:
    from asyncpg import Record

    _PreparedStatement = PreparedStatement[Record]
else:
    _PreparedStatement = PreparedStatement


class CheckedPreparedStatement(_PreparedStatement):
    """asyncpg's `PreparedStatement` made by an unnamed ``prepare()`` on a `DescribeCacheConnection`.

    `_description` is what its executions are checked against (its `statement` is the
    statement's `_state`); None: run as asyncpg runs them (unchecked).
    """

    __slots__ = ("_description",)
    # asyncpg's (declared in its class's __slots__, unknown to type checkers here).
    _state: Any
    _query: str
    _connection: Any
    _last_status: Any

    def __init__(self, connection: Any, query: str, state: Any,
                 description: Description | None) -> None:
        super().__init__(connection, query, state)
        self._description = description

    def _adopt(self, state: Any, description: Description | None) -> None:
        """Take the statement a changed reply was decoded with (``get_attributes()`` changes, as
        after asyncpg's own re-prepare)."""
        state.attach()
        self._state.detach()
        self._state = state
        self._description = description

    # asyncpg's fetch, fetchrow and fetchval all end in this private method of its class.
    async def _bind_execute(self, args: Any, limit: int, timeout: float | None) -> Any:
        protocol = self._connection._protocol

        def executor(state: Any, timeout: float | None) -> Any:
            return protocol.bind_execute(state, args, "", limit, True, timeout)

        data, status, _ = await self._connection._run_prepared(self, executor, timeout, ROWS)
        self._last_status = status
        return data

    _PreparedStatement__bind_execute = _bind_execute

    @connresource.guarded
    def cursor(self, *args: Any, prefetch: int | None = None,
               timeout: float | None = None) -> cursor.CursorFactory[Record]:
        # asyncpg's cursor decodes with this statement's description, which may predate a
        # migration (an int4 column retyped to float4 read as 1078530011 for 3.1415927); a
        # cursor is not a checked reuse. Described afresh at its first use instead, inside its
        # transaction, as `conn.cursor()` is (`_get_statement`): one round trip more.
        return cursor.CursorFactory(self._connection, self._query, None, args, prefetch,
                                    timeout, self._state.record_class)

    @connresource.guarded
    async def executemany(self, args: Any, *, timeout: float | None = None) -> None:
        await self._many(args, timeout, return_rows=False)

    @connresource.guarded
    async def fetchmany(self, args: Any, *, timeout: float | None = None) -> Any:
        return await self._many(args, timeout, return_rows=True)

    async def _many(self, args: Any, timeout: float | None, return_rows: bool) -> Any:
        protocol = self._connection._protocol

        def executor(state: Any, timeout: float | None) -> Any:
            return protocol.bind_execute_many(state, args, portal_name="", timeout=timeout,
                                              return_rows=return_rows)

        return await self._connection._run_prepared(self, executor, timeout,
                                                    MANY_ROWS if return_rows else DISCARD)


# asyncpg's docstrings, for help().
CheckedPreparedStatement.cursor.__doc__ = PreparedStatement.cursor.__doc__
CheckedPreparedStatement.executemany.__doc__ = PreparedStatement.executemany.__doc__
CheckedPreparedStatement.fetchmany.__doc__ = PreparedStatement.fetchmany.__doc__

__all__ = ["DISCARD", "MANY_ROWS", "PLAIN", "ROWS", "CheckedPreparedStatement"]
