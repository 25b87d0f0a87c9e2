"""The pool's error for a checkout it has ended: what a held connection, and the statements and
cursors made through it, raise once the lease is no longer active."""

from __future__ import annotations

from asyncpool.errors import ConnectionLeakedError, PoolClosedError, PoolError
from asyncpool.pool.lease import CLOSED, INHERITED, LEAKED, TERMINATED, LeaseState


def unusable(state: LeaseState, pool_name: str) -> PoolError:
    """The error for using a connection of the pool `pool_name` whose lease is in `state`
    (not active): released, reclaimed as a leak, terminated, closed with the pool, inherited."""
    if state is LEAKED:
        return ConnectionLeakedError(
            f"pool {pool_name!r}: this connection was held past leak_timeout and "
            "reclaimed; release connections promptly or raise leak_timeout"
        )
    if state is TERMINATED:
        return PoolError(
            f"pool {pool_name!r}: this connection was terminated (conn.terminate(), or "
            "held by a task, a block in an async generator, or a `conn = await "
            "pool.acquire()` not released, past the end of the Lambda invocation that took "
            "it, or when a SnapStart snapshot was taken); acquire a new one"
        )
    if state is CLOSED:
        return PoolClosedError(f"pool {pool_name!r} was closed while this connection was held")
    if state is INHERITED:
        return PoolError(
            f"pool {pool_name!r}: this connection was held when this process was forked "
            "from the one that opened the pool; it belongs to that parent process, which may "
            "be using it. Open a pool in this process, after the fork, and use its connections "
            "(releasing this one does nothing)"
        )
    return PoolError(
        f"pool {pool_name!r}: this connection was released back to the pool; "
        "acquire a new one"
    )


def closed_before_commit(pool_name: str) -> PoolClosedError:
    """The error for a transaction still open when its pool was closed (or terminated): the
    pool closes the connection, so it was not committed (`pool.transaction()`'s, and a held
    connection's ``async with conn.transaction():``'s)."""
    return PoolClosedError(
        f"pool {pool_name!r} was closed while this transaction was open: it was not committed")
