"""Each host's own failure in a login to several hosts.

asyncpg tries a DSN's hosts in turn, goes on to the next after a network or TLS error (an
``OSError``) and raises only the last one's error: a certificate that did not verify on one host
was lost behind a refused port on the next. `HostsLoop`, given to asyncpg as its ``loop`` only
when there are several hosts, sees every ``create_connection`` (one per host, and one more for the
plain retry of ``sslmode=prefer``/``allow``) and every TLS upgrade, and notes each host's error in
a `HostLog`. Logins only: nothing it adds is called once a connection is made.

asyncpg also goes on after a server's 57P03 ("the database system is starting up", a standby
without hot standby), which comes after the dial, and after a host that logged in but is not what
``target_session_attrs`` asks for. The loop tells the two apart by asyncpg's one call to
``get_debug`` as it makes a `Connection` of a finished login: that host `logged_in`.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Coroutine
from typing import Any

from asyncpool.connect.forwarding import LoopView

#: asyncpg's name for a Unix-domain socket: the directory, then this and the port.
_SOCKET = "/.s.PGSQL."


class HostTry:
    """One host dialled: its address, and how it failed (None: it connected, or is in progress;
    a server's answer to the login is not seen here).

    The error is a copy without traceback or chain: asyncpg's frames, which hold the password,
    stay out of it (the log outlives the login when a later host answers)."""

    __slots__ = ("connected", "error", "host", "logged_in", "port")

    def __init__(self, host: str, port: int) -> None:
        self.host = host
        self.port = port
        self.error: BaseException | None = None
        self.connected = False
        #: The login finished (asyncpg made a connection of it, then kept it or passed it over).
        self.logged_in = False

    def failed(self, exc: BaseException) -> None:
        self.error = bare(exc)


class HostLog:
    """The hosts one login dialled, in order."""

    __slots__ = ("finished", "tries")

    def __init__(self) -> None:
        self.tries: list[HostTry] = []
        self.finished = False

    def finish(self) -> None:
        """Logged in: forget the failures, and note nothing more (the connection keeps its loop,
        and asyncpg's cancel requests connect through it)."""
        self.finished = True
        self.tries.clear()

    def dialling(self, host: str, port: int) -> HostTry | None:
        """The entry for `host`:`port`: the last one again for the same address (asyncpg's
        retry without TLS, or with it, on the same host); None once `finished`."""
        if self.finished:
            return None
        if self.tries and (self.tries[-1].host, self.tries[-1].port) == (host, port):
            return self.tries[-1]
        tried = HostTry(host, port)
        self.tries.append(tried)
        return tried


class HostsLoop(LoopView):
    """The running loop (or another view of it), as `asyncpg.connect` sees it: each connection
    and TLS upgrade it makes is noted in `log`, with its error."""

    def __init__(self, loop: Any, log: HostLog) -> None:
        super().__init__(loop)
        self.log = log

    async def create_connection(self, factory: Callable[[], Any], host: Any = None,
                                port: Any = None, **kwargs: Any) -> tuple[Any, Any]:
        # (No host: a socket asyncpg made itself, on a loop without start_tls.)
        tried = None if host is None else self.log.dialling(str(host), int(port or 0))
        return await _noted(tried, self.real.create_connection(factory, host, port, **kwargs))

    async def create_unix_connection(self, factory: Callable[[], Any], path: Any = None,
                                     **kwargs: Any) -> tuple[Any, Any]:
        directory, _, port = str(path).rpartition(_SOCKET)
        tried = self.log.dialling(directory, int(port) if port.isdigit() else 0)
        return await _noted(tried, self.real.create_unix_connection(factory, path, **kwargs))

    def get_debug(self) -> bool:
        # asyncpg's Connection asks once, as it is made from a finished login (asyncpg 0.32):
        # the host dialled last logged in. (Only asyncpg calls this view's methods: the
        # transports and futures it makes belong to the real loop.)
        log = self.log
        if not log.finished and log.tries:
            log.tries[-1].logged_in = True
        return bool(self.real.get_debug())

    async def start_tls(self, *args: Any, **kwargs: Any) -> Any:
        try:
            return await self.real.start_tls(*args, **kwargs)
        except Exception as exc:
            if self.log.tries:
                self.log.tries[-1].failed(exc)
            raise


async def _noted(tried: HostTry | None,
                 dial: Coroutine[Any, Any, tuple[Any, Any]]) -> tuple[Any, Any]:
    """`dial`'s transport and protocol, its outcome noted in `tried` (None: not noted)."""
    try:
        result = await dial
    except Exception as exc:
        if tried is not None:
            tried.failed(exc)
        raise
    if tried is not None:
        tried.connected = True
    return result


def bare(exc: BaseException) -> BaseException:
    """`exc`'s class, arguments and attributes (an SSL error's ``verify_message``...), without
    its traceback, cause or context."""
    try:
        twin = copy.copy(exc)
    except Exception:  # an exception class that cannot be rebuilt from its arguments
        twin = OSError(f"{type(exc).__name__}: {exc}")
    twin.__cause__ = twin.__context__ = None
    return twin.with_traceback(None)
