"""examples/sqlalchemy_fastapi: FastAPI + SQLAlchemy ORM on asyncpool, invoked through Mangum as
the Lambda runtime would (one thread, one event after another), through PgBouncer 1.18."""

from __future__ import annotations

import asyncio
import json
import warnings
from collections.abc import AsyncIterator, Iterator
from types import ModuleType
from typing import Any

import pytest

pytest.importorskip("sqlalchemy")

from asyncpool import Pool
from asyncpool.integrations.invocation import LocalContext
from asyncpool.integrations.sqlalchemy import create_async_engine
from asyncpool.testing import PgBouncerServer, PostgresServer
from tests.lambda_env import TEST_LOOP, RuntimeThread, load_event, loops_like_the_tests
from tests.script_support import REPO, load_script

EXAMPLE = REPO / "examples" / "sqlalchemy_fastapi"


@pytest.fixture(autouse=True)
async def _mangums_loop_like_the_tests() -> AsyncIterator[None]:
    """Under ASYNCPOOL_TEST_LOOP=uvloop the example's loops (Mangum's, TestClient's,
    ``asyncio.run()``'s) are uvloop's too."""
    with loops_like_the_tests():
        yield


@pytest.fixture
def runtime() -> Iterator[RuntimeThread]:
    thread = RuntimeThread()
    yield thread
    thread.close()


def _load_example() -> ModuleType:
    return load_script(EXAMPLE / "notes_app.py", "sqlalchemy_notes_app")


def _close_on_mangums_loop(app: ModuleType) -> None:
    """Close the example's pool on the loop Mangum ran it on (the runtime thread's)."""
    loop = asyncio.get_event_loop()
    loop.run_until_complete(app.pool.close())
    loop.close()


def _mangums_loop_kind() -> str:
    """The kind ("uvloop" or "asyncio") of the loop Mangum runs the example on (the runtime
    thread's)."""
    return "uvloop" if "uvloop" in type(asyncio.get_event_loop()).__module__ else "asyncio"


async def _example_with_fresh_tables(runtime: RuntimeThread, legacy: PgBouncerServer,
                                     monkeypatch: pytest.MonkeyPatch) -> ModuleType:
    """The example pointed at `legacy`, its tables made anew."""
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
    return app


async def test_example_serves_invocations_from_one_pool(
        runtime: RuntimeThread, legacy: PgBouncerServer, monkeypatch: pytest.MonkeyPatch) -> None:
    app = await _example_with_fresh_tables(runtime, legacy, monkeypatch)

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
        assert await runtime.call(_mangums_loop_kind) == TEST_LOOP
    finally:
        await runtime.call(_close_on_mangums_loop, app)


async def test_example_ends_a_session_run_into_the_deadline_with_a_504(
        runtime: RuntimeThread, legacy: PgBouncerServer, postgres: PostgresServer,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The example serves through `LambdaDeadline`: an ORM session still in its transaction
    near the Lambda timeout is rolled back (its note not written), its statement cancelled
    behind PgBouncer, its connection freed before the invocation ends; the client gets a 504
    (it was Lambda's timeout, the environment killed with the statement running on)."""
    import sqlalchemy as sa
    from fastapi import Depends

    from tests.test_fastapi_mangum import http_event

    app = await _example_with_fresh_tables(runtime, legacy, monkeypatch)

    @app.app.get("/slow")  # type: ignore[untyped-decorator]
    async def slow(session: Any = Depends(app.get_session, scope="function")) -> None:  # noqa: B008
        session.add(app.Note(title="never written", tags=[]))
        await session.flush()
        await session.execute(sa.text("SELECT pg_sleep(30) -- slow note"))
        await session.commit()

    # The cancelled session's connection has half the margin to be cancelled on the server and
    # rolled back before the invocation ends, or it is closed: the example's 0.5 s (0.25 s for
    # that) was once too little for a loaded CI run (closed_total 1).
    app.handler.app.timeout_margin = 1.0
    try:
        response = await runtime.call(app.handler, http_event("GET", "/slow"),
                                      LocalContext(timeout=2.5))
        assert response["statusCode"] == 504, response
        assert "deadline margin was reached" in json.loads(response["body"])["detail"]
        # SQLAlchemy invalidates a connection whose statement was cancelled (CancelledError is
        # an "exit exception" to it): the pool rolls it back before the invocation ends, and
        # keeps it (the next invocation does not log in again).
        stats = app.pool.stats()
        assert (stats.in_use, stats.closed_total) == (0, 0), stats
        async with Pool(postgres.dsn(postgres.superuser, "postgres"), max_size=1,
                        telemetry=False) as admin:
            # Nor left "idle in transaction (aborted)" on PgBouncer's server connection: the
            # connection SQLAlchemy invalidated was still being reset when the invocation
            # ended, and the environment would have been frozen with it.
            states = await admin.fetch(
                "SELECT state FROM pg_stat_activity WHERE query LIKE '%-- slow note'"
                " AND pid <> pg_backend_pid()")
            assert [row["state"] for row in states if row["state"] != "idle"] == []
        async with Pool(legacy.dsn(), max_size=1, telemetry=False) as check:
            assert await check.fetchval("SELECT count(*) FROM example_notes") == 0
        found = await runtime.call(app.handler, load_event(EXAMPLE / "events" / "find_notes_v2.json"),
                                   LocalContext())
        assert (found["statusCode"], found["body"]) == (200, "[]")
    finally:
        await runtime.call(_close_on_mangums_loop, app)


def test_example_under_testclient_after_its_table_set_up(
        legacy: PgBouncerServer, monkeypatch: pytest.MonkeyPatch) -> None:
    """A user's test of the example: the table made with its ``create_tables()`` (as its
    docstring says), then the app under ``with TestClient(app)``. ``create_tables()`` closed
    the app's own pool (``async with pool``), and the lifespan refused it: PoolClosedError."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Starlette 1.x suggests httpx2 for its TestClient
        from fastapi.testclient import TestClient

    monkeypatch.setenv("ASYNCPOOL_DSN", legacy.dsn())
    monkeypatch.delenv("AWS_LAMBDA_FUNCTION_NAME", raising=False)
    app = _load_example()
    asyncio.run(app.create_tables())
    with TestClient(app.app) as client:
        assert client.portal is not None
        client.portal.call(app.create_tables)  # (again, within: a fixture's set-up)
        added = client.post("/notes", json={"title": "Test it", "tags": ["testclient"]})
        assert added.status_code == 201, added.text
        found = client.get(f"/notes/{added.json()['id']}")
        assert found.json()["tags"] == ["testclient"]
        assert app.pool.stats().in_use == 0
    assert app.pool.closed  # by the lifespan, at the end of the block
