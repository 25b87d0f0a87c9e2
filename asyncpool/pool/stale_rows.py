"""asyncpg's errors for rows it decoded with a description that no longer fits them, said as
the pool's `StaleStatementError`."""

from __future__ import annotations

import asyncpg

from asyncpool.errors import StaleStatementError

#: What asyncpg raises when a row does not fit the statement's description, by class and start
#: of message: a column retyped to a wider type (its decoder finds bytes left over), to a narrower
#: one (it asks for more than the field holds: asyncpg's buffer check is an AssertionError), or
#: columns added or dropped.
_MISDECODES: tuple[tuple[type[BaseException], str], ...] = (
    (BufferError, "unexpected trailing "),
    (AssertionError, "insufficient data in buffer"),
    (asyncpg.ProtocolError, "the number of columns in the result row"),
)


def stale_rows_error(exc: BaseException, pool_name: str, query: object
                     ) -> StaleStatementError | None:
    """The pool's error for `exc` if it is asyncpg failing to decode the rows of `query` with
    the description it read before running it; None for any other error.

    asyncpg's own path (``prepared_statements="off"``, a prepared statement or a cursor kept
    across a migration) describes a statement, looks up the types it has not seen in a separate
    transaction, then runs it with a fresh Parse and decodes with the first description: a
    migration landing in between gives rows of another shape. The connection stays in step
    (asyncpg reads on to ReadyForQuery), so only the message changes.
    """
    if not any(isinstance(exc, kind) and str(exc).startswith(start)
               for kind, start in _MISDECODES):
        return None
    error = StaleStatementError(
        f"pool {pool_name!r}: the rows of a statement could not be decoded with the description "
        f"asyncpg read before running it ({type(exc).__name__}: {exc}): a column of its result "
        "was retyped, or columns were added or dropped, between asyncpg's describe and its run "
        "(a migration landing while asyncpg looked up a type it had not seen). The statement "
        "ran; its rows were not returned. The next call describes it afresh. "
        'prepared_statements="unnamed" (the default) checks every reply against its '
        "description instead."
    )
    error.may_have_run = True
    error.query = query if isinstance(query, str) else None
    return error
