"""Reading and redacting PostgreSQL connection strings.

A DSN is parsed once, here, by a guard that never quotes what it reads: its errors say what is
wrong and how to write it, never which characters were there (a DSN's user info holds a password,
and a typo in it is exactly when a parser would quote it). A DSN is shown only as rebuilt from its
parsed parts, with the password replaced (`ParsedDsn.redacted`), and the driver is given a DSN
rebuilt the same way, without the password (it gets that as a keyword), so asyncpg, libpq and
asyncpool cannot read one string three ways.

Rejected, with advice to percent-encode: a character that ends the user info early (``/ ? # @``,
so ``postgresql://app:42/SECRET@host/db`` is not host "app", port 42), a second ``@``, spaces,
control and non-ASCII characters (the fullwidth at sign and solidus included), a ``%`` not followed by two
hex digits, a ``+`` in the query (a space to asyncpg, a plus to libpq), a query field without
``=``, and a setting given twice (asyncpg reads the last ``?host=``, a first-wins reader the first;
the address and ``?host=`` at once, too).
"""

from __future__ import annotations

import dataclasses
import difflib
import getpass
import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import TYPE_CHECKING, Any
from urllib.parse import quote, unquote_to_bytes

from asyncpool.connect.addresses import login_addresses
from asyncpool.connect.conninfo import ConninfoSyntaxError, is_conninfo, split_conninfo
from asyncpool.connect.service import ASYNCPG_SERVICE_KEYS
from asyncpool.errors import PoolConfigError

if TYPE_CHECKING:
    from asyncpool.connect.service import Service

_SCHEMES = ("postgresql", "postgres")
#: libpq's connection keywords that asyncpg does not read. asyncpg sends every query key it does
#: not read to the server as a run-time setting, which fails the login ("unrecognized
#: configuration parameter"), so the pool reads these itself (None: `POOL_READ_KEYS`) or refuses
#: them at config time with what to use instead (asyncpool.config).
LIBPQ_ONLY: Mapping[str, str | None] = MappingProxyType({
    "connect_timeout": None,  # the pool's connect_timeout (asyncpool.config)
    "require_auth": None, "channel_binding": None, "sslcrldir": None,  # asyncpool.connect.tls
    "hostaddr": None,  # refused by asyncpool.connect.tls, with its own advice
    # (Not tcp_user_timeout: a server setting of that name exists, and asyncpg sends it as one.)
    **dict.fromkeys(
        ("keepalives", "keepalives_idle", "keepalives_interval", "keepalives_count"),
        "asyncpg sets no TCP keepalives: a connection that died while idle is found by the "
        "pool's check before use (validate_after), one that dies under a query by "
        "command_timeout; leave it out"),
    "fallback_application_name": "write application_name= instead",
    "gssencmode": "asyncpg does no GSSAPI encryption (TLS is set with sslmode); leave it out",
    "sslcompression": "no TLS compression is done (libpq ignores it since PostgreSQL 14); "
                      "leave it out",
    "sslcertmode": "asyncpg sends the client certificate when sslcert/sslkey are given; leave "
                   "it out (and those out to send none)",
    "sslsni": "asyncpg always sends the host name (SNI) in the TLS handshake; leave it out",
    "sslkeylogfile": "asyncpg writes no TLS key log; leave it out",
    "requirepeer": "asyncpg cannot check the peer of a Unix socket; leave it out",
    "gssdelegation": "asyncpg does not delegate GSS credentials; leave it out",
    "load_balance_hosts": "asyncpg tries the hosts in the order given; leave it out (and order "
                          "the hosts)",
    "replication": "the pool opens no replication connections; leave it out",
    **dict.fromkeys(("min_protocol_version", "max_protocol_version"),
                    "asyncpg speaks protocol 3.0 only; leave it out"),
    **dict.fromkeys(("oauth_issuer", "oauth_client_id", "oauth_client_secret", "oauth_scope"),
                    "asyncpg has no OAuth login; leave it out (a token provider goes in "
                    "credentials=)"),
})
#: libpq keywords asyncpg does not know that the pool reads itself: left out of what asyncpg gets.
POOL_READ_KEYS = frozenset(key for key, advice in LIBPQ_ONLY.items() if advice is None)
#: Values of other `LIBPQ_ONLY` keywords that ask for what asyncpg does anyway (mostly libpq's
#: defaults, which DSNs copied from libpq's tools carry): taken, and left out of what asyncpg
#: gets. Any other value asks for something asyncpg cannot do, and is refused.
ASYNCPG_DOES_ALREADY: Mapping[str, frozenset[str]] = MappingProxyType({
    "gssencmode": frozenset({"disable", "prefer"}),
    "sslcompression": frozenset({"0", "1"}),  # libpq itself ignores it since PostgreSQL 14
    "sslsni": frozenset({"1"}),
    "keepalives": frozenset({"0"}),
    "sslcertmode": frozenset({"allow"}),
    "load_balance_hosts": frozenset({"disable"}),
    "replication": frozenset({"0", "false", "off", "no"}),
    "min_protocol_version": frozenset({"3.0"}),
    "max_protocol_version": frozenset({"3.0"}),
})

#: The connection keywords asyncpg reads in a DSN's query (as in a service's section, and the
#: service itself); any other key it sends to the server as a run-time setting.
ASYNCPG_KEYS = frozenset({*ASYNCPG_SERVICE_KEYS, "service"})
#: Every connection keyword a DSN's query may hold; any other key is a server setting. (libpq
#: sends the last three at login as startup parameters, as asyncpg sends a server setting.)
CONNECTION_KEYWORDS = ASYNCPG_KEYS | LIBPQ_ONLY.keys() | {"application_name", "options",
                                                         "client_encoding"}
#: Query keys whose values are secrets: held, given to the driver, never shown.
SECRET_KEYS = frozenset({"password", "sslpassword"})
_SETTING_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_.]*$")
_BAD_PERCENT = re.compile(r"%(?![0-9A-Fa-f]{2})")
_PORT = re.compile(r"^[0-9]{1,5}$")
_ENCODE_ADVICE = (
    "percent-encode the password (and names) with urllib.parse.quote(text, safe=''): / is %2F, "
    "@ %40, # %23, ? %3F, % %25, & %26, + %2B, [ %5B, ] %5D, a space %20"
)
_NOT_SHOWN = "(the DSN is not shown: it may hold a password)"
_UNPARSEABLE = "<DSN not shown: it could not be parsed>"

# For free text (a driver's or a tool's message): user:password@ in a URL up to the last @ on
# the line, password=... in a key/value string or query, and an IAM token's signing parts.
_URL_PASSWORD = re.compile(r"(?P<pre>://[^:/@\s]*:)(?P<secret>[^\n]*)(?P<post>@)")
_KV_PASSWORD = re.compile(
    r"(?P<pre>\b(?:ssl)?password\s*=\s*)(?P<secret>'(?:[^'\\]|\\.)*'|(?:\\.|[^\s&\\])+)", re.I
)
_SIGV4 = re.compile(
    r"(?P<pre>X-Amz-(?:Signature|Security-Token|Credential)=)(?P<secret>[^&\s'\"]+)", re.I
)
#: The shortest piece of a secret that `scrub` hides wherever it appears.
FRAGMENT = 4


#: PostgreSQL's settings as close to a connection keyword as a misspelling (checked against
#: pg_settings of PostgreSQL 15, and the settings added up to 18): never taken for one.
SETTINGS_NEAR_KEYWORDS = frozenset({
    "ssl_crl_dir", "ssl_key_file", "tcp_keepalives_count", "tcp_keepalives_idle",
    "tcp_keepalives_interval", "wal_compression",
})


def misspelt_keyword(key: str) -> str | None:
    """The connection keyword a DSN's query key is a likely misspelling of (``sslmod``:
    ``sslmode``), or None: a keyword, one of PostgreSQL's settings, or nothing close."""
    if key in CONNECTION_KEYWORDS or key.lower() in SETTINGS_NEAR_KEYWORDS:
        return None
    close = difflib.get_close_matches(key.lower(), sorted(CONNECTION_KEYWORDS), n=1, cutoff=0.8)
    return close[0] if close else None


def left_to_the_pool(key: str, value: str) -> bool:
    """Whether a DSN's query key is the pool's to read or drop, not asyncpg's to send."""
    return key in POOL_READ_KEYS or value.strip().lower() in ASYNCPG_DOES_ALREADY.get(key, ())


class DsnError(PoolConfigError):
    """A DSN asyncpool will not read. The message says why, never what the DSN holds."""


class _Invalid(Exception):
    """Raised inside the parser; turned into `DsnError` in a frame that holds no DSN."""


def redact(text: str) -> str:
    """`text` with every DSN password and IAM token signature replaced by `***`.

    For free text only (a driver's message); a DSN itself is shown with `redact_dsn`.
    """
    text = _URL_PASSWORD.sub(lambda m: f"{m['pre']}***{m['post']}", text)
    text = _KV_PASSWORD.sub(lambda m: f"{m['pre']}***", text)
    return _SIGV4.sub(lambda m: f"{m['pre']}***", text)


def scrub(text: str, secrets: Iterable[str | None]) -> str:
    """`text` with every piece of `FRAGMENT` or more characters of any of `secrets` replaced by
    ``***`` (a message that quotes part of a password shows none of it)."""
    grams: set[str] = set()
    for secret in secrets:
        if secret and len(secret) >= FRAGMENT:
            grams.update(secret[i : i + FRAGMENT] for i in range(len(secret) - FRAGMENT + 1))
    if not grams or len(text) < FRAGMENT:
        return text
    hidden = [False] * len(text)
    for i in range(len(text) - FRAGMENT + 1):
        if text[i : i + FRAGMENT] in grams:
            for j in range(i, i + FRAGMENT):
                hidden[j] = True
    if not any(hidden):
        return text
    out: list[str] = []
    for i, ch in enumerate(text):
        if not hidden[i]:
            out.append(ch)
        elif i == 0 or not hidden[i - 1]:
            out.append("***")
    return "".join(out)


@dataclass(frozen=True)
class Target:
    """Where a connection goes: what a credentials provider signs a token for."""

    host: str
    port: int
    user: str
    database: str

    def __str__(self) -> str:
        return f"{self.user}@{self.host}:{self.port}/{self.database}"


@dataclass(frozen=True)
class ParsedDsn:
    """A DSN's parts, decoded. `password` and secret query values never show in its repr."""

    scheme: str
    user: str | None
    password: str | None = field(repr=False)
    #: (host, port) pairs in order; host "" means the default (a local socket or localhost).
    hosts: tuple[tuple[str, int | None], ...]
    database: str | None
    #: Query parameters, decoded, without ``password``; `SECRET_KEYS` values are never shown.
    params: Mapping[str, str] = field(repr=False)

    def __repr__(self) -> str:
        return f"ParsedDsn({self.redacted()!r})"

    def __str__(self) -> str:
        return ParsedDsn.__repr__(self)

    @property
    def secrets(self) -> tuple[str, ...]:
        """Every secret the DSN holds (to scrub from messages)."""
        values = [self.password] + [self.params.get(k) for k in SECRET_KEYS]
        return tuple(v for v in values if v)

    def redacted(self) -> str:
        """The DSN rebuilt from its parts, every secret written as ``***``."""
        return self._build(hide=True)

    def for_driver(self) -> str:
        """The DSN rebuilt, encoded the one way asyncpg and libpq both read, without the
        password (pass that as a keyword)."""
        return self._build(hide=False)

    def for_asyncpg(self) -> str:
        """`for_driver` with only the connection keywords asyncpg reads: not the ones that are
        the pool's to read or drop (`left_to_the_pool`), nor the run-time settings
        (`setting_values`), which the pool gives asyncpg as ``server_settings`` where they can
        hold (asyncpool.connect.startup), as it does the ``server_settings=`` option's."""
        params = {k: v for k, v in self.params.items()
                  if k in ASYNCPG_KEYS and not left_to_the_pool(k, v)}
        if len(params) == len(self.params):
            return self.for_driver()
        return dataclasses.replace(self, params=MappingProxyType(params)).for_driver()

    @property
    def server_settings(self) -> tuple[str, ...]:
        """The query keys that are run-time settings (asyncpg would send them at login)."""
        return tuple(self.setting_values())

    def setting_values(self) -> dict[str, str]:
        """The run-time settings in the query (``?search_path=app``), by name: every key that
        is not a connection keyword asyncpg reads or the pool's (asyncpg would send each to the
        server at login, as libpq refuses them). One with an empty value (``?search_path=``) is
        none: asyncpg drops every empty query value, so it never reached the server."""
        return {k: v for k, v in self.params.items()
                if v and k not in ASYNCPG_KEYS and not left_to_the_pool(k, v)}

    def _build(self, *, hide: bool) -> str:
        """hide: every secret as ``***``; otherwise the password left out, the rest encoded."""
        userinfo = ""
        if self.user is not None:
            userinfo = _encode(self.user)
        if hide and self.password:
            userinfo += ":***"
        if userinfo:
            userinfo += "@"
        hosts = ",".join(
            (f"[{h}]" if ":" in h else _encode(h)) + (f":{p}" if p is not None else "")
            for h, p in self.hosts
        )
        path = "/" + _encode(self.database) if self.database is not None else ""
        fields = []
        for key, value in self.params.items():
            shown = "***" if hide and key in SECRET_KEYS else _encode(value)
            fields.append(f"{_encode(key)}={shown}")
        query = "?" + "&".join(fields) if fields else ""
        return f"{self.scheme}://{userinfo}{hosts}{path}{query}"

    def target(self, *, host: Any = None, port: Any = None, user: str | None = None,
               database: str | None = None, environ: Mapping[str, str] | None = None,
               service: Service | None = None) -> Target:
        """The first host, port, user and database, with explicit options winning.

        What the DSN and the options leave out comes from the connection `service`, then from
        libpq's variables (PGHOST, PGPORT, PGUSER, PGDATABASE), as asyncpg reads them, then
        libpq's defaults: port 5432, the operating system's user name, database = user.
        """
        env = os.environ if environ is None else environ
        try:
            # The first address asyncpg dials ("" is its default: a local socket, then localhost).
            host, port = login_addresses(host=host, port=port, dsn_hosts=self.hosts,
                                         service=service, env=env)[0]
        except ValueError as exc:
            _env_port(env)  # (a PGPORT that is no number says so)
            raise DsnError(
                f"the hosts and ports cannot be paired as asyncpg pairs them ({exc}), and it "
                "would fail every login: give one port, or one per host") from None
        host = host or "localhost"
        port = int(port or 5432)
        s_user = service.user if service is not None else None
        s_database = service.database if service is not None else None
        user = user or self.user or s_user or env.get("PGUSER") or _os_user()
        database = database or self.database or s_database or env.get("PGDATABASE") or user
        return Target(host=host, port=port, user=user, database=database)


def dialled(dsn: ParsedDsn | None, *, host: Any = None, port: Any = None,
            service: Service | None = None,
            environ: Mapping[str, str] | None = None) -> tuple[tuple[str, int], ...]:
    """The host and port of each address a login tries (`login_addresses`: asyncpg's order and
    pairing), the default host shown as localhost. Empty when the ports pair with no host list."""
    try:
        pairs = login_addresses(host=host, port=port, dsn_hosts=dsn.hosts if dsn else None,
                                service=service, env=os.environ if environ is None else environ)
    except ValueError:
        return ()
    return tuple((h or "localhost", p) for h, p in pairs)


def parse_dsn(dsn: str) -> ParsedDsn:
    """`dsn` checked and decoded; `DsnError` (never quoting it) when it is not a DSN asyncpool
    reads one way only."""
    try:
        return _parse(dsn)
    except _Invalid as exc:
        reason = str(exc)
    # Raised from a frame that no longer holds the DSN: error trackers record frame locals.
    del dsn
    raise DsnError(f"the DSN cannot be used: {reason} {_NOT_SHOWN}")


def redact_dsn(dsn: str | None) -> str:
    """`dsn` rebuilt from its parsed parts with its secrets as ``***`` (or a placeholder)."""
    if dsn is None:
        return "None"
    try:
        return parse_dsn(dsn).redacted()
    except DsnError:
        return _UNPARSEABLE


def _env_port(env: Mapping[str, str]) -> int | None:
    text = env.get("PGPORT", "").split(",")[0].strip()
    if not text:
        return None
    if not text.isdigit():
        raise DsnError(f"PGPORT={env.get('PGPORT')!r} is not a port number")
    return int(text)


def _os_user() -> str:
    try:
        return getpass.getuser()
    except Exception:  # no user name (a container without a passwd entry)
        return "postgres"


def parse_target(dsn: str | None, *, host: Any = None, port: Any = None,
                 user: str | None = None, database: str | None = None) -> Target:
    """The first host, port, user and database a DSN (plus explicit options) names."""
    parsed = parse_dsn(dsn) if dsn else _EMPTY
    return parsed.target(host=host, port=port, user=user, database=database)


def dsn_password(dsn: str | None) -> str | None:
    """The password written in the DSN (user info or ``?password=``), if any."""
    return parse_dsn(dsn).password if dsn else None


def _encode(text: str) -> str:
    return quote(text, safe="")


def _decode(text: str, what: str) -> str:
    try:
        return unquote_to_bytes(text).decode("utf-8")
    except UnicodeDecodeError:
        raise _Invalid(
            f"the {what} has percent-encoded bytes that are not UTF-8; encode the text as UTF-8"
        ) from None


def _parse(dsn: str) -> ParsedDsn:
    if not isinstance(dsn, str):
        raise _Invalid(f"a DSN is a string, not {type(dsn).__name__}")
    if is_conninfo(dsn):
        return _parse_conninfo(dsn)
    scheme, sep, rest = dsn.partition("://")
    if not sep or scheme.lower() not in _SCHEMES:
        shown = f" (scheme {scheme!r})" if sep and scheme.isalnum() and len(scheme) < 20 else ""
        raise _Invalid(
            f"it is not a postgresql:// URL{shown}: write it as postgresql://user:"
            "password@host:port/database, or as libpq's key=value string: host=... dbname=..."
        )
    if any(ch.isspace() or not ch.isprintable() or ord(ch) > 127 for ch in rest):
        raise _Invalid(
            "it holds a space, a line break, a control or a non-ASCII character (the "
            f"fullwidth forms of @ and / included): {_ENCODE_ADVICE}"
        )
    if "#" in rest:
        raise _Invalid(f"it holds a # (a DSN has no fragment): {_ENCODE_ADVICE}")
    if _BAD_PERCENT.search(rest):
        raise _Invalid(f"it holds a % not followed by two hex digits: {_ENCODE_ADVICE}")
    end = min((i for i in (rest.find("/"), rest.find("?")) if i >= 0), default=len(rest))
    authority, tail = rest[:end], rest[end:]
    if "@" in tail or authority.count("@") > 1:
        raise _Invalid(
            "an @ appears after the user info ends (or twice): the password (or user name) "
            "holds a character that ends it early, one of / ? # @, which would make part of it "
            f"the host, port or database; {_ENCODE_ADVICE}"
        )
    user = password = None
    if "@" in authority:
        userinfo, _, hostspec = authority.partition("@")
        if "[" in userinfo or "]" in userinfo:
            # urllib (so asyncpg) takes a bracket there for an IPv6 address and fails.
            raise _Invalid(f"the user info holds a [ or ]: {_ENCODE_ADVICE}")
        raw_user, colon, raw_password = userinfo.partition(":")
        user = _decode(raw_user, "user name") or None
        password = (_decode(raw_password, "password") or None) if colon else None
    else:
        hostspec = authority
    hosts = _hosts(hostspec)
    path, _, query = tail.partition("?")
    database = _decode(path[1:], "database name") or None if path else None
    params = _query(query)
    database = _take_database(database, params)
    user = _take(user, params, "user", "user")
    password = _take(password, params, "password", "password")
    hosts = _take_hosts(hosts, params)
    return ParsedDsn(scheme.lower(), user, password, hosts, database, MappingProxyType(params))


def _parse_conninfo(text: str) -> ParsedDsn:
    """A libpq ``key=value`` string read into the parts a URL has: its keywords are the query
    keys a URL may hold, checked the same way."""
    try:
        pairs = split_conninfo(text)
    except ConninfoSyntaxError as exc:
        raise _Invalid(f"it is not a key=value string as libpq reads it: {exc}") from None
    # requiressl: libpq's old spelling of sslmode, which it still reads so.
    fields: list[tuple[str, str | None]] = [
        ("sslmode", "require" if value.startswith("1") else "prefer") if key == "requiressl"
        else (key, value) for key, value in pairs]
    params = _checked_params(fields, "it", "keyword", _CONNINFO_SPLITS, repeats=True)
    database = _take_database(None, params)
    user = _take(None, params, "user", "user")
    password = _take(None, params, "password", "password")
    hosts = _take_hosts((), params)
    return ParsedDsn("postgresql", user, password, hosts, database, MappingProxyType(params))


def _hosts(hostspec: str) -> tuple[tuple[str, int | None], ...]:
    if not hostspec:
        return ()
    hosts: list[tuple[str, int | None]] = []
    for item in hostspec.split(","):
        if item.startswith("["):
            host, bracket, after = item[1:].partition("]")
            if not bracket or (after and not after.startswith(":")):
                raise _Invalid("an IPv6 address in it is not written [address]:port")
            raw_port = after[1:] if after else None
        else:
            host, colon, port_text = item.partition(":")
            raw_port = port_text if colon else None
            host = _decode(host, "host name")
        hosts.append((host, _port(raw_port)))
    return tuple(hosts)


def _port(raw: str | None) -> int | None:
    if raw is None or raw == "":
        return None
    if not _PORT.match(raw) or not 1 <= int(raw) <= 65535:
        raise _Invalid(
            "a port is not a number from 1 to 65535 (if a password comes before it, the @ "
            f"after the password is missing or a character in it ends the user info: "
            f"{_ENCODE_ADVICE})"
        )
    return int(raw)


def _query(query: str) -> dict[str, str]:
    if not query:
        return {}
    if "+" in query:
        raise _Invalid(
            "its query holds a +, which asyncpg reads as a space and libpq as a plus: "
            + _ENCODE_ADVICE
        )
    fields = []
    for item in query.split("&"):
        raw_key, eq, raw_value = item.partition("=")
        key = _decode(raw_key, "query key")
        # (A field without = keeps None: refused below, as an unknown key is.)
        fields.append((key, _decode(raw_value, f"value of {key!r}") if eq else None))
    return _checked_params(fields, "its query", "query key", _URL_SPLITS, repeats=False)


_URL_SPLITS = f"an & or = in the password splits it: {_ENCODE_ADVICE}"
_CONNINFO_SPLITS = ("a space in the password splits it: write the value in single quotes "
                    "('a b'), a ' in it as \\' and a backslash as \\\\")


def _checked_params(fields: list[tuple[str, str | None]], where: str, what: str, splits: str,
                    *, repeats: bool) -> dict[str, str]:
    """The fields of a URL's query or a key=value string, decoded, as params (a repeated key:
    an error, or the last one counts when `repeats`, as libpq takes a key=value string's).
    `what` names a key in messages, `splits` says how a password's character splits it."""
    params: dict[str, str] = {}
    has_secret = any(key in SECRET_KEYS for key, _ in fields)
    for key, value in fields:
        if (value is None or not _SETTING_NAME.match(key)
                or (has_secret and key not in CONNECTION_KEYWORDS)):
            # Never named: with a password in it, this may be a piece of it after an & (or an
            # unquoted space).
            raise _Invalid(
                f"{where} has a field that is not key=value with a known key (when it holds a "
                f"password, {splits}); give server settings with server_settings=, not in "
                "the DSN"
            )
        if key in params and not repeats:
            raise _Invalid(
                f"{what} {key!r} is given twice: asyncpg reads the last, other tools the "
                "first; keep one"
            )
        if key not in CONNECTION_KEYWORDS and _looks_like_a_secret_key(key):
            # Read as a server setting, its value would be sent at login and shown as one.
            raise _Invalid(
                f"{what} {key!r} looks like a misspelt {' or '.join(sorted(SECRET_KEYS))} "
                "(its value is not shown): spell it so, or give the setting with "
                "server_settings= if it is one")
        params.pop(key, None)  # (a repeat counts where libpq's last one would)
        params[key] = value
    return params


#: Short spellings of a password that no PostgreSQL setting has.
_SECRET_ALIASES = frozenset({"pass", "passwd", "pw", "pwd", "passphrase", "secret"})


def _looks_like_a_secret_key(key: str) -> bool:
    lowered = key.lower()
    return lowered in _SECRET_ALIASES or bool(
        difflib.get_close_matches(lowered, SECRET_KEYS, n=1, cutoff=0.8))


# ``?dbname=``/``?user=``/``?password=``/``?host=``/``?port=`` fold into the parts; the same
# setting in the address and in the query is an error (which one wins depends on the reader).


def _conflict(what: str, key: str) -> _Invalid:
    return _Invalid(f"it gives the {what} twice, in the address and as ?{key}=; keep one")


def _take(value: str | None, params: dict[str, str], key: str, what: str) -> str | None:
    if key not in params:
        return value
    if value is not None:
        raise _conflict(what, key)
    return params.pop(key) or None


def _take_database(database: str | None, params: dict[str, str]) -> str | None:
    if "dbname" in params and "database" in params:
        raise _Invalid("it gives the database twice, as ?dbname= and ?database=; keep one")
    database = _take(database, params, "dbname", "database")
    return _take(database, params, "database", "database")


def _take_hosts(hosts: tuple[tuple[str, int | None], ...],
                params: dict[str, str]) -> tuple[tuple[str, int | None], ...]:
    if "host" in params:
        if hosts:
            raise _conflict("host", "host")
        names = params.pop("host").split(",")
        ports: list[int | None] = [None] * len(names)
        if "port" in params:
            texts = params.pop("port").split(",")
            if len(texts) not in (1, len(names)):
                raise _Invalid("?port= names neither one port nor one per host")
            ports = [_port(t) for t in texts] * (len(names) if len(texts) == 1 else 1)
        return tuple(zip(names, ports, strict=True))
    if "port" in params:
        if any(p is not None for _, p in hosts):
            raise _conflict("port", "port")
        port = _port(params.pop("port"))
        return tuple((h, port) for h, _ in hosts) or (("", port),)
    return hosts


_EMPTY = ParsedDsn("postgresql", None, None, (), None, MappingProxyType({}))
