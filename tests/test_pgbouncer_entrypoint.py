"""deploy/pgbouncer/entrypoint.sh: what it renders and what it refuses, run with /bin/sh.

The script ends by exec-ing its arguments with the rendered pgbouncer.ini appended, so running it
with `cat` prints exactly the configuration PgBouncer would get.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ENTRYPOINT = ROOT / "deploy" / "pgbouncer" / "entrypoint.sh"
SETTINGS = ROOT / "asyncpool" / "testing" / "pgbouncer.ini"
CA = "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----"


def render(tmp_path: Path, **env: str) -> subprocess.CompletedProcess[str]:
    base = {
        "PATH": "/usr/bin:/bin",
        "PGBOUNCER_SETTINGS_FILE": str(SETTINGS),
        "PGBOUNCER_CONF_DIR": str(tmp_path / "conf"),
        "DB_HOST": "db.example.internal",
        "APP_DB_PASSWORD": "app-password",  # pragma: allowlist secret
    }
    return subprocess.run(
        ["sh", str(ENTRYPOINT), "cat"],
        env={**base, **env},
        capture_output=True,
        text=True,
        check=False,
        timeout=30,
    )


def settings(out: str) -> dict[str, str]:
    """The rendered file's own `key = value` lines (the shared file is only %include-d)."""
    return {
        k.strip(): v.strip() for k, _, v in (line.partition("=") for line in out.splitlines() if "=" in line)
    }


def test_backend_tls_defaults_to_verify_full_and_needs_the_ca(tmp_path: Path) -> None:
    out = render(tmp_path)
    assert out.returncode == 64
    assert "needs PGBOUNCER_SERVER_TLS_CA" in out.stderr
    assert "PGBOUNCER_SERVER_TLS_SSLMODE=disable explicitly" in out.stderr
    out = render(tmp_path, PGBOUNCER_SERVER_TLS_CA=CA)
    assert out.returncode == 0, out.stderr
    rendered = settings(out.stdout)
    assert rendered["server_tls_sslmode"] == "verify-full"
    assert Path(rendered["server_tls_ca_file"]).read_text().strip() == CA


@pytest.mark.parametrize("mode", ["verify-ca", "verify-full"])
def test_every_verifying_mode_needs_the_ca(tmp_path: Path, mode: str) -> None:
    out = render(tmp_path, PGBOUNCER_SERVER_TLS_SSLMODE=mode)
    assert out.returncode == 64
    assert f"PGBOUNCER_SERVER_TLS_SSLMODE={mode} needs PGBOUNCER_SERVER_TLS_CA" in out.stderr


def test_a_weaker_backend_mode_only_by_name(tmp_path: Path) -> None:
    out = render(tmp_path, PGBOUNCER_SERVER_TLS_SSLMODE="disable")
    assert out.returncode == 0, out.stderr
    assert settings(out.stdout)["server_tls_sslmode"] == "disable"
    out = render(tmp_path, PGBOUNCER_SERVER_TLS_SSLMODE="verify_full")
    assert out.returncode == 64
    assert "is not a PgBouncer sslmode" in out.stderr


def test_console_user_is_read_only_and_no_admin_by_default(tmp_path: Path) -> None:
    out = render(tmp_path, PGBOUNCER_SERVER_TLS_SSLMODE="disable", PGBOUNCER_STATS_PASSWORD="stats-pw")
    assert out.returncode == 0, out.stderr
    rendered = settings(out.stdout)
    assert rendered["stats_users"] == "pgb_stats"
    assert rendered["admin_users"] == ""
    users = (tmp_path / "conf" / "userlist.txt").read_text().splitlines()
    assert [line.split()[0] for line in users] == ['"app"', '"pgb_stats"']


def test_an_admin_user_only_when_named(tmp_path: Path) -> None:
    out = render(tmp_path, PGBOUNCER_SERVER_TLS_SSLMODE="disable", PGBOUNCER_ADMIN_PASSWORD="admin-pw")
    assert out.returncode == 64
    assert "without PGBOUNCER_ADMIN_USER" in out.stderr
    out = render(tmp_path, PGBOUNCER_SERVER_TLS_SSLMODE="disable", PGBOUNCER_ADMIN_USER="ops")
    assert out.returncode == 64
    assert "PGBOUNCER_ADMIN_PASSWORD (or _FILE) is empty" in out.stderr
    out = render(
        tmp_path,
        PGBOUNCER_SERVER_TLS_SSLMODE="disable",
        PGBOUNCER_ADMIN_USER="ops",
        PGBOUNCER_ADMIN_PASSWORD="admin-pw",  # pragma: allowlist secret
    )
    assert out.returncode == 0, out.stderr
    assert settings(out.stdout)["admin_users"] == "ops"


def test_the_shared_file_cannot_grant_console_access(tmp_path: Path) -> None:
    """The deployment's lists come after the shared file's, so they win even if it sets one."""
    shared = tmp_path / "shared.ini"
    shared.write_text(SETTINGS.read_text() + "\nadmin_users = app\n")
    out = render(tmp_path, PGBOUNCER_SERVER_TLS_SSLMODE="disable", PGBOUNCER_SETTINGS_FILE=str(shared))
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    include = next(i for i, line in enumerate(lines) if line.startswith("%include"))
    admin = [i for i, line in enumerate(lines) if line.startswith("admin_users")]
    assert admin
    assert admin[-1] > include
    assert settings(out.stdout)["admin_users"] == ""
