"""Cancel requests sent without the event loop, for a process about to end.

A SIGTERM handler that runs on top of the pool's running loop (the Lambda runtime calls the
handler on the main thread, where Python runs signal handlers) cannot await: a cancel request
left to a task of the loop is never sent, the process ends, and the pooler or server keeps
running the statement (PgBouncer passes the client's disconnect on as a closed server
connection, which PostgreSQL notices only when the statement next writes to it). `send` writes
the requests from the calling thread, each on a socket of its own, in parallel, and waits for the
server to close each one (closing it first crashes PgBouncer 1.18, pgbouncer#801).
"""

from __future__ import annotations

import socket
import ssl as ssl_module
import struct
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass

from asyncpool.connect.direct_cancel import cancel_message
from asyncpool.connect.driver import CancelTarget

# The protocol's SSLRequest code.
_SSL_CODE = 80877103


def send(targets: Sequence[CancelTarget], timeout: float) -> int:
    """Send a cancel request to each of `targets` and wait, up to `timeout` seconds for them all,
    until each server has taken its request (closed the socket); returns how many did. Never
    raises for a request that fails (the process is ending either way)."""
    return sum(delivery.taken for delivery in deliver(targets, timeout))


@dataclass(frozen=True, slots=True)
class Delivery:
    """What became of one cancel request by the deadline: `taken` (the server closed its socket:
    it has the request), else `sent` (written, no answer yet: it may still arrive) or not, and
    `why` it was not sent."""

    sent: bool
    taken: bool
    why: str = ""


#: Why a request was not sent when the time ran out first (the caller had none left, or the
#: lookup, connection or TLS handshake took it all).
NO_TIME = "no time left"


def deliver(targets: Sequence[CancelTarget], timeout: float) -> list[Delivery]:
    """`send`, saying what became of each of `targets`' requests. With no time left, none is
    tried."""
    if timeout <= 0:
        return [Delivery(sent=False, taken=False, why=NO_TIME) for _ in targets]
    # Socket and join timeouts overflow past it (``cancel_within=math.inf``: as long as it takes).
    deadline = time.monotonic() + min(timeout, threading.TIMEOUT_MAX)
    attempts = [_Attempt() for _ in targets]

    def one(i: int) -> None:
        try:
            _send_one(targets[i], deadline, attempts[i])
        except (OSError, ValueError) as exc:
            attempts[i].failed(exc)

    # Threads even for one request: a host name's lookup has no time limit of its own, and
    # the caller's budget must hold (the threads are daemons: the process may end under them).
    threads = [threading.Thread(target=one, args=(i,), daemon=True,
                                name="asyncpool-cancel") for i in range(len(targets))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(max(0.0, deadline - time.monotonic()))
    return [attempt.delivery() for attempt in attempts]


class _Attempt:
    """One request's progress, written by its thread, read when the time is up."""

    def __init__(self) -> None:
        self.sent = self.taken = False
        self.why = NO_TIME  # (a thread still looking up or connecting at the deadline)

    def failed(self, exc: BaseException) -> None:
        if not isinstance(exc, TimeoutError):
            self.why = f"{type(exc).__name__}: {exc}"

    def delivery(self) -> Delivery:
        return Delivery(self.sent, self.taken, "" if self.sent else self.why)


def _send_one(target: CancelTarget, deadline: float, attempt: _Attempt) -> None:
    sock = _connect(target.addr, deadline)
    try:
        if target.ssl is not None:
            sock = _start_tls(sock, target.ssl, target, deadline)
        sock.sendall(cancel_message(target.key))
        attempt.sent = True
        # The server (or pooler) closes the socket once it has taken the request.
        while True:
            sock.settimeout(_left(deadline))
            if not sock.recv(64):
                attempt.taken = True
                return
    finally:
        sock.close()


def _connect(addr: str | tuple[str, int], deadline: float) -> socket.socket:
    if isinstance(addr, str):
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.settimeout(_left(deadline))
            sock.connect(addr)
        except BaseException:
            sock.close()
            raise
        return sock
    sock = socket.create_connection(addr, timeout=_left(deadline))
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def _start_tls(sock: socket.socket, context: ssl_module.SSLContext, target: CancelTarget,
               deadline: float) -> socket.socket:
    """Negotiate TLS as the connection did: an SSLRequest first (as asyncpg's own cancel
    requests), or from the first byte (direct TLS)."""
    host = target.addr[0] if isinstance(target.addr, tuple) else None
    sock.settimeout(_left(deadline))
    if target.direct:
        return context.wrap_socket(sock, server_hostname=host)
    sock.sendall(struct.pack("!ll", 8, _SSL_CODE))
    answer = sock.recv(1)
    if answer == b"S":
        return context.wrap_socket(sock, server_hostname=host)
    if answer == b"N" and target.advisory:
        return sock
    raise OSError(f"the server answered the SSLRequest with {answer!r}")


def _left(deadline: float) -> float:
    left = deadline - time.monotonic()
    if left <= 0:
        raise TimeoutError("no time left for the cancel request")
    return left
