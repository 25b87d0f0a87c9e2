"""`asyncpool.connect.blocking_cancel`: the budget holds whatever the network does."""

from __future__ import annotations

import socket
import threading
import time

import pytest

from asyncpool.connect import blocking_cancel
from asyncpool.connect.driver import CancelTarget


def test_a_lookup_that_hangs_does_not_hold_the_caller_past_its_budget(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A host name's lookup (``getaddrinfo``) has no time limit of its own: a SIGTERM handler
    sending one cancel request waited on it past `cancel_within`."""
    release = threading.Event()

    def hanging_lookup(*args: object, **kwargs: object) -> object:
        release.wait(10)
        raise socket.gaierror("released")

    monkeypatch.setattr(socket, "getaddrinfo", hanging_lookup)
    target = CancelTarget(("db.invalid", 5432), (1, 2), None, False, False)
    started = time.monotonic()
    try:
        assert blocking_cancel.send([target], 0.2) == 0
        assert time.monotonic() - started < 2.0
    finally:
        release.set()
