"""The hosts and ports a login dials: one reader (`asyncpool.connect.addresses`) for the target,
the credential rules, the password file's matching and the addresses named in errors, checked
against asyncpg's own reading (``_parse_connect_dsn_and_args``), connection services included.

Before, a service's ``host`` was split its own way (``db:6432`` was a host name, ``[::1]`` kept
its brackets, spaces were stripped that asyncpg keeps), the addresses in errors ignored the
service's ports and PGHOST's, and the password file was matched against the first port only: a
``.pgpass`` line for the second host's port was not seen, and its password went to a remote
server without verified TLS.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

from asyncpool import Pool, PoolConfigError
from asyncpool.connect.connector import Connector
from asyncpool.connect.dsn import dialled, parse_dsn
from asyncpool.connect.service import named_service
from asyncpool.connect.tls import dialled_hosts, passfile_login
from asyncpool.observer import PoolObserver

CASES = [
    # (DSN, host option, port option, service section, PGHOST, PGPORT)
    ("postgresql://u@/d?service=s", None, None, "host=db1:6432,db2", None, None),
    ("postgresql://u@/d?service=s", None, None, "host=a,b\nport=5433,5434", None, None),
    ("postgresql://u@/d?service=s", None, None, "host=[::1]:6432,/tmp", None, None),
    ("postgresql://u@/d?service=s", None, None, "host=a, b", None, "7000"),
    ("postgresql://u@/d?service=s", ["h1", "h2"], None, "port=6433", None, None),
    ("postgresql://u@h1/d?service=s", None, None, "host=x\nport=6433", None, None),
    ("postgresql://u@/d", None, None, None, "h1:5433,h2", None),
    ("postgresql://u@/d", None, None, None, "a,b", "7000,7001"),
    ("postgresql://u@h1:5433,h2/d", None, [6000], None, None, None),
]


def _asyncpg_addresses(dsn: str, host: Any, port: Any, servicefile: Path | None,
                       ) -> list[tuple[str, int]]:
    from asyncpg import connect_utils

    addrs, _ = connect_utils._parse_connect_dsn_and_args(  # type: ignore[attr-defined]  # (private)
        dsn=dsn, host=host, port=port, user="u", password=None, passfile=None, database="d",
        ssl=None, service=None, servicefile=str(servicefile) if servicefile else None,
        direct_tls=None, server_settings=None, target_session_attrs=None, krbsrvname=None,
        gsslib=None)
    return [(a.rpartition("/.s.PGSQL.")[0], int(a.rpartition(".")[2])) if isinstance(a, str)
            else (a[0], a[1]) for a in addrs]


@pytest.mark.parametrize("case", CASES)
def test_every_reader_sees_the_addresses_asyncpg_dials(
        case: tuple[str, Any, Any, str | None, str | None, str | None], tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    dsn, host, port, section, pghost, pgport = case
    for name, value in (("PGHOST", pghost), ("PGPORT", pgport)):
        if value is None:
            monkeypatch.delenv(name, raising=False)
        else:
            monkeypatch.setenv(name, value)
    monkeypatch.delenv("PGSERVICE", raising=False)
    servicefile = None
    if section is not None:
        servicefile = tmp_path / "services"
        servicefile.write_text(f"[s]\n{section}\n")
        monkeypatch.setenv("PGSERVICEFILE", str(servicefile))
    parsed = parse_dsn(dsn)
    expected = _asyncpg_addresses(parsed.for_asyncpg(), host, port, servicefile)
    options = {k: v for k, v in (("host", host), ("port", port)) if v is not None}

    service = named_service(parsed.params, options, os.environ)
    shown = [(h or "localhost", p) for h, p in expected]
    assert list(dialled(parsed, host=host, port=port, service=service)) == shown
    target = parsed.target(host=host, port=port, service=service)
    assert (target.host, target.port) == shown[0]
    config = Pool(dsn, connect_kwargs=options, telemetry=False).config
    assert dialled_hosts(config) == [h for h, _ in expected]
    login = passfile_login(parsed, target, host=host, port=port, service=service)
    assert login.ports == {p for _, p in expected}


def test_a_pgpass_line_for_the_second_hosts_port_is_seen(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """asyncpg reads the password of the first line that matches any host with its port: the
    line for db2:6432 gives the login (db1 first) a password."""
    path = tmp_path / "pgpass"
    path.write_text("db2.example.com:6432:*:*:pgpass-secret\n")
    path.chmod(0o600)
    services = tmp_path / "services"
    services.write_text("[s]\nhost=db1.example.com,db2.example.com\nport=5432,6432\n")
    monkeypatch.setenv("PGPASSFILE", str(path))
    monkeypatch.setenv("PGSERVICEFILE", str(services))
    for name in ("PGPASSWORD", "PGHOST", "PGPORT", "PGSERVICE"):
        monkeypatch.delenv(name, raising=False)
    connector = Connector(Pool("postgresql://app@/app?service=s", telemetry=False).config,
                          PoolObserver())
    # Held back: only a server that asks for no password gets the login
    # (tests/test_pgpass_withheld.py).
    assert connector.withheld == f"the password asyncpg reads for db1.example.com from {path}"
    assert not connector.auth_methods & {"password", "md5", "scram-sha-256"}


def test_a_service_host_list_asyncpg_cannot_read_is_refused(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    services = tmp_path / "services"
    services.write_text("[s]\nhost=db1:port\n")
    monkeypatch.setenv("PGSERVICEFILE", str(services))
    with pytest.raises(PoolConfigError, match=r"service \[s\]: its host or port cannot be read"):
        Connector(Pool("postgresql://app@/app?service=s", telemetry=False).config,
                  PoolObserver())
