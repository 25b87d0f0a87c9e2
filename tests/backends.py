"""Ending a PostgreSQL backend behind a pool's back, for the tests of what the pool then sees."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import psycopg


def ended_unread(admin: psycopg.Connection[Any], pid: int) -> None:
    """End the backend `pid` through `admin` and wait until it is gone, blocking the running
    loop: the pool reads the close only when its loop runs again, in the next checkout's check,
    which fails. (Read while the connection is idle, the close retires it at once, with no check
    to fail: `asyncpool.pool.lost_idle`.)"""
    row = admin.execute("SELECT pg_terminate_backend(%s)", (pid,)).fetchone()
    assert row is not None
    assert row[0], f"backend {pid} was not terminated"
    deadline = time.monotonic() + 5.0
    while admin.execute("SELECT 1 FROM pg_stat_activity WHERE pid = %s", (pid,)).fetchone():
        assert time.monotonic() < deadline, f"backend {pid} still there after 5 s"
        time.sleep(0.005)
