"""examples/sqlalchemy_fastapi: FastAPI + SQLAlchemy ORM on asyncpool, invoked through Mangum as
the Lambda runtime would (one thread, one event after another), through PgBouncer 1.18."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from types import ModuleType
from typing import Any

import pytest

pytest.importorskip("sqlalchemy")

from asyncpool import Pool
from asyncpool.integrations.invocation import LocalContext
from asyncpool.integrations.sqlalchemy import create_async_engine
from asyncpool.testing import PgBouncerServer
from tests.lambda_env import RuntimeThread, load_event
from tests.script_support import REPO, load_script

EXAMPLE = REPO / "examples" / "sqlalchemy_fastapi"


@pytest.fixture
def runtime() -> Iterator[RuntimeThread]:
    thread = RuntimeThread()
    yield thread
    thread.close()


def _load_example() -> ModuleType:
    return load_script(EXAMPLE / "notes_app.py", "sqlalchemy_notes_app")


async def test_example_serves_invocations_from_one_pool(
        runtime: RuntimeThread, legacy: PgBouncerServer, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ASYNCPOOL_DSN", legacy.dsn())
    monkeypatch.setenv("AWS_LAMBDA_FUNCTION_NAME", "notes-api-test")
    # Imported on the runtime thread: Mangum takes that thread's event loop.
    app = await runtime.call(_load_example)
    async with Pool(legacy.dsn(), name="notes-schema", max_size=1, telemetry=False) as schema_pool:
        engine = create_async_engine(schema_pool)
        async with engine.begin() as conn:
            await conn.run_sync(app.Base.metadata.drop_all)
            await conn.run_sync(app.Base.metadata.create_all)
        await engine.dispose()

    def invoke(name: str) -> dict[str, Any]:
        event = load_event(EXAMPLE / "events" / name)
        response: dict[str, Any] = app.handler(event, LocalContext(function_name="notes-api-test"))
        return response

    try:
        ids = []
        for _ in range(5):
            added = await runtime.call(invoke, "add_note_v2.json")
            assert added["statusCode"] == 201, added
            body = json.loads(added["body"])
            assert (body["title"], body["tags"]) == ("Buy milk", ["home", "errand"])
            ids.append(body["id"])
            found = await runtime.call(invoke, "find_notes_v2.json")
            assert [n["id"] for n in json.loads(found["body"])] == ids
            missing = await runtime.call(invoke, "missing_note_v2.json")
            assert missing["statusCode"] == 404
            stats = app.pool.stats()
            assert not app.pool.closed  # Mangum's lifespan shutdown after each invocation
            assert (stats.in_use, stats.created_total, stats.closed_total) == (0, 1, 0)
        assert app.pool.stats().acquired_total == 15
    finally:
        def close_on_mangums_loop() -> None:
            loop = asyncio.get_event_loop()
            loop.run_until_complete(app.pool.close())
            loop.close()

        await runtime.call(close_on_mangums_loop)
