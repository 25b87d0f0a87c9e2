"""Unit tests: the pool against the fake driver (`fakes.py`) on a virtual clock, no server."""

from __future__ import annotations

import pytest

from tests.unit.fakes import FakeServer, install


@pytest.fixture(autouse=True)
def _fake_driver(monkeypatch: pytest.MonkeyPatch) -> None:
    install(monkeypatch)


@pytest.fixture
def server() -> FakeServer:
    return FakeServer()
