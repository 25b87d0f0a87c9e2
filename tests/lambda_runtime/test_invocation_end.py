"""What the end of an invocation waits for, under the real runtime (awslambdaric) against
PgBouncer: a reset, a close or a cancel request the pool is waiting for must not hold the
handler's answer back (the environment may be frozen once it goes)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from asyncpool.testing import PgBouncerServer
from asyncpool.testing.faultproxy import FaultProxy
from asyncpool.testing.lambda_runtime import RuntimeAPI
from tests.lambda_runtime.support import environment, invoke, network_dies_in_a_freeze, response


def _record(log: str, line: str) -> str:
    """The log record that begins with `line`, its following lines (the acquire site) too."""
    record = log[log.index(line):]
    end = record.find("\n[")  # (the runtime's records begin with their level)
    return record if end < 0 else record[:end]


async def test_a_thaw_on_a_dead_network_answers_soon_after_the_checkout_gives_up(
    own_pgbouncer: PgBouncerServer, tmp_path: Path
) -> None:
    """The network to PgBouncer dies without a word during a freeze: the thawed invocation's
    check gets no answer (half of acquire_timeout), its cancel request none either, the new login
    none: PoolTimeoutError at acquire_timeout (3 s here). The error must then go out within half
    the margin (0.25 s); it waited for the check's cancel request up to the deadline's margin
    (5.5 s of 6 s)."""
    async with FaultProxy.to_dsn(own_pgbouncer.dsn()) as proxy:
        env: dict[str, str | None] = {"ASYNCPOOL_DSN": proxy.dsn(own_pgbouncer.dsn()),
                                      "ASYNCPOOL_ACQUIRE_TIMEOUT": "3"}
        with RuntimeAPI(function_timeout=6) as api, environment(
                api, own_pgbouncer, tmp_path, env=env) as proc:
            await network_dies_in_a_freeze(api, proc, proxy)
            thawed = await invoke(api, {"op": "query"})
            assert thawed.kind == "error", thawed.body
            assert thawed.json()["errorType"] == "PoolTimeoutError"
            assert "no connection within 3s" in thawed.json()["errorMessage"]
            assert thawed.seconds < 4.0, proc.log()[-3000:]


async def test_an_async_generator_kept_across_invocations_does_not_keep_its_connection(
    own_pgbouncer: PgBouncerServer, tmp_path: Path
) -> None:
    """The handler keeps an async generator module-level, suspended inside ``async with
    pool.acquire()``: the invocation's end says where it was acquired and closes that connection,
    so the next invocation is served (max_size=1); it timed out waiting until leak_timeout, with
    no word. The generator's next statement is refused, not run on a connection another holds."""
    with RuntimeAPI(function_timeout=6) as api, environment(api, own_pgbouncer, tmp_path) as proc:
        response(await invoke(api, {"op": "generator"}), proc)
        after = await invoke(api, {"op": "query"})
        stats = response(after, proc)["pool"]
        assert after.seconds < 2.0
        assert (stats["created_total"], stats["closed_total"], stats["in_use"]) == (2, 1, 0)
        [line] = [line for line in proc.log().splitlines() if "no task runs" in line]
        assert "WARNING" in line
        site = _record(proc.log(), line)
        assert "in _backend_pids" in site
        assert "async with pool.acquire() as conn" in site
        # Where the block waits, in the handler's code; not the invocation's end, asyncpool's.
        assert 'yield await conn.fetchval("SELECT pg_backend_pid()")' in site, site
        assert "asyncpool/integrations" not in site, site
        assert "asyncpool/pool" not in site, site
        again = await invoke(api, {"op": "generator"})
        assert again.kind == "error", again.body
        assert "was terminated" in again.json()["errorMessage"]
        assert response(await invoke(api, {"op": "query"}), proc)["pool"]["in_use"] == 0


async def test_a_connection_acquired_without_async_with_and_kept_is_named_and_closed(
    own_pgbouncer: PgBouncerServer, tmp_path: Path
) -> None:
    """The handler keeps ``conn = await pool.acquire()`` past its invocation (module-level):
    the invocation's end says where it was acquired and closes it, so the next invocation is
    served at once (max_size=1); it waited until acquire_timeout (5 s) and failed with
    PoolTimeoutError, with no word, the connection left to leak_timeout. The kept connection's
    next use is refused."""
    with RuntimeAPI(function_timeout=6) as api, environment(api, own_pgbouncer, tmp_path) as proc:
        response(await invoke(api, {"op": "leak"}), proc)
        after = await invoke(api, {"op": "query"})
        stats = response(after, proc)["pool"]
        assert after.seconds < 2.0
        assert (stats["created_total"], stats["closed_total"], stats["in_use"]) == (2, 1, 0)
        log = proc.log()
        [line] = [line for line in log.splitlines() if "was not released when it returned" in line]
        assert "WARNING" in line
        assert "`conn = await pool.acquire()`" in line
        site = _record(log, line)
        assert "in handler\n    conn = await pool.acquire()" in site, site
        assert "asyncpool/integrations" not in site, site
        assert "asyncpool/pool" not in site, site
        used = response(await invoke(api, {"op": "use_kept"}), proc)
        assert "was terminated" in used["error"], used
        assert used["pool"]["in_use"] == 0


@pytest.mark.parametrize("margin", ["0", "0.5"])
async def test_a_task_left_holding_a_connection_does_not_make_the_invocation_time_out(
    own_pgbouncer: PgBouncerServer, tmp_path: Path, margin: str
) -> None:
    """``timeout_margin=0``: the invocation's end gave a task it left holding a connection all
    the invocation's time, so the response went out at the deadline, and Lambda timed the
    invocation out (the handler had returned at once). The end keeps some time for the
    response whatever the margin; 0.5 s (the default) is the control."""
    env: dict[str, str | None] = {"TEST_TIMEOUT_MARGIN": margin}
    with RuntimeAPI(function_timeout=2) as api, environment(
            api, own_pgbouncer, tmp_path, env=env) as proc:
        outcome = await invoke(api, {"op": "background", "hold": 10})
        assert outcome.kind == "response", outcome.body
        assert 1.0 < outcome.seconds < 2.0, outcome.seconds  # (given time, then cancelled)
        results = response(await invoke(api, {"op": "background_results"}), proc)
        assert results["background"] == ["cancelled"]
        assert results["pool"]["in_use"] == 0


async def test_a_min_size_refill_still_logging_in_is_given_up_before_the_response(
    own_pgbouncer: PgBouncerServer, tmp_path: Path
) -> None:
    """An invocation that opens the pool (``open(wait=False)``: the min_size refill runs in the
    background) and does not use it answers at once; the refill's login, slow to answer, is given
    up before the response goes, its socket closed, rather than left half done while the
    environment is frozen (the loop does not run between invocations). The next invocation logs
    in itself."""
    async with FaultProxy.to_dsn(own_pgbouncer.dsn()) as proxy:
        env: dict[str, str | None] = {"ASYNCPOOL_DSN": proxy.dsn(own_pgbouncer.dsn())}
        with RuntimeAPI(function_timeout=6) as api, environment(
                api, own_pgbouncer, tmp_path, env=env) as proc:
            proxy.set_mode("half-open")  # the login's replies are lost
            first = await invoke(api, {"op": "stats"})
            response(first, proc)
            assert first.seconds < 1.0
            await asyncio.to_thread(api.wait_idle)
            proc.freeze()
            try:
                await asyncio.sleep(0.3)
                assert proxy.connections == 0, "the refill's login was left open across the freeze"
            finally:
                proc.thaw()
            proxy.set_mode("pass")
            after = response(await invoke(api, {"op": "query"}), proc)["pool"]
            assert (after["created_total"], after["in_use"], after["size"]) == (1, 0, 1)


async def test_a_connection_kept_by_an_earlier_invocations_task_that_ended_is_closed(
    own_pgbouncer: PgBouncerServer, tmp_path: Path
) -> None:
    """A task started in one invocation acquires (``conn = await pool.acquire()``) in a later
    one, keeps the connection and ends: nobody who can still run gives it back. The later
    invocation's end closes it, so the next invocation is served (max_size=1); it waited for
    acquire_timeout (5 s) and failed with PoolTimeoutError, the connection left to leak_timeout:
    the checkout carries the earlier invocation's context, which ended long before."""
    with RuntimeAPI(function_timeout=6) as api, environment(api, own_pgbouncer, tmp_path) as proc:
        response(await invoke(api, {"op": "arm_late"}), proc)
        response(await invoke(api, {"op": "go"}), proc)
        after = await invoke(api, {"op": "query"})
        stats = response(after, proc)["pool"]
        assert after.seconds < 2.0
        assert (stats["created_total"], stats["closed_total"], stats["in_use"]) == (2, 1, 0)
        [line] = [line for line in proc.log().splitlines() if "was not released" in line]
        assert "WARNING" in line
        assert "it is closed now" in line, line
        site = _record(proc.log(), line)
        assert "in _late_acquire\n    conn = await pool.acquire()" in site, site
        used = response(await invoke(api, {"op": "use_kept"}), proc)
        assert "was terminated" in used["error"], used
