"""The query helpers' inline lease and the record's connection probes (the helpers' fast path)."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import sys
from contextvars import ContextVar
from typing import Any

import pytest

from asyncpool.connect import driver
from asyncpool.errors import PoolError, PoolTimeoutError
from asyncpool.pool.checkout import AcquireContext
from asyncpool.pool.lease import ACTIVE, GIVEN_BACK, RELEASED, Lease, Site
from asyncpool.pool.record import ConnectionRecord
from asyncpool.pool.slow_checkout import UNSET
from tests.unit.fakes import FakeServer, fake_pool, run

_SPAN: ContextVar[str] = ContextVar("_SPAN", default="none")


def _slots_of(lease: Lease) -> dict[str, Any]:
    return {name: getattr(lease, name) for name in Lease.__slots__}


def test_the_helpers_lease_sets_every_slot_as_the_constructor_would(server: FakeServer) -> None:
    # The statement runner builds its lease without Lease.__init__: a slot added to Lease and forgotten
    # there would be unset (AttributeError in a leak report) or hold another value.
    async def main() -> None:
        async with fake_pool(server, min_size=1, max_size=1) as pool:
            slots = pool._slots
            _SPAN.set("caller's span")
            statement = asyncio.create_task(pool.fetchval("SELECT pg_sleep(1)"))
            await asyncio.sleep(0.01)
            (record,) = slots.leased()
            lease = record.lease
            assert lease is not None
            made = _slots_of(lease)  # every slot is set, or this raises AttributeError
            expected = _slots_of(Lease(record, lease.acquired_at, None, statement,
                                       lease.context))
            expected["scoped"] = True  # a helper's statement ends with the helper
            assert made == expected
            assert lease.state is ACTIVE
            assert lease.task is statement
            assert lease.context is not None
            assert lease.context[_SPAN] == "caller's span"
            await statement
            assert not slots.leased()
            assert record.lease is None

    run(main())


def test_a_clean_statement_leaves_its_lease_to_the_next_one_on_that_connection(
        server: FakeServer) -> None:
    async def main() -> None:
        async with fake_pool(server, min_size=1, max_size=1) as pool:
            slots = pool._slots
            _SPAN.set("first caller")
            await pool.fetchval("SELECT 1")
            (record,) = slots.idle
            spare = record.spare
            assert spare is not None
            assert spare.state is RELEASED
            # Nothing of the holder is kept on the spare (a finished task keeps its result).
            assert spare.task is None
            assert spare.context is None
            _SPAN.set("second caller")
            statement = asyncio.create_task(pool.fetchval("SELECT pg_sleep(1)"))
            await asyncio.sleep(0.01)
            lease = record.lease
            assert lease is spare  # taken again...
            # ...and set as a new one would be, for this statement's task and context.
            expected = _slots_of(Lease(record, lease.acquired_at, None, statement, lease.context))
            expected["scoped"] = True
            assert _slots_of(lease) == expected
            assert lease.context is not None
            assert lease.context[_SPAN] == "second caller"
            await statement
            assert record.spare is lease
            # An `async with pool.acquire()` block takes it too (off the record while held), and
            # its clean end leaves it there again.
            async with pool.acquire() as conn:
                assert conn._lease is spare
                assert record.lease is spare
                assert record.spare is None
                # ...set as a new one would be (the acquire site's instruction was read at
                # acquire(); the frame has run on).
                made = _slots_of(spare)
                expected = _slots_of(Lease(record, spare.acquired_at, sys._getframe(),
                                           asyncio.current_task(), spare.context))
                assert made.pop("lasti") <= expected.pop("lasti")
                expected["scoped"] = True
                expected["cancel_requests"] = 0  # the task's count when the block took it
                assert made == expected
            assert record.spare is spare
            assert spare.state is RELEASED
            assert (spare.task, spare.context, spare.frame) == (None, None, None)
            assert spare.cancel_requests is None  # a query helper may take it next

    run(main())


@pytest.mark.parametrize("ending", ["reported", "failed", "cancelled", "retired"])
def test_a_lease_that_did_not_end_cleanly_is_not_taken_again(server: FakeServer,
                                                            ending: str) -> None:
    async def main() -> None:
        async with fake_pool(server, min_size=1, max_size=1, leak_timeout=1.0,
                             leak_action="log") as pool:
            slots = pool._slots
            await pool.fetchval("SELECT 1")
            (record,) = slots.idle
            first = record.spare
            assert first is not None
            statement = asyncio.create_task(pool.fetchval("SELECT pg_sleep(2)"))
            await asyncio.sleep(0.01)
            assert record.lease is first
            if ending == "reported":
                await statement  # ran past leak_timeout: reported, then returned
                assert first.reported
            elif ending == "failed":
                record.conn.terminate()  # the statement fails: the connection is gone
                with pytest.raises(Exception):  # noqa: B017, PT011
                    await statement
            elif ending == "cancelled":
                statement.cancel()
                with pytest.raises(asyncio.CancelledError):
                    await statement
            else:
                slots.retire(record, "test")
                await asyncio.gather(statement, return_exceptions=True)
            assert record.spare is None
            for _ in range(2):  # (a new connection's first statement comes the slow way)
                await pool.fetchval("SELECT 1")
            (now_idle,) = slots.idle
            assert now_idle.spare is not None
            assert now_idle.spare is not first
            assert not now_idle.spare.reported

    run(main())


def test_a_statement_that_left_a_transaction_open_leaves_no_spare(server: FakeServer) -> None:
    async def main() -> None:
        async with fake_pool(server, min_size=1, max_size=1) as pool:
            await pool.fetchval("SELECT 1")
            (record,) = pool._slots.idle
            first = record.spare
            assert first is not None
            await pool.execute("BEGIN")  # returned through a reset, not the clean way
            assert record.spare is None
            await pool.fetchval("SELECT 1")
            assert record.spare is not None
            assert record.spare is not first
            assert record.spare.task is None

    run(main())


def test_the_probes_follow_the_connection(server: FakeServer) -> None:
    async def main() -> None:
        async with fake_pool(server, min_size=1, max_size=1) as pool:
            record: ConnectionRecord = pool._slots.idle[0]
            assert record.probe.is_connected()
            assert not record.probe.is_in_transaction()
            async with pool.acquire() as conn:
                await conn.execute("BEGIN")
                assert record.probe.is_in_transaction()
                await conn.execute("ROLLBACK")
            assert not record.probe.is_in_transaction()
            record.conn.terminate()
            assert not record.probe.is_connected()
            # The helper does not hand out the closed connection: it opens another.
            assert await pool.fetchval("SELECT 1") is not None
            assert pool.stats().created_total == 2

    run(main())


def test_the_probe_of_an_asyncpg_without_its_internals_uses_the_public_api() -> None:
    class Public:
        closed = False
        in_tx = False

        def is_closed(self) -> bool:
            return self.closed

        def is_in_transaction(self) -> bool:
            return self.in_tx

    conn = Public()
    probe = driver.probe(conn)  # no _protocol: the public methods
    connected, in_transaction = probe.is_connected, probe.is_in_transaction
    assert connected()
    assert not in_transaction()
    conn.closed, conn.in_tx = True, True
    assert not connected()
    assert in_transaction()


def test_a_proxy_kept_past_its_block_stays_refused_when_its_lease_is_taken_again(
        server: FakeServer) -> None:
    # A block's clean end leaves its lease to the next checkout of that connection: the proxy the
    # holder may keep must not see that lease come back to life under another holder.
    async def main() -> None:
        async with fake_pool(server, min_size=1, max_size=1) as pool:
            slots = pool._slots
            async with pool.acquire() as kept:
                lease = kept._lease
            assert kept._lease is GIVEN_BACK
            (record,) = slots.idle
            assert record.spare is lease
            statement = asyncio.create_task(pool.fetchval("SELECT pg_sleep(1)"))
            await asyncio.sleep(0.01)
            assert record.lease is lease  # the helper holds it now, ACTIVE again
            assert lease.state is ACTIVE
            for use in (lambda: kept.fetchval("SELECT 1"), lambda: kept.execute("SELECT 1"),
                        lambda: kept.prepare("SELECT 1")):
                with pytest.raises(PoolError, match="released back to the pool"):
                    await use()
            with pytest.raises(PoolError, match="released back to the pool"):
                kept.transaction()
            with pytest.raises(PoolError, match="released back to the pool"):
                _ = kept.raw
            await kept.close()  # no-op: it is not the holder's any more
            await pool.release(kept)  # as for any released connection: nothing
            assert record.lease is lease
            assert lease.state is ACTIVE
            assert "released" in repr(kept)
            await statement  # the helper's statement ran to its end, undisturbed
            assert record.spare is lease
            async with pool.acquire() as holder:
                assert holder._lease is lease  # the same lease, a new proxy
                with pytest.raises(PoolError, match="released back to the pool"):
                    await kept.fetchval("SELECT 1")
                assert await holder.fetchval("SELECT 1") == 1
            assert record.spare is lease
            assert pool.stats().in_use == 0

    run(main())


@pytest.mark.parametrize("kind", ["acquire", "transaction"])
def test_a_context_exited_again_does_not_end_the_next_holders_checkout(server: FakeServer,
                                                                      kind: str) -> None:
    # The context still refers to its lease after the block, and the next checkout reuses that
    # very lease: exited again, the context must do nothing to it.
    async def main() -> None:
        async with fake_pool(server, min_size=1, max_size=1, acquire_timeout=0.1) as pool:
            slots = pool._slots
            context = pool.acquire() if kind == "acquire" else pool.transaction()
            async with context as first:
                lease = first._lease
            (record,) = slots.idle
            assert record.spare is lease
            async with pool.acquire() as holder:
                assert holder._lease is lease  # taken again
                await context.__aexit__(None, None, None)
                assert lease.state is ACTIVE
                assert record.lease is lease
                assert await holder.fetchval("SELECT 1") == 1
                with pytest.raises(PoolTimeoutError):  # still held: nothing for another one
                    async with pool.acquire():
                        pass
                with pytest.raises(PoolError, match="already used"):
                    await context.__aenter__()
            assert pool.stats().in_use == 0
            assert record.spare is lease

    run(main())


@pytest.mark.parametrize("ending", ["raised", "in a transaction", "listening", "cancelled"])
def test_a_block_that_did_not_end_cleanly_leaves_no_spare(server: FakeServer, ending: str) -> None:
    async def main() -> None:
        async with fake_pool(server, min_size=1, max_size=1) as pool:
            slots = pool._slots
            (record,) = slots.idle
            with contextlib.suppress(LookupError, asyncio.CancelledError):
                async with pool.acquire() as conn:
                    lease = conn._lease
                    if ending == "raised":
                        raise LookupError
                    if ending == "in a transaction":
                        await conn.execute("BEGIN")
                    elif ending == "listening":
                        await conn.add_listener("channel", lambda *_: None)
                    else:
                        task = asyncio.current_task()
                        assert task is not None
                        task.cancel()
                        await asyncio.sleep(0)
            assert record.spare is None
            assert lease.state is RELEASED
            assert conn._lease is lease  # not GIVEN_BACK: the lease itself says released
            with pytest.raises(PoolError, match="released back to the pool"):
                await conn.fetchval("SELECT 1")
            assert slots.idle == collections.deque([record])  # reset where needed, and back
            assert not record.probe.is_in_transaction()
            assert not record.conn._listeners  # type: ignore[attr-defined]

    run(main())


def test_the_acquire_paths_context_lease_and_proxy_set_every_slot_as_the_constructors_would(
        server: FakeServer) -> None:
    # `pool.acquire()` builds its context, `checkout_nowait` the lease and the context the proxy
    # without their __init__ too.
    async def main() -> None:
        async with fake_pool(server, min_size=1, max_size=1) as pool:
            slots = pool._slots
            _SPAN.set("holder's span")
            context = pool.acquire()
            made_context = {name: getattr(context, name) for name in AcquireContext.__slots__}
            assert made_context == {"_owner": slots, "_timeout": UNSET,
                                    "_frame": sys._getframe(), "_lease": None, "_conn": None}
            reference = AcquireContext(slots, UNSET, sys._getframe())
            assert made_context == {name: getattr(reference, name) for name in AcquireContext.__slots__}
            async with context as conn:
                (record,) = slots.leased()
                lease = record.lease
                assert lease is not None
                made = _slots_of(lease)  # every slot is set, or this raises AttributeError
                task = asyncio.current_task()
                assert not isinstance(lease.frame, Site)  # (SQLAlchemy's checkouts keep one)
                expected = _slots_of(Lease(record, lease.acquired_at, lease.frame, task,
                                           lease.context))
                # The acquire site's instruction was read at acquire(); the frame has run on.
                assert made.pop("lasti") <= expected.pop("lasti")
                expected["scoped"] = True  # taken by `async with`...
                expected["cancel_requests"] = 0  # ...whose task had no cancel request then
                assert made["frame"] is sys._getframe()  # the acquire site: this function
                assert made == expected
                assert lease.context is not None
                assert lease.context[_SPAN] == "holder's span"
                assert {name: getattr(conn, name) for name in ("_lease", "_owner")} == {
                    "_lease": lease, "_owner": slots}
                assert await conn.fetchval("SELECT 1") == 1
            assert not slots.leased()
            assert record.lease is None

    run(main())


def test_every_record_names_the_pool_that_owns_it(server: FakeServer) -> None:
    # A held connection's statements read their pool from the record (`record.owner`), not from
    # the proxy: every connection, opened at open(), by a checkout or by the housekeeping's
    # refill, must carry its own pool's, or a statement would check another pool's loop.
    async def main() -> None:
        async with fake_pool(server, min_size=1, max_size=2) as pool, \
                fake_pool(server, min_size=0, max_size=1) as other:
            async with pool.acquire() as first, pool.acquire() as second, other.acquire() as third:
                assert await first.fetchval("SELECT 1") is not None
                assert await second.fetchval("SELECT 1") is not None
                assert await third.fetchval("SELECT 1") is not None
            assert len(pool._slots.records) == 2
            assert all(record.owner is pool._slots for record in pool._slots.records)
            assert [record.owner for record in other._slots.records] == [other._slots]

    run(main())
