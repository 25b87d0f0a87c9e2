"""The FastAPI example through Mangum under the real runtime: one kept connection, a freeze that
the clock does not show, and a clean close at SIGTERM from Mangum's loop."""

from __future__ import annotations

import asyncio
import copy
import json
import signal
import uuid
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import asyncpg
import pytest

from asyncpool.testing import PgBouncerServer, PostgresServer
from asyncpool.testing.faultproxy import FaultProxy
from asyncpool.testing.lambda_runtime import RuntimeAPI
from tests.lambda_env import app_clients, load_event, scratch_table
from tests.lambda_runtime.support import (
    CLEAN_CLOSE,
    VANISHED,
    departures,
    environment,
    invoke,
    response,
    running,
    wait_for_no_clients,
)
from tests.script_support import REPO

# The 3.12 / 3.13 test venvs (requirements/matrix.in) leave FastAPI out.
pytest.importorskip("mangum")
pytest.importorskip("fastapi")

MANGUM_EXAMPLE = REPO / "examples" / "fastapi_mangum"
HELLO = load_event(MANGUM_EXAMPLE / "events" / "hello_v2.json")


async def test_the_mangum_example_keeps_one_connection_and_closes_it_at_sigterm(
    runtime_api: RuntimeAPI, own_pgbouncer: PgBouncerServer, tmp_path: Path
) -> None:
    with environment(
        runtime_api, own_pgbouncer, tmp_path, handler="mangum_app.handler",
        execution_env="AWS_Lambda_python3.11", extra_path=[MANGUM_EXAMPLE],
    ) as proc:
        ports = set()
        for _ in range(5):
            body = response(await invoke(runtime_api, HELLO), proc)
            assert body["statusCode"] == 200, body
            assert json.loads(body["body"])["greeting"] == "Hello, Grace!"
            ports |= {row["port"] for row in await app_clients(own_pgbouncer)}
        assert len(ports) == 1
        await asyncio.to_thread(runtime_api.wait_idle)
        proc.signal(signal.SIGTERM)
        assert await asyncio.to_thread(proc.wait, 1.0) is not None, proc.log()[-2000:]
    [goodbye] = await departures(own_pgbouncer)
    assert CLEAN_CLOSE in goodbye


async def test_the_mangum_example_after_a_freeze_the_clock_does_not_show(
    runtime_api: RuntimeAPI, idle_closing_pgbouncer: PgBouncerServer, tmp_path: Path
) -> None:
    """validate_after=3600: only the dependency's check at a new invocation catches it."""
    with environment(
        runtime_api, idle_closing_pgbouncer, tmp_path, handler="mangum_app.handler",
        env={"ASYNCPOOL_VALIDATE_AFTER": "3600"}, extra_path=[MANGUM_EXAMPLE],
    ) as proc:
        assert response(await invoke(runtime_api, HELLO), proc)["statusCode"] == 200
        await asyncio.to_thread(runtime_api.wait_idle)
        proc.freeze()
        await wait_for_no_clients(idle_closing_pgbouncer)
        proc.thaw()
        body = response(await invoke(runtime_api, HELLO), proc)
        assert body["statusCode"] == 200, body
        assert len(await app_clients(idle_closing_pgbouncer)) == 1


def _get(path: str, query: dict[str, str]) -> dict[str, Any]:
    """The example's API Gateway HTTP API event, for another route."""
    event = copy.deepcopy(HELLO)
    raw = urlencode(query)
    event.update(routeKey=f"GET {path}", rawPath=path, rawQueryString=raw,
                 queryStringParameters=query)
    event["requestContext"]["http"]["path"] = path
    return event



async def test_without_lambda_deadline_the_timeout_kills_the_environment_mid_statement(
    own_pgbouncer: PgBouncerServer, postgres: PostgresServer, tmp_path: Path
) -> None:
    """The control: Mangum alone. Lambda's timeout resets the environment with the connection
    checked out, and PostgreSQL runs the statement on (and keeps its transaction open)."""
    tag = uuid.uuid4().hex
    with RuntimeAPI(function_timeout=2) as api, environment(
        api, own_pgbouncer, tmp_path, handler="mangum_deadline.handler",
        env={"TEST_NO_DEADLINE": "1"},
    ) as proc:
        async with scratch_table(postgres.dsn()) as table:
            assert response(await invoke(api, _get("/quick", {})), proc)["statusCode"] == 200
            late = await invoke(api, _get("/stall", {"tag": tag, "table": table}))
            assert late.kind == "timeout", late.body
            assert await asyncio.to_thread(proc.wait, 5.0) == -signal.SIGKILL
            assert await running(postgres.dsn(), tag) == 1
            # PgBouncer drops the server connection too; PostgreSQL notices only when the
            # statement next writes to it.
            gone = await departures(own_pgbouncer)
            assert any(VANISHED in line for line in gone), gone
            await _cancel_tagged(postgres, tag)


async def _cancel_tagged(postgres: PostgresServer, tag: str) -> None:
    """Clean up after the control: end the statement the dead environment left running."""
    admin = await asyncpg.connect(postgres.admin_dsn)
    try:
        await admin.execute("SELECT pg_cancel_backend(pid) FROM pg_stat_activity "
                            "WHERE query LIKE $1 AND pid <> pg_backend_pid()", f"%{tag}%")
    finally:
        await admin.close()


async def test_lambda_deadline_answers_504_with_the_connection_back_before_the_invocation_ends(
    own_pgbouncer: PgBouncerServer, postgres: PostgresServer, tmp_path: Path
) -> None:
    """A 2 s function timeout, an endpoint whose statement would run 30 s inside a transaction
    with a write: 504 with a body that says why, the connection back in the pool when the
    invocation hands its response over, the statement cancelled and the write rolled back on
    the server, and the next invocation served by the same connection."""
    tag = uuid.uuid4().hex
    with RuntimeAPI(function_timeout=2) as api, environment(
        api, own_pgbouncer, tmp_path, handler="mangum_deadline.handler",
    ) as proc:
        async with scratch_table(postgres.dsn()) as table:
            first = response(await invoke(api, _get("/quick", {})), proc)
            assert first["statusCode"] == 200, first
            late = response(await invoke(api, _get("/stall", {"tag": tag, "table": table})), proc)
            assert late["statusCode"] == 504, late
            assert "deadline margin was reached" in json.loads(late["body"])["detail"]
            headers = late["headers"]
            assert (headers["x-pool-in-use"], headers["x-pool-closed"]) == ("0", "0"), headers
            assert await running(postgres.dsn(), tag) == 0
            check = await asyncpg.connect(postgres.dsn())
            try:
                assert await check.fetchval(f"SELECT count(*) FROM {table}") == 0
            finally:
                await check.close()
            again = response(await invoke(api, _get("/quick", {})), proc)
            assert again["statusCode"] == 200, again
            assert json.loads(again["body"])["backend_pid"] == json.loads(first["body"])["backend_pid"]
            assert again["headers"]["x-pool-created"] == "1"
        assert not proc.was_reset.is_set()


async def test_lambda_deadline_answers_504_in_time_when_the_network_to_the_pooler_is_gone(
    own_pgbouncer: PgBouncerServer, postgres: PostgresServer, tmp_path: Path
) -> None:
    """As above, but the network stalls under the statement: the transaction dependency's
    ROLLBACK is never answered. It gets half the margin, the connection is closed, and the 504
    still goes out before the deadline (it waited for leak_timeout: Lambda's timeout first)."""
    tag = uuid.uuid4().hex
    async with scratch_table(postgres.dsn()) as table, FaultProxy.to_dsn(own_pgbouncer.dsn()) as proxy:
        env: dict[str, str | None] = {"ASYNCPOOL_DSN": proxy.dsn(own_pgbouncer.dsn())}
        with RuntimeAPI(function_timeout=2) as api, environment(
            api, own_pgbouncer, tmp_path, handler="mangum_deadline.handler", env=env,
        ) as proc:
            try:
                assert response(await invoke(api, _get("/quick", {})), proc)["statusCode"] == 200
                rid = api.submit(_get("/stall", {"tag": tag, "table": table}))
                for _ in range(200):  # (10 s)
                    if await running(postgres.dsn(), tag):
                        break
                    await asyncio.sleep(0.05)
                else:
                    raise AssertionError(f"the statement never started\n{proc.log()[-2000:]}")
                proxy.set_mode("stall")
                late = await asyncio.to_thread(api.result, rid, 30)
                assert late.kind == "response", late.body
                assert late.json()["statusCode"] == 504
                assert late.json()["headers"]["x-pool-in-use"] == "0"
                proxy.set_mode("pass")
                again = response(await invoke(api, _get("/quick", {})), proc)
                assert again["statusCode"] == 200, again
                assert again["headers"]["x-pool-created"] == "2"  # the stuck one was closed
            finally:
                await postgres.end_statements(tag)
            assert not proc.was_reset.is_set()


async def test_lambda_deadline_with_a_margin_above_the_function_timeout_serves_and_says_so_once(
    own_pgbouncer: PgBouncerServer, tmp_path: Path
) -> None:
    """timeout_margin=3 on a 2 s function: every request was a 504 at once, the log silent on
    why. Under the real runtime they are served, and the log says once what to change."""
    with RuntimeAPI(function_timeout=2) as api, environment(
        api, own_pgbouncer, tmp_path, handler="mangum_deadline.handler",
        env={"TEST_TIMEOUT_MARGIN": "3"},
    ) as proc:
        for _ in range(2):
            body = response(await invoke(api, _get("/quick", {})), proc)
            assert body["statusCode"] == 200, body
        warnings = [line for line in proc.log().splitlines()
                    if "timeout_margin=3s is at or above the" in line]
        assert len(warnings) == 1, proc.log()[-3000:]
        assert "Set timeout_margin" in warnings[0]
