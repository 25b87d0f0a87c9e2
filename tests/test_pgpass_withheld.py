"""A password from the password file (``*:*:*:*:secret``) for another machine, without TLS that
verifies it: held back, not refused before dialling.

Before, such a pool could not be made at all, even for a server that asks for no password
(trust). asyncpg reads the file before it dials (a callable password is called then too, not
when the server asks), so the auth guard does the holding back: a login that asks for no
password goes through, one that asks for any password (SCRAM included) is refused before
anything is sent. ``vm`` is this machine's name (/etc/hosts: 127.0.0.1): to the credential rules,
a name that is not ``localhost`` is another machine.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from asyncpool import AuthMethodRefusedError, Pool
from asyncpool.testing import PostgresServer
from asyncpool.testing.mitm import FakeServer
from tests.pgpass_support import catch_all_pgpass, remote_name
from tests.secret_support import exposed, leaks

SECRET = "pgpass-Secret-4711"  # pragma: allowlist secret


@pytest.fixture(name="remote_name")
def _remote_name() -> str:
    """A name of this machine that the rules take for another machine's."""
    return remote_name()


@pytest.fixture
def catch_all(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    return catch_all_pgpass(tmp_path, monkeypatch, SECRET)


@pytest.fixture(scope="module")
def trusting() -> Iterator[PostgresServer]:
    """A server that lets `postgres` in from 127.0.0.1 without a password."""
    with PostgresServer(max_connections=10,
                        hba_lines=["host all postgres 127.0.0.1/32 trust"]) as server:
        yield server


async def test_a_server_that_asks_no_password_is_reached(
        trusting: PostgresServer, catch_all: Path, remote_name: str) -> None:
    dsn = f"postgresql://postgres@{remote_name}:{trusting.port}/app"
    async with Pool(dsn, min_size=1, max_size=1, telemetry=False) as pool:
        assert await pool.fetchval("SELECT current_user") == "postgres"


async def test_a_password_request_gets_nothing(catch_all: Path, remote_name: str) -> None:
    async with FakeServer(tls="refuse", auth="password") as fake:
        pool = Pool(f"postgresql://app@{remote_name}:{fake.port}/app", min_size=1,
                    telemetry=False)
        with pytest.raises(AuthMethodRefusedError) as info:
            await pool.open()
    assert fake.logins  # dialled: the server asked
    assert fake.received == []
    message = str(info.value)
    assert f"the password asyncpg reads for {remote_name} from {catch_all}" in message
    assert "allow_unprotected_credentials=True" in message
    assert leaks(exposed(info.value), [SECRET]) == []


async def test_a_scram_request_gets_nothing(
        postgres: PostgresServer, catch_all: Path, remote_name: str) -> None:
    """SCRAM too: over TLS that does not verify the server it can be relayed."""
    pool = Pool(f"postgresql://app@{remote_name}:{postgres.port}/app", min_size=1,
                telemetry=False)
    with pytest.raises(AuthMethodRefusedError, match="SCRAM-SHA-256") as info:
        await pool.open()
    assert info.value.method == "scram-sha-256"


def test_windows_reads_pgpass_conf_in_appdata(tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """On Windows asyncpg (as libpq) reads %APPDATA%\\postgresql\\pgpass.conf, not ~/.pgpass,
    and whatever its permissions."""
    from asyncpool.connect import passfile
    from asyncpool.connect.connector import Connector
    from asyncpool.observer import PoolObserver

    conf = tmp_path / "appdata" / "postgresql" / "pgpass.conf"
    conf.parent.mkdir(parents=True)
    conf.write_text(f"*:*:*:*:{SECRET}\n")
    conf.chmod(0o644)
    home = tmp_path / "home"
    home.mkdir()
    (home / ".pgpass").write_text("nothing.example:1:x:y:z\n")
    monkeypatch.setattr(passfile, "on_windows", lambda: True, raising=False)
    monkeypatch.setenv("APPDATA", str(tmp_path / "appdata"))
    monkeypatch.setenv("HOME", str(home))
    for name in ("PGPASSFILE", "PGPASSWORD", "PGSERVICE", "PGSSLMODE", "PGHOST", "PGPORT"):
        monkeypatch.delenv(name, raising=False)
    assert passfile.passfile_path(None, {"APPDATA": "C:/Users/u/AppData/Roaming"}) == Path(
        "C:/Users/u/AppData/Roaming", "postgresql", "pgpass.conf")
    assert passfile.passfile_path(None, {}) is None  # no APPDATA: asyncpg finds no folder
    connector = Connector(Pool("postgresql://app@db.example.com/app", telemetry=False).config,
                          PoolObserver())
    assert connector.withheld == f"the password asyncpg reads for db.example.com from {conf}"
