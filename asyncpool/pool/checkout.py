"""The `async with` objects returned by `Pool.acquire()` and `Pool.transaction()`."""

from __future__ import annotations

import asyncio
from collections.abc import Generator
from types import FrameType, TracebackType
from typing import TYPE_CHECKING, Any

from asyncpool.connect.failures import lost_connection_hint
from asyncpool.errors import (
    ConnectionLeakedError,
    ConnectionLostError,
    PoolClosedError,
    PoolError,
)
from asyncpool.pool.connection import PooledConnection
from asyncpool.pool.lease import CLOSED, LEAKED, Lease

if TYPE_CHECKING:
    from asyncpool.pool import Pool


class AcquireContext:
    """``async with pool.acquire() as conn`` / ``conn = await pool.acquire()``."""

    __slots__ = ("_frame", "_lease", "_pool", "_timeout")

    def __init__(self, pool: Pool, timeout: float | None, frame: FrameType | None) -> None:
        self._pool = pool
        self._timeout = timeout
        self._frame = frame
        self._lease: Lease | None = None

    async def __aenter__(self) -> PooledConnection:
        pool = self._pool
        lease = pool._acquire_nowait(self._frame) or await pool._acquire(self._timeout, self._frame)
        self._frame = None
        self._lease = lease
        return PooledConnection(lease, self._pool.name)

    def __await__(self) -> Generator[Any, None, PooledConnection]:
        return self.__aenter__().__await__()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        lease = self._lease
        if lease is None:
            return
        if lease.state is LEAKED:
            _raise_leaked(self._pool.name, exc)
        # A cancelled task must end cancelled, even if its connection died meanwhile.
        lost = isinstance(exc, Exception) and lease.active and lease.record.conn.is_closed()
        if self._pool._release_nowait(lease):
            await self._pool._release_after_reset(lease)
        if lost:
            assert exc is not None
            raise ConnectionLostError(
                f"pool {self._pool.name!r}: the connection to {self._pool.target} was lost while "
                f"in use ({type(exc).__name__}: {exc}).{lost_connection_hint(exc)} An open "
                "transaction was not committed "
                "(if it was lost during COMMIT, that commit's outcome is unknown). The pool "
                "replaced the connection; retry if the work is idempotent."
            ) from exc


def _raise_leaked(pool_name: str, exc: BaseException | None) -> None:
    """Turn the cancellation the leak reclaim caused into `ConnectionLeakedError`."""
    task = asyncio.current_task()
    if isinstance(exc, asyncio.CancelledError) and task is not None:
        if task.cancelling() > 1:
            # Somebody else cancelled this task too: let their cancellation go on.
            task.uncancel()
            return
        task.uncancel()
    raise ConnectionLeakedError(
        f"pool {pool_name!r}: the connection was held past leak_timeout and reclaimed (holder "
        "cancelled, connection closed); release connections promptly or raise leak_timeout"
    ) from None


def _not_committed(pool: Pool, lease: Lease | None) -> PoolError:
    if lease is not None and lease.state is CLOSED:
        return PoolClosedError(
            f"pool {pool.name!r} was closed while this transaction was open: it was not committed"
        )
    return ConnectionLostError(
        f"pool {pool.name!r}: the connection to {pool.target} was lost before COMMIT: the "
        "transaction was not committed. The pool replaced the connection; retry if the work is "
        "idempotent."
    )


class TransactionContext(AcquireContext):
    """``async with pool.transaction() as conn``: commit on success, roll back on error."""

    __slots__ = ("_options", "_tx")

    def __init__(self, pool: Pool, timeout: float | None, frame: FrameType | None,
                 **options: Any) -> None:
        super().__init__(pool, timeout, frame)
        self._options = options
        self._tx: Any = None

    async def __aenter__(self) -> PooledConnection:
        conn = await super().__aenter__()
        try:
            self._tx = conn.raw.transaction(**self._options)
            await self._tx.start()
        except BaseException as exc:
            await super().__aexit__(type(exc), exc, exc.__traceback__)
            raise
        return conn

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        lease = self._lease
        usable = lease is not None and lease.active and not lease.record.conn.is_closed()
        if not usable or self._tx is None:
            await super().__aexit__(exc_type, exc, tb)
            if exc is None and self._tx is not None:
                # The block ended well but its connection is gone: COMMIT was never sent.
                raise _not_committed(self._pool, lease)
            return
        if exc is not None:
            try:
                await self._tx.rollback()
            except Exception:  # noqa: S110
                # The block's own error (or cancellation) is what the caller must see; a failed
                # rollback leaves the transaction open, and release() resets or drops it.
                pass
            finally:
                await super().__aexit__(exc_type, exc, tb)
            return
        try:
            await self._tx.commit()
        except BaseException as commit_error:
            await super().__aexit__(type(commit_error), commit_error, commit_error.__traceback__)
            raise
        await super().__aexit__(None, None, None)
