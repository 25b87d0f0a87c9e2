"""A password file that matches every server, and a name of this machine that its rules take
for another machine's: what a password withheld from an unverified remote server needs."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest


def remote_name() -> str:
    """A name of this machine that resolves to 127.0.0.1 but is not ``localhost`` (skips the
    test where there is none)."""
    name = socket.gethostname()
    if name == "localhost" or socket.gethostbyname(name) != "127.0.0.1":
        pytest.skip("this machine's name does not resolve to 127.0.0.1")
    return name


def catch_all_pgpass(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, secret: str) -> Path:
    """A .pgpass giving `secret` for every server, the one libpq's rules read (no other
    password source set in the environment)."""
    path = tmp_path / "pgpass"
    path.write_text(f"*:*:*:*:{secret}\n")
    path.chmod(0o600)
    monkeypatch.setenv("PGPASSFILE", str(path))
    for name in ("PGPASSWORD", "PGSERVICE", "PGSSLMODE", "PGHOST", "PGPORT"):
        monkeypatch.delenv(name, raising=False)
    return path
