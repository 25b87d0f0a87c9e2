"""The query helpers (``pool.fetchval()``...): bound straight to the slot owner on each pool, and
still what asyncpg users and their tools expect of them."""

from __future__ import annotations

import asyncio
import inspect
from typing import Any
from unittest import mock

import pytest

from asyncpool import Pool
from asyncpool.errors import PoolClosedError
from asyncpool.pool.pool import QUERY_HELPERS
from asyncpool.pool.runner import QUERY_METHODS
from tests.unit.fakes import FakeServer, fake_pool, leak_report, run


def test_each_helper_is_a_coroutine_function_for_inspect_asyncio_and_mock(
        server: FakeServer) -> None:
    pool = fake_pool(server)
    for name in QUERY_HELPERS:
        helper = getattr(pool, name)
        assert helper is not getattr(Pool, name).__get__(pool), name  # the bound fast path
        assert inspect.iscoroutinefunction(helper), name
        assert asyncio.iscoroutinefunction(helper), name
        assert inspect.iscoroutinefunction(getattr(Pool, name)), name
    assert pool.fetchval.__name__ == "fetchval"
    assert str(inspect.signature(pool.fetchval)) == str(inspect.signature(pool.__class__.fetchval)
                                                         ).replace("self, ", "")
    assert pool.fetchval.__doc__ == Pool.fetchval.__doc__
    assert repr(pool.fetchval) == "<bound method Pool.fetchval of pool 'unit'>"
    # Test doubles made from a pool await them, and check their arguments.
    for double in (mock.create_autospec(pool, instance=True), mock.MagicMock(spec=pool),
                   mock.create_autospec(Pool, instance=True)):
        assert isinstance(double.fetchval, mock.AsyncMock), double
    # Autospec'd from the class or from a pool, the arguments are checked against the method's
    # signature.
    for checked in (mock.create_autospec(Pool, instance=True),
                    mock.create_autospec(pool, instance=True)):
        with pytest.raises(TypeError, match="colum"):
            asyncio.run(checked.fetchval("SELECT 1", colum=1))
        assert isinstance(asyncio.run(checked.fetchval("SELECT 1", column=1)), mock.AsyncMock)


def test_the_helpers_pass_asyncpgs_arguments_through(server: FakeServer) -> None:
    async def main() -> None:
        async with fake_pool(server, min_size=1, max_size=1) as pool:
            conn = server.connections[0]
            # The fake returns the command word, and the arguments it was given as rows/values.
            assert await pool.execute("SELECT 1") == "SELECT"
            assert await pool.execute("SELECT 2", timeout=5) == "SELECT"
            await pool.executemany("INSERT 3", [(1,), (2,)])
            await pool.executemany("INSERT 4", [(1,)], timeout=5)
            assert await pool.fetch("SELECT 5", 5) == [(5,)]
            assert await pool.fetchrow("SELECT 6", 6, "x", timeout=5) == (6, "x")
            assert await pool.fetchval("SELECT 7", 7, 8, column=1, timeout=5) == 8
            assert conn.queries == ["SELECT 1", "SELECT 2", "INSERT 3", "INSERT 4", "SELECT 5",
                                    "SELECT 6", "SELECT 7"]
            # An argument the driver does not take: its TypeError, and the connection comes back.
            with pytest.raises(TypeError):
                await pool.fetchval("SELECT 8", colum=1)  # type: ignore[call-arg]
            stats = pool.stats()
            assert (stats.idle, stats.in_use) == (1, 0)

    run(main())


def test_through_the_class_and_in_a_subclass_they_still_run(server: FakeServer) -> None:
    class Counting(Pool):
        calls = 0

        async def fetchval(self, query: str, *args: Any, column: int | str = 0,
                           timeout: float | None = None) -> Any:
            Counting.calls += 1
            return await super().fetchval(query, *args, column=column, timeout=timeout)

    async def main() -> None:
        async with fake_pool(server, min_size=1, max_size=1) as pool:
            assert await Pool.fetchval(pool, "SELECT 1", 1, 2, column=1) == 2
            assert await Pool.fetch(pool, "SELECT 2", 3, timeout=1) == [(3,)]
            assert server.connections[0].queries == ["SELECT 1", "SELECT 2"]
        sub = Counting(connect_kwargs={"fake_server": server}, name="sub", telemetry=False,
                       min_size=1, max_size=1)
        async with sub:
            await sub.fetchval("SELECT 3")  # the override is not shadowed
            await sub.fetch("SELECT 4")  # the others are bound as usual
        assert Counting.calls == 1

    run(main())


@pytest.mark.parametrize("route", ["instance", "class", "subclass"])
def test_a_helpers_leak_report_names_its_caller_whatever_the_route(
        server: FakeServer, caplog: pytest.LogCaptureFixture, route: str) -> None:
    class Overriding(Pool):
        async def fetchval(self, query: str, *args: Any, column: int | str = 0,
                           timeout: float | None = None) -> Any:
            return await super().fetchval(query, *args, column=column, timeout=timeout)

    async def service(pool: Pool) -> None:
        server.latency = 2.0  # this statement runs past leak_timeout
        if route == "class":
            await Pool.fetchval(pool, "SELECT 1")
        else:
            await pool.fetchval("SELECT 1")

    async def main() -> None:
        options: dict[str, Any] = {"leak_timeout": 1.0, "leak_action": "log"}
        pool = (Overriding(connect_kwargs={"fake_server": server}, name="sub", telemetry=False,
                           **options) if route == "subclass" else fake_pool(server, **options))
        async with pool:
            await service(pool)

    site, names = leak_report(caplog, main())
    if route == "subclass":  # the override is the user's code: it is the caller shown
        assert names[-3:] == ["main", "service", "fetchval"], site
    else:
        assert names[-2:] == ["main", "service"], site
    assert "slots.py" not in site, site
    assert "runner.py" not in site, site
    assert "asyncpool/pool/pool.py" not in site, site


#: One call of each helper asyncpg's pool has (the bound ones and those through the class).
CALLS: dict[str, tuple[tuple[Any, ...], dict[str, Any]]] = {
    "execute": (("SELECT 1",), {}),
    "executemany": (("INSERT 1", [(1,)]), {}),
    "fetch": (("SELECT 1",), {}),
    "fetchrow": (("SELECT 1",), {}),
    "fetchval": (("SELECT 1",), {}),
    "fetchmany": (("INSERT 1 RETURNING", [(1,)]), {}),
    "copy_from_query": (("SELECT 1",), {"output": "out.csv"}),
    "copy_from_table": (("t",), {"output": "out.csv"}),
    "copy_to_table": (("t",), {"source": "in.csv"}),
    "copy_records_to_table": (("t",), {"records": [(1,)]}),
}


def test_every_helper_is_refused_before_open_and_after_close(server: FakeServer) -> None:
    assert set(CALLS) == set(QUERY_METHODS)

    async def main() -> None:
        pool = fake_pool(server, min_size=1, max_size=1)
        for name, (args, kwargs) in CALLS.items():
            with pytest.raises(PoolClosedError, match="not open yet"):
                await getattr(pool, name)(*args, **kwargs)
        async with pool:
            for name, (args, kwargs) in CALLS.items():
                await getattr(pool, name)(*args, **kwargs)
            assert len(server.connections[0].queries) == len(CALLS)
        for name, (args, kwargs) in CALLS.items():
            with pytest.raises(PoolClosedError, match="is closed"):
                await getattr(pool, name)(*args, **kwargs)

    run(main())


@pytest.mark.parametrize("name", ["copy_records_to_table", "copy_to_table", "fetchmany"])
def test_a_leak_report_of_a_helper_through_the_class_names_its_caller(
        server: FakeServer, caplog: pytest.LogCaptureFixture, name: str) -> None:
    async def load(pool: Pool) -> None:
        server.latency = 2.0  # this statement runs past leak_timeout
        args, kwargs = CALLS[name]
        await getattr(pool, name)(*args, **kwargs)

    async def main() -> None:
        async with fake_pool(server, leak_timeout=1.0, leak_action="log") as pool:
            await load(pool)

    site, names = leak_report(caplog, main())
    assert names[-2:] == ["main", "load"], site
    assert "asyncpool/pool/pool.py" not in site, site
