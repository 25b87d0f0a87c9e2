"""The AWS environment tests run in: fake static credentials, nothing from this machine's config."""

from __future__ import annotations

import pytest


def set_environment(monkeypatch: pytest.MonkeyPatch, env: dict[str, str | None]) -> None:
    """Apply `env` (from `asyncpool.testing.aws_endpoint.aws_environment`): None unsets."""
    for name, value in env.items():
        if value is None:
            monkeypatch.delenv(name, raising=False)
        else:
            monkeypatch.setenv(name, value)
