"""Handlers under the real Lambda runtime client (awslambdaric) against a Runtime API emulator.

Each test starts one execution environment, ``python -m awslambdaric pooled.handler``
(tests/lambda_functions/pooled.py) or an example's handler, talking to
`asyncpool.testing.lambda_runtime.RuntimeAPI`, and a PgBouncer of its own whose log shows how
each client left: "client close request" (a Terminate message) or "client unexpected eof".
"""

from __future__ import annotations

import asyncio
import json
import signal
import statistics
import time
import uuid
from pathlib import Path

import asyncpg
import pytest

from asyncpool.testing import PgBouncerServer, PostgresServer
from asyncpool.testing.admin import admin_command
from asyncpool.testing.faultproxy import FaultMode, FaultProxy
from asyncpool.testing.lambda_runtime import RuntimeAPI
from tests.lambda_env import POWERTOOLS_EXAMPLE, app_clients, load_event, scratch_table
from tests.lambda_runtime.support import (
    CLEAN_CLOSE,
    VANISHED,
    departures,
    environment,
    invoke,
    network_dies_in_a_freeze,
    response,
    running,
    wait_for_no_clients,
)


async def test_warm_invocations_share_one_server_connection(
    runtime_api: RuntimeAPI, own_pgbouncer: PgBouncerServer, tmp_path: Path
) -> None:
    with environment(runtime_api, own_pgbouncer, tmp_path) as proc:
        bodies = [response(await invoke(runtime_api, {"op": "query"}), proc) for _ in range(50)]
        assert {b["greeting"] for b in bodies} == {"Hello, Ada"}
        assert len({b["request_id"] for b in bodies}) == 50
        # One client login and one server session behind it for all 50.
        assert len({b["backend_pid"] for b in bodies}) == 1
        last = bodies[-1]["pool"]
        assert last["created_total"] == 1
        assert last["acquired_total"] == 50
        assert last["closed_total"] == 0
        assert len(await app_clients(own_pgbouncer)) == 1


async def test_the_powertools_example_under_the_runtime(
    runtime_api: RuntimeAPI, own_pgbouncer: PgBouncerServer, tmp_path: Path
) -> None:
    hello = load_event(POWERTOOLS_EXAMPLE / "events" / "hello.json")
    missing = load_event(POWERTOOLS_EXAMPLE / "events" / "missing_name.json")
    with environment(runtime_api, own_pgbouncer, tmp_path, handler="powertools_handler.handler") as proc:
        ports = set()
        for event in (hello, missing, hello, hello):
            body = response(await invoke(runtime_api, event), proc)
            assert body["statusCode"] in (200, 400)
            ports |= {row["port"] for row in await app_clients(own_pgbouncer)}
        assert "Hello, Ada!" in body["body"]
        assert len(ports) == 1  # one client connection served every invocation


async def test_a_raising_handler_is_reported_and_its_connection_released(
    runtime_api: RuntimeAPI, own_pgbouncer: PgBouncerServer, tmp_path: Path
) -> None:
    with environment(runtime_api, own_pgbouncer, tmp_path) as proc:
        response(await invoke(runtime_api, {"op": "query"}), proc)
        failed = await invoke(runtime_api, {"op": "raise"})
        assert failed.kind == "error"
        error = failed.json()
        assert error["errorType"] == "HandlerFailedError"
        assert error["requestId"] == failed.request_id
        stats = response(await invoke(runtime_api, {"op": "stats"}), proc)["pool"]
        assert stats["in_use"] == 0
        assert stats["idle"] == 1
        assert stats["created_total"] == 1  # the connection went back and is reused
        after = response(await invoke(runtime_api, {"op": "query"}), proc)["pool"]
        assert after["created_total"] == 1
        assert after["acquired_total"] == 3


@pytest.mark.parametrize(
    "execution_env", ["AWS_Lambda_python3.11", "AWS_Lambda_python3.12", None],
    ids=["python3.11", "python3.12", "unset"],
)
async def test_sigterm_closes_cleanly_and_the_process_ends_within_a_second(
    runtime_api: RuntimeAPI, own_pgbouncer: PgBouncerServer, tmp_path: Path, execution_env: str | None
) -> None:
    """Under 3.11 and with the variable unset the runtime's main thread waits inside a C call,
    where no Python signal handler runs: the hook must not keep the process alive there."""
    with environment(runtime_api, own_pgbouncer, tmp_path, execution_env=execution_env) as proc:
        response(await invoke(runtime_api, {"op": "query"}), proc)
        await asyncio.to_thread(runtime_api.wait_idle)  # back in GET /next, as when Lambda stops it
        assert len(await app_clients(own_pgbouncer)) == 1
        sent = time.monotonic()
        proc.signal(signal.SIGTERM)
        status = await asyncio.to_thread(proc.wait, 1.0)
        took = time.monotonic() - sent
        assert status is not None, f"still running 1 s after SIGTERM\n{proc.log()[-2000:]}"
        assert status in (-signal.SIGTERM, 128 + signal.SIGTERM), status
        assert took < 1.0
    [goodbye] = await departures(own_pgbouncer)
    assert await app_clients(own_pgbouncer) == []
    assert CLEAN_CLOSE in goodbye


async def test_sigterm_closes_every_pool_of_the_process(
    runtime_api: RuntimeAPI, own_pgbouncer: PgBouncerServer, tmp_path: Path
) -> None:
    """Two pools, two close_on_shutdown calls: one handler closes both, one after the other."""
    env: dict[str, str | None] = {"TEST_SECOND_POOL": "1"}
    with environment(runtime_api, own_pgbouncer, tmp_path, execution_env=None, env=env) as proc:
        assert response(await invoke(runtime_api, {"op": "query"}), proc)["second"] == 2
        await asyncio.to_thread(runtime_api.wait_idle)
        assert len(await app_clients(own_pgbouncer)) == 2
        proc.signal(signal.SIGTERM)
        assert await asyncio.to_thread(proc.wait, 1.0) is not None, proc.log()[-2000:]
    lines = await departures(own_pgbouncer)
    for _ in range(20):
        if len(lines) == 2:
            break
        await asyncio.sleep(0.1)
        lines = await departures(own_pgbouncer)
    assert len(lines) == 2, lines
    assert all(CLEAN_CLOSE in line for line in lines), lines


async def test_without_the_hook_the_default_action_stays(
    runtime_api: RuntimeAPI, own_pgbouncer: PgBouncerServer, tmp_path: Path
) -> None:
    """The control: no close_on_shutdown, the process dies at once and PgBouncer sees an EOF."""
    env: dict[str, str | None] = {"TEST_NO_SHUTDOWN_HOOK": "1"}
    with environment(runtime_api, own_pgbouncer, tmp_path, execution_env=None, env=env) as proc:
        response(await invoke(runtime_api, {"op": "query"}), proc)
        await asyncio.to_thread(runtime_api.wait_idle)
        proc.signal(signal.SIGTERM)
        assert await asyncio.to_thread(proc.wait, 1.0) == -signal.SIGTERM
    [gone] = await departures(own_pgbouncer)
    assert VANISHED in gone


async def test_sigterm_during_an_invocation_still_ends_the_process(
    runtime_api: RuntimeAPI, own_pgbouncer: PgBouncerServer, tmp_path: Path
) -> None:
    with environment(runtime_api, own_pgbouncer, tmp_path, execution_env=None) as proc:
        response(await invoke(runtime_api, {"op": "query"}), proc)
        runtime_api.submit({"op": "sleep", "seconds": 5})
        await asyncio.sleep(0.3)
        proc.signal(signal.SIGTERM)
        assert await asyncio.to_thread(proc.wait, 1.0) is not None, proc.log()[-2000:]
    await departures(own_pgbouncer)
    assert await app_clients(own_pgbouncer) == []


async def test_warm_invocation_timing(
    runtime_api: RuntimeAPI, own_pgbouncer: PgBouncerServer, tmp_path: Path
) -> None:
    """Not a benchmark (benchmarks/bench_lambda_runtime.py is): warm invocations stay in the
    low milliseconds under the real runtime, where one reconnection would cost more."""
    with environment(runtime_api, own_pgbouncer, tmp_path) as proc:
        response(await invoke(runtime_api, {"op": "query"}), proc)
        times = [(await invoke(runtime_api, {"op": "query"})).seconds for _ in range(20)]
        assert statistics.median(times) < 0.05, times


def leak_lines(log: str) -> list[str]:
    return [line for line in log.splitlines() if "past leak_timeout" in line]


@pytest.mark.parametrize("log_format", ["Text", "JSON", "Powertools"])
async def test_a_leak_report_names_the_invocation_that_took_the_connection(
    runtime_api: RuntimeAPI, own_pgbouncer: PgBouncerServer, tmp_path: Path, log_format: str
) -> None:
    """The leak is noticed during the next invocation, whose id the runtime's log filter writes
    into ``aws_request_id``; the report still carries the acquiring one. (``leak_action="log"``:
    under "reclaim" the connection is closed as the acquiring invocation ends,
    test_invocation_end.py.)"""
    env: dict[str, str | None] = {"ASYNCPOOL_LEAK_TIMEOUT": "1", "ASYNCPOOL_LEAK_ACTION": "log"}
    if log_format == "JSON":
        env["AWS_LAMBDA_LOG_FORMAT"] = "JSON"
    if log_format == "Powertools":
        env["TEST_POWERTOOLS_LOGGER"] = "1"
    with environment(runtime_api, own_pgbouncer, tmp_path, env=env) as proc:
        leaking = await invoke(runtime_api, {"op": "leak"})
        response(leaking, proc)
        # It runs past leak_timeout (1 s): the leak is noticed meanwhile.
        later = await invoke(runtime_api, {"op": "sleep", "seconds": 1.2})
        assert response(later, proc)["pool"]["leaked_total"] == 1
        [line] = leak_lines(proc.log())
    if log_format == "Text":
        # "[WARNING]\t<time>\t<current request id>\tpool ...by task 'lambda-invocation-<id>'..."
        assert f"\t{later.request_id}\t" in line  # what the runtime stamps
        assert f"lambda-invocation-{leaking.request_id}" in line
        return
    record = json.loads(line)
    assert record["asyncpool_request_id"] == leaking.request_id
    assert f"lambda-invocation-{leaking.request_id}" in record["message"]
    if log_format == "JSON":
        assert record["requestId"] == later.request_id  # overwritten by the runtime's filter


@pytest.mark.parametrize("validate_after", ["0.5", "3600"], ids=["clock-says-paused", "clock-says-nothing"])
async def test_a_frozen_environment_whose_connection_was_closed_serves_the_next_invocation(
    runtime_api: RuntimeAPI, idle_closing_pgbouncer: PgBouncerServer, tmp_path: Path, validate_after: str
) -> None:
    """With ``validate_after=3600`` the clock never asks for a check: only the invocation boundary
    does, as after a freeze the monotonic clock did not count."""
    env: dict[str, str | None] = {"ASYNCPOOL_VALIDATE_AFTER": validate_after}
    with environment(runtime_api, idle_closing_pgbouncer, tmp_path, env=env) as proc:
        response(await invoke(runtime_api, {"op": "query"}), proc)
        await asyncio.to_thread(runtime_api.wait_idle)
        proc.freeze()
        await wait_for_no_clients(idle_closing_pgbouncer)
        proc.thaw()
        thawed = await invoke(runtime_api, {"op": "query"})
        stats = response(thawed, proc)["pool"]
        counts = (stats["validation_failures_total"], stats["closed_total"], stats["created_total"])
        assert counts == (1, 1, 2)
        assert len(await app_clients(idle_closing_pgbouncer)) == 1
        again = response(await invoke(runtime_api, {"op": "query"}), proc)["pool"]
        assert again["created_total"] == 2


async def _end_app_backends(postgres: PostgresServer) -> None:
    check = await asyncpg.connect(postgres.admin_dsn)
    try:
        await check.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                            "WHERE usename = 'app' AND pid <> pg_backend_pid()")
    finally:
        await check.close()


@pytest.mark.parametrize("fault", ["backend-ended-behind-pgbouncer", "pgbouncer-reconnect",
                                   "backend-ended-direct"])
async def test_what_the_server_side_did_during_a_freeze_is_not_seen_by_the_next_invocation(
    runtime_api: RuntimeAPI, own_pgbouncer: PgBouncerServer, postgres: PostgresServer,
    tmp_path: Path, fault: str,
) -> None:
    """Frozen between invocations, the environment's server session is ended
    (pg_terminate_backend, PgBouncer's RECONNECT), behind PgBouncer or with the pool straight to
    PostgreSQL: the next invocation is served, quickly, on a connection that works."""
    direct = fault.endswith("direct")
    env: dict[str, str | None] = {"ASYNCPOOL_DSN": postgres.dsn()} if direct else {}
    with environment(runtime_api, own_pgbouncer, tmp_path, env=env) as proc:
        before = response(await invoke(runtime_api, {"op": "query"}), proc)
        await asyncio.to_thread(runtime_api.wait_idle)
        proc.freeze()
        try:
            if fault == "pgbouncer-reconnect":
                assert own_pgbouncer.admin_dsn is not None
                await admin_command(own_pgbouncer.admin_dsn, "RECONNECT app")
            else:
                await _end_app_backends(postgres)
            await asyncio.sleep(0.5)
        finally:
            proc.thaw()
        thawed = await invoke(runtime_api, {"op": "query"})
        after = response(thawed, proc)
        assert thawed.seconds < 2.0  # (milliseconds, on a shared machine)
        assert after["backend_pid"] != before["backend_pid"]
        stats = after["pool"]
        # Behind PgBouncer the client connection lives on (PgBouncer logs in to PostgreSQL again);
        # straight to PostgreSQL it was closed, noticed at the invocation's start and replaced.
        assert (stats["created_total"], stats["closed_total"]) == ((2, 1) if direct else (1, 0))
        assert response(await invoke(runtime_api, {"op": "query"}), proc)["pool"]["in_use"] == 0


async def test_a_refill_login_left_on_a_dead_network_does_not_fail_the_invocation_after_it(
    own_pgbouncer: PgBouncerServer, tmp_path: Path
) -> None:
    """The network to PgBouncer dies without a word while the environment is frozen: the thawed
    invocation fails (PoolTimeoutError), and the pool's min_size refill, begun on the dead
    network, would still be logging in when the network came back. It is given up (at the
    thawed invocation's end, or at the next one's start) and the next invocation logs in
    itself; it waited behind it (max_size=1) and failed as well."""
    # Housekeeping every second (max_idle / 2), so a refill starts in the thawed invocation,
    # after its checkout gave up; a login outlives the next invocation's acquire_timeout.
    timeouts: dict[str, str | None] = {"ASYNCPOOL_ACQUIRE_TIMEOUT": "1.5",
                                       "ASYNCPOOL_CONNECT_TIMEOUT": "4", "ASYNCPOOL_MAX_IDLE": "2",
                                       "TEST_POOL_INFO": "1"}
    async with FaultProxy.to_dsn(own_pgbouncer.dsn()) as proxy:
        env = {"ASYNCPOOL_DSN": proxy.dsn(own_pgbouncer.dsn()), **timeouts}
        with RuntimeAPI(function_timeout=4) as api, environment(
                api, own_pgbouncer, tmp_path, env=env) as proc:
            await network_dies_in_a_freeze(api, proc, proxy)
            # (Lingering past a housekeeping round after the failure: a refill starts.)
            thawed = await invoke(api, {"op": "try_query", "linger": 1.2})
            assert response(thawed, proc)["error"] == "PoolTimeoutError"
            await asyncio.to_thread(api.wait_idle)
            proxy.set_mode("pass")
            back = await invoke(api, {"op": "query"})
            assert response(back, proc)["pool"]["in_use"] == 0
            assert back.seconds < 1.0
            assert "was given up" in proc.log(), proc.log()[-3000:]
            assert "pool 'runtime-test': pool" not in proc.log()  # (named once)


async def test_snapstart_restore_of_a_pool_opened_at_init(
    runtime_api: RuntimeAPI, own_pgbouncer: PgBouncerServer, tmp_path: Path
) -> None:
    """INIT opens the pool (one connection); the before-snapshot hook closes it cleanly; the
    environment is frozen as a snapshot and restored (after a housekeeping round was due: its
    min_size refill begins as the loop runs again); the first invocation succeeds, on that
    refill's connection."""
    env: dict[str, str | None] = {
        "AWS_LAMBDA_INITIALIZATION_TYPE": "snap-start",
        "TEST_OPEN_AT_INIT": "1",
        "TEST_POOL_INFO": "1",
        # A housekeeping period of 0.1 s (max_idle / 2), over by the restore.
        "ASYNCPOOL_MAX_IDLE": "0.2",
    }
    with environment(runtime_api, own_pgbouncer, tmp_path, env=env) as proc:
        restore_asked = await asyncio.to_thread(runtime_api.restore_requested.wait, 30)
        assert restore_asked, proc.log()[-3000:]
        # The hooks ran before /restore/next: nothing is open to be cloned into the snapshot.
        [goodbye] = await departures(own_pgbouncer)
        assert CLEAN_CLOSE in goodbye
        assert await app_clients(own_pgbouncer) == []
        proc.freeze()  # the snapshot
        await asyncio.sleep(0.5)
        proc.thaw()  # restored, maybe in another place and much later
        restored = time.monotonic()
        runtime_api.release_restore()
        first = await invoke(runtime_api, {"op": "query"})
        took = time.monotonic() - restored
        stats = response(first, proc)["pool"]
        assert runtime_api.restore_errors == []
        assert took < 10.0  # Lambda's restore budget
        assert stats["created_total"] == 2  # one at INIT, closed for the snapshot; one after
        assert stats["closed_total"] == 1
        assert len(await app_clients(own_pgbouncer)) == 1
        # The refill the restore began served the invocation: its start gave it up (as begun
        # before a pause) and the query logged in again.
        assert "was given up" not in proc.log(), proc.log()[-3000:]


async def test_snapstart_snapshot_of_a_pool_still_logging_in_at_init(
    runtime_api: RuntimeAPI, own_pgbouncer: PgBouncerServer, tmp_path: Path
) -> None:
    """INIT opens the pool with ``open(wait=False)`` and its login gets no answer: the
    before-snapshot hook stops it, its socket closed before the snapshot (it was kept, half
    done, for every restored copy to find dead). The first invocation after the restore logs
    in anew."""
    async with FaultProxy.to_dsn(own_pgbouncer.dsn()) as proxy:
        proxy.set_mode("half-open")
        env: dict[str, str | None] = {
            "AWS_LAMBDA_INITIALIZATION_TYPE": "snap-start",
            "TEST_OPEN_AT_INIT": "nowait",
            "ASYNCPOOL_DSN": proxy.dsn(own_pgbouncer.dsn()),
        }
        with environment(runtime_api, own_pgbouncer, tmp_path, env=env) as proc:
            restore_asked = await asyncio.to_thread(runtime_api.restore_requested.wait, 30)
            assert restore_asked, proc.log()[-3000:]
            assert proxy.accepted_total == 1
            deadline = time.monotonic() + 2.0
            while proxy.connections and time.monotonic() < deadline:
                await asyncio.sleep(0.02)
            assert proxy.connections == 0, "a login was left half done in the snapshot"
            proc.freeze()  # the snapshot
            proxy.set_mode("pass")
            proc.thaw()
            runtime_api.release_restore()
            first = await invoke(runtime_api, {"op": "query"})
            stats = response(first, proc)["pool"]
            assert runtime_api.restore_errors == []
            assert first.seconds < 2.0
            assert (stats["created_total"], stats["in_use"]) == (1, 0)


async def test_snapstart_snapshot_of_an_acquire_left_in_its_setup_hook_at_init(
    runtime_api: RuntimeAPI, own_pgbouncer: PgBouncerServer, tmp_path: Path
) -> None:
    """The real runtime snapshots with a coroutine of INIT still running: a task INIT left in
    an acquire whose ``setup`` hook is on a statement (``pg_sleep``) when the before-snapshot
    hooks run. Its connection is closed for the snapshot (PgBouncer has no client of the
    function's before ``/restore/next``); the acquire, which failed there (PoolError: the
    connection was terminated), is served after the restore, the hook run again on a new one."""
    env: dict[str, str | None] = {
        "AWS_LAMBDA_INITIALIZATION_TYPE": "snap-start",
        "TEST_SETUP_AT_INIT": "1",
    }
    with environment(runtime_api, own_pgbouncer, tmp_path, env=env) as proc:
        restore_asked = await asyncio.to_thread(runtime_api.restore_requested.wait, 30)
        assert restore_asked, proc.log()[-3000:]
        await wait_for_no_clients(own_pgbouncer, within=5)
        proc.freeze()  # the snapshot
        await asyncio.sleep(0.5)
        proc.thaw()
        runtime_api.release_restore()
        first = await invoke(runtime_api, {"op": "setup_result"})
        body = response(first, proc)
        assert runtime_api.restore_errors == []
        assert body["setup_result"] == "set up", proc.log()[-3000:]
        stats = body["setup_pool"]
        assert (stats["created_total"], stats["closed_total"], stats["timeouts_total"]) == (2, 1, 0)
        assert stats["acquired_total"] == 1  # (its second checkout counted as one of its own)
        assert "still held when the SnapStart snapshot" not in proc.log()
        # (The module's other pool, attached but opened by the first invocation: its
        # after-restore step failed on it with an AssertionError, logged at ERROR.)
        assert "Traceback" not in proc.log(), proc.log()[-3000:]


async def test_what_opening_imports_is_imported_during_init_not_in_the_first_invocation(
    runtime_api: RuntimeAPI, own_pgbouncer: PgBouncerServer, tmp_path: Path
) -> None:
    with environment(runtime_api, own_pgbouncer, tmp_path) as proc:
        body = response(await invoke(runtime_api, {"op": "modules"}), proc)
        assert body["preloaded_at_init"] is True


@pytest.mark.parametrize("iam_pool", [False, True], ids=["password", "iam"])
async def test_an_aws_providers_sdk_is_imported_during_init(
    runtime_api: RuntimeAPI, own_pgbouncer: PgBouncerServer, tmp_path: Path, iam_pool: bool
) -> None:
    """aiobotocore (240-330 ms to import) comes with a pool on IamAuth, in INIT, where the first
    invocation does not pay for it; and only with one."""
    if iam_pool:
        pytest.importorskip("aiobotocore")  # (the iam extra: not in every interpreter's venv)
    env: dict[str, str | None] = {"TEST_IAM_POOL": "1" if iam_pool else None}
    with environment(runtime_api, own_pgbouncer, tmp_path, env=env) as proc:
        body = response(await invoke(runtime_api, {"op": "modules"}), proc)
        assert body["aws_sdk_at_init"] is iam_pool


async def test_powertools_resolve_async_on_the_runners_loop(
    runtime_api: RuntimeAPI, own_pgbouncer: PgBouncerServer, tmp_path: Path
) -> None:
    """examples/lambda_powertools/resolver_handler.py: async routes through ``resolve_async``."""
    hello = load_event(POWERTOOLS_EXAMPLE / "events" / "hello.json")
    unknown = {**hello, "path": "/nowhere", "resource": "/nowhere"}
    with environment(runtime_api, own_pgbouncer, tmp_path, handler="resolver_handler.handler") as proc:
        ports = set()
        for _ in range(5):
            body = response(await invoke(runtime_api, hello), proc)
            assert body["statusCode"] == 200, body
            assert json.loads(body["body"]) == {"greeting": "Hello, Ada!"}
            ports |= {row["port"] for row in await app_clients(own_pgbouncer)}
        assert response(await invoke(runtime_api, unknown), proc)["statusCode"] == 404
        assert len(ports) == 1  # one kept connection for every invocation


async def test_invocations_frozen_in_between_as_lambda_does(
    runtime_api: RuntimeAPI, own_pgbouncer: PgBouncerServer, tmp_path: Path
) -> None:
    """SIGSTOP after every response, SIGCONT before every event: the connection is kept."""
    with environment(runtime_api, own_pgbouncer, tmp_path) as proc:
        bodies = [
            response(await asyncio.to_thread(proc.invoke, {"op": "query"}), proc) for _ in range(20)
        ]
        assert {b["pool"]["created_total"] for b in bodies} == {1}
        assert bodies[-1]["pool"]["validation_failures_total"] == 0
        assert len({b["backend_pid"] for b in bodies}) == 1


async def test_the_deadline_cancels_the_handler_and_its_connection_goes_back(
    own_pgbouncer: PgBouncerServer, tmp_path: Path
) -> None:
    """A 1.5 s function timeout: the runner cancels 0.5 s before the deadline header says."""
    with RuntimeAPI(function_timeout=1.5) as api, environment(api, own_pgbouncer, tmp_path) as proc:
        response(await invoke(api, {"op": "query"}), proc)
        late = await invoke(api, {"op": "query", "hold": 5})
        assert late.kind == "error", late.body
        assert late.json()["errorType"] == "HandlerTimeoutError"
        assert late.seconds < 1.5
        stats = response(await invoke(api, {"op": "query"}), proc)["pool"]
        assert (stats["created_total"], stats["in_use"]) == (1, 0)


async def test_a_deadline_during_a_statement_rolls_back_and_cancels_it_on_the_server(
    own_pgbouncer: PgBouncerServer, postgres: PostgresServer, tmp_path: Path
) -> None:
    """A transaction with a write, then a statement that runs into the deadline: the server's
    statement is cancelled, the write rolled back, and the next invocation reuses the connection."""
    tag = uuid.uuid4().hex
    with RuntimeAPI(function_timeout=2) as api, environment(api, own_pgbouncer, tmp_path) as proc:
        async with scratch_table(postgres.dsn()) as table:
            response(await invoke(api, {"op": "query"}), proc)
            late = await invoke(api, {"op": "write_then_stall", "table": table, "tag": tag})
            assert late.kind == "error", late.body
            assert late.json()["errorType"] == "HandlerTimeoutError"
            assert late.seconds < 2.0
            check = await asyncpg.connect(postgres.dsn())
            try:
                assert await check.fetchval(f"SELECT count(*) FROM {table}") == 0
                left = await check.fetchval(
                    "SELECT count(*) FROM pg_stat_activity WHERE query LIKE $1 "
                    "AND pid <> pg_backend_pid()", f"%{tag}%")
                assert left == 0
            finally:
                await check.close()
            stats = response(await invoke(api, {"op": "query"}), proc)["pool"]
            assert (stats["created_total"], stats["closed_total"], stats["in_use"]) == (1, 0, 0)


@pytest.mark.parametrize("mode", ["stall", "half-open"])
async def test_a_deadline_in_a_transaction_whose_server_stopped_answering_still_answers_in_time(
    own_pgbouncer: PgBouncerServer, postgres: PostgresServer, tmp_path: Path, mode: FaultMode
) -> None:
    """The network to the pooler goes while ``pool.transaction()`` runs a statement: the ROLLBACK
    on the way out can never be answered. It gets the time a reset has (half the margin), then the
    connection is closed and the error goes out before the deadline; it waited for the leak
    timeout instead, and Lambda timed the invocation out and reset the environment."""
    tag = uuid.uuid4().hex
    async with scratch_table(postgres.dsn()) as table, FaultProxy.to_dsn(own_pgbouncer.dsn()) as proxy:
        env: dict[str, str | None] = {"ASYNCPOOL_DSN": proxy.dsn(own_pgbouncer.dsn())}
        with RuntimeAPI(function_timeout=2) as api, environment(
                api, own_pgbouncer, tmp_path, env=env) as proc:
            try:
                response(await invoke(api, {"op": "query"}), proc)
                rid = api.submit({"op": "write_then_stall", "table": table, "tag": tag})
                deadline = time.monotonic() + 10
                while not await running(postgres.dsn(), tag):
                    assert time.monotonic() < deadline, proc.log()[-2000:]
                    await asyncio.sleep(0.05)
                proxy.set_mode(mode)
                late = await asyncio.to_thread(api.result, rid, 30)
                assert late.kind == "error", late.body
                assert late.json()["errorType"] == "HandlerTimeoutError"
                assert late.seconds < 2.0
                assert not proc.was_reset.is_set()
                proxy.set_mode("pass")
                stats = response(await invoke(api, {"op": "query"}), proc)["pool"]
                # The stuck connection was closed; a new one served the next invocation.
                assert (stats["created_total"], stats["closed_total"], stats["in_use"]) == (2, 1, 0)
                assert stats["leaked_total"] == 0
            finally:
                # Its cancel request never got through: end the statement (and its lock).
                await postgres.end_statements(tag)


@pytest.mark.parametrize("warm", [False, True], ids=["logging-in", "checking-the-connection"])
async def test_a_task_left_getting_a_connection_does_not_keep_it_from_the_next_invocation(
    own_pgbouncer: PgBouncerServer, tmp_path: Path, warm: bool
) -> None:
    """The handler starts a task that acquires and holds the connection, and returns at once.
    The task's checkout is still under way when the invocation ends (the first of an invocation
    logs in, or checks the connection after the pause): it must be waited for, then cancelled,
    like one already holding it, not take the connection while the environment is frozen and
    keep it from the next invocation (which then timed out)."""
    with RuntimeAPI(function_timeout=3) as api, environment(api, own_pgbouncer, tmp_path) as proc:
        if warm:
            response(await invoke(api, {"op": "query"}), proc)
        response(await invoke(api, {"op": "background", "hold": 30}), proc)
        await asyncio.to_thread(api.wait_idle)
        proc.freeze()
        await asyncio.sleep(0.3)
        proc.thaw()
        after = await invoke(api, {"op": "query"})
        stats = response(after, proc)["pool"]
        assert stats["in_use"] == 0
        assert response(await invoke(api, {"op": "background_results"}), proc)["background"] == [
            "cancelled"]
        [line] = [line for line in proc.log().splitlines() if "'fire-and-forget'" in line]
        assert "was getting a connection" in line



@pytest.mark.parametrize(
    "execution_env", ["AWS_Lambda_python3.11", "AWS_Lambda_python3.12"],
    ids=["python3.11", "python3.12"],
)
async def test_sigterm_during_a_statement_cancels_it_on_the_server(
    runtime_api: RuntimeAPI, own_pgbouncer: PgBouncerServer, postgres: PostgresServer,
    tmp_path: Path, execution_env: str,
) -> None:
    """SIGTERM while a statement runs (as when Lambda resets an environment whose invocation
    timed out, with an extension registered): the pool is closed within its budget, and the
    statement does not run on in PostgreSQL behind PgBouncer once the client is gone."""
    tag = uuid.uuid4().hex
    with environment(runtime_api, own_pgbouncer, tmp_path, execution_env=execution_env) as proc:
        response(await invoke(runtime_api, {"op": "query"}), proc)
        runtime_api.submit({"op": "stall", "tag": tag})
        deadline = time.monotonic() + 10
        while not await running(postgres.dsn(), tag):
            assert time.monotonic() < deadline, proc.log()[-2000:]
            await asyncio.sleep(0.05)
        proc.signal(signal.SIGTERM)
        assert await asyncio.to_thread(proc.wait, 1.0) is not None, proc.log()[-2000:]
    deadline = time.monotonic() + 1.0
    while (left := await running(postgres.dsn(), tag)) and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    assert left == 0, f"the statement still runs on the server\n{proc.log()[-2000:]}"
