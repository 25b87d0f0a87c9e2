"""PgBouncer fleets (#20): several PgBouncer 1.24 processes on one port (``so_reuseport``).

With peering (``peer_id`` and ``[peers]``) a cancel request reaches the process that holds the
query wherever the kernel hands it; without, it is lost whenever it lands elsewhere (2 in 3 with
three processes). Real processes, real cancel requests, pg_stat_activity as the judge.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Iterator
from typing import Any

import pytest

from asyncpool import ConnectionLeakedError, Pool
from asyncpool.testing import PostgresServer, ServerStack
from asyncpool.testing.binaries import current_pgbouncer
from asyncpool.testing.fleet import PgBouncerFleet

PROCESSES = 3
ROUNDS = 6  # all six cancels reaching the right process by chance, unpeered: (1/3)^6 = 0.14%


def _fleet(stack: ServerStack, peering: bool) -> Iterator[PgBouncerFleet]:
    fleet = PgBouncerFleet(current_pgbouncer(), stack.postgres, processes=PROCESSES,
                           peering=peering,
                           overrides={"default_pool_size": 4, "max_db_connections": 4,
                                      "max_client_conn": 100, "query_wait_timeout": 20})
    fleet.start()
    try:
        yield fleet
    finally:
        fleet.stop()


@pytest.fixture(scope="module")
def peered(stack: ServerStack) -> Iterator[PgBouncerFleet]:
    yield from _fleet(stack, peering=True)


@pytest.fixture(scope="module")
def unpeered(stack: ServerStack) -> Iterator[PgBouncerFleet]:
    yield from _fleet(stack, peering=False)


async def _settled(postgres: PostgresServer, token: str, within: float = 2.0) -> int:
    """Statements still running with `token` once cancels had `within` seconds to land."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    while (left := await postgres.running_statements(token)) and loop.time() < deadline:
        await asyncio.sleep(0.1)
    return left


async def _leak_rounds(fleet: PgBouncerFleet, token: str, **options: Any) -> Pool:
    """ROUNDS holders, each leaking a connection mid-statement; each reclaimed."""
    pool = Pool(fleet.dsn(), name="fleet", min_size=0, max_size=ROUNDS, leak_timeout=0.3,
                telemetry=False, **options)
    await pool.open()

    async def holder(i: int) -> None:
        # A new connection per holder: each lands on a process the kernel picks.
        async with pool.acquire() as conn:
            await conn.fetch(f"SELECT pg_sleep(60) /* {token} {i} */")

    tasks = [asyncio.create_task(holder(i)) for i in range(ROUNDS)]
    results = await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), 10)
    assert all(isinstance(r, ConnectionLeakedError) for r in results), results
    return pool


async def test_peered_fleet_reclaim_cancels_every_statement(peered: PgBouncerFleet,
                                                            postgres: PostgresServer) -> None:
    token = f"t{uuid.uuid4().hex[:10]}"
    try:
        pool = await _leak_rounds(peered, token)
        try:
            assert await _settled(postgres, token) == 0
            assert pool.stats().leaked_total == ROUNDS
            assert await pool.fetchval("SELECT 1") == 1
        finally:
            await pool.close()
    finally:
        await postgres.end_statements(token)


async def test_unpeered_fleet_loses_cancels_and_the_pool_still_reclaims(
        unpeered: PgBouncerFleet, postgres: PostgresServer) -> None:
    """Without peering a cancel reaches the right process only by chance: statements may run on
    (until statement_timeout); the pool reclaims every connection at once all the same and
    serves the next caller.

    How many cancels are lost is the kernel's choice (which so_reuseport listener takes each
    cancel connection): 5 of 6 in one run, 0 of 6 in a CI run. The deterministic lost-cancel
    test is tests/test_cancel_delivery.py (a proxy that drops every cancel request).
    """
    token = f"t{uuid.uuid4().hex[:10]}"
    loop = asyncio.get_running_loop()
    try:
        pool = await _leak_rounds(unpeered, token)
        try:
            assert pool.stats().leaked_total == ROUNDS
            started = loop.time()
            assert await pool.fetchval("SELECT 1") == 1
            assert loop.time() - started < 1.5
            assert pool.stats().in_use == 0
        finally:
            await pool.close()
    finally:
        await postgres.end_statements(token)


async def test_unpeered_fleet_timeouts_with_cancel_requests_off(
        unpeered: PgBouncerFleet, postgres: PostgresServer) -> None:
    """Timed-out statements through an unpeered fleet: with cancel_requests="off" each release
    is immediate (relying on the cancel, a lost one holds it for RELEASE_TIMEOUT)."""
    token = f"t{uuid.uuid4().hex[:10]}"
    loop = asyncio.get_running_loop()
    try:
        async with Pool(unpeered.dsn(), name="fleet-off", min_size=0, max_size=1,
                        cancel_requests="off", telemetry=False) as pool:
            for i in range(3):
                conn = await pool.acquire()
                with pytest.raises(TimeoutError):
                    await conn.fetch(f"SELECT pg_sleep(60) /* {token} {i} */", timeout=0.2)
                started = loop.time()
                await pool.release(conn)
                assert loop.time() - started < 0.5
            assert await pool.fetchval("SELECT 1") == 1
    finally:
        await postgres.end_statements(token)


async def test_the_fleet_is_what_it_says(peered: PgBouncerFleet,
                                         unpeered: PgBouncerFleet) -> None:
    """Three processes on one port; the console user reads (stats) but may not administer."""
    for fleet, peer_id in ((peered, {"1", "2", "3"}), (unpeered, {"0"})):
        ids = set()
        for i in range(PROCESSES):
            config = {r["key"]: r["value"] for r in await fleet.member_admin(i, "SHOW CONFIG")}
            assert config["so_reuseport"] == "1"
            ids.add(config["peer_id"])
        assert ids == peer_id
        assert len(set(fleet.pids())) == PROCESSES
        import psycopg

        with pytest.raises(psycopg.Error):
            await fleet.admin("PAUSE")


async def _doctor(fleet: PgBouncerFleet) -> dict[str, object]:
    import io
    import json

    from asyncpool.cli.doctor import doctor

    out = io.StringIO()
    await doctor(fleet.dsn(), fleet.admin_dsn, 5.0, True, out)
    report: dict[str, object] = json.loads(out.getvalue())
    return report


def _cancel_finding(report: dict[str, object]) -> dict[str, str]:
    findings = report["findings"]
    assert isinstance(findings, list)
    found = [f for f in findings if f["check"] == "cancel"]
    assert len(found) == 1, findings
    return dict(found[0])


async def test_doctor_warns_about_a_fleet_without_peering(unpeered: PgBouncerFleet) -> None:
    """Read with the console's stats user only (pgb_stats in compose and Terraform)."""
    finding = _cancel_finding(await _doctor(unpeered))
    assert finding["level"] == "warning"
    assert "peer_id" in finding["message"]
    assert "cancel_requests='off'" in finding["message"]


async def test_doctor_is_content_with_a_peered_fleet(peered: PgBouncerFleet) -> None:
    finding = _cancel_finding(await _doctor(peered))
    assert finding["level"] == "ok"
    assert "peering" in finding["message"]
