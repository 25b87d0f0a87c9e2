"""No password or IAM token in what asyncpool prints: DSN redaction, reprs, errors, logs."""

from __future__ import annotations

import logging
import traceback

import pytest

from asyncpool import ConnectError, Pool, PoolConfig, PoolConfigError
from asyncpool.connect.dsn import DsnError, parse_dsn, redact, redact_dsn
from asyncpool.connect.failures import translate
from asyncpool.testing.ports import free_port

SECRET = "s3cr3t-Pa55"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (f"postgresql://app:{SECRET}@db:5432/app", "postgresql://app:***@db:5432/app"),
        (f"postgres://app:{SECRET}@db/app?sslmode=require", "postgres://app:***@db/app?sslmode=require"),
        # An unescaped @ in the password: nothing of it may survive.
        (f"postgresql://app:{SECRET}@x@db/app", "postgresql://app:***@db/app"),
        (f"postgresql://app@db/app?password={SECRET}&sslmode=require",
         "postgresql://app@db/app?password=***&sslmode=require"),
        (f"host=db user=app password={SECRET} dbname=app", "host=db user=app password=*** dbname=app"),
        (f"host=db password='{SECRET} with space' dbname=app", "host=db password=*** dbname=app"),
        # libpq's escapes: a backslash takes the next character, a space included.
        (f"host=db password = {SECRET}\\ with\\ space dbname=app", "host=db password = *** dbname=app"),
        (f"host=db password='{SECRET}\\' with' dbname=app", "host=db password=*** dbname=app"),
        (f"postgresql://app@db/app?sslpassword={SECRET}", "postgresql://app@db/app?sslpassword=***"),
        (
            "db:5432/?Action=connect&DBUser=app&X-Amz-Credential=AKID%2F20250101%2Fus-east-1"
            f"%2Frds-db%2Faws4_request&X-Amz-Security-Token={SECRET}&X-Amz-Signature=abc123",
            "db:5432/?Action=connect&DBUser=app&X-Amz-Credential=***"
            "&X-Amz-Security-Token=***&X-Amz-Signature=***",
        ),
    ],
)
def test_redact_hides_every_secret_form(text: str, expected: str) -> None:
    assert redact(text) == expected


@pytest.mark.parametrize(
    "text",
    ["postgresql://app@db:5432/app", "two DSNs: postgresql://a@b/c and postgresql://d@e/f",
     "user@example.com wrote: no secret here"],
)
def test_redact_leaves_text_without_secrets_alone(text: str) -> None:
    assert redact(text) == text


def test_config_repr_hides_the_dsn_password_and_connect_kwargs() -> None:
    config = PoolConfig(dsn=f"postgresql://app:{SECRET}@db/app", connect_kwargs={"password": SECRET})
    for text in (repr(config), str(config), f"{config}"):
        assert SECRET not in text
        assert "postgresql://app:***@db/app" in text


async def test_bad_dsn_error_shows_the_dsn_redacted() -> None:
    with pytest.raises(PoolConfigError) as info:
        await Pool(f"mysql://app:{SECRET}@db/app", telemetry=False).open()
    assert SECRET not in str(info.value)
    assert "pool 'asyncpool': the DSN cannot be used" in str(info.value)
    assert "scheme 'mysql'" in str(info.value)


async def test_connect_failure_error_and_logs_carry_no_password(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    dsn = f"postgresql://app:{SECRET}@127.0.0.1:{free_port()}/app"
    pool = Pool(dsn, min_size=1, acquire_timeout=1, connect_timeout=0.5, telemetry=False)
    with pytest.raises(ConnectError) as info:
        await pool.open()
    shown = "".join(traceback.format_exception(info.value))
    assert "app@127.0.0.1" in str(info.value)
    assert SECRET not in shown
    assert SECRET not in caplog.text
    assert SECRET not in repr(pool)


# --- The DSN guard: parsed once, never quoted -------------------------------------------------



@pytest.mark.parametrize(
    ("dsn", "why"),
    [
        # The part before an unescaped / is digits: it used to parse as host "app", port 42.
        ("postgresql://app:42/SECRETpart@host/db", "ends it early"),
        ("postgresql://app:/SECRETpart@host/db", "ends it early"),
        ("postgresql://app:pa?SECRETpart@host/db", "ends it early"),
        ("postgresql://app:pa#SECRETpart@host/db", "fragment"),
        ("postgresql://app:pa@SECRETpart@host/db", "ends it early"),  # pragma: allowlist secret
        ("postgresql://app:SECRETpart/host/db", "port is not a number"),
        ("postgresql://app:pa\uff20SECRETpart@host/db", "non-ASCII"),  # pragma: allowlist secret
        ("postgresql://app:pa\uff0fSECRETpart@host/db", "non-ASCII"),  # pragma: allowlist secret
        ("postgresql://app:pa\nSECRETpart@host/db", "line break"),  # pragma: allowlist secret
        ("postgresql://app:pa[SECRETpart@host/db", "\\[ or \\]"),
        ("postgresql://app:pa SECRETpart@host/db", "space"),
        ("postgresql://app:%zzSECRETpart@host/db", "two hex digits"),  # pragma: allowlist secret
        ("postgresql://app:%C3SECRETpart@host/db", "not UTF-8"),  # pragma: allowlist secret
        ("postgresql://app@host/db?password=a&SECRETpart", "not key=value"),
        ("postgresql://app@host/db?password=a&SECRETpart=b", "not key=value"),
        ("postgresql://app@host/db?password=a+SECRETpart", "asyncpg reads as a space"),
        ("mysql://app:SECRETpart@host/db", "not a postgresql:// URL"),  # pragma: allowlist secret
    ],
)
def test_dsn_guard_refuses_ambiguous_passwords_without_quoting_them(dsn: str, why: str) -> None:
    with pytest.raises(DsnError, match=why) as info:
        parse_dsn(dsn)
    assert "SECRET" not in str(info.value)
    assert "percent-encode" in str(info.value) or "postgresql://user" in str(info.value)
    # Nothing chained, and no frame of the parser holds the DSN (error trackers record locals).
    assert info.value.__cause__ is None
    assert info.value.__context__ is None
    tb = info.value.__traceback__
    while tb is not None:
        if tb.tb_frame.f_code.co_filename.endswith("dsn.py"):
            assert "SECRET" not in repr(tb.tb_frame.f_locals)
        tb = tb.tb_next
    assert redact_dsn(dsn) == "<DSN not shown: it could not be parsed>"


@pytest.mark.parametrize("key", ["pasword", "passwd", "pwd", "PASSWORD", "Password",
                                 "sslpasword", "pass"])
def test_a_misspelt_password_key_is_refused_without_quoting_its_value(key: str) -> None:
    """An unknown query key is a server setting, sent at login and shown in the config's repr:
    a misspelt password's value would have been."""
    with pytest.raises(DsnError, match=f"query key {key!r} looks like a misspelt password") as info:
        parse_dsn(f"postgresql://app@host/db?{key}=SECRETpart")
    assert "SECRET" not in str(info.value)


@pytest.mark.parametrize("key", ["password_encryption", "application_name", "search_path",
                                 "passfile", "sslpassword"])
def test_settings_and_keys_near_password_are_not_mistaken_for_it(key: str) -> None:
    assert parse_dsn(f"postgresql://app@host/db?{key}=x").params[key] == "x"


@pytest.mark.parametrize(
    ("dsn", "message"),
    [
        ("postgresql://app@h/db?sslmode=verify-full&sslmode=disable", "'sslmode' is given twice"),
        ("postgresql://app@h/db?host=evil", "host twice"),
        ("postgresql://app@h:5432/db?port=6432", "port twice"),
        ("postgresql://app:x@h/db?password=y", "password twice"),
        ("postgresql://app@h/db?user=root", "user twice"),
        ("postgresql://app@h/db?dbname=other", "database twice"),
        ("postgresql://app@h?dbname=a&database=b", "database twice"),
    ],
)
def test_dsn_guard_refuses_a_setting_given_twice(dsn: str, message: str) -> None:
    with pytest.raises(DsnError, match=message):
        parse_dsn(dsn)


def test_dsn_guard_reads_percent_encoded_passwords_and_rebuilds_the_dsn() -> None:
    from urllib.parse import quote

    password = "a/b@c#d?e%f&g+h i:j\uff20k\u00e9\n"  # pragma: allowlist secret
    parsed = parse_dsn(f"postgresql://app:{quote(password, safe='')}@db:6432/app?sslmode=require")
    assert parsed.password == password
    assert parsed.target().port == 6432
    assert parsed.target().host == "db"
    assert parsed.redacted() == "postgresql://app:***@db:6432/app?sslmode=require"
    assert parsed.for_driver() == "postgresql://app@db:6432/app?sslmode=require"
    assert password not in repr(parsed)
    query = parse_dsn(f"postgresql://app@db/app?password={quote(password, safe='')}")
    assert query.password == password
    assert query.redacted() == "postgresql://app:***@db/app"
    hosts = parse_dsn("postgresql:///app?host=/run/pg,h2&port=5433&user=bob")
    assert hosts.hosts == (("/run/pg", 5433), ("h2", 5433))
    assert str(hosts.target()) == "bob@/run/pg:5433/app"
    assert parse_dsn("postgres://u@[::1]:5433/d").target().host == "::1"


def test_translated_errors_keep_sqlstate_and_class_but_no_cause() -> None:
    import asyncpg

    exc = asyncpg.InvalidPasswordError(f'password authentication failed ("{SECRET}")')
    target = parse_dsn("postgresql://app@db/app").target()
    error = translate(exc, target, "p", 1.0, secrets=[SECRET])
    assert error.sqlstate == "28P01"
    assert error.driver_error_class == "asyncpg.exceptions.InvalidPasswordError"
    assert error.__cause__ is None
    assert error.__suppress_context__
    assert SECRET not in str(error)
    assert SECRET[2:7] not in str(error)


def test_bench_refuses_a_malformed_admin_dsn_before_starting_and_never_quotes_it(
    capsys: pytest.CaptureFixture[str],
) -> None:
    from asyncpool.cli.main import main

    code = main(["bench", "--dsn", "postgresql://app@127.0.0.1:1/app", "--clients", "1",
                 "--admin-dsn", f"postgresql://pgb_stats:{SECRET}/x@127.0.0.1:1/pgbouncer"])
    shown = capsys.readouterr()
    assert code == 2
    assert "percent-encode" in shown.err
    assert SECRET[:6] not in shown.out + shown.err
