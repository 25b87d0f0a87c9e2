"""No password or IAM token in what asyncpool prints: DSN redaction, reprs, errors, logs."""

from __future__ import annotations

import logging
import traceback

import pytest

from asyncpool import ConnectError, Pool, PoolConfig, PoolConfigError
from asyncpool.connect.dsn import redact
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
    assert "mysql://app:***@db/app" in str(info.value)


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
