"""Turn the driver's connect failures into asyncpool errors that say what to fix."""

from __future__ import annotations

import dataclasses
import difflib
import re
import socket
import ssl
from collections.abc import Callable, Iterable, Mapping, Sequence

import asyncpg

from asyncpool.connect.dsn import CONNECTION_KEYWORDS, ParsedDsn, Target, redact, scrub
from asyncpool.connect.hosts import HostTry
from asyncpool.errors import (
    AuthenticationError,
    ConnectError,
    PoolConfigError,
    PoolerExhaustedError,
)

_AUTH_STATES = {"28P01", "28000"}
#: PostgreSQL's refusals of a login for its client certificate (missing, or for another user).
_CLIENT_CERT = re.compile(r"requires a valid client certificate|certificate authentication "
                          r"failed", re.I)


def is_auth_failure(exc: BaseException) -> bool:
    """True when the server refused the credentials (worth a fresh token or secret)."""
    state = getattr(exc, "sqlstate", None)
    text = str(exc).lower()
    if "pg_hba.conf" in text or _CLIENT_CERT.search(text):
        # 28000 too, but no credentials will pass an address/TLS rule, nor replace a client
        # certificate.
        return False
    if state in _AUTH_STATES:
        return True
    # PgBouncer reports a bad SCRAM proof as 08P01 with this text.
    return "password authentication failed" in text or "sasl authentication failed" in text


def translate(  # noqa: PLR0912, PLR0915 - one branch per kind of failure reads best
    exc: BaseException, target: Target, pool_name: str, timeout: float,
    auth_hint: str | None = None, *, secrets: Iterable[str] = (),
    settings: Mapping[str, str] | None = None, direct_tls: str | None = None,
    direct_tls_worked: bool = False, root_cert_source: str | None = None,
    tls_optional: bool = False, own_context: bool = False,
    dialled: Sequence[tuple[str, int]] = (), tried: Sequence[HostTry] = (),
    where: str | None = None,
) -> ConnectError:
    """The asyncpool error for a failed login to `target`.

    It keeps the driver error's class (`driver_error_class`) and SQLSTATE (`sqlstate`) and a
    message with every known secret (`secrets`) scrubbed, but not the driver's error itself: its
    frames hold the connection parameters, password included, and error trackers record frame
    locals. Raise it outside the ``except`` block (or ``from None``) so it has no context either.
    `auth_hint` (from the credentials provider) replaces the generic advice for refused logins.
    `settings`: where each run-time setting sent at login came from (`setting_sources`).
    `direct_tls`: the setting that asked for direct TLS (``sslnegotiation=direct``), if any;
    `direct_tls_worked`: whether a direct TLS login to the target has succeeded (the server
    takes it, so a hang-up in the handshake is the network's).
    `root_cert_source`: where the root certificate the chain was checked against came from.
    `tls_optional`: the ssl mode lets a server without TLS in (``allow``, ``prefer``), so a
    refused TLS request cannot come from PostgreSQL or PgBouncer (they say no, and are used so).
    `own_context`: TLS is the user's own ``ssl.SSLContext``, which may offer no ALPN protocol
    (the pool's and asyncpg's contexts offer the one PostgreSQL 17 needs for direct TLS).
    `dialled`: every host and port the login tried, in order, when there are several: asyncpg
    goes on to the next after a network error and raises the last host's error.
    `tried`: each host's own failure (`asyncpool.connect.hosts.HostLog`), when several were
    dialled: the error then advises on the most telling one, and names every host's.
    `where`: the start of the message (default: the pool and `target`).
    """
    if len(dialled) > 1 and tried:
        def one(failure: BaseException, at: Target, where: str) -> ConnectError:
            return translate(failure, at, pool_name, timeout, auth_hint, secrets=secrets,
                             settings=settings, direct_tls=direct_tls,
                             direct_tls_worked=direct_tls_worked,
                             root_cert_source=root_cert_source, tls_optional=tls_optional,
                             own_context=own_context, where=where)

        return _each_host(exc, target, pool_name, dialled, tried, one=one)
    where = where or f"pool {pool_name!r} could not connect to {target}"
    state = getattr(exc, "sqlstate", None)
    if len(dialled) > 1:
        where, target = _several_hosts(exc, state, target, pool_name, dialled)
    text = scrub(redact(str(exc)), secrets)
    error: ConnectError
    if (unencodable := _unencodable(exc)) is not None:
        # Its message names the character and where it is in the string: the password's.
        error = ConnectError(
            f"{where}: {type(exc).__name__}: the password (or the user name) cannot be encoded "
            f"as UTF-8 ({unencodable.reason}; the character is not shown, it may be the "
            "password's): a lone surrogate is what Python makes of bytes that are not UTF-8 "
            "(os.environ, PGPASSWORD); give the password as text")
        error.transient = False
    elif is_auth_failure(exc):
        error = _refused_login(where, state, text, target.user, auth_hint)
    elif state == "28000" and "pg_hba.conf" in text:
        need_tls = "no encryption" in text
        error = ConnectError(
            f"{where}: the server's pg_hba.conf does not let this connection in ({text}); "
            + ("it requires TLS: set ssl='verify-full' (or 'require')" if need_tls else
               "ask for a pg_hba.conf entry for this user, database and address")
        )
        error.transient = False
    elif _CLIENT_CERT.search(text):
        error = ConnectError(
            f"{where}: the server refused the login for its client certificate ({text}); give "
            "one the server's CA signed, for this user: sslcert/sslkey (PGSSLCERT/PGSSLKEY), or "
            "~/.postgresql/postgresql.crt and postgresql.key"
        )
        error.transient = False
    elif unknown := _UNKNOWN_SETTING.search(text):
        error = _unknown_setting(where, unknown, text, settings)
    elif (limit := connection_limit_advice(text)) is not None:
        # PostgreSQL's 53300, or PgBouncer 1.18 relaying it at login as 08P01.
        error = PoolerExhaustedError(f"{where}: {limit}")
    elif isinstance(exc, asyncpg.TooManyConnectionsError) or state == "53300":
        error = PoolerExhaustedError(
            f"{where}: the server has no connection slots left ({text}); put a pooler in front, "
            "lower max_size, or raise the server's max_connections"
        )
    elif state == "08P01" and "no more connections" in text.lower():
        error = PoolerExhaustedError(
            f"{where}: the pooler refused the login, it has reached max_client_conn ({text}); "
            "raise PgBouncer's max_client_conn or lower the number/size of pools"
        )
    elif (disabled := _DISABLED.search(text)) is not None:
        error = ConnectError(
            f"{where}: PgBouncer takes no new logins to database {disabled['name']!r}: an admin "
            f"ran DISABLE on it ({text}); it takes them again after ENABLE {disabled['name']} "
            "(connections already open still serve)")
        error.transient = False
    elif state == "55000" and "not currently accepting connections" in text:
        error = ConnectError(
            f"{where}: database {target.database!r} does not take connections ({text}): its "
            f"datallowconn is off (ALTER DATABASE {target.database} ALLOW_CONNECTIONS true), "
            "or it is being created or dropped")
        error.transient = False
    elif state == "3D000":
        error = ConnectError(f"{where}: database {target.database!r} does not exist ({text})")
        error.transient = False
    elif state == "57P03":
        error = ConnectError(f"{where}: the server is starting up or shutting down ({text})")
    elif isinstance(exc, TimeoutError):
        error = ConnectError(
            f"{where}: no answer within connect_timeout={timeout:g}s; check host, port and "
            "firewall, or raise connect_timeout"
            + ("" if direct_tls is None or direct_tls_worked else
               f" (direct TLS is asked for by {direct_tls}: a server or pooler that does not "
               "take it may wait for the rest of what it reads as a startup packet, as "
               "PgBouncer 1.24 does; leave sslnegotiation=direct out for it)")
        )
    elif isinstance(exc, socket.gaierror):
        error = ConnectError(f"{where}: unknown host {target.host!r} ({exc.strerror}); check the DSN")
        error.transient = False
    elif isinstance(exc, FileNotFoundError | ConnectionRefusedError) and _is_socket(target):
        error = ConnectError(
            f"{where}: {'no socket' if isinstance(exc, FileNotFoundError) else 'connection refused'}"
            f" at {_socket_path(target)}; is the server running on this machine, and are its "
            f"socket directory (host={target.host}) and port ({target.port}) right? (Debian and "
            "Ubuntu's PostgreSQL: /var/run/postgresql, others: /tmp)"
        )
    elif isinstance(exc, ConnectionRefusedError):
        error = ConnectError(
            f"{where}: connection refused; is the server running and is port {target.port} right?"
        )
    elif isinstance(exc, ssl.SSLCertVerificationError):
        if "mismatch" in str(exc.verify_message).lower():  # host name or IP address
            fix = (
                f"the certificate is not for {target.host!r}: dial the name it was issued for "
                "(the RDS or RDS Proxy endpoint, not an IP or a CNAME of your own)"
            )
        elif exc.verify_code in _OUT_OF_DATE:
            # The CA is the right one: its advice to change ssl_root_cert would mislead.
            fix = (
                "a certificate of the server's chain is outside its validity period: renew it "
                "where the server or pooler is configured (PostgreSQL's ssl_cert_file, "
                "PgBouncer's client_tls_cert_file; RDS: rotate the instance's CA), and check "
                "this machine's clock"
            )
        elif "crl" in str(exc.verify_message).lower() or "revoked" in str(exc.verify_message).lower():
            fix = ("the certificate revocation list (sslcrl / sslcrldir, else "
                   "~/.postgresql/root.crl) revokes it, or lacks a CRL for a CA of its chain "
                   "(every CA's CRL is needed, as libpq checks the whole chain)")
        else:
            fix = "check ssl_root_cert (RDS: the RDS CA bundle; RDS Proxy: the Amazon root CAs)"
            if root_cert_source is not None:
                # ~/.postgresql/root.crt, read without being named, may be another server's CA.
                fix += f"; it was checked against {root_cert_source}"
        error = ConnectError(
            f"{where}: the server's TLS certificate did not verify ({exc.verify_message}); {fix}"
        )
        error.transient = False
    elif _TLS_REQUIRED.search(text) and not isinstance(exc, ssl.SSLError):
        # PgBouncer's refusal (client_tls_sslmode require or verify-*) of a login that did not
        # ask for TLS: only sslmode=disable gets here (allow retries with TLS).
        error = ConnectError(
            f"{where}: the pooler takes only TLS connections ({text}), and this pool's ssl mode "
            "did not ask for TLS: set sslmode=verify-full with sslrootcert= the CA that signed "
            "the pooler's certificate (PgBouncer: client_tls_cert_file)"
        )
        error.transient = False
    elif direct_tls is not None and _not_tls_answer(exc):
        error = ConnectError(
            f"{where}: the server answered the TLS hello of the direct TLS handshake asked for "
            f"by {direct_tls} with something that is not TLS ({text}): it does not take direct "
            f"TLS (a pooler, PgBouncer included, or a server before PostgreSQL 17). {_DIRECT}"
        )
        error.transient = False
    elif direct_tls is not None and _hang_up(exc):
        shown = f"{type(exc).__name__}{': ' + text if text else ''}"
        if direct_tls_worked:
            # The server has taken direct TLS: a passing network fault, retried.
            error = ConnectError(f"{where}: the connection was lost during the direct TLS "
                                 f"handshake ({shown})")
        else:
            # A server before PostgreSQL 17 reads the TLS hello as a startup packet of absurd
            # length and hangs up: the same on every attempt, so not retried. But a close or
            # reset cannot tell it from the network's (it may come after part of a TLS answer):
            # both causes are named, neither asserted.
            error = ConnectError(
                f"{where}: the connection was closed or reset during the direct TLS handshake "
                f"asked for by {direct_tls} ({shown}), and no direct TLS login to this server "
                "has worked yet in this pool, so the cause cannot be told. Either the server "
                "does not take direct TLS (PostgreSQL before 17 hangs up on it, as do poolers "
                f"and servers with ssl off): {_DIRECT} Or the network lost the connection "
                "(the server is PostgreSQL 17 or later with ssl on): try again."
            )
            error.transient = False
    elif "rejected ssl upgrade" in text.lower() and tls_optional:
        # PostgreSQL and PgBouncer answer a TLS request they do not take with "N", which these
        # modes accept: any other answer is from something else.
        error = ConnectError(f"{where}: {_NOT_POSTGRES} ({text}); {_WHICH_PORT}")
        error.transient = False
    elif "rejected ssl upgrade" in text.lower():
        error = ConnectError(
            f"{where}: the server does not accept TLS ({text}); turn ssl on at the server, or "
            "lower the pool's ssl mode if the network is trusted (never with IAM tokens). If "
            f"the port is not PostgreSQL's or a pooler's, the same is seen: {_WHICH_PORT}"
        )
        error.transient = False
    elif _CLOSED_UNANSWERED in text:
        # PostgreSQL and poolers answer the TLS request (or the startup packet) before they
        # close; a port forward or load balancer with nothing behind it closes at once.
        error = ConnectError(
            f"{where}: the connection was closed before anything answered ({text}); nothing "
            "that speaks PostgreSQL is there yet (a port forward, container or load balancer "
            f"with no server behind it, or another service): {_WHICH_PORT}, or wait for the "
            "server to start"
        )
    elif "error response during ssl exchange" in text.lower():
        # asyncpg's words for an ErrorResponse read where the answer to its SSLRequest was due;
        # it drops the server's text. A server that takes no TLS answers "N", not that: a
        # pooler ended the login first, such as PgBouncer's client_login_timeout for a client
        # frozen while it logged in (a Lambda environment frozen during a background login,
        # which reported "TLS failed", not retried, on the thaw).
        error = ConnectError(
            f"{where}: the server or pooler ended the login with an error before TLS was agreed "
            f"({text}); a pooler's login timeout does that (PgBouncer's client_login_timeout: "
            "a process frozen, or stalled, while it logged in)"
        )
    elif (direct_tls is not None and own_context and not direct_tls_worked
          and isinstance(exc, asyncpg.ConnectionDoesNotExistError)):
        # PostgreSQL 17 completes the handshake, then ends a direct TLS connection whose hello
        # offered no ALPN protocol 'postgresql' without a word to the client (its log: "received
        # direct SSL connection request without ALPN protocol negotiation extension"): the same
        # on every attempt, so not retried. A network lost just then looks the same: both named.
        error = ConnectError(
            f"{where}: the server closed the connection right after the direct TLS handshake "
            f"asked for by {direct_tls} ({type(exc).__name__}: {text}), and no direct TLS login "
            "to this server has worked yet in this pool. PostgreSQL 17 does that when the TLS "
            "hello offers no ALPN protocol 'postgresql': the pool's and asyncpg's contexts offer "
            "it, an ssl.SSLContext of yours must too: "
            "context.set_alpn_protocols(['postgresql']). Or the network lost the connection: "
            "try again."
        )
        error.transient = False
    elif isinstance(exc, ssl.SSLError) or "ssl" in text.lower():
        error = ConnectError(f"{where}: TLS failed ({text}); check the ssl mode and CA bundle")
        error.transient = False
    elif isinstance(exc, OSError | asyncpg.InterfaceError | asyncpg.ConnectionDoesNotExistError):
        error = ConnectError(f"{where}: {type(exc).__name__}: {text}")
    elif isinstance(exc, asyncpg.PostgresError):
        error = ConnectError(f"{where}: {type(exc).__name__}: {text}")
        error.transient = False
    else:
        # Neither the network nor the server (asyncpg's InternalClientError for a malformed
        # authentication exchange, a password it cannot encode...): trying again will not help.
        error = ConnectError(f"{where}: {type(exc).__name__}: {text}")
        error.transient = False
    return _keep_facts_of(exc, error)


def _each_host(exc: BaseException, target: Target, pool_name: str,
               dialled: Sequence[tuple[str, int]], tried: Sequence[HostTry], *,
               one: Callable[[BaseException, Target, str], ConnectError]) -> ConnectError:
    """The error for a login to several hosts, each host's failure known: the most telling
    one's advice (a certificate or a refused login over a closed port), then every host's.

    It is retryable (`transient`) when any host's failure is: the host that was down may be up.
    Its SQLSTATE and driver class are the advised failure's."""
    raised = _raised_by(exc, tried)
    failures = [exc if i == raised else t.error for i, t in enumerate(tried)]
    # The most telling failure; among equals, the one asyncpg raised, then the last.
    best = max((i for i, failure in enumerate(failures) if failure is not None),
               key=lambda i: (_telling(failures[i]), i == raised, i))
    chosen, failure = tried[best], failures[best]
    assert failure is not None
    shown = f"{target.user}@{','.join(f'{host}:{port}' for host, port in dialled)}/{target.database}"
    error = one(failure, dataclasses.replace(target, host=chosen.host, port=chosen.port),
                f"pool {pool_name!r} could not connect to {shown}, its hosts tried in turn, "
                f"at {chosen.host}:{chosen.port}")
    roll = [f"{t.host}:{t.port}: {_briefly(failure, t)}" for t, failure in zip(tried, failures,
                                                                                 strict=True)]
    roll += [f"{host}:{port}: not tried" for host, port in dialled[len(tried):]]
    error.args = (f"{error} (each host: {', '.join(roll)})",)
    # The other hosts' failures are translated only for their `transient`, and only until one
    # is (none when the advised one is).
    error.transient = error.transient or any(
        one(other, dataclasses.replace(target, host=t.host, port=t.port), "").transient
        for i, (t, other) in enumerate(zip(tried, failures, strict=True))
        if other is not None and i != best)
    return error


def _raised_by(exc: BaseException, tried: Sequence[HostTry]) -> int:
    """Which host's failure `exc` (asyncpg's) is: asyncpg goes on after an OSError or a
    server's 57P03 and raises the last one it saw (not necessarily the last host's: a later one
    may have logged in and been passed over for target_session_attrs); it stops at any other
    error."""
    if isinstance(exc, OSError):
        for i in range(len(tried) - 1, -1, -1):
            seen = tried[i].error
            if seen is not None and type(seen) is type(exc) and str(seen) == str(exc):
                return i
    elif isinstance(exc, asyncpg.CannotConnectNowError):
        # Answered after the dial, so not seen by the loop: the last host that connected
        # and did not log in.
        for i in range(len(tried) - 1, -1, -1):
            if tried[i].connected and tried[i].error is None and not tried[i].logged_in:
                return i
    # Not seen by the loop (a time limit, a server's answer): the host being dialled.
    return len(tried) - 1


def _telling(exc: BaseException | None) -> int:
    """How much a host's failure says about what to fix: a network one (a closed port, an
    unknown name, no answer) least, a TLS or server failure most."""
    if isinstance(exc, ConnectionRefusedError | socket.gaierror | FileNotFoundError):
        return 0
    if isinstance(exc, TimeoutError):
        return 1
    if isinstance(exc, OSError) and not isinstance(exc, ssl.SSLError):
        return 1 if type(exc) in (OSError, ConnectionError) else 2
    return 3


def _briefly(exc: BaseException | None, tried: HostTry) -> str:
    """A host's failure in a few words (`exc`: None when none is known)."""
    if exc is None and tried.logged_in:
        return "logged in, and was passed over for target_session_attrs"
    if exc is None:
        # asyncpg raises only the last failure it went on after.
        return ("connected, and did not log in (its error is not known: a server starting up, "
                "or the connection lost)")
    for kind, words in _BRIEFLY:
        if isinstance(exc, kind):
            return words
    return "the login was refused" if is_auth_failure(exc) else type(exc).__name__


#: A host's failure in a few words, by class (the first that matches). A time limit's is
#: TimeoutError (asyncio.TimeoutError is the same class from Python 3.11 on), here as throughout.
_BRIEFLY: tuple[tuple[type[BaseException], str], ...] = (
    (ssl.SSLCertVerificationError, "the server's TLS certificate did not verify"),
    (ssl.SSLError, "TLS failed"),
    (TimeoutError, "no answer in time"),
    (ConnectionRefusedError, "connection refused"),
    (socket.gaierror, "unknown host"),
    (FileNotFoundError, "no socket"),
    (asyncpg.CannotConnectNowError, "the server cannot take logins now (57P03: starting up, "
     "shutting down, or a standby without hot_standby)"),
)


def _several_hosts(exc: BaseException, state: object, target: Target, pool_name: str,
                   dialled: Sequence[tuple[str, int]]) -> tuple[str, Target]:
    """The start of the message for a login to several hosts, and the target its advice is
    about: asyncpg goes on to the next host after a network error and raises the last one's,
    but raises a server's answer (a refused password...) from the host that gave it."""
    shown = f"{target.user}@{','.join(f'{host}:{port}' for host, port in dialled)}/{target.database}"
    where = f"pool {pool_name!r} could not connect to {shown}, its hosts tried in turn"
    if state is not None or isinstance(exc, asyncpg.PostgresError):
        return f"{where}, until one answered", target
    if isinstance(exc, TimeoutError):  # (the time is shared: any host's)
        return where, target
    last = dataclasses.replace(target, host=dialled[-1][0], port=dialled[-1][1])
    return f"{where}: each failed, the last ({last.host}:{last.port}) with", last


#: OpenSSL's verify codes for a certificate that has expired or is not valid yet
#: (X509_V_ERR_CERT_NOT_YET_VALID, X509_V_ERR_CERT_HAS_EXPIRED).
_OUT_OF_DATE = frozenset({9, 10})
#: PgBouncer's text when client_tls_sslmode requires TLS and the login did not ask for it.
_TLS_REQUIRED = re.compile(r"\bSSL required\b", re.I)
_NOT_POSTGRES = ("what answered is not PostgreSQL or a pooler: its reply to the TLS request "
                 "was neither yes nor no")
_WHICH_PORT = "check the host and port (PostgreSQL: 5432, PgBouncer: 6432)"
#: asyncpg's text for a connection closed before the first answer (its TLS request's).
_CLOSED_UNANSWERED = "unexpected connection_lost() call"


def _is_socket(target: Target) -> bool:
    """Whether `target` is a Unix-domain socket (asyncpg takes a host that is a path as its
    directory)."""
    return target.host.startswith("/")


def _socket_path(target: Target) -> str:
    """The socket file asyncpg dials for `target` (libpq's name for it)."""
    return f"{target.host.rstrip('/')}/.s.PGSQL.{target.port}"


def _unencodable(exc: BaseException) -> UnicodeEncodeError | None:
    """The error of a login string the driver could not encode, if that is what `exc` comes
    from (asyncpg wraps it in InternalClientError, quoting its message)."""
    seen: BaseException | None = exc
    for _ in range(5):
        if seen is None:
            return None
        if isinstance(seen, UnicodeEncodeError):
            return seen
        seen = seen.__cause__ or seen.__context__
    return None


_DIRECT = ("PostgreSQL accepts direct TLS from version 17 (with the ALPN protocol "
           "'postgresql'): leave sslnegotiation=direct out (or direct_tls) for an older server "
           "or a pooler.")
#: OpenSSL's reasons for a reply to the TLS hello that is no TLS record: a server or pooler
#: speaking the plain protocol answered it (PgBouncer 1.18 with an error message).
_NOT_TLS_REASONS = frozenset({"WRONG_VERSION_NUMBER", "PACKET_LENGTH_TOO_LONG",
                              "UNKNOWN_PROTOCOL"})


def _not_tls_answer(exc: BaseException) -> bool:
    """Whether a direct TLS login failed because the server's answer was not TLS."""
    return isinstance(exc, ssl.SSLError) and exc.reason in _NOT_TLS_REASONS


def _hang_up(exc: BaseException) -> bool:
    """Whether a direct TLS login failed with the server closing the connection in the
    handshake (a close after it is asyncpg's ConnectionDoesNotExistError): a FIN is asyncio's
    ConnectionResetError without an errno (PostgreSQL 15 on loopback), a reset one with it."""
    return isinstance(exc, ConnectionResetError | ConnectionAbortedError | BrokenPipeError
                      | EOFError | ssl.SSLEOFError)


# PostgreSQL's refusal of a run-time setting it does not know (42704), and PgBouncer's of a
# startup parameter it does not pass on (08P01).
_UNKNOWN_SETTING = re.compile(r'unrecognized configuration parameter "(?P<server>[^"]+)"'
                              r"|unsupported startup parameter: (?P<pooler>[^\s,;]+)", re.I)
_DSN = "the DSN's query"
_SERVER_SETTINGS = "server_settings"


def setting_sources(dsn: ParsedDsn | None,
                    server_settings: Mapping[str, str] | None) -> dict[str, str]:
    """Where each run-time setting a login sends came from, by lower-case name: the DSN's query
    (every key asyncpg does not read, which it sends as one) or `server_settings`."""
    sources = {name.lower(): _SERVER_SETTINGS for name in server_settings or {}}
    sources.update((name.lower(), _DSN) for name in (dsn.server_settings if dsn else ()))
    return sources


def refused_transaction_setting(exc: BaseException, pool_name: str,
                                settings: Mapping[str, str],
                                within: str = "pool.transaction()") -> PoolConfigError | None:
    """The error for a run-time setting the server refused in a transaction the pool set it
    in (`within`: ``pool.transaction()``, one SQLAlchemy began), where a pooler's client gets
    the settings it would not keep from the login (`StartupPlan.transaction_sql`); None for any
    other error. Directly, the login refuses such a setting (`translate`); here it was asyncpg's
    bare UndefinedObjectError."""
    if not isinstance(exc, asyncpg.PostgresError):
        return None
    text = str(exc)
    found = _UNKNOWN_SETTING.search(text)
    if found is None or found["server"] is None:
        return None
    where = (f"pool {pool_name!r}, in {within} (where a pooler's client gets the settings "
             "the pooler would not keep from its login)")
    return PoolConfigError(" ".join(_unknown_setting_parts(where, found, text, settings)))


def _unknown_setting(where: str, found: re.Match[str], text: str,
                     settings: Mapping[str, str] | None) -> ConnectError:
    """The error for a login refused over a run-time setting."""
    error = ConnectError(" ".join(_unknown_setting_parts(where, found, text, settings)))
    error.transient = False
    return error


def _unknown_setting_parts(where: str, found: re.Match[str], text: str,
                           settings: Mapping[str, str] | None) -> list[str]:
    """What to say of a run-time setting refused: its name, where it came from, the connection
    keyword it may be a misspelling of, and (PgBouncer) where such a setting goes."""
    name = found["server"] or found["pooler"]
    source = (settings or {}).get(name.lower())
    pooler = found["pooler"] is not None
    if pooler:
        parts = [f"{where}: PgBouncer refused startup parameter {name!r} ({text})."]
    else:
        parts = [f"{where}: the server does not know run-time setting {name!r} ({text})."]
    sent_by_asyncpg = ("every query key that is no connection keyword is a run-time setting, "
                       "as in asyncpg, and planned as server_settings= is")
    if source == _DSN:
        parts.append(f"It came from the DSN's ?{name}=: {sent_by_asyncpg}.")
    elif source == _SERVER_SETTINGS:
        parts.append("It came from server_settings.")
    else:
        parts.append(f"It came from the DSN's query ({sent_by_asyncpg}) or server_settings.")
    close = difflib.get_close_matches(name.lower(), sorted(CONNECTION_KEYWORDS), n=1, cutoff=0.8)
    if name.lower() in CONNECTION_KEYWORDS:
        parts.append(f"{name!r} is a connection keyword, not a server setting: give it in the "
                     "DSN's query instead.")
    elif close:
        parts.append(f"Did you mean ?{close[0]}=? Otherwise fix or remove it.")
    else:
        parts.append("Fix or remove it.")
    if pooler and source == _SERVER_SETTINGS:
        parts.append("Listing it in PgBouncer's ignore_startup_parameters has PgBouncer drop it "
                     "at login; the pool then sets it in each pool.transaction().")
    elif pooler:
        parts.append("A setting the server knows, in server_settings= or the DSN's query, is "
                     "set in each pool.transaction() behind PgBouncer (at login PgBouncer passes on "
                     "only application_name, client_encoding, DateStyle, TimeZone and "
                     "standard_conforming_strings; one listed in its ignore_startup_parameters "
                     "is dropped).")
    return parts


#: PgBouncer's refusal of a login to a database an admin ran DISABLE on.
_DISABLED = re.compile(r'database "(?P<name>[^"]+)" is disabled')
#: PostgreSQL's refusal of a login past a role's or a database's own CONNECTION LIMIT (53300,
#: as for max_connections, whose advice does not help here).
_OWN_LIMIT = re.compile(r'too many connections for (?P<kind>role|database) "(?P<name>[^"]+)"', re.I)


def connection_limit_advice(text: str, *, quote: bool = True) -> str | None:
    """What to do about a login refused over a role's or a database's CONNECTION LIMIT, named
    in `text` (PostgreSQL's message, or PgBouncer's that carries it; quoted if `quote`); None
    for any other."""
    found = _OWN_LIMIT.search(text)
    if found is None:
        return None
    kind, name = found["kind"].lower(), found["name"]
    return (
        f"{kind} {name!r} has reached its own connection limit{f' ({text})' if quote else ''}, "
        "below the server's "
        f"max_connections: every session of the {kind} counts, a pooler's server connections "
        f"included. Raise it (ALTER {kind.upper()} {name} CONNECTION LIMIT n; -1 for none), or "
        "lower max_size, the number of pools, or the pooler's pool size for it"
    )


def _refused_login(where: str, state: object, text: str, user: str,
                   auth_hint: str | None) -> AuthenticationError:
    """The error for a refused login, with advice for its cause."""
    if state == "28000" and "does not exist" in text:
        # Past a rule that asks for no password (trust, peer, cert) PostgreSQL names the cause;
        # a password or token is not it, so the provider's advice does not apply.
        return AuthenticationError(
            f"{where}: the server has no role {user!r} ({text}); fix the user name in the DSN or "
            "settings, or create the role (CREATE ROLE ... LOGIN)"
        )
    if state == "28000" and "not permitted to log in" in text:
        return AuthenticationError(
            f"{where}: role {user!r} exists but may not log in ({text}); give it LOGIN "
            "(ALTER ROLE ... LOGIN) or connect as a role that has it"
        )
    return AuthenticationError(
        f"{where}: authentication failed for user {user!r} ({text}); "
        + (auth_hint or "check the password or credentials provider, and the user name (a "
           "server that asks for a password refuses an unknown user the same way)")
    )


def _keep_facts_of(exc: BaseException, error: ConnectError) -> ConnectError:
    """Copy the driver error's SQLSTATE and class into `error`, and chain nothing to it."""
    state = getattr(exc, "sqlstate", None)
    error.sqlstate = state if isinstance(state, str) else None
    error.driver_error_class = f"{type(exc).__module__}.{type(exc).__qualname__}"
    error.__cause__ = None
    error.__suppress_context__ = True
    return error


# Why PgBouncer closed a client connection, by the text it sends before closing (1.18 to 1.24;
# not always its setting's name), and what to do.
_POOLER_CLOSE_REASONS = {
    "query_wait_timeout": "PgBouncer found no free server connection within its "
    "query_wait_timeout: its server pool is saturated; shorten transactions, raise "
    "default_pool_size (within PostgreSQL's max_connections), or lower the number of clients",
    # query_timeout's words for a transaction still waiting for a server connection (one that
    # has a server and runs too long gets "query timeout", below).
    "query_timeout": "PgBouncer's query_timeout ran out while this transaction waited for a free "
    "server connection (its server pool was saturated), so nothing of it reached the server; "
    "shorten transactions, raise default_pool_size (within PostgreSQL's max_connections), or "
    "raise query_timeout",
    "server_login_retry": "PgBouncer cannot log in to PostgreSQL (down, restarting or refusing "
    "it) and turns clients away for server_login_retry seconds after each failed login",
    "idle transaction timeout": "a transaction sat idle longer than PgBouncer's "
    "idle_transaction_timeout; do not wait on other work inside a transaction",
    "query timeout": "a query ran longer than PgBouncer's query_timeout (it may have completed "
    "on the server, a write committed); shorten it or raise query_timeout",
    # PgBouncer's kill_pool(): admin KILL, or the database gone from [databases] at RELOAD.
    "database removed": "PgBouncer closed every connection to this database: an admin ran KILL "
    "on it (new logins then wait until RESUME), or RELOAD found it removed from PgBouncer's "
    "[databases] (new logins fail until it is back); a statement under way may have completed "
    "on the server. Check the pooler's SHOW DATABASES, then retry",
    # SUSPEND (an admin's, or an online restart, ``pgbouncer -R``) waits for every socket's
    # buffer to empty; one still holding data (a statement half forwarded, a result the client
    # had not read) when suspend_timeout (10 s by default) runs out is closed with these words.
    "suspend_timeout": "PgBouncer was suspended (an admin's SUSPEND, or an online restart with "
    "-R) while this connection had data in flight, and closed it when its suspend_timeout ran "
    "out; the statement may or may not have reached the server. Retry once PgBouncer is resumed "
    "or restarted; check its log for SUSPEND",
    # PgBouncer 1.24's KILL_CLIENT <id>.
    "admin forced disconnect": "a PgBouncer admin disconnected this client (KILL_CLIENT); a "
    "statement under way may have completed on the server",
    # PgBouncer gives a client's session parameters (application_name, client_encoding,
    # DateStyle, TimeZone, standard_conforming_strings, and 1.20+'s track_extra_parameters) to
    # the server connection it links the client to with a SET, before it forwards anything; an
    # error to that SET closes the client. PgBouncer accepts any value at login, so a typo there
    # fails here, on every transaction; a pg_cancel_backend that lands on the SET does too.
    "invalid server parameter": "PgBouncer could not give this connection's session parameters "
    "(server_settings or the DSN's application_name, client_encoding, DateStyle, TimeZone...) to "
    "the server connection it picked: PostgreSQL refused a value PgBouncer had accepted at login "
    "(check server_settings: PgBouncer's log names the parameter), or the SET was cancelled "
    "(pg_cancel_backend); nothing of this transaction reached the server",
    # PgBouncer 1.23+'s safe shutdown (SHUTDOWN WAIT_FOR_SERVERS, SIGINT): transactions under way
    # finish, and a client that needs a server connection for a new one is closed with these
    # words before anything is sent.
    "server shutting down": "PgBouncer is shutting down (SHUTDOWN WAIT_FOR_SERVERS, or SIGINT: a "
    "restart or a deploy): it lets transactions under way finish but starts no new one, so this "
    "one did not reach the server; retry once PgBouncer, or whatever replaces it, takes logins "
    "again (its address may be another: check the DSN)",
    # PgBouncer's words when the server connection it gave this client closed under it.
    "server conn crashed?": "PostgreSQL ended the server connection PgBouncer was using for "
    "this client (pg_terminate_backend, a server-side limit such as "
    "idle_in_transaction_session_timeout, the database dropped, or PostgreSQL crashed or "
    "restarted); a statement under way may have completed on the server. PostgreSQL's log says "
    "which",
}


# How a driver call fails when its connection breaks under it: the socket's errors, asyncpg's
# "connection closed in the middle of operation", a pooler's or server's closing error (08xxx),
# a server shutting down (57P0x).
_CONNECTION_FAILURES = (OSError, asyncpg.InterfaceError, asyncpg.PostgresConnectionError,
                        asyncpg.exceptions.OperatorInterventionError,
                        asyncpg.exceptions.InternalClientError)


def broken_connection_error(exc: BaseException) -> bool:
    """Whether `exc` is what a statement raises when its connection breaks: not the holder's
    own exception, nor a time limit (TimeoutError is an OSError, and a timed-out statement's
    connection may be closed on purpose), which pass through unchanged."""
    return isinstance(exc, _CONNECTION_FAILURES) and not isinstance(exc, TimeoutError)


def protocol_out_of_step(exc: BaseException) -> bool:
    """Whether `exc` is asyncpg refusing a statement because its protocol is out of step with
    the server (it read a message it had not asked for: the FATAL error a server or pooler sends
    an idle connection before closing it), so that the connection refuses every statement from
    now on. Not its other InternalClientErrors: a value without a decoder (an enum inside an
    anonymous record) leaves the connection working."""
    return (isinstance(exc, asyncpg.InternalClientError)
            and str(exc).startswith(_OUT_OF_STEP))


#: How asyncpg's protocol state machine (coreproto ``_set_state``) refuses to switch state.
_OUT_OF_STEP = "cannot switch to state "


def dropped_transport_error(exc: Exception, conn: object) -> Exception:
    """`exc` as a COPY method or a cursor step of asyncpg's raised it, or, when its connection
    was closed under it (released or terminated from another task, the pool's ``terminate()``,
    ``close()`` past its timeout, a leak reclaim, a lost network), the error asyncpg's other
    statements raise then: asyncpg's COPY goes on writing to (or resuming) the transport its
    protocol has dropped, and a cursor whose last rows came in as it closed asks the dropped
    protocol whether it is in a transaction; both fail with an ``AttributeError`` (``'NoneType'
    object has no attribute 'write'``, ``'is_in_transaction'``) that says nothing of the
    connection, and that the pool's own error for it (`stopped_by_pool`, the lost connection's)
    did not replace."""
    if isinstance(exc, AttributeError) and conn.is_closed():  # type: ignore[attr-defined]
        return asyncpg.ConnectionDoesNotExistError(
            "connection was closed in the middle of operation")
    return exc


def stopped_by_pool(exc: BaseException) -> bool:
    """Whether `exc` is what a statement raises when the pool stops it (``close()`` past its
    timeout, ``terminate()``, a leak reclaim): its connection closed under it, or the server
    cancelled it at the pool's cancel request. Asked only once the pool has taken the lease."""
    return broken_connection_error(exc) or isinstance(exc, asyncpg.QueryCanceledError)


#: asyncpg's refusals of a statement on a connection already closed (`InterfaceError`, nothing
#: sent): the connection's, and its protocol's. A pooler's or server's reason for closing an
#: idle connection is not kept by asyncpg.
_CLOSED_BEFORE = frozenset(("connection is closed", "cannot perform operation: connection is closed"))
_CLOSED_BEFORE_HINT = (
    " It was closed before this statement was sent, so the statement did not run: by the pooler "
    "or server between statements (inside a transaction, likely PgBouncer's "
    "idle_transaction_timeout or PostgreSQL's idle_in_transaction_session_timeout: do not wait "
    "on other work inside a transaction), or by a terminated backend, a restart or the network."
)


#: asyncpg refused the statement because it had read a message it had not asked for: the
#: FATAL error a server or pooler sends an idle connection as it ends it (asyncpg drops its
#: text), read before the close.
_GOODBYE_READ_HINT = (
    " The server or pooler ended this connection while it sat idle between statements, and its "
    "goodbye (an error asyncpg does not keep) was read before the close, so this statement was "
    "not sent: PgBouncer's KILL, client_idle_timeout, idle_transaction_timeout or shutdown, or "
    "PostgreSQL's pg_terminate_backend, idle_session_timeout, "
    "idle_in_transaction_session_timeout or a restart (the server's or pooler's log says which)."
)


def lost_connection_hint(exc: BaseException) -> str:
    """What a pooler's reason for closing a connection in use means (" ..." or "")."""
    text = str(exc)
    for reason, hint in _POOLER_CLOSE_REASONS.items():
        if reason in text:
            limit = connection_limit_advice(text, quote=False)
            return f" {hint[0].upper()}{hint[1:]}." + (f" Here the {limit}." if limit else "")
    if protocol_out_of_step(exc):
        return _GOODBYE_READ_HINT
    closed_before = isinstance(exc, asyncpg.InterfaceError) and text in _CLOSED_BEFORE
    return _CLOSED_BEFORE_HINT if closed_before else ""


# asyncpg's errors for a prepared statement the server connection does not have (or has twice):
# what a transaction pooler does to named statements it does not track.
_PREPARED_STATEMENT_ERRORS = (asyncpg.InvalidSQLStatementNameError,
                              asyncpg.DuplicatePreparedStatementError)


def advise_on_prepared_statements(exc: BaseException, mode: str) -> None:
    """Replace asyncpg's hint on a lost prepared statement (which tells users to drop PgBouncer
    for asyncpg's pool, or to set statement_cache_size) with what to do with asyncpool."""
    if not isinstance(exc, _PREPARED_STATEMENT_ERRORS) or "asyncpool:" in (exc.hint or ""):
        return
    # asyncpg appends its note to the server's own hint, which stays.
    server_hint = (exc.hint or "").split("NOTE: pgbouncer with pool_mode", 1)[0].strip()
    if mode == "on":
        advice = (
            'asyncpool: prepared_statements="on" keeps named prepared statements on each server '
            "connection. Behind PgBouncer in transaction mode that needs PgBouncer 1.21 or later "
            "with max_prepared_statements > 0; behind an older PgBouncer (or with "
            'max_prepared_statements = 0) use prepared_statements="unnamed", the default (one '
            'round trip per repeated statement, nothing kept on the server), or "off".'
        )
    else:
        advice = (
            "asyncpool: a statement made with prepare() lives on one server connection, and a "
            "transaction pooler gives each transaction whichever is free: behind one, use it only "
            "inside the transaction that prepared it (async with conn.transaction()), or run the "
            f'query itself (prepared_statements="{mode}" prepares nothing that outlives it).'
        )
    exc.hint = f"{server_hint}\n{advice}" if server_hint else advice
