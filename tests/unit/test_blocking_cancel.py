"""`asyncpool.connect.blocking_cancel`: the budget holds whatever the network does."""

from __future__ import annotations

import math
import socket
import struct
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


def test_an_unbounded_budget_still_sends_the_request() -> None:
    """``Pool.terminate(cancel_within=math.inf)`` ("as long as it takes") passes its check, but
    socket and join timeouts overflow past `threading.TIMEOUT_MAX`: the caller got
    OverflowError, with the pool half terminated, and no request was sent."""
    server = socket.create_server(("127.0.0.1", 0))
    received: list[bytes] = []

    def take_one() -> None:
        conn, _ = server.accept()
        with conn:
            received.append(conn.recv(16))  # then closed: the request taken

    thread = threading.Thread(target=take_one, daemon=True)
    thread.start()
    try:
        target = CancelTarget(server.getsockname()[:2], (7, 9), None, False, False)
        assert blocking_cancel.send([target], math.inf) == 1
        assert received == [struct.pack("!llll", 16, 80877102, 7, 9)]
    finally:
        server.close()
        thread.join(5)


def test_each_request_says_whether_it_was_sent_and_why_not() -> None:
    """A refused connection is told apart from a request the time ran out for; with no time
    left none is tried (the listener gets no second connection)."""
    listening = socket.create_server(("127.0.0.1", 0))
    refusing = socket.create_server(("127.0.0.1", 0))
    refused_addr = refusing.getsockname()[:2]
    refusing.close()
    try:
        quiet = CancelTarget(listening.getsockname()[:2], (1, 2), None, False, False)
        refused = CancelTarget(refused_addr, (3, 4), None, False, False)
        unanswered, failed = blocking_cancel.deliver([quiet, refused], 0.2)
        assert (unanswered.sent, unanswered.taken) == (True, False)  # (the backlog took it)
        assert (failed.sent, failed.taken) == (False, False)
        assert failed.why.startswith("ConnectionRefusedError"), failed.why
        listening.settimeout(0)
        listening.accept()[0].close()  # the one above
        assert blocking_cancel.deliver([quiet], 0) == [
            blocking_cancel.Delivery(sent=False, taken=False, why=blocking_cancel.NO_TIME)]
        with pytest.raises(BlockingIOError):
            listening.accept()
    finally:
        listening.close()
