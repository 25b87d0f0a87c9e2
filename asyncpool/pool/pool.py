"""The pool: hands out asyncpg connections, takes them back, keeps them healthy."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import sys
from types import FrameType
from typing import Any

import asyncpg

from asyncpool.config import PoolConfig
from asyncpool.connect.connector import Connector
from asyncpool.errors import (
    ConnectError,
    PoolClosedError,
    PoolError,
    PoolTimeoutError,
)
from asyncpool.observer import LeakReport, ObserverGroup, PoolObserver
from asyncpool.pool.backoff import Backoff
from asyncpool.pool.checkout import AcquireContext, TransactionContext
from asyncpool.pool.connection import PooledConnection
from asyncpool.pool.leaks import LeakTracker, NoLeakTracker, log_leak, log_returned
from asyncpool.pool.lease import ACTIVE, CLOSED, LEAKED, RELEASED, Lease
from asyncpool.pool.record import ConnectionRecord
from asyncpool.stats import PoolStats, StatementCacheStats

logger = logging.getLogger("asyncpool.pool")

_UNSET: Any = object()
# A waiter's future resolves to a connection, or to this: "a slot is yours, open a connection".
_SLOT = object()

_VALIDATION_QUERY = "SELECT 1"
# How long release may spend rolling back a transaction left open before the connection is dropped.
_RELEASE_TIMEOUT = 5.0


class Pool:
    """An asyncio pool of asyncpg connections, safe behind transaction-mode poolers.

    Give options as keyword arguments (see `PoolConfig` for each one) or a whole `config`.
    Use ``await pool.open()`` or ``async with Pool(...) as pool``; `create_pool` does both.
    """

    def __init__(
        self,
        dsn: str | None = None,
        *,
        config: PoolConfig | None = None,
        observers: list[PoolObserver] | None = None,
        **options: Any,
    ) -> None:
        if config is None:
            config = PoolConfig(dsn=dsn, **options)
        elif dsn is not None or options:
            config = config.replace(**({"dsn": dsn} if dsn is not None else {}), **options)
        self.config = config
        self.name = config.name
        self._extra_observers = list(observers or [])
        self._observer: PoolObserver = PoolObserver()
        self._connector: Connector | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._idle: collections.deque[ConnectionRecord] = collections.deque()
        self._waiters: collections.deque[asyncio.Future[Any]] = collections.deque()
        self._leases: dict[ConnectionRecord, Lease] = {}
        self._size = 0  # open connections plus slots reserved for connections being opened
        self._connecting = 0
        self._opened = False
        self._closing = False
        self._closed = False
        self._all_returned: asyncio.Event | None = None
        self._background: set[asyncio.Task[Any]] = set()
        self._housekeeper: asyncio.Task[None] | None = None
        self._leaks: LeakTracker | NoLeakTracker = NoLeakTracker()
        self._validate_after = config.validate_after
        # Only "unnamed" connections can ask to be retired (stale statement description).
        self._may_retire = config.prepared_statements == "unnamed"
        self._created_total = 0
        self._closed_total = 0
        self._timeouts_total = 0
        self._leaked_total = 0
        self._validation_failures_total = 0
        self._acquired_total = 0
        self._connect_errors_total = 0

    def __repr__(self) -> str:
        s = self.stats()
        state = "closed" if self._closed else "open" if self._opened else "new"
        return (
            f"<asyncpool.Pool {self.name!r} {state} size={s.size} idle={s.idle} "
            f"in_use={s.in_use} waiting={s.waiting} max_size={s.max_size}>"
        )

    # -- lifecycle ----------------------------------------------------------------------------

    async def open(self, wait: bool = True) -> Pool:
        """Start the pool and open `min_size` connections.

        With `wait` (default) the first connections are opened now, so a wrong DSN or password
        fails here rather than on the first query.
        """
        if self._closed or self._closing:
            raise PoolClosedError(f"pool {self.name!r} is closed; create a new pool")
        if self._opened:
            return self
        self._loop = asyncio.get_running_loop()
        self._observer = self._build_observer()
        self._connector = Connector(self.config, self._observer)
        self._all_returned = asyncio.Event()
        if self.config.leak_timeout is not None:
            self._leaks = LeakTracker(self.config.leak_timeout, self._on_leak)
        self._observer.attach(self.name, self.stats)
        self._opened = True
        creds = self._connector.credentials
        try:
            if creds is not None:
                await creds.warm(self._connector.target)
            if wait and self.config.min_size:
                await self._fill(self.config.min_size)
        except BaseException:
            await self.close(timeout=0)
            raise
        self._housekeeper = asyncio.create_task(self._housekeeping(), name=f"asyncpool:{self.name}")
        return self

    def _build_observer(self) -> PoolObserver:
        observers = list(self._extra_observers)
        if self.config.telemetry:
            from asyncpool.telemetry import TelemetryObserver

            observers.insert(0, TelemetryObserver(self.config))
        if not observers:
            return PoolObserver()
        return observers[0] if len(observers) == 1 else ObserverGroup(observers)

    async def _fill(self, count: int) -> None:
        """Open connections until `count` exist (raising the first failure)."""
        loop = self._require_loop()
        while self._size < count and not self._closing:
            self._size += 1
            try:
                timeout = self.config.connect_timeout
                record = await self._connect(loop.time() + timeout, timeout)
            except BaseException:
                self._free_slot()
                raise
            self._put_idle(record)

    async def __aenter__(self) -> Pool:
        return await self.open()

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self, timeout: float | None = 10.0) -> None:
        """Stop handing out connections, wait up to `timeout` for held ones, then terminate.

        Waiters get `PoolClosedError`. Idle connections are closed at once. A connection still
        held after `timeout` is terminated and its holder gets `PoolClosedError` on next use.
        """
        if self._closed:
            return
        self._closing = True
        while self._waiters:
            fut = self._waiters.popleft()
            if not fut.done():
                fut.set_exception(PoolClosedError(f"pool {self.name!r} was closed while waiting"))
        if self._housekeeper is not None:
            self._housekeeper.cancel()
        closes = [self._close_conn(rec.conn) for rec in self._drain_idle("pool closed")]
        if self._leases and self._all_returned is not None:
            self._all_returned.clear()
            try:
                async with asyncio.timeout(timeout):
                    await self._all_returned.wait()
            except TimeoutError:
                pass
        for record, lease in list(self._leases.items()):
            lease.state = CLOSED
            self._leaks.untrack(lease)
            del self._leases[record]
            self._terminate(record.conn)
            self._size -= 1
            self._count_closed("pool closed")
        housekeeper = [self._housekeeper] if self._housekeeper is not None else []
        await asyncio.gather(*closes, *housekeeper, *list(self._background), return_exceptions=True)
        self._leaks.close()
        if self._connector is not None and self._connector.credentials is not None:
            try:
                await self._connector.credentials.close()
            except Exception:
                logger.exception("pool %r: closing the credentials provider failed", self.name)
        self._closed = True
        if self._opened:
            self._observer.detach()

    def terminate(self) -> None:
        """Close every connection now, without waiting (for shutdown paths that cannot await)."""
        self._closing = self._closed = True
        for rec in self._drain_idle("pool terminated"):
            rec.conn.terminate()
        for record, lease in list(self._leases.items()):
            lease.state = CLOSED
            record.conn.terminate()
        self._leases.clear()
        self._leaks.close()
        if self._housekeeper is not None:
            self._housekeeper.cancel()

    def expire_all(self) -> None:
        """Retire every connection: idle ones now, held ones when returned (after a migration,
        a credentials rotation, or a failover)."""
        for rec in self._drain_idle("expired by expire_all"):
            self._spawn(self._close_conn(rec.conn))
        for record in self._leases:
            record.expires_at = 0.0

    def invalidate_statement_cache(self) -> None:
        """Forget cached statement descriptions (``prepared_statements="unnamed"``), e.g.
        after a migration: every connection describes each statement afresh on its next use.
        Applies to every pool in this process."""
        from asyncpool.unnamed import invalidate_all

        invalidate_all()

    # -- checkout -----------------------------------------------------------------------------

    def acquire(self, timeout: float | None = _UNSET) -> AcquireContext:
        """``async with pool.acquire() as conn:`` a connection, returned when the block ends.

        `timeout` overrides `acquire_timeout` for this call. Also ``conn = await
        pool.acquire()`` followed by ``await pool.release(conn)``.
        """
        return AcquireContext(self, timeout, sys._getframe(1))

    def transaction(
        self,
        timeout: float | None = _UNSET,
        *,
        isolation: str | None = None,
        readonly: bool = False,
        deferrable: bool = False,
    ) -> TransactionContext:
        """``async with pool.transaction() as conn:`` commits on success, rolls back on error."""
        return TransactionContext(
            self, timeout, sys._getframe(1), isolation=isolation, readonly=readonly,
            deferrable=deferrable,
        )

    async def release(self, conn: PooledConnection) -> None:
        """Return a connection taken with ``await pool.acquire()``."""
        if not isinstance(conn, PooledConnection):
            raise PoolError(f"pool {self.name!r}: release() takes the connection acquire() gave")
        await self._release(conn._lease)

    async def execute(self, query: str, *args: Any, timeout: float | None = None) -> str:
        async with self._acquire_here() as conn:
            result: str = await conn.execute(query, *args, timeout=timeout)
            return result

    async def executemany(self, query: str, args: Any, *, timeout: float | None = None) -> None:
        async with self._acquire_here() as conn:
            await conn.executemany(query, args, timeout=timeout)

    async def fetch(self, query: str, *args: Any, timeout: float | None = None) -> list[Any]:
        async with self._acquire_here() as conn:
            rows: list[Any] = await conn.fetch(query, *args, timeout=timeout)
            return rows

    async def fetchrow(self, query: str, *args: Any, timeout: float | None = None) -> Any:
        async with self._acquire_here() as conn:
            return await conn.fetchrow(query, *args, timeout=timeout)

    async def fetchval(self, query: str, *args: Any, column: int = 0,
                       timeout: float | None = None) -> Any:
        async with self._acquire_here() as conn:
            return await conn.fetchval(query, *args, column=column, timeout=timeout)

    def _acquire_here(self) -> AcquireContext:
        # The leak report should name the caller of pool.fetch(), not this module.
        return AcquireContext(self, _UNSET, sys._getframe(2))

    def _acquire_nowait(self, frame: FrameType | None) -> Lease | None:
        """The fast path, without a coroutine: an idle connection, nobody queued ahead, no check
        due. None when the caller must take the slow path (`_acquire`)."""
        loop = self._loop
        if loop is None or self._closing or not self._idle or self._waiters:
            return None
        record = self._idle[-1]
        now = loop.time()
        after = self._validate_after
        if (after is not None and now - record.last_used > after) or record.expired(now):
            return None
        if record.conn.is_closed() or asyncio.get_running_loop() is not loop:
            return None
        self._idle.pop()
        return self._checkout(record, now, now, frame)

    async def _acquire(self, timeout: float | None, frame: FrameType | None) -> Lease:
        """Check out a connection; called by the acquire contexts."""
        loop = self._loop
        if loop is None or self._closing:
            raise self._not_open_error()
        if asyncio.get_running_loop() is not loop:
            raise PoolError(
                f"pool {self.name!r} was opened on another event loop; asyncpg connections are "
                "bound to their loop, so keep one loop for the process "
                "(see asyncpool.integrations.lambda_runner)"
            )
        if timeout is _UNSET:
            timeout = self.config.acquire_timeout
        # The acquire contexts have tried _acquire_nowait() already; this is the slow path.
        started = loop.time()
        deadline = None if timeout is None else started + timeout
        record = await self._get_record(deadline, timeout)
        return self._checkout(record, started, loop.time(), frame)

    def _checkout(self, record: ConnectionRecord, started: float, now: float,
                  frame: FrameType | None) -> Lease:
        lease = Lease(record, now, frame)
        self._leases[record] = lease
        self._leaks.track(lease)
        self._acquired_total += 1
        self._observer.acquired(now - started)
        return lease

    async def _get_record(  # noqa: PLR0911 - each way to obtain a connection returns at once
        self, deadline: float | None, timeout: float | None
    ) -> ConnectionRecord:
        loop = self._require_loop()
        while True:
            if self._closing:
                raise self._not_open_error()
            if self._idle and not self._waiters:
                record = self._idle.pop()
                now = loop.time()
                if not record.usable():
                    # Closed while idle (server restart, pooler timeout seen by the driver).
                    self._count_failed_check("broken")
                    return await self._connect_in_slot(deadline, timeout)
                if record.expired(now):
                    self._spawn(self._close_conn(record.conn))
                    self._count_closed("expired")
                    return await self._connect_in_slot(deadline, timeout)
                after = self.config.validate_after
                if after is not None and now - record.last_used > after:
                    if await self._validate(record, deadline):
                        return record
                    return await self._connect_in_slot(deadline, timeout)
                return record
            if self._size < self.config.max_size:
                self._size += 1
                return await self._connect_in_slot(deadline, timeout)
            got = await self._wait_turn(deadline, timeout)
            if got is _SLOT:
                return await self._connect_in_slot(deadline, timeout)
            # A connection handed over by release() is fresh from use: no check needed.
            handed: ConnectionRecord = got
            return handed

    async def _wait_turn(self, deadline: float | None, timeout: float | None) -> Any:
        """Queue until release() hands over a connection or a free slot."""
        loop = self._require_loop()
        fut: asyncio.Future[Any] = loop.create_future()
        self._waiters.append(fut)
        try:
            async with asyncio.timeout_at(deadline):
                return await fut
        except BaseException as exc:
            got = self._leave_queue(fut)
            if got is not None:
                # Woken in the same instant we gave up (timeout, cancel): pass it on.
                self._give_back(got)
            if isinstance(exc, TimeoutError):
                self._timeouts_total += 1
                self._observer.timed_out()
                raise self._timeout_error(timeout) from None
            raise

    def _leave_queue(self, fut: asyncio.Future[Any]) -> Any:
        """Step out of the waiters' queue: what release() handed `fut` (a connection or a slot)
        if it did so before we left, else None (and `fut` will be skipped)."""
        if fut.done() and not fut.cancelled() and fut.exception() is None:
            return fut.result()
        fut.cancel()
        with contextlib.suppress(ValueError):
            self._waiters.remove(fut)
        return None

    def _give_back(self, got: Any) -> None:
        if got is _SLOT:
            self._free_slot()
        else:
            self._put_idle(got)

    async def _connect_in_slot(self, deadline: float | None, timeout: float | None) -> ConnectionRecord:
        """Open a connection in a slot this caller already holds; the slot is freed on failure."""
        try:
            return await self._connect(deadline, timeout, take_released=True)
        except BaseException:
            self._free_slot()
            raise

    async def _connect(self, deadline: float | None, timeout: float | None = None, *,
                       take_released: bool = False) -> ConnectionRecord:
        """Open a connection, retrying transient failures with backoff until `deadline`.

        With `take_released`, a connection returned to the pool between attempts is taken
        instead (a full pooler refuses logins while our own connections come back).
        """
        loop = self._require_loop()
        assert self._connector is not None
        backoff = Backoff()
        self._connecting += 1
        try:
            while True:
                try:
                    async with asyncio.timeout_at(deadline):
                        conn = await self._connector.connect()
                except TimeoutError:
                    self._timeouts_total += 1
                    self._observer.timed_out()
                    raise self._timeout_error(timeout, "while connecting") from None
                except ConnectError as exc:
                    self._connect_errors_total += 1
                    delay = backoff.next_delay()
                    now = loop.time()
                    if not exc.transient or (deadline is not None and now + delay >= deadline):
                        logger.warning("pool %r: %s", self.name, exc)
                        raise
                    logger.info("pool %r: %s; retrying in %.2fs", self.name, exc, delay)
                    if not take_released:
                        await asyncio.sleep(delay)
                        continue
                    record = await self._released_within(delay)
                    if record is None:
                        continue
                    return record
                self._created_total += 1
                if self._closing:
                    conn.terminate()
                    raise self._not_open_error()
                cfg = self.config
                return ConnectionRecord(conn, loop.time(), cfg.max_lifetime, cfg.lifetime_jitter)
        finally:
            self._connecting -= 1

    async def _released_within(self, delay: float) -> ConnectionRecord | None:
        """Wait `delay` between connect attempts in line with the waiters; a connection
        release() hands over ends the wait. The caller's own slot is then freed."""
        loop = self._require_loop()
        fut: asyncio.Future[Any] = loop.create_future()
        self._waiters.append(fut)
        try:
            async with asyncio.timeout(delay):
                got = await fut
        except TimeoutError:
            got = self._leave_queue(fut)  # handed over in the instant the delay ran out?
            if got is None:
                return None
        except BaseException:
            got = self._leave_queue(fut)
            if got is not None:
                self._give_back(got)
            raise
        # Either way this caller holds one slot too many now: pass it on.
        self._free_slot()
        return None if got is _SLOT else got

    async def _validate(self, record: ConnectionRecord, deadline: float | None) -> bool:
        """One round trip on a connection that sat idle; False (and closed) if it is dead."""
        loop = self._require_loop()
        budget = self.config.connect_timeout
        if deadline is not None:
            budget = max(0.001, min(budget, deadline - loop.time()))
        self._connecting += 1
        try:
            await record.conn.execute(_VALIDATION_QUERY, timeout=budget)
        # InternalClientError: the server's FATAL (pg_terminate_backend, pooler shutdown) arrived
        # but the driver has not yet seen the socket close.
        except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError,
                asyncpg.InternalClientError) as exc:
            logger.info("pool %r: idle connection failed its check (%s); replacing it", self.name,
                        type(exc).__name__)
            self._terminate(record.conn)
            self._count_failed_check("failed validation")
            return False
        except BaseException:
            self._terminate(record.conn)
            self._free_slot()
            self._count_closed("cancelled during validation")
            raise
        finally:
            self._connecting -= 1
        record.last_used = loop.time()
        return True

    # -- return -------------------------------------------------------------------------------

    async def _release(self, lease: Lease) -> None:
        """Take a connection back. Never loses the slot, even if cancelled part-way."""
        if self._release_nowait(lease):
            await self._release_after_reset(lease)

    def _release_nowait(self, lease: Lease) -> bool:
        """Release without a coroutine when no round trip is needed. True means the connection
        must be reset first (a query still being cancelled, a transaction left open): the caller
        then awaits `_release_after_reset`."""
        if lease.state is not ACTIVE:
            return False
        record = lease.record
        now = self._require_loop().time()
        lease.state = RELEASED
        lease.forget_site()
        self._leaks.untrack(lease)
        self._leases.pop(record, None)
        self._observer.released(now - lease.acquired_at)
        if lease.reported:
            log_returned(self.name, lease, now - lease.acquired_at)
        conn = record.conn
        if conn.is_closed():
            self._discard(record, "broken")
            self._note_if_all_returned()
            return False
        if _is_cancelling(conn) or conn.is_in_transaction() or _has_stale_transaction(conn):
            return True
        self._note_if_all_returned()
        self._settle(record, now)
        return False

    async def _release_after_reset(self, lease: Lease) -> None:
        record = lease.record
        try:
            await self._reset(record.conn)
        except Exception as exc:
            # Dropping the connection rolls its transaction back and the slot is restored: the
            # caller's own error (a query timeout, say) must not be replaced by this one.
            logger.info("pool %r: could not reset a returned connection (%s); closed it",
                        self.name, type(exc).__name__)
            self._discard(record, "reset failed")
            return
        except BaseException:
            self._discard(record, "reset failed")
            raise
        finally:
            self._note_if_all_returned()
        self._settle(record, self._require_loop().time())

    def _settle(self, record: ConnectionRecord, now: float) -> None:
        """Put a returned, clean connection back in service, or retire it."""
        record.last_used = now
        # "unnamed" marks a connection whose statement description went stale.
        retired = getattr(record.conn, "retire_reason", None) if self._may_retire else None
        if self._closing or record.expired(now) or retired:
            reason = "pool closed" if self._closing else retired or "expired"
            self._discard(record, reason, graceful=True)
            return
        self._put_idle(record)

    def _note_if_all_returned(self) -> None:
        # Only close() waits for this; skip the Event on the hot path otherwise.
        if self._closing and not self._leases and self._all_returned is not None:
            self._all_returned.set()

    async def _reset(self, conn: asyncpg.Connection) -> None:
        """Finish a cancelled query and roll back a transaction left open (bounded in time)."""
        async with asyncio.timeout(_RELEASE_TIMEOUT):
            if _is_cancelling(conn):
                await conn._protocol._wait_for_cancellation()
            # asyncpg keeps a Transaction whose BEGIN failed (timed out, cancelled) as the open
            # one, so every later transaction() on this connection would be a SAVEPOINT.
            conn._top_xact = None
            if conn.is_in_transaction():
                await conn.execute("ROLLBACK")

    def _put_idle(self, record: ConnectionRecord) -> None:
        """Hand the connection to the first live waiter, or keep it idle."""
        while self._waiters:
            fut = self._waiters.popleft()
            if not fut.done():
                fut.set_result(record)
                return
        if self._closing:
            self._discard(record, "pool closed", graceful=True)
            return
        self._idle.append(record)

    def _discard(self, record: ConnectionRecord, reason: str, graceful: bool = False) -> None:
        if graceful and not record.conn.is_closed():
            self._spawn(self._close_conn(record.conn))
        else:
            self._terminate(record.conn)
        self._count_closed(reason)
        self._free_slot()

    def _free_slot(self) -> None:
        """A slot became free: give it to a waiter (who will connect) or shrink the pool."""
        while self._waiters:
            fut = self._waiters.popleft()
            if not fut.done():
                fut.set_result(_SLOT)
                return
        self._size -= 1

    def _count_failed_check(self, reason: str) -> None:
        """An idle connection failed its checkout check and left the pool."""
        self._validation_failures_total += 1
        self._observer.validation_failed()
        self._count_closed(reason)

    def _count_closed(self, reason: str) -> None:
        self._closed_total += 1
        self._observer.connection_closed(reason)

    def _drain_idle(self, reason: str) -> list[ConnectionRecord]:
        records = list(self._idle)
        self._idle.clear()
        for _ in records:
            self._size -= 1
            self._count_closed(reason)
        return records

    def _terminate(self, conn: asyncpg.Connection) -> None:
        """Close `conn` now, or once asyncpg has sent the cancel request it has in flight:
        closing that request's socket early crashes PgBouncer 1.18 (pgbouncer#801)."""
        pending = [t for t in getattr(conn, "_cancellations", ()) if not t.done()]
        if not pending:
            conn.terminate()
            return
        self._spawn(self._terminate_after(conn, pending))

    async def _terminate_after(self, conn: asyncpg.Connection, pending: list[Any]) -> None:
        await asyncio.wait(pending, timeout=_RELEASE_TIMEOUT)
        conn.terminate()

    async def _close_conn(self, conn: asyncpg.Connection) -> None:
        try:
            await conn.close(timeout=2)
        except Exception:
            conn.terminate()

    # -- leaks --------------------------------------------------------------------------------

    def _on_leak(self, lease: Lease) -> None:
        """Called by the leak tracker when a lease outlives `leak_timeout`."""
        if lease.state is not ACTIVE:
            return
        loop = self._require_loop()
        held = loop.time() - lease.acquired_at
        reclaim = self.config.leak_action == "reclaim"
        site = lease.acquire_site()
        assert self._connector is not None
        report = LeakReport(self.name, held, lease.task_name(), site, reclaim, self._connector.target)
        log_leak(self.name, lease, held, reclaim, site)
        self._leaked_total += 1
        if not reclaim:
            lease.reported = True
            self._observer.leaked(report)
            return
        lease.state = LEAKED
        lease.forget_site()
        record = lease.record
        self._leases.pop(record, None)
        task = lease.task
        if task is not None and not task.done() and task is not asyncio.current_task():
            task.cancel(_LEAK_CANCEL_MESSAGE)
        self._observer.leaked(report)
        self._discard(record, "leaked")
        self._note_if_all_returned()

    # -- housekeeping -------------------------------------------------------------------------

    async def _housekeeping(self) -> None:
        """Retire idle connections past max_idle or max_lifetime; keep min_size open."""
        cfg = self.config
        limits = [v for v in (cfg.max_idle, cfg.max_lifetime) if v is not None]
        period = min([5.0, *[v / 2 for v in limits]])
        loop = self._require_loop()
        backoff = Backoff()
        while not self._closing:
            await asyncio.sleep(period)
            now = loop.time()
            keep: list[ConnectionRecord] = []
            surplus = len(self._idle) + self._in_use() - cfg.min_size
            # Oldest-used first: the deque's left end has been idle longest.
            for record in self._idle:
                idle_too_long = cfg.max_idle is not None and now - record.last_used > cfg.max_idle
                if record.expired(now) or not record.usable() or (idle_too_long and surplus > 0):
                    surplus -= 1
                    self._spawn(self._close_conn(record.conn))
                    self._count_closed("idle" if idle_too_long else "expired")
                    self._size -= 1
                else:
                    keep.append(record)
            self._idle = collections.deque(keep)
            if self._size < cfg.min_size and not self._closing:
                try:
                    await self._fill(cfg.min_size)
                    backoff = Backoff()
                except ConnectError as exc:
                    logger.warning("pool %r: could not keep min_size connections: %s", self.name, exc)
                    await asyncio.sleep(backoff.next_delay())

    # -- introspection ------------------------------------------------------------------------

    def _in_use(self) -> int:
        return len(self._leases)

    def stats(self) -> PoolStats:
        """Current sizes and running totals."""
        return PoolStats(
            name=self.name,
            size=self._size,
            idle=len(self._idle),
            in_use=len(self._leases),
            connecting=self._connecting,
            waiting=sum(1 for f in self._waiters if not f.done()),
            min_size=self.config.min_size,
            max_size=self.config.max_size,
            created_total=self._created_total,
            closed_total=self._closed_total,
            timeouts_total=self._timeouts_total,
            leaked_total=self._leaked_total,
            validation_failures_total=self._validation_failures_total,
            acquired_total=self._acquired_total,
            connect_errors_total=self._connect_errors_total,
            statement_cache=self._statement_cache_stats(),
        )

    def _statement_cache_stats(self) -> StatementCacheStats | None:
        totals = self._connector.statement_cache if self._connector is not None else None
        return totals.snapshot() if totals is not None else None

    @property
    def closed(self) -> bool:
        return self._closed or self._closing

    @property
    def target(self) -> str:
        """``user@host:port/database`` this pool connects to (no secrets)."""
        return str(self._connector.target) if self._connector else "<not open>"

    # -- helpers ------------------------------------------------------------------------------

    def _spawn(self, coro: Any) -> None:
        task = asyncio.ensure_future(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    def _require_loop(self) -> asyncio.AbstractEventLoop:
        if self._loop is None:
            raise self._not_open_error()
        return self._loop

    def _not_open_error(self) -> PoolClosedError:
        if self._closing or self._closed:
            return PoolClosedError(f"the pool {self.name!r} is closed")
        return PoolClosedError(f"the pool {self.name!r} is not open yet: await pool.open() first")

    def _timeout_error(self, timeout: float | None, during: str = "") -> PoolTimeoutError:
        s = self.stats()
        what = f" {during}" if during else ""
        return PoolTimeoutError(
            f"pool {self.name!r}: no connection within {timeout:g}s{what} (size={s.size}, "
            f"in_use={s.in_use}, idle={s.idle}, waiting={s.waiting}, max_size={s.max_size}); "
            "release connections sooner, raise max_size or acquire_timeout"
        )


_LEAK_CANCEL_MESSAGE = "asyncpool: connection held past leak_timeout was reclaimed"


def _is_cancelling(conn: asyncpg.Connection) -> bool:
    """True while asyncpg is still finishing a query whose task was cancelled."""
    proto = getattr(conn, "_protocol", None)
    check = getattr(proto, "_is_cancelling", None)
    return bool(check()) if check is not None else False


def _has_stale_transaction(conn: asyncpg.Connection) -> bool:
    """True when asyncpg still tracks a Transaction object (a failed or abandoned start)."""
    return getattr(conn, "_top_xact", None) is not None


async def create_pool(dsn: str | None = None, **options: Any) -> Pool:
    """Create and open a pool: ``pool = await asyncpool.create_pool(dsn, max_size=5)``."""
    return await Pool(dsn, **options).open()
