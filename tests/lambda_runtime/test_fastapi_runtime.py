"""The FastAPI example through Mangum under the real runtime: one kept connection, a freeze that
the clock does not show, and a clean close at SIGTERM from Mangum's loop."""

from __future__ import annotations

import asyncio
import json
import signal
from pathlib import Path

import pytest

from asyncpool.testing import PgBouncerServer
from asyncpool.testing.lambda_runtime import RuntimeAPI
from tests.lambda_env import app_clients, load_event
from tests.lambda_runtime.support import (
    CLEAN_CLOSE,
    departures,
    environment,
    invoke,
    response,
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
