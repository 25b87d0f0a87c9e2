"""`asyncpool doctor` against the harness servers: PgBouncer 1.18, a current PgBouncer,
PostgreSQL itself, misconfigured PgBouncers, and servers it cannot log in to."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest

from asyncpool.cli.diagnosis import Facts, diagnose, recommend
from asyncpool.cli.doctor import doctor
from asyncpool.testing import PgBouncerServer, PostgresServer, ServerStack
from asyncpool.testing.binaries import PgBouncerBinary


def _cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "asyncpool.cli", "doctor", *args],
                          check=False, capture_output=True, text=True, timeout=60, env=env)


async def _doctor_json(dsn: str, admin_dsn: str | None = None) -> tuple[int, dict[str, Any]]:
    out = io.StringIO()
    code = await doctor(dsn, admin_dsn, 5.0, True, out)
    return code, json.loads(out.getvalue())


def _finding(report: dict[str, Any], check: str) -> dict[str, Any]:
    found: list[dict[str, Any]] = [f for f in report["findings"] if f["check"] == check]
    assert len(found) == 1, report["findings"]
    return found[0]


async def test_pgbouncer_1_18_gets_describe_cache(legacy: PgBouncerServer) -> None:
    code, report = await _doctor_json(legacy.dsn(), legacy.admin_dsn)
    facts = report["facts"]
    assert code == 0
    assert facts["pooler"] == "pgbouncer"
    assert facts["pgbouncer_version"][:2] == [1, 18]
    assert facts["pool_mode"] == "transaction"
    assert facts["auth_method"] == "SCRAM-SHA-256"
    assert facts["tls_in_use"] is False
    assert facts["pgbouncer_settings"]["default_pool_size"] == legacy.settings["default_pool_size"]
    assert report["recommendation"]["prepared_statements"] == "unnamed"
    assert "1.21" in _finding(report, "pooler")["message"]


async def test_current_pgbouncer_gets_on(current: PgBouncerServer) -> None:
    code, report = await _doctor_json(current.dsn(), current.admin_dsn)
    facts = report["facts"]
    assert code == 0
    assert tuple(facts["pgbouncer_version"][:2]) >= (1, 21)
    assert facts["max_prepared_statements"] == int(current.settings["max_prepared_statements"]) > 0
    assert report["recommendation"]["prepared_statements"] == "on"


async def test_a_pgbouncer_whose_console_refuses_the_user_is_still_recognised(
    current: PgBouncerServer,
) -> None:
    code, report = await _doctor_json(current.dsn())  # app is not an admin or stats user
    assert code == 3  # no problem found, but a check could not run
    assert report["facts"]["pooler"] == "pgbouncer"
    assert report["facts"]["pool_mode"] is None
    # The default, which works through any transaction pooler (docs/describe-cache.md).
    assert report["recommendation"]["prepared_statements"] == "unnamed"
    pooler = _finding(report, "pooler")
    assert pooler["level"] == "unchecked"
    assert "'not allowed'" in pooler["message"]
    assert "--admin-dsn" in pooler["message"]
    result = _cli(current.dsn())
    assert result.returncode == 3, result.stdout + result.stderr
    assert "No problems found" not in result.stdout
    assert "1 check(s) NOT run: pooler" in result.stdout


async def test_an_admin_dsn_that_does_not_work_leaves_the_pooler_unchecked(
    current: PgBouncerServer,
) -> None:
    """The user named the console: failing to read it is a check not run (exit 3), never
    "No problems found", and says why and what to fix without the password."""
    from asyncpool.testing.ports import free_port

    admin_password = current.postgres.pgb_admin.password
    wrong = current.admin_dsn.replace(admin_password, "Wr0ng-Passw0rd-xyz")
    closed = f"postgresql://pgb_admin@127.0.0.1:{free_port()}/pgbouncer"
    for admin_dsn, why in ((wrong, "authentication failed for user 'pgb_admin'"),
                           (closed, "connection refused")):
        code, report = await _doctor_json(current.dsn(), admin_dsn)
        assert code == 3, report["findings"]
        assert report["exit_code"] == 3
        assert report["recommendation"]["prepared_statements"] == "unnamed"
        pooler = _finding(report, "pooler")
        assert pooler["level"] == "unchecked"
        assert "NOT checked: --admin-dsn did not work" in pooler["message"]
        assert why in pooler["message"]
        assert report["facts"]["admin_target"].startswith("pgb_admin@127.0.0.1:")
        shown = json.dumps(report)
        assert "Wr0ng-Passw0rd-xyz" not in shown
        assert admin_password not in shown

    result = _cli(current.dsn(), "--admin-dsn", wrong)
    assert result.returncode == 3, result.stdout + result.stderr
    assert "unchecked pooler" in result.stdout
    assert "check the user and password of --admin-dsn" in result.stdout
    assert "No problems found" not in result.stdout
    assert "1 check(s) NOT run: pooler" in result.stdout
    for secret in ("Wr0ng-Passw0rd-xyz", admin_password, current.postgres.app.password):
        assert secret not in result.stdout + result.stderr


async def test_an_admin_user_outside_admin_users_is_told_so(current: PgBouncerServer) -> None:
    # The application's user as --admin-dsn: PgBouncer answers "not allowed".
    admin_dsn = current.dsn().rsplit("/", 1)[0] + "/pgbouncer"
    code, report = await _doctor_json(current.dsn(), admin_dsn)
    assert code == 3, report["findings"]
    assert report["facts"]["pooler"] == "pgbouncer"
    message = _finding(report, "pooler")["message"]
    assert "'not allowed' to user 'app'" in message
    assert "admin_users or stats_users" in message


def test_with_json_every_refusal_is_json() -> None:
    """A DSN that cannot be used, or whose password would travel unprotected, and no DSN at
    all: JSON on stdout like every other outcome, exit 2, nothing dialled."""
    from asyncpool.testing.ports import free_port

    env = {k: v for k, v in os.environ.items() if k != "ASYNCPOOL_DSN"}
    app_dsn = f"postgresql://app@127.0.0.1:{free_port()}/app"
    cases = [
        (["postgresql://app@127.0.0.1:notaport/app"], "dsn", "the DSN cannot be used"),
        (["mysql://app@127.0.0.1/app"], "dsn", "not a postgresql:// URL"),
        # 192.0.2.1 (TEST-NET-1) is never dialled: the password is refused before any login.
        ([f"postgresql://app:{'x' * 12}@192.0.2.1:5432/app"], "dsn", "a password is only sent"),
        ([app_dsn, "--admin-dsn", "postgresql://pgb_admin@127.0.0.1:0:1/pgbouncer"],
         "admin_dsn", "--admin-dsn: the DSN cannot be used"),
        ([app_dsn, "--admin-dsn", f"postgresql://pgb_admin:{'x' * 12}@192.0.2.1/pgbouncer"],
         "admin_dsn", "--admin-dsn: pool 'doctor': a password is only sent"),
        ([], "dsn", "give a DSN or set ASYNCPOOL_DSN"),
    ]
    for args, check, says in cases:
        result = _cli(*args, "--json", "--timeout", "2", env=env)
        assert result.returncode == 2, (args, result.stdout, result.stderr)
        report = json.loads(result.stdout)
        assert report["exit_code"] == 2
        assert report["recommendation"] is None
        (finding,) = report["findings"]
        assert (finding["level"], finding["check"]) == ("problem", check), args
        assert says in finding["message"], finding["message"]
        assert "x" * 12 not in result.stdout + result.stderr


def test_the_help_names_every_exit_status() -> None:
    result = _cli("--help")
    text = " ".join(result.stdout.split())
    assert "Exit 0: fine; 1: problems found; 2: could not check" in text
    assert "3: no problem found, but some checks could not run" in text


def _without_psycopg(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "psycopg", None)  # `import psycopg` now fails


async def test_the_console_is_read_with_asyncpg_alone(
    current: PgBouncerServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """psycopg is not a dependency: asyncpg logs in and the doctor reads the rows itself."""
    _without_psycopg(monkeypatch)
    code, report = await _doctor_json(current.dsn(), current.admin_dsn)
    assert code == 0, report["findings"]
    assert report["facts"]["max_prepared_statements"] == int(
        current.settings["max_prepared_statements"])
    assert report["facts"]["pool_mode"] == "transaction"
    assert report["recommendation"]["prepared_statements"] == "on"


async def test_without_asyncpg_access_the_console_is_read_with_psycopg(
    legacy: PgBouncerServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    from asyncpool.cli import admin_console

    monkeypatch.setattr(admin_console, "transport_of", lambda conn: None)
    code, report = await _doctor_json(legacy.dsn(), legacy.admin_dsn)
    assert code == 0, report["findings"]
    assert report["facts"]["pgbouncer_version"][:2] == [1, 18]
    assert report["facts"]["pool_mode"] == "transaction"


async def test_with_no_way_to_read_the_console_the_doctor_says_so_loudly(
    current: PgBouncerServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    from asyncpool.cli import admin_console, diagnosis
    from asyncpool.cli.doctor import gather_facts, render_text
    from asyncpool.connect.dsn import parse_target

    monkeypatch.setattr(admin_console, "transport_of", lambda conn: None)
    _without_psycopg(monkeypatch)
    facts = await gather_facts(current.dsn(), parse_target(current.dsn()), current.admin_dsn, 5.0)
    report = diagnosis.diagnose(facts)
    text = render_text(facts, report)
    assert facts.pooler == "pgbouncer"
    assert report.exit_code == 3
    assert [f.check for f in report.unchecked] == ["pooler"]
    assert "NOT checked" in text
    assert "pip install 'psycopg[binary]'" in text
    assert "No problems found" not in text
    assert "1 check(s) NOT run" in text


async def test_direct_postgresql_gets_on_and_a_pooler_suggestion(postgres: PostgresServer) -> None:
    code, report = await _doctor_json(postgres.dsn())
    facts = report["facts"]
    assert code == 0
    assert facts["pooler"] is None
    assert facts["max_connections"] == postgres.max_connections
    assert facts["server_version"].split(".")[0].isdigit()
    assert report["recommendation"]["prepared_statements"] == "on"
    assert "PgBouncer" in _finding(report, "pooler")["message"]


async def test_a_failed_admin_dsn_straight_at_postgresql_is_a_note(
        postgres: PostgresServer) -> None:
    """No console to read there: nothing went unchecked (exit 0), but the failure is said."""
    code, report = await _doctor_json(postgres.dsn(), postgres.dsn().rsplit("/", 1)[0]
                                      + "/no_such_database")
    assert code == 0
    note = _finding(report, "admin_dsn")
    assert note["level"] == "note"
    assert "--admin-dsn did not work" in note["message"]
    assert "not needed" in note["message"]


@pytest.fixture
def odd_pgbouncers(stack: ServerStack) -> Iterator[dict[str, PgBouncerServer]]:
    """PgBouncers configured the ways the doctor should catch."""
    configs: dict[str, tuple[PgBouncerBinary, dict[str, str | int]]] = {
        "no-prepared": (stack.current.binary, {"max_prepared_statements": 0}),
        "session": (stack.current.binary, {"pool_mode": "session"}),
        "statement": (stack.legacy.binary, {"pool_mode": "statement"}),
    }
    started: dict[str, PgBouncerServer] = {}
    try:
        for name, (binary, overrides) in configs.items():
            started[name] = PgBouncerServer(
                binary, stack.postgres, {"default_pool_size": 2, "max_db_connections": 2,
                                         **overrides}
            ).start()
        yield started
    finally:
        for server in started.values():
            server.stop()


async def test_misconfigured_pgbouncers(odd_pgbouncers: dict[str, PgBouncerServer]) -> None:
    bouncer = odd_pgbouncers["no-prepared"]
    code, report = await _doctor_json(bouncer.dsn(), bouncer.admin_dsn)
    assert code == 0
    assert report["facts"]["max_prepared_statements"] == 0
    assert report["recommendation"]["prepared_statements"] == "unnamed"
    assert "max_prepared_statements=0" in report["recommendation"]["reason"]

    bouncer = odd_pgbouncers["session"]
    code, report = await _doctor_json(bouncer.dsn(), bouncer.admin_dsn)
    assert code == 0
    assert report["recommendation"]["prepared_statements"] == "on"
    assert _finding(report, "pool_mode")["level"] == "note"

    bouncer = odd_pgbouncers["statement"]
    result = _cli(bouncer.dsn(), "--admin-dsn", bouncer.admin_dsn)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "problem   pool_mode" in result.stdout
    assert "1 problem(s) found." in result.stdout


def test_the_text_report_names_the_mode_to_set(current: PgBouncerServer) -> None:
    result = _cli(current.dsn(), "--admin-dsn", current.admin_dsn)
    assert result.returncode == 0, result.stderr
    assert 'Recommended: prepared_statements="on"' in result.stdout
    assert "ASYNCPOOL_PREPARED_STATEMENTS=on" in result.stdout
    assert "No problems found." in result.stdout


def test_a_wrong_password_exits_2_without_printing_it(legacy: PgBouncerServer,
                                                      postgres: PostgresServer) -> None:
    for dsn in (postgres.dsn(), legacy.dsn()):
        wrong = dsn.replace(postgres.app.password, "Wr0ng-Passw0rd-xyz")
        result = _cli(wrong)
        assert result.returncode == 2, result.stdout + result.stderr
        assert "authentication failed" in result.stdout
        assert "Wr0ng-Passw0rd-xyz" not in result.stdout + result.stderr
        assert postgres.app.password not in result.stdout + result.stderr


def test_an_unreachable_server_exits_2() -> None:
    from asyncpool.testing.ports import free_port

    result = _cli(f"postgresql://app:pw@127.0.0.1:{free_port()}/app", "--timeout", "2")
    assert result.returncode == 2
    assert "connection refused" in result.stdout
    assert "fix the connection first" in result.stdout


# What the doctor concludes from facts a harness server cannot show (remote hosts, RDS Proxy,
# other authentication methods).

def _facts(**changes: Any) -> Facts:
    base = {"target": "app@db.example.com:5432/app", "host": "db.example.com", "login_ms": 3.0,
            "server_version": "16.4", "tls_in_use": True, "tls_version": "TLSv1.3",
            "sslmode": "verify-full", "auth_method": "SCRAM-SHA-256"}
    return Facts(**{**base, **changes})


def test_an_unidentified_pooler_behind_a_failed_admin_dsn_is_unchecked() -> None:
    facts = _facts(pooler="unknown", pooler_evidence="x", admin_error="could not connect ...")
    assert diagnose(facts).exit_code == 0  # no --admin-dsn: only the DSN's own login was tried
    report = diagnose(_facts(pooler="unknown", pooler_evidence="x", admin_target="a@h:1/pgbouncer",
                             admin_error="could not connect to a@h:1/pgbouncer: refused"))
    assert report.exit_code == 3
    assert [f.check for f in report.unchecked] == ["pooler"]


def test_an_rds_proxy_gets_describe_cache() -> None:
    assert recommend(_facts(pooler="rds-proxy")).prepared_statements == "unnamed"


def test_an_unidentified_proxy_gets_the_default() -> None:
    assert recommend(_facts(pooler="unknown", pooler_evidence="x")).prepared_statements == "unnamed"


def test_unverified_tls_to_a_remote_host_is_a_warning() -> None:
    report = diagnose(_facts(sslmode="require"))
    assert [f.level for f in report.findings if f.check == "tls"] == ["warning"]
    report = diagnose(_facts(sslmode="verify-full"))
    assert [f.level for f in report.findings if f.check == "tls"] == ["ok"]


def test_no_tls_to_a_remote_host_is_a_warning_and_on_loopback_a_note() -> None:
    remote = diagnose(_facts(tls_in_use=False, tls_offered=False))
    assert [f.level for f in remote.findings if f.check == "tls"] == ["warning"]
    local = diagnose(_facts(host="127.0.0.1", tls_in_use=False, tls_offered=False))
    assert [f.level for f in local.findings if f.check == "tls"] == ["note"]


def test_cleartext_passwords_without_tls_are_a_problem() -> None:
    report = diagnose(_facts(auth_method="password", tls_in_use=False, tls_offered=False))
    assert report.exit_code == 1
    assert diagnose(_facts(auth_method="md5")).exit_code == 0
    assert [f.level for f in diagnose(_facts(auth_method="md5")).findings
            if f.check == "auth"] == ["warning"]


@pytest.fixture(scope="module")
def tls_postgres() -> Iterator[tuple[PostgresServer, str]]:
    """A PostgreSQL that refuses connections without TLS, and its CA certificate."""
    from asyncpool.testing.pki import make_test_pki

    pki = make_test_pki()
    server = PostgresServer(max_connections=10, settings=pki.postgres_settings(),
                            hba_lines=["hostnossl all all 127.0.0.1/32 reject"])
    try:
        server.start()
        yield server, str(pki.ca_cert)
    finally:
        server.stop()
        pki.remove()


async def test_tls_is_reported_and_the_auth_probe_works_over_it(
    tls_postgres: tuple[PostgresServer, str],
) -> None:
    server, ca = tls_postgres
    code, report = await _doctor_json(server.dsn(sslmode="verify-full", sslrootcert=ca))
    facts = report["facts"]
    assert code == 0, report["findings"]
    assert facts["tls_in_use"] is True
    assert facts["tls_version"].startswith("TLSv1.")
    assert facts["tls_offered"] is True
    # Read from the server's first message after the TLS handshake, before any password.
    assert facts["auth_method"] == "SCRAM-SHA-256"
    assert _finding(report, "tls")["level"] == "ok"
    assert "verified" in _finding(report, "tls")["message"]

    # sslmode=require encrypts without checking who answers.
    code, report = await _doctor_json(server.dsn(sslmode="require"))
    assert code == 0
    assert report["facts"]["tls_in_use"] is True
    assert "not verified" in _finding(report, "tls")["message"]


async def test_a_server_that_requires_tls_refuses_sslmode_disable(
    tls_postgres: tuple[PostgresServer, str],
) -> None:
    server, _ = tls_postgres
    code, report = await _doctor_json(server.dsn(sslmode="disable"))
    assert code == 2
    assert _finding(report, "connection")["level"] == "problem"
    assert server.app.password not in json.dumps(report)


def test_the_admin_console_comes_from_the_environment_with_its_dsn(
        current: PgBouncerServer, legacy: PgBouncerServer) -> None:
    """ASYNCPOOL_ADMIN_DSN (written by `asyncpool local-pgbouncer` beside ASYNCPOOL_DSN) is
    read for the DSN from the environment only: given another DSN, the doctor would report
    the settings of the environment's PgBouncer as that one's."""
    assert current.admin_dsn is not None
    env = {**os.environ, "ASYNCPOOL_DSN": current.dsn(), "ASYNCPOOL_ADMIN_DSN": current.admin_dsn}
    result = _cli(env=env)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"ok        pooler      PgBouncer {current.binary.version_text}" in result.stdout
    password = urlsplit(current.admin_dsn).password
    assert password
    assert password not in result.stdout + result.stderr

    other = _cli(legacy.dsn(), env=env)  # legacy's console refuses its app user: unchecked
    assert "unchecked pooler" in other.stdout, other.stdout
    assert current.binary.version_text not in other.stdout


def test_a_dsn_with_no_password_is_told_so(current: PgBouncerServer, postgres: PostgresServer,
                                           tmp_path: Path) -> None:
    """`asyncpool doctor postgresql://app@host:port/app` (the quick start's form, no password)
    said "check the password or credentials provider" of a password nobody gave."""
    passfile = tmp_path / "pgpass"
    passfile.write_text("")
    passfile.chmod(0o600)
    env = {k: v for k, v in os.environ.items() if k not in ("PGPASSWORD", "PGSERVICE")}
    env["PGPASSFILE"] = str(passfile)
    result = _cli(current.dsn().replace(f":{postgres.app.password}@", "@"), env=env)
    assert result.returncode == 2, result.stdout + result.stderr
    assert "no password was given for user 'app'" in result.stdout, result.stdout
