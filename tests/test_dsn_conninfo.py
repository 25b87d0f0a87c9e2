"""libpq's ``key=value`` connection strings, as psycopg and libpq's tools take them.

They were refused ("key=value strings are not read"). Now they are read with libpq's grammar and
checked as a URL's query is. The grammar is checked against libpq itself (``PQconninfoParse``,
through psycopg's libpq binding), and a login against psql given the same string.
"""

from __future__ import annotations

import asyncio
import secrets
import shutil
import subprocess

import asyncpg
import pytest
from psycopg import pq

from asyncpool import Pool, PoolConfigError
from asyncpool.connect.connector import Connector
from asyncpool.connect.conninfo import ConninfoSyntaxError, split_conninfo
from asyncpool.connect.dsn import DsnError, parse_dsn
from asyncpool.observer import PoolObserver
from asyncpool.testing import PostgresServer
from tests.conftest import Pooler

SECRET = "s3cret pw'\\x"  # pragma: allowlist secret
QUOTED_SECRET = "'s3cret pw\\'\\\\x'"  # the same, as a key=value string writes it


def _libpq(text: str) -> dict[str, str] | None:
    """What libpq reads in `text`: its keywords and values, or None when it refuses it."""
    try:
        options = pq.Conninfo.parse(text.encode())
    except Exception:
        return None
    return {o.keyword.decode(): o.val.decode() for o in options if o.val is not None}


def _ours(text: str) -> dict[str, str] | None:
    try:
        pairs = split_conninfo(text)
    except ConninfoSyntaxError:
        return None
    return dict(pairs)  # the last of a repeated keyword counts, as in libpq


GRAMMAR = [
    "host=db port=5432 dbname=app user=u sslmode=verify-full",
    "host = db   port =5432\tdbname= app",  # spaces around =
    "\n host=db\n",
    f"password={QUOTED_SECRET} host=x",  # quotes, escaped quote and backslash, a space
    "password=a\\ b host=x",  # a backslash escapes outside quotes too
    "host='a'port=5",  # a quoted value may run into the next keyword
    "host=a'b",  # a quote inside an unquoted value is a character
    "dbname=",  # empty value
    "dbname= host=x",  # libpq skips the space after =: dbname is "host=x"
    "application_name=''",
    "password=a\\",  # a trailing backslash escapes nothing
    "host=a host=b",  # the last counts
    "host=x\vport=1",  # C's isspace(), vertical tab included
    "options='-c search_path=a,b'",
    # Refused by libpq as by the pool:
    "password='x",
    "password='a\\",
    "host",
    "host db=1",
    "host=x port",
]


@pytest.mark.parametrize("text", GRAMMAR)
def test_the_grammar_is_libpqs(text: str) -> None:
    assert _ours(text) == _libpq(text)


@pytest.mark.parametrize("text", [
    "host=db,db2 port=5432,6432 dbname=app user=u sslmode=verify-full",
    "host=a,b port=7 user=u",
    f"host=::1 user=app password={QUOTED_SECRET} dbname='my db'",
    "host=/var/run/postgresql dbname=app",
    "port=6432",
])
def test_the_parts_are_libpqs(text: str) -> None:
    """Host, port, database, user and password as libpq reads them, through the URL the pool
    rebuilds (what asyncpg is given) and parses again."""
    libpq = _libpq(text)
    assert libpq is not None
    parsed = parse_dsn(parse_dsn(text).for_driver())
    assert ",".join(h for h, _ in parsed.hosts) == libpq.get("host", "")
    ports = libpq.get("port", "").split(",")
    expected = ports * len(parsed.hosts) if len(ports) == 1 else ports  # one port for every host
    assert ["" if p is None else str(p) for _, p in parsed.hosts] == expected
    assert (parsed.database or "") == libpq.get("dbname", "")
    assert (parsed.user or "") == libpq.get("user", "")
    assert (parse_dsn(text).password or "") == libpq.get("password", "")


@pytest.mark.parametrize("text", ["requiressl=1", "sslmode=verify-full requiressl=0",
                                  "requiressl=1 sslmode=verify-ca"])
def test_requiressl_is_libpqs_sslmode(text: str) -> None:
    libpq = _libpq(text)
    assert libpq is not None
    assert parse_dsn(text).params["sslmode"] == libpq["sslmode"]


def test_unknown_keywords_are_refused_as_in_a_url() -> None:
    # A misspelt keyword: the URL form's refusal, with the keyword meant.
    with pytest.raises(PoolConfigError, match=r"did you mean \?sslmode="):
        Pool("host=db.example.com sslmod=verify-full", telemetry=False)
    # A libpq keyword asyncpg cannot honour: the URL form's refusal and advice.
    with pytest.raises(PoolConfigError, match="keepalives= is a libpq setting"):
        Pool("host=db.example.com keepalives=1", telemetry=False)
    # A misspelt password keyword: refused, its value not shown.
    with pytest.raises(DsnError, match="'passwd' looks like a misspelt") as caught:
        parse_dsn("host=db passwd=hunter2-secret")
    assert "hunter2" not in str(caught.value)


@pytest.mark.parametrize("text", [
    "host=db password=s3cret-pw xyz",  # an unquoted space in the password  # pragma: allowlist secret
    "host=db password=s3cret-pw xyz=1",  # the same, with an = after it  # pragma: allowlist secret
    "host=db password='s3cret-pw",  # not closed  # pragma: allowlist secret
    "host=db password=s3cret-pw port=99999",  # pragma: allowlist secret
    "host=db password=s3cret-pw sslmode=verify-full sslmode=",  # pragma: allowlist secret
])
def test_a_password_is_never_shown(text: str) -> None:
    problem = ""
    try:
        parsed = parse_dsn(text)
        problem = repr(parsed) + str(parsed) + parsed.redacted()
        _connector(text)
    except (DsnError, PoolConfigError) as exc:
        problem += str(exc) + repr(exc)
    assert problem
    assert "s3cret" not in problem
    assert "xyz" not in problem


def test_the_credential_rules_hold() -> None:
    """A password to another machine still needs verified TLS."""
    with pytest.raises(PoolConfigError, match="only sent to another machine over TLS"):
        _connector("host=db.example.com dbname=app user=app password=pw12345678")


def _connector(dsn: str) -> Connector:
    """What a pool of `dsn` checks before dialling."""
    return Connector(Pool(dsn, telemetry=False).config, PoolObserver())


def _quoted(value: str) -> str:
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


def _conninfo(url: str, user: str, password: str) -> str:
    """The key=value string of `url`'s host, port and database, as `user` with `password`."""
    parsed = parse_dsn(url)
    ((host, port),) = parsed.hosts
    return (f"host = {host} port={port}  dbname={_quoted(parsed.database or '')} user={user} "
            f"password={_quoted(password)} application_name='conninfo test'")


async def test_a_login_reads_it_as_psql_does(postgres: PostgresServer, pooler: Pooler) -> None:
    """A role whose password has a space, a quote and a backslash, logged in with a key=value
    string by the pool (directly and through PgBouncer) and by psql."""
    role = f"kv_{secrets.token_hex(4)}"
    password = f"{SECRET}{secrets.token_hex(4)}"
    admin = await asyncpg.connect(postgres.dsn(postgres.superuser))
    try:
        await admin.execute(f"CREATE ROLE {role} LOGIN PASSWORD "
                            f"{_sql_literal(password)} IN ROLE app")
        await admin.execute(f"GRANT CONNECT ON DATABASE app TO {role}")
        # The direct login; PgBouncer's auth file knows the app user only.
        text = _conninfo(postgres.dsn(), role, password)
        async with Pool(text, telemetry=False, min_size=1, max_size=1) as pool:
            got = await pool.fetchrow(
                "SELECT current_user AS u, current_database() AS d, "
                "current_setting('application_name') AS a")
        assert got is not None
        assert tuple(got) == (role, "app", "conninfo test")
        psql = shutil.which("psql")
        assert psql is not None
        out = await asyncio.to_thread(subprocess.run, [psql, "-X", "-At", "-c",
                              "SELECT current_user || ' ' || current_database()", text],
                             capture_output=True, text=True, timeout=30, check=True)
        assert out.stdout.strip() == f"{role} app"
        through = _conninfo(pooler.dsn(), "app", postgres.app.password)
        async with Pool(through, telemetry=False, min_size=1, max_size=1) as pool:
            assert await pool.fetchval("SELECT current_user") == "app"
    finally:
        await admin.execute(f"DROP OWNED BY {role}; DROP ROLE {role}")
        await admin.close()


def _sql_literal(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"
