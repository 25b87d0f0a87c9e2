"""checkov over terraform/: resources really scanned, no failed check, every skip justified.

checkov is run with --skip-download (its start-up download of guideline mappings cannot work
offline). An empty scan reports resource_count 0 and no summary, so "0 failed" alone proves
nothing: the test also requires scanned resources and passed checks, and shows with a planted
misconfiguration that the same run does fail.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]
TERRAFORM = ROOT / "terraform"
ROOT_DIR = Path(__file__).resolve().parents[1]
# scripts/setup.sh installs checkov into a venv of its own (it pins a vulnerable urllib3).
_VERSION = re.search(r"^checkov_version=(\S+)$", (ROOT_DIR / "scripts/setup.sh").read_text(), re.MULTILINE)
CHECKOV = ROOT_DIR / ".cache" / f"checkov-{_VERSION.group(1) if _VERSION else 'missing'}" / "bin" / "checkov"


def run_checkov(directory: Path) -> dict[str, Any]:
    """checkov's JSON report for the Terraform in `directory` (one framework: one report)."""
    if not CHECKOV.exists():
        pytest.fail(f"checkov is not installed at {CHECKOV}: run scripts/setup.sh")
    out = subprocess.run(
        [
            str(CHECKOV),
            "--directory",
            str(directory),
            "--framework",
            "terraform",
            "--skip-download",
            "--compact",
            "--output",
            "json",
        ],
        capture_output=True,
        text=True,
        check=False,
        timeout=300,
        cwd=directory,
    )
    # Exit 1 means failed checks; anything else but 0 is checkov itself failing.
    assert out.returncode in (0, 1), f"checkov exited {out.returncode}:\n{out.stderr[-3000:]}"
    report = json.loads(out.stdout)
    if isinstance(report, list):  # several frameworks: one report each
        report = next(r for r in report if r.get("check_type") == "terraform")
    assert isinstance(report, dict), report
    return report


def _skip_reasons(report: dict[str, Any]) -> list[tuple[str, str, str]]:
    return [
        (c["check_id"], c["resource"], (c.get("check_result") or {}).get("suppress_comment") or "")
        for c in report["results"].get("skipped_checks", [])
    ]


@pytest.fixture(scope="module")
def report() -> dict[str, Any]:
    return run_checkov(TERRAFORM)


def test_checkov_scanned_resources_and_failed_none(report: dict[str, Any]) -> None:
    summary = report.get("summary")
    assert summary is not None, f"empty scan (no summary): {report}"
    assert summary["resource_count"] > 0, summary
    assert summary["passed"] > 0, summary
    assert summary["parsing_errors"] == 0, summary
    failed = [
        (c["check_id"], c["resource"], c["file_path"]) for c in report["results"].get("failed_checks", [])
    ]
    assert failed == []
    assert summary["failed"] == 0, summary


def test_checkov_saw_every_module(report: dict[str, Any]) -> None:
    """Each module and the example contributed resources (a module checkov skipped proves nothing)."""
    files = {c["file_path"] for c in report["results"]["passed_checks"]}
    for part in ("/modules/rds-proxy/", "/modules/pgbouncer-fargate/", "/examples/lambda/"):
        assert any(part in f for f in files), (part, sorted(files))
    resources = {c["resource"].rsplit(".", 2)[-2] for c in report["results"]["passed_checks"]}
    for kind in ("aws_lambda_function", "aws_ecs_task_definition", "aws_lb", "aws_secretsmanager_secret"):
        assert kind in resources, sorted(resources)


def test_every_checkov_skip_is_justified(report: dict[str, Any]) -> None:
    skips = _skip_reasons(report)
    for check_id, resource, reason in skips:
        assert len(reason.split()) >= 6, f"{check_id} on {resource} is skipped without a real reason"
    # The suppressions in the sources are exactly the ones reported (none stale, none hidden).
    comments = [
        line.split("checkov:skip=", 1)[1].split(":", 1)[0]
        for path in TERRAFORM.rglob("*.tf")
        for line in path.read_text().splitlines()
        if "checkov:skip=" in line
    ]
    assert sorted(comments) == sorted(c for c, _, _ in skips)


def test_checkov_fails_a_planted_misconfiguration(tmp_path: Path) -> None:
    """The same run and the same assertions catch a bad resource."""
    shutil.copytree(TERRAFORM / "modules" / "rds-proxy", tmp_path / "rds-proxy")
    (tmp_path / "rds-proxy" / "planted.tf").write_text(
        'resource "aws_security_group" "planted" {\n'
        '  name        = "planted"\n'
        '  description = "ssh from anywhere"\n'
        "  ingress {\n"
        '    description = "ssh"\n'
        "    from_port   = 22\n"
        "    to_port     = 22\n"
        '    protocol    = "tcp"\n'
        '    cidr_blocks = ["0.0.0.0/0"]\n'
        "  }\n"
        "}\n"
        'resource "aws_db_proxy_default_target_group" "planted" {\n'
        '  db_proxy_name = "x"\n'
        "}\n"
    )
    planted = run_checkov(tmp_path / "rds-proxy")
    assert planted["summary"]["resource_count"] > 0
    failed = {c["check_id"] for c in planted["results"]["failed_checks"]}
    assert "CKV_AWS_24" in failed, failed  # SSH open to the world
