"""Refusing a server's request for a password it could read, before asyncpg answers it.

libpq's ``require_auth`` lets a client refuse authentication methods; asyncpg has no such
option, and answers inside its Cython protocol (``AuthenticationCleartextPassword`` with the
password itself, ``AuthenticationMD5Password`` with a salted hash the server chose the salt of).
So the server's bytes reach asyncpg's protocol through a `Reader` while the login lasts: it reads
each Authentication message, and one that asks for a method not allowed is never delivered: the
connection is aborted, nothing is written, and `AuthGuard.refused` names the method. After
AuthenticationOk the `Reader` takes itself off the transport (no cost once logged in).

The `Reader` is put in place by `GuardedLoop`, passed to asyncpg as its ``loop``: it forwards
everything to the running loop except ``create_connection``, ``create_unix_connection`` and
``start_tls``, whose protocols it wraps (the TLS upgrade included). `asyncpool.unnamed`'s
`InterceptingLoop` goes around it when both are used.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

from asyncpool.connect import driver
from asyncpool.connect.forwarding import ForwardingProtocol, LoopView
from asyncpool.connect.hosts import HostLog, HostsLoop
from asyncpool.errors import AuthMethodRefusedError

if TYPE_CHECKING:
    from asyncpool.config import PoolConfig
    from asyncpool.connect.dsn import ParsedDsn, Target
    from asyncpool.connect.service import Service
    from asyncpool.connect.tls import TlsSetting

# Authentication request codes (PostgreSQL protocol 3.0) and the require_auth names they ask for.
_OK = 0
_METHODS = {3: "password", 5: "md5", 7: "gss", 9: "sspi", 10: "scram-sha-256"}
#: The first libpq that reads ``sslrootcert=system`` (16).
_LIBPQ_SYSTEM_ROOTS = 160000
_WHAT = {
    "password": "a cleartext password (AuthenticationCleartextPassword)",  # pragma: allowlist secret
    "md5": "an MD5 password hash (AuthenticationMD5Password) instead of SCRAM",
    "none": "nothing (it let the login in without authentication)",
    "scram-sha-256": "SCRAM-SHA-256",
    "gss": "GSSAPI",
    "sspi": "SSPI",
}


#: Methods that use no password (`asyncpool.connect.tls.NO_PASSWORD_METHODS`).
_NO_PASSWORD = frozenset({"gss", "sspi", "none"})


class AuthGuard:
    """What one connection attempt allows; records what it refused. Shared by every socket
    asyncpg opens for the attempt (a TLS try and a plain retry, the hosts of a list)."""

    __slots__ = ("allowed", "once", "refused", "repeated", "sent")

    def __init__(self, allowed: frozenset[str], *, once: bool = False) -> None:
        self.allowed: frozenset[str] = allowed
        #: Answer one password request per attempt at most (the server is not verified: a
        #: second one is asyncpg's retry without TLS after the first was refused, ``prefer``).
        self.once: bool = once
        #: The method a server asked for and was refused (None: nothing refused).
        self.refused: str | None = None
        #: A password was answered / a second request was refused under `once`.
        self.sent: bool = False
        self.repeated: bool = False


def refusal_error(guard: AuthGuard, config: PoolConfig, target: Target, tls: TlsSetting,
                  require_auth: str | None = None, *,
                  withheld: str | None = None) -> AuthMethodRefusedError:
    """The error for a login `guard` stopped: what was asked, and the setting that allows it.
    `withheld`: the password that may not be sent (`tls.withheld_password`), if any."""
    method = guard.refused or "password"
    where = f"pool {config.name!r} could not connect to {target}"
    asked = f"the server asked for {_WHAT.get(method, method)}"
    require_auth = config.require_auth if require_auth is None else require_auth
    if withheld is not None and method not in _NO_PASSWORD:
        message = (
            f"{where}: {asked}, and {withheld} is only sent to another machine over TLS that "
            f"verifies the server's certificate and name, but the setting is {tls.describe()}; "
            "nothing was sent. Set ssl='verify-full' with ssl_root_cert, or, only where the "
            "network is trusted, allow_unprotected_credentials=True (ASYNCPOOL_ALLOW_"
            "UNPROTECTED_CREDENTIALS=true); a server that asks for no password is let in")
    elif require_auth is not None:
        message = (f"{where}: {asked}, which require_auth={require_auth!r} does not "
                   "allow; nothing was sent")
    else:
        message = (
            f"{where}: {asked} on a connection that does not verify the server "
            f"({tls.describe()}); whoever answers on the port could read or replay it, so "
            "nothing was sent (only SCRAM-SHA-256 is used there). Use TLS that verifies the "
            "server (ssl='verify-full' with ssl_root_cert), or, if this server and network are "
            f"trusted, allow it by name: require_auth='{method},scram-sha-256' (or "
            "allow_unprotected_credentials=True)"
        )
    error = AuthMethodRefusedError(message)
    error.method = method
    return error


class GuardedLoop(LoopView):
    """The running loop, as `asyncpg.connect` sees it: the protocols it connects get a `Reader`."""

    def __init__(self, loop: Any, guard: AuthGuard) -> None:
        super().__init__(loop)
        self.guard = guard

    async def create_connection(self, factory: Callable[[], Any], *args: Any,
                                **kwargs: Any) -> tuple[Any, Any]:
        transport, protocol = await self.real.create_connection(self._wrap(factory), *args,
                                                                **kwargs)
        return _unwrap(transport, protocol)

    async def create_unix_connection(self, factory: Callable[[], Any], *args: Any,
                                     **kwargs: Any) -> tuple[Any, Any]:
        transport, protocol = await self.real.create_unix_connection(self._wrap(factory), *args,
                                                                     **kwargs)
        return _unwrap(transport, protocol)

    async def start_tls(self, transport: Any, protocol: Any, *args: Any, **kwargs: Any) -> Any:
        # The loop sets the TLS protocol on the plain transport: no Reader in front of that one.
        upgraded = await self.real.start_tls(_disarm(transport), protocol, *args, **kwargs)
        # asyncpg then calls set_protocol(its protocol) on what this returns.
        return None if upgraded is None else _arm(upgraded, self.guard)

    def _wrap(self, factory: Callable[[], Any]) -> Callable[[], Any]:
        guard = self.guard

        def make() -> Any:
            protocol = factory()
            if driver.is_wire_protocol(getattr(protocol, "inner", protocol)):
                return Reader(protocol, guard)
            # The TLS negotiation's protocol reads one byte, not messages: its transport is
            # armed (`_arm`), so that the PostgreSQL protocol asyncpg puts on the same socket
            # when the server declines TLS (``prefer``) is read through a Reader too.
            return _Negotiation(protocol, guard)

        return make


def _unwrap(transport: Any, protocol: Any) -> tuple[Any, Any]:
    if isinstance(protocol, Reader):
        return transport, protocol.inner
    if isinstance(protocol, _Negotiation):
        return protocol.transport, protocol.inner
    return transport, protocol


def _arm(transport: Any, guard: AuthGuard) -> Any:
    """`transport`, made to put a `Reader` in front of the next protocol set on it.

    asyncpg writes to the transport it is given for the whole life of the connection, so a view
    in front of it would be paid on every query (about 700 instructions, benchmarks/README.md):
    asyncio's transports are given as they are, with a ``set_protocol`` of the instance's own
    that removes itself when called. Others (uvloop's, which take no attributes) get a
    `GuardedTransport`.
    """
    def set_protocol(protocol: Any) -> None:
        _disarm(transport)
        transport.set_protocol(Reader(protocol, guard, transport))

    try:
        transport.set_protocol = set_protocol
    except AttributeError:
        return GuardedTransport(transport, guard)
    return transport


def _disarm(transport: Any) -> Any:
    """The real transport under `transport`, with no `Reader` to put in front any more."""
    if isinstance(transport, GuardedTransport):
        return transport.real
    # Deleted as an attribute: reading the instance's __dict__ would make CPython keep its
    # attributes in a dict object from then on, and every read of one by asyncio's transport
    # code slower (6,000 instructions per query).
    with contextlib.suppress(AttributeError):
        del transport.set_protocol
    return transport


class _Negotiation(ForwardingProtocol):
    """Around asyncpg's TLS negotiation protocol: the transport it sees puts a `Reader` in front
    of the next protocol set on it (`_arm`)."""

    def __init__(self, inner: Any, guard: AuthGuard) -> None:
        self.inner = inner
        self.guard = guard
        self.transport: Any = None

    def connection_made(self, transport: Any) -> None:
        self.transport = _arm(transport, self.guard)
        self.inner.connection_made(self.transport)

    def connection_lost(self, exc: Exception | None) -> None:
        self.inner.connection_lost(exc)
        driver.retrieve_negotiation_error(self.inner)


class GuardedTransport:
    """A transport whose first ``set_protocol`` puts a `Reader` in front of the protocol (for the
    transports `_arm` cannot give an attribute)."""

    __slots__ = ("_armed", "guard", "real", "write", "writelines")

    def __init__(self, real: Any, guard: AuthGuard) -> None:
        self.real: Any = real
        self.guard: AuthGuard = guard
        self.write: Callable[[bytes | bytearray | memoryview], None] = real.write
        self.writelines: Callable[[Iterable[bytes | bytearray | memoryview]], None] = (
            real.writelines)
        self._armed = True

    def set_protocol(self, protocol: Any) -> None:
        if self._armed:
            self._armed = False
            self.real.set_protocol(Reader(protocol, self.guard, self.real))
        else:
            self.real.set_protocol(protocol)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.real, name)


class Reader(ForwardingProtocol):
    """Between a transport and asyncpg's protocol until the login ends (see the module)."""

    def __init__(self, inner: Any, guard: AuthGuard, transport: Any = None) -> None:
        self.inner = inner
        self.guard = guard
        self.transport: Any = transport
        self._held = bytearray()
        self._asked = False  # the server asked for some authentication
        self._closed = False
        self._through = False  # logged in: everything goes straight to asyncpg

    def connection_made(self, transport: Any) -> None:
        self.transport = transport
        self.inner.connection_made(transport)

    def data_received(self, data: bytes) -> None:
        if self._through:
            self.inner.data_received(data)
            return
        if self._closed:
            return
        held = self._held
        held += data
        pos = 0
        while len(held) - pos >= 5:
            length = int.from_bytes(held[pos + 1 : pos + 5], "big")
            end = pos + 1 + length
            if held[pos] == 0x52:  # 'R': an Authentication message
                if len(held) - pos < 9:
                    break
                code = int.from_bytes(held[pos + 5 : pos + 9], "big", signed=True)
                if not self._admit(code):
                    return
                if code == _OK:
                    self._done()
                    return
            if end > len(held):
                break
            pos = end
        if pos:
            chunk = bytes(held[:pos])
            del held[:pos]
            self.inner.data_received(chunk)

    def _admit(self, code: int) -> bool:
        """False (and the connection aborted) when authentication request `code` is refused."""
        guard = self.guard
        if code == _OK:
            if not self._asked and "none" not in guard.allowed:
                self._refuse("none")
                return False
            return True
        method = _METHODS.get(code)
        if method is None:
            return True  # a SASL/GSS continuation, or one asyncpg itself refuses
        if method not in guard.allowed:
            self._refuse(method)
            return False
        if method in ("password", "md5"):
            if guard.once and guard.sent:
                self._refuse(method, repeated=True)
                return False
            guard.sent = True
        self._asked = True
        return True

    def _done(self) -> None:
        """Logged in: the rest goes to asyncpg, and the transport talks to it directly."""
        rest = bytes(self._held)
        self._held.clear()
        self._through = True
        if self.transport is not None:
            # If the transport cannot change protocols, this Reader just keeps forwarding.
            with contextlib.suppress(Exception):
                self.transport.set_protocol(self.inner)
        if rest:
            self.inner.data_received(rest)

    def _refuse(self, method: str, *, repeated: bool = False) -> None:
        if repeated:
            self.guard.repeated = True
        else:
            self.guard.refused = method
        self._held.clear()
        self._closed = True
        if self.transport is not None:
            self.transport.abort()

    def connection_lost(self, exc: Exception | None) -> None:
        self._held.clear()
        self.inner.connection_lost(exc)


class Login:
    """The pool's TLS and credential rules for a login made outside a pool (``asyncpool doctor``
    and its admin console reads): the resolved TLS setting, the credential check, and the guard.

    `config` supplies the options a pool in the same environment would have
    (``PoolConfig.from_env``: ``ASYNCPOOL_SSL``, ``ASYNCPOOL_ALLOW_UNPROTECTED_CREDENTIALS``...).
    Raises `PoolConfigError` as a pool would (a password to another machine without verified
    TLS, conflicting settings).
    """

    def __init__(self, config: PoolConfig, dsn: ParsedDsn) -> None:
        from asyncpool.connect import tls

        self.config = config
        self.dsn = dsn
        service = tls.service_of(config, dsn.params)  # (its file read once, for all)
        self.service: Service | None = service
        self.tls: TlsSetting = tls.resolve_tls(config, list(dsn.params.items()), service=service)
        kind: tls.CredentialKind | None = (
            "password" if dsn.password or os.environ.get("PGPASSWORD") else None)
        hosts = tls.checked_hosts(config, self.tls, kind, [h for h, _ in dsn.hosts], service)
        passfile = tls.passfile_login(dsn, dsn.target(service=service), service=service)
        #: The password file's password, when it may not be sent (`tls.withheld_password`).
        self.withheld: str | None = tls.withheld_password(config, self.tls, kind, hosts, service,
                                                          passfile=passfile)
        # For a refused login's message only: with no password given, say so.
        self._no_password = None if kind is not None else (hosts, service, passfile)
        self.require_auth: str | None = tls.require_auth_setting(config, dsn.params)
        self.allowed: frozenset[str] = tls.allowed_auth_methods(
            config, self.tls, self.require_auth, withheld=self.withheld is not None)
        self.guard: AuthGuard | None = None
        #: The last `kwargs` call's log of each host's failure (several hosts only).
        self.hosts: HostLog | None = None

    async def connect(self, timeout: float, name: str) -> Any:
        """One asyncpg connection to the DSN under these rules (no statement cache). A failed
        login raises `ConnectError` (or `AuthMethodRefusedError`) that says what to fix, with
        nothing of the driver's error chained: its frames hold the password."""
        import asyncpg

        from asyncpool.connect import tls
        from asyncpool.connect.dsn import dialled
        from asyncpool.connect.failures import setting_sources, translate

        dsn = self.dsn
        error: Exception
        try:
            conn = await asyncpg.connect(self.driver_dsn(dsn), password=dsn.password,
                                         timeout=timeout, statement_cache_size=0,
                                         **self.kwargs())
            if self.hosts is not None:
                self.hosts.finish()
            return conn
        except Exception as exc:
            target = dsn.target()
            hint = (tls.missing_password_hint(self.config, *self._no_password) or None
                    if self._no_password is not None else None)
            error = self.refusal(target) or translate(
                exc, target, name, timeout, hint, secrets=dsn.secrets,
                settings=setting_sources(dsn, None),
                root_cert_source=self.tls.root_cert_source, tls_optional=self.tls.optional,
                dialled=dialled(dsn, service=self.service),
                tried=self.hosts.tries if self.hosts is not None else ())
        raise error  # outside the except block: no __context__ either

    def driver_dsn(self, dsn: ParsedDsn) -> str:
        """`dsn` for asyncpg: rebuilt without the password, and without what the pool reads
        itself (``require_auth``...: asyncpg would send it to the server)."""
        return dsn.for_asyncpg()

    def kwargs(self) -> dict[str, Any]:
        """``ssl`` and, unless the server is verified and every method allowed, a guarded
        ``loop`` for one ``asyncpg.connect`` call (a new guard each call); with several hosts,
        a loop that notes each one's failure in `hosts` (a new log each call)."""
        from asyncpool.connect.dsn import dialled

        out: dict[str, Any] = {"ssl": self.tls.driver_argument()}
        real = asyncio.get_running_loop()
        loop: Any = real
        self.hosts = None
        if len(dialled(self.dsn, service=self.service)) > 1:
            self.hosts = HostLog()
            loop = HostsLoop(loop, self.hosts)
        self.guard = None
        if self.allowed != frozenset(_WHAT) or not self.tls.verified:
            self.guard = AuthGuard(self.allowed, once=not self.tls.verified)
            loop = GuardedLoop(loop, self.guard)
        if loop is not real:
            out["loop"] = loop
        return out

    def libpq_kwargs(self, libpq_version: int | None = None) -> dict[str, Any]:
        """The same rules for a libpq login (psycopg), which enforces them itself: the resolved
        ``sslmode`` and ``sslrootcert``, and ``require_auth`` where not every method is allowed.
        They override what the DSN says (the resolution already read it). `libpq_version`
        (``psycopg.pq.version()``; None: unknown): from 16 on, ``verify-full`` against the
        system CAs is written ``sslrootcert=system``, where libpq would look for
        ``~/.postgresql/root.crt`` and fail (an RDS Proxy's public certificate)."""
        from asyncpool.connect.tls import SYSTEM

        tls = self.tls
        out: dict[str, Any] = {"sslmode": tls.mode}
        if tls.root_cert is not None:
            out["sslrootcert"] = "system" if tls.root_cert == SYSTEM else tls.root_cert
        elif (tls.mode == "verify-full" and tls.context is None and libpq_version is not None
              and libpq_version >= _LIBPQ_SYSTEM_ROOTS):
            out["sslrootcert"] = "system"
        allowed = self.allowed
        if allowed != frozenset(_WHAT):
            # libpq (16+) takes the same names; it reads an empty list as "any method", so
            # nothing allowed is written as every method negated.
            out["require_auth"] = (",".join(sorted(allowed)) if allowed
                                   else ",".join(f"!{m}" for m in sorted(_WHAT)))
        return out

    def refusal(self, target: Target,
                guard: AuthGuard | None = None) -> AuthMethodRefusedError | None:
        """The error for a login the guard stopped, if it refused what the server asked:
        `guard`'s login, or the last call's (a caller with concurrent logins keeps each
        call's `guard`)."""
        guard = self.guard if guard is None else guard
        if guard is None or guard.refused is None:
            return None
        return refusal_error(guard, self.config, target, self.tls, self.require_auth,
                             withheld=self.withheld)
