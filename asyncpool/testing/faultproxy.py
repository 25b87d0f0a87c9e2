"""A loopback TCP proxy that breaks the network on demand, for fault tests and the soak."""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import socket
import struct
from typing import Literal
from urllib.parse import urlsplit, urlunsplit

FaultMode = Literal["pass", "stall", "drop", "reset", "half-open"]
Direction = Literal["replies", "requests"]

_CHUNK = 64 * 1024
# SO_LINGER on with a zero timeout: close() sends RST instead of FIN.
_LINGER_ZERO = struct.pack("ii", 1, 0)


class FaultProxy:
    """Listens on 127.0.0.1 and forwards each connection to `upstream`, misbehaving on demand.

    Modes, switched at run time with `set_mode`:

    - ``pass``: forward bytes both ways.
    - ``stall``: a partition. Nothing is forwarded; new connections are accepted but not dialled
      upstream. Back in ``pass``, every connection carries on where it stopped.
    - ``drop``: close every connection (FIN to both ends), and each new one once accepted.
    - ``reset``: as ``drop``, with RST (``SO_LINGER`` 0): peers see ``ECONNRESET``.
    - ``half-open``: the peer vanished without a word. With ``direction="replies"`` (default)
      the client's requests still reach the server but its replies are thrown away, so the
      server may commit what the client never hears about; ``"requests"`` drops the other way.
      Affected connections stay deaf after ``pass``, as a connection to a vanished peer does.

    Two protocol-aware faults, set as attributes before connections are made:

    - ``drop_cancels``: a PostgreSQL CancelRequest (a connection of its own) is read and closed
      without reaching the server, as when it lands on a pooler process that does not know the
      key. Counted in `cancels_dropped`; `cancels_seen` counts every one.
    - ``strip_backend_key``: the server's BackendKeyData is removed from the login replies, as
      RDS Proxy does, so the client has no key to cancel with.

    - ``spare_cancels``: ``drop`` and ``reset`` leave CancelRequest connections alone (counted
      in `cancels_seen`), for PgBouncer 1.18: a cancel request's connection closed before it has
      forwarded the request crashes it (docs/faults.md, "PgBouncer 1.18 crashes"), whoever
      closed it, a network fault too.

    - ``cancel_delay`` (seconds): a CancelRequest reaches the server only this long after it
      arrived, as when the pooler is too busy to accept it sooner (or its TCP or TLS handshake
      is slow); a client that closes its socket before then never gets it delivered, as one that
      gave up before the server took its connection. Counted in `cancels_abandoned`: closing a
      cancel request's socket before the server has taken it crashes PgBouncer 1.18
      (pgbouncer#801), so a client that does so is caught here.

    With any of them set, the proxy answers a TLS request with "N" itself: those logins are
    plaintext.

    ``close_delay`` (seconds, set as an attribute): when the server ends a connection, its last
    bytes reach the client at once and its close (FIN) this much later, as when the FIN segment
    is lost and sent again. The client reads a server's goodbye (a FATAL ErrorResponse) before it
    learns the connection is gone.

    ``hold_requests(after=n)``: the clients' next `n` bytes go on, then the proxy stops reading
    what clients send (replies still flow) until `release_requests`: the client's writes back up
    into its socket and its transport, as behind a front that has stopped taking them. Held
    bytes are forwarded, in order, once released.

    Bounded: at most `max_connections` at once (more are reset) and one buffered chunk per
    direction per connection while stalled.
    """

    def __init__(self, upstream_host: str, upstream_port: int, *, max_connections: int = 256) -> None:
        _require_loopback(upstream_host)
        self.upstream_host = upstream_host
        self.upstream_port = upstream_port
        self.max_connections = max_connections
        self.host = "127.0.0.1"
        self.port: int = 0
        self.mode: FaultMode = "pass"
        self.direction: Direction = "replies"
        self.accepted_total = 0
        self.drop_cancels = False
        self.strip_backend_key = False
        self.spare_cancels = False
        self.cancels_seen = 0
        self.cancels_dropped = 0
        self.cancel_delay = 0.0
        self.cancels_abandoned = 0
        self.close_delay = 0.0
        #: Chunks read from one end and held back by a stall (a request waiting at the partition).
        self.held = 0
        self._flowing = asyncio.Event()
        self._flowing.set()
        #: Request bytes still to forward before holding (`hold_requests`); None: not holding.
        self._request_budget: int | None = None
        self._requests_released = asyncio.Event()
        self._requests_released.set()
        self._links: set[_Link] = set()
        self._server: asyncio.Server | None = None

    @classmethod
    def to_dsn(cls, dsn: str, **options: int) -> FaultProxy:
        """A proxy in front of the host and port a ``postgresql://`` DSN names."""
        parts = urlsplit(dsn)
        return cls(parts.hostname or "127.0.0.1", parts.port or 5432, **options)

    def dsn(self, dsn: str) -> str:
        """`dsn` rewritten to go through this proxy (user, password, database and query kept)."""
        parts = urlsplit(dsn)
        userinfo = parts.netloc.rpartition("@")[0]
        netloc = f"{userinfo}@{self.host}:{self.port}" if userinfo else f"{self.host}:{self.port}"
        return urlunsplit(parts._replace(netloc=netloc))

    @property
    def connections(self) -> int:
        """Client connections open through the proxy right now."""
        return len(self._links)

    async def start(self) -> FaultProxy:
        self._server = await asyncio.start_server(self._serve, self.host, 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def close(self) -> None:
        """Stop listening and close every connection."""
        if self._server is not None:
            self._server.close()
        self._flowing.set()
        links = list(self._links)
        for link in links:
            link.close(reset=False)
        self.release_requests()  # (their pumps, closed, forward nothing)
        # Closed sockets end every pump; cancelling is only for a pump stuck past that.
        tasks = [link.task for link in links if link.task is not None]
        if tasks:
            _, stuck = await asyncio.wait(tasks, timeout=5)
            for task in stuck:
                task.cancel()
            await asyncio.gather(*stuck, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()
            self._server = None

    async def __aenter__(self) -> FaultProxy:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def set_mode(self, mode: FaultMode, *, direction: Direction = "replies") -> None:
        """Switch the fault now: applies to open connections as well as new ones."""
        self.mode = mode
        self.direction = direction
        if mode == "stall":
            self._flowing.clear()
            return
        self._flowing.set()
        if mode in ("drop", "reset"):
            for link in list(self._links):
                if not link.cancel:
                    link.close(reset=mode == "reset")
        elif mode == "half-open":
            for link in self._links:
                link.deafen(direction)

    def hold_requests(self, *, after: int = 0) -> None:
        """Forward the clients' next `after` bytes (all connections together), then read no
        more from them until `release_requests`."""
        self._request_budget = after
        self._requests_released.clear()

    def release_requests(self) -> None:
        """Forward what `hold_requests` held, and read from clients again."""
        self._request_budget = None
        self._requests_released.set()

    async def _within_budget(self, data: bytes, dst: asyncio.StreamWriter) -> bytes:
        """What of `data` (read from a client) goes on now; the rest once released."""
        budget = self._request_budget
        if budget is None:
            return data
        self._request_budget = max(budget - len(data), 0)
        if budget >= len(data):
            return data
        if budget:
            dst.write(data[:budget])
        await self._requests_released.wait()
        return data[budget:]

    # -- forwarding ---------------------------------------------------------------------------

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.accepted_total += 1
        if self.mode in ("drop", "reset") or len(self._links) >= self.max_connections:
            _shut(writer, reset=self.mode != "drop")
            return
        link = _Link(writer, asyncio.current_task())
        self._links.add(link)
        try:
            # A stalled network does not even reach the server.
            await self._flowing.wait()
            if link.closed:
                return
            first: bytes | None = b""
            if self.drop_cancels or self.strip_backend_key or self.spare_cancels or self.cancel_delay:
                first = await self._first_request(reader, writer)
                if first is None:
                    return  # a cancel request, lost
                link.cancel = self.spare_cancels and _is_cancel(first)
                if self.cancel_delay and _is_cancel(first) and not await _stays(reader, self.cancel_delay):
                    self.cancels_abandoned += 1
                    return  # its client left before the server would have taken it
            try:
                up_reader, up_writer = await asyncio.open_connection(
                    self.upstream_host, self.upstream_port
                )
            except OSError:
                link.close(reset=True)
                return
            link.upstream = up_writer
            if link.closed:  # dropped while dialling
                link.close(reset=self.mode == "reset")
                return
            if self.mode == "half-open":
                link.deafen(self.direction)
            if first:
                up_writer.write(first)
            replies = up_reader
            if self.strip_backend_key and first:
                replies = _KeyStripper(up_reader)  # type: ignore[assignment]
            await asyncio.gather(
                self._pump(link, reader, up_writer, "requests"),
                self._pump(link, replies, writer, "replies"),
            )
        except (asyncio.CancelledError, ConnectionError):
            # Only close() cancels this task, and nothing awaits it; a client may reset before
            # its first packet is read (a pool terminated while it logged in): end quietly,
            # not in the loop's exception handler.
            pass
        finally:
            link.close(reset=False)
            self._links.discard(link)

    async def _first_request(self, reader: asyncio.StreamReader,
                             writer: asyncio.StreamWriter) -> bytes | None:
        """The client's first packet (a startup packet or a cancel request), whole, TLS
        refused; None for a cancel request this proxy drops, or a client already gone.

        Whole, to be sent on in one write: PgBouncer 1.18 ends a login whose startup packet
        arrives in two pieces ("client sent partial pkt in startup phase")."""
        first = await self._packet(reader)
        code = struct.unpack("!ii", first[:8])[1] if len(first) >= 8 else 0
        if code == _SSL_REQUEST_CODE:
            # No TLS through these faults: refused here, as a server without TLS does; the
            # client goes on in plaintext (or gives up).
            if writer.is_closing():  # it already left (uvloop would raise RuntimeError)
                return None
            writer.write(b"N")
            first = await self._packet(reader)
            code = struct.unpack("!ii", first[:8])[1] if len(first) >= 8 else 0
        if code != _CANCEL_REQUEST_CODE:
            return first
        self.cancels_seen += 1
        if not self.drop_cancels:
            return first
        self.cancels_dropped += 1  # pid and key read, thrown away
        return None

    @staticmethod
    async def _packet(reader: asyncio.StreamReader) -> bytes:
        """A length-prefixed packet of the startup phase, or what came of it before EOF."""
        head = b""
        try:
            head = await reader.readexactly(8)
            length = struct.unpack("!i", head[:4])[0]
            # (A length out of bounds is the server's to refuse: passed on as it is.)
            return head + (await reader.readexactly(length - 8) if 8 < length <= 10_000 else b"")
        except asyncio.IncompleteReadError as exc:
            return head + exc.partial

    async def _pump(self, link: _Link, src: asyncio.StreamReader, dst: asyncio.StreamWriter,
                    direction: Direction) -> None:
        try:
            while not link.closed:
                if direction == "requests" and self._request_budget == 0:
                    await self._requests_released.wait()  # (not reading: the client backs up)
                data = await src.read(_CHUNK)
                if not data:
                    if direction == "replies" and self.close_delay:
                        await asyncio.sleep(self.close_delay)
                    break
                if not self._flowing.is_set():
                    self.held += 1
                    try:
                        await self._flowing.wait()
                    finally:
                        self.held -= 1
                if link.closed:
                    break
                if direction in link.deaf:
                    continue
                if direction == "requests":
                    data = await self._within_budget(data, dst)
                if link.closed or dst.is_closing():  # (uvloop raises writing to a closed one)
                    break
                dst.write(data)
                await dst.drain()
        except OSError:
            pass
        finally:
            # One end went away: so does the other, as with a real connection.
            link.close(reset=False)


_CANCEL_REQUEST_CODE = 80877102
_SSL_REQUEST_CODE = 80877103


async def _stays(reader: asyncio.StreamReader, seconds: float) -> bool:
    """Whether the client keeps its end open for `seconds` (a cancel request sends nothing more)."""
    try:
        async with asyncio.timeout(seconds):
            await reader.read(1)
    except TimeoutError:
        return True
    except OSError:
        pass
    return False


def _is_cancel(first: bytes) -> bool:
    return len(first) >= 8 and struct.unpack("!ii", first[:8])[1] == _CANCEL_REQUEST_CODE


class _KeyStripper:
    """Reads the server's side of a login and leaves BackendKeyData ('K') out, up to the first
    ReadyForQuery; then passes bytes through (the proxy refused TLS, so the login is plain)."""

    def __init__(self, src: asyncio.StreamReader) -> None:
        self.src = src
        self.done = False

    async def read(self, n: int) -> bytes:
        if self.done:
            return await self.src.read(n)
        try:
            head = await self.src.readexactly(5)
            body = await self.src.readexactly(struct.unpack("!i", head[1:])[0] - 4)
        except asyncio.IncompleteReadError as exc:
            return exc.partial
        if head[:1] == b"Z":
            self.done = True
        if head[:1] == b"K":
            return await self.read(n)
        return head + body


class _Link:
    """One client connection and, once dialled, its upstream connection."""

    __slots__ = ("cancel", "client", "closed", "deaf", "task", "upstream")

    def __init__(self, client: asyncio.StreamWriter, task: asyncio.Task[None] | None) -> None:
        self.client = client
        self.upstream: asyncio.StreamWriter | None = None
        self.task = task
        self.closed = False
        self.deaf: set[Direction] = set()
        #: A CancelRequest's connection that drop/reset spare (`FaultProxy.spare_cancels`).
        self.cancel = False

    def deafen(self, direction: Direction) -> None:
        self.deaf.add(direction)

    def close(self, *, reset: bool) -> None:
        if self.closed and not reset:
            return
        self.closed = True
        _shut(self.client, reset=reset)
        if self.upstream is not None:
            _shut(self.upstream, reset=reset)


def _shut(writer: asyncio.StreamWriter, *, reset: bool) -> None:
    if reset:
        sock = writer.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_ZERO)
        writer.transport.abort()
    elif not writer.is_closing():
        writer.close()


def _require_loopback(host: str) -> None:
    """Fault traffic stays on this machine."""
    if host == "localhost":
        return
    try:
        loopback = ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    if not loopback:
        raise ValueError(f"FaultProxy forwards only to loopback addresses, not {host!r}")
