"""detect-secrets over the repository finds nothing, and finds a secret when one is planted.

The scan covers the files git would commit: tracked ones plus untracked ones that .gitignore
does not exclude (.env, .venv and caches are ignored), so a secret is caught before its commit.
"""

from __future__ import annotations

import json
import secrets
import string
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]
DETECT_SECRETS = Path(sys.executable).with_name("detect-secrets")

# False positives are silenced by rule where a rule is sound, by audited hash otherwise.
#
# Rule 1, every file: dotted module paths of this package are not secrets (asyncpool/__init__.py
# maps "SecretsManagerAuth" to "asyncpool.credentials.secrets_manager" in its lazy-import table, which the
# keyword plugin reads as a secret).
EXCLUDE_SECRETS = r"^asyncpool(\.[a-z_]+)+$"
# Rule 2, Terraform files only: a literal needs quotes in HCL, so a line without any quote holds
# references and calls (`secrets = local.secrets`, `secret_string_wo = jsonencode({`), which the
# keyword plugin flags by name alone. Quoted values on .tf lines are still scanned.
HCL_EXCLUDE_LINES = r"^[^\"']*$"
# Rule 3, every file: a PostgreSQL URL with a password for a loopback host is a placeholder for a
# throwaway local server (usage lines, tests); the same URL for any other host is still reported.
LOOPBACK_DSN_LINES = r"postgres(?:ql)?://[^:/@\s]+:[^@\s]+@(?:127\.0\.0\.1|localhost|\[::1\])[:/]"

# Audited values: (plugin type, hashed_secret) -> where they occur and why they are not secrets.
# The hash is of the value, so an audit holds wherever the same placeholder appears. A new finding
# must be audited here (or marked "pragma: allowlist secret" on its line) by whoever adds it.
AUDITED: dict[tuple[str, str], str] = {
    (
        "Secret Keyword",
        "26b2e4d71fa9856e473043370df9449dabe2b9aa",  # pragma: allowlist secret
    ): "asyncpool/testing/aws_endpoint.py: moto's fake secret key, asyncpool-test-secret-access-key",
    (
        "Secret Keyword",
        "0df7dba0087b31c56c2e5584e2420424d6fb906a",  # pragma: allowlist secret
    ): "asyncpool/testing/aws_endpoint.py: moto's fake session token, asyncpool-test-session-token",
    (
        "Hex High Entropy String",
        "d5662d7353c6257f68cab2a3b0f758cc79b1ac5e",  # pragma: allowlist secret
    ): "examples/lambda_powertools/events/*.json: sample API Gateway apiId abcdef1234",
    (
        "Basic Auth Credentials",
        "1a91d62f7ca67399625a4368a6ab5d4a3baa6073",  # pragma: allowlist secret
    ): "tests/test_pool_api.py: placeholder DSN u:pw@h",
    (
        "Secret Keyword",
        "d5d1d3f9dfb268f3edb270e670fcec014beb7153",  # pragma: allowlist secret
    ): "tests/test_secrets_manager.py: moto-backed test value s3cret-value",
    (
        "Secret Keyword",
        "eaef1152cbc4449fe7352d429ba1f292c335e1ba",  # pragma: allowlist secret
    ): "tests/test_redaction.py: the value the redaction tests must never see printed",
    (
        "Secret Keyword",
        "6216eaab98a9f9d4a5a3bdea6d21ff5b854003fc",  # pragma: allowlist secret
    ): "docs/credentials-and-tls.md: token_host=, a host name in an IamAuth example",
}


def candidate_files(root: Path) -> list[str]:
    out = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=root,
        capture_output=True,
        check=True,
    )
    names = [n for n in out.stdout.decode().split("\0") if n]
    return sorted(n for n in names if (root / n).is_file())


def _detect_secrets(root: Path, files: list[str], *extra: str) -> dict[str, Any]:
    if not DETECT_SECRETS.exists():
        pytest.fail(f"detect-secrets is not installed next to {sys.executable}: install asyncpool[dev]")
    out = subprocess.run(
        [
            str(DETECT_SECRETS),
            "scan",
            "--exclude-secrets",
            EXCLUDE_SECRETS,
            "--exclude-lines",
            LOOPBACK_DSN_LINES,
            *extra,
            "--",
            *files,
        ],
        cwd=root,
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    report: dict[str, Any] = json.loads(out.stdout)
    return report


def scan(root: Path, files: list[str]) -> dict[str, Any]:
    """detect-secrets' report for `files` (relative to `root`); no network (no verification).

    Two runs: Terraform files with HCL_EXCLUDE_LINES, everything else without it.
    """
    hcl = [f for f in files if f.endswith((".tf", ".tfvars"))]
    other = [f for f in files if f not in hcl]
    report = _detect_secrets(root, other) if other else {"results": {}, "plugins_used": []}
    if hcl:
        report["results"].update(_detect_secrets(root, hcl, "--exclude-lines", HCL_EXCLUDE_LINES)["results"])
    return report


def findings(report: dict[str, Any], audited: dict[tuple[str, str], str] | None = None) -> list[str]:
    return [
        f"{name}:{hit['line_number']} {hit['type']}"
        for name, hits in report["results"].items()
        for hit in hits
        if (hit["type"], hit["hashed_secret"]) not in (audited or {})
    ]


def test_the_repository_holds_no_secret() -> None:
    files = candidate_files(ROOT)
    # The scan is not vacuous: it covers the infrastructure and the package.
    for expected in (
        "compose.yaml",
        ".env.example",
        "terraform/modules/rds-proxy/main.tf",
        "asyncpool/__init__.py",
    ):
        assert expected in files, expected
    assert ".env" not in files, ".env must be gitignored"
    report = scan(ROOT, files)
    assert len(report["plugins_used"]) >= 10, report["plugins_used"]
    assert findings(report, AUDITED) == []


def _fake_aws_key_id() -> str:
    return "AKIA" + "".join(secrets.choice(string.ascii_uppercase + "234567") for _ in range(16))


@pytest.mark.parametrize(
    ("name", "content"),
    [
        ("settings.py", lambda: f'DB_PASSWORD = "{secrets.token_urlsafe(24)}"\n'),
        ("deploy.env", lambda: f"AWS_ACCESS_KEY_ID={_fake_aws_key_id()}\n"),
        (
            "compose.override.yaml",
            lambda: f"services:\n  db:\n    environment:\n      POSTGRES_PASSWORD: {secrets.token_hex(20)}\n",
        ),
        (
            "main.tf",
            lambda: 'resource "aws_db_instance" "x" {\n  password = "' + secrets.token_urlsafe(24) + '"\n}\n',
        ),
        (
            "tls.key",
            lambda: (
                "-----BEGIN "
                + "RSA PRIVATE KEY-----\n"
                + secrets.token_hex(32)
                + "\n-----END RSA PRIVATE KEY-----\n"
            ),
        ),
    ],
)
def test_a_planted_secret_is_found(tmp_path: Path, name: str, content: Any) -> None:
    """Same candidate list and same scan as above, in a throwaway git repository."""
    subprocess.run(["git", "init", "-q"], cwd=tmp_path, check=True)
    (tmp_path / ".gitignore").write_text(".env\n")
    (tmp_path / "clean.txt").write_text("nothing to see\n")
    (tmp_path / name).write_text(content())  # generated here, so this file itself holds no secret
    (tmp_path / ".env").write_text(f"IGNORED_PASSWORD={secrets.token_urlsafe(24)}\n")
    files = candidate_files(tmp_path)
    assert name in files
    assert ".env" not in files
    hits = findings(scan(tmp_path, files))
    assert any(hit.startswith(f"{name}:") for hit in hits), hits
    assert not any(hit.startswith("clean.txt") for hit in hits)


def test_the_exclusion_does_not_hide_a_real_secret(tmp_path: Path) -> None:
    """The module-path rule only matches dotted asyncpool paths, not secrets next to them."""
    subprocess.run(["git", "init", "-q"], cwd=tmp_path, check=True)
    (tmp_path / "lazy.py").write_text(
        '_LAZY = {"SecretsManagerAuth": "asyncpool.credentials.secrets_manager"}\n'
        f'api_secret = "asyncpool-{secrets.token_urlsafe(24)}"\n'  # pragma: allowlist secret
    )
    hits = findings(scan(tmp_path, candidate_files(tmp_path)))
    assert {h.split()[0] for h in hits} == {"lazy.py:2"}, hits


def test_the_hcl_rule_still_scans_quoted_values(tmp_path: Path) -> None:
    """Quote-free .tf lines are skipped; a quoted secret in a .tf file is still found."""
    subprocess.run(["git", "init", "-q"], cwd=tmp_path, check=True)
    (tmp_path / "main.tf").write_text(
        f'locals {{\n  secrets = local.other_secrets\n  db_password = "{secrets.token_urlsafe(20)}"\n}}\n'
    )
    hits = findings(scan(tmp_path, candidate_files(tmp_path)))
    assert {h.split()[0] for h in hits} == {"main.tf:3"}, hits


def test_the_loopback_rule_keeps_other_hosts(tmp_path: Path) -> None:
    subprocess.run(["git", "init", "-q"], cwd=tmp_path, check=True)
    password = secrets.token_urlsafe(12)
    (tmp_path / "dsns.py").write_text(
        f'LOCAL = "postgresql://app:{password}@127.0.0.1:6432/app"\n'
        f'REMOTE = "postgresql://app:{password}@db.example.internal:5432/app"\n'
    )
    hits = findings(scan(tmp_path, candidate_files(tmp_path)))
    assert {h.split()[0] for h in hits} == {"dsns.py:2"}, hits
