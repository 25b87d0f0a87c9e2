"""The secret scan in detect-secrets' own form: `.secrets.baseline` holds the findings audited as
false positives, and nothing else may turn up.

Two detect-secrets are checked: Yelp's (what pre-commit runs, `.pre-commit-config.yaml`; setup.sh
installs it into `.cache/detect-secrets-<version>`) and the fork checkov installs into `.venv`
(bc-detect-secrets, which owns the `detect-secrets` command there). They differ (the fork knows
fewer plugins, and each flags lines the other does not), so the baseline is written by the fork,
whose plugin list both can load, and a line only Yelp's flags carries `pragma: allowlist secret`.

A new finding is audited by whoever adds it: `detect-secrets scan --baseline .secrets.baseline`,
then `detect-secrets audit .secrets.baseline` (mark it a false positive), or `pragma: allowlist
secret` on its line.
"""

from __future__ import annotations

import json
import re
import secrets
import shutil
import string
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]
BASELINE = ".secrets.baseline"
FORK_BIN = Path(sys.executable).parent


def _yelp_bin() -> Path:
    config = (ROOT / ".pre-commit-config.yaml").read_text()
    version = re.search(r"rev: v([0-9.]+) +# detect-secrets", config)
    assert version, "the detect-secrets hook's rev is not pinned in .pre-commit-config.yaml"
    return ROOT / ".cache" / f"detect-secrets-{version[1]}" / "bin"


def _fork_bin() -> Path:
    return FORK_BIN


TOOLS: dict[str, Callable[[], Path]] = {"yelp": _yelp_bin, "checkov-fork": _fork_bin}


def _installed(name: str) -> Path:
    bindir = TOOLS[name]()
    if not (bindir / "detect-secrets-hook").exists():
        pytest.fail(f"detect-secrets is not installed in {bindir}: run scripts/setup.sh")
    return bindir


@pytest.fixture(params=sorted(TOOLS))
def tool(request: pytest.FixtureRequest) -> Path:
    return _installed(request.param)


def tracked_files(root: Path) -> list[str]:
    out = subprocess.run(["git", "ls-files", "-z"], cwd=root, capture_output=True, check=True)
    return sorted(n for n in out.stdout.decode().split("\0")
                  if n and n != BASELINE and (root / n).is_file())


def rescan(bindir: Path, root: Path, baseline: Path) -> dict[str, Any]:
    """`detect-secrets scan --baseline` over `root`'s tracked files, into a copy of `baseline`
    (the scan rewrites the file it is given; the repository's stays as committed)."""
    with tempfile.TemporaryDirectory() as scratch:
        work = Path(scratch) / "baseline-under-test.json"
        shutil.copy(baseline, work)
        result = subprocess.run(
            [str(bindir / "detect-secrets"), "scan", "--baseline", str(work),
             "--exclude-files", r"^\.secrets\.baseline$"],
            cwd=root, capture_output=True, text=True, check=False, timeout=120,
        )
        assert result.returncode == 0, result.stderr[-2000:]
        report: dict[str, Any] = json.loads(work.read_text())
    return report


def hook(bindir: Path, root: Path, baseline: Path, files: list[str]) -> subprocess.CompletedProcess[str]:
    """The pre-commit hook over `files`, against a copy of `baseline` (the hook may update it)."""
    with tempfile.TemporaryDirectory() as scratch:
        work = Path(scratch) / "baseline-for-hook.json"
        shutil.copy(baseline, work)
        return subprocess.run(
            [str(bindir / "detect-secrets-hook"), "--baseline", str(work), *files],
            cwd=root, capture_output=True, text=True, check=False, timeout=120,
        )


def unaudited(report: dict[str, Any]) -> list[str]:
    return [f"{name}:{hit['line_number']} {hit['type']}"
            for name, hits in report["results"].items() for hit in hits
            if hit.get("is_secret") is not False]


# Over the whole repository (a minute or more each on a loaded 2-core machine), each tool where
# the project relies on it: the fork writes the baseline (`scan --baseline`), and pre-commit runs
# Yelp's hook. The other pairing adds nothing these two miss: both report every finding that is
# not audited in the baseline.
def test_the_baseline_holds_only_audited_false_positives() -> None:
    tool = _installed("checkov-fork")
    files = tracked_files(ROOT)
    for expected in ("compose.yaml", ".env.example", "terraform/modules/rds-proxy/main.tf",
                     "asyncpool/__init__.py", ".pre-commit-config.yaml"):
        assert expected in files, expected  # the scan covers the infrastructure and the package
    assert ".env" not in files, ".env must never be committed"
    committed = json.loads((ROOT / BASELINE).read_text())
    assert len(committed["plugins_used"]) >= 20
    assert unaudited(committed) == [], "every finding in the baseline must be audited"
    report = rescan(tool, ROOT, ROOT / BASELINE)
    assert sum(len(h) for h in report["results"].values()) >= 10  # it does find the placeholders
    assert unaudited(report) == [], (
        "new findings: audit them (detect-secrets scan --baseline .secrets.baseline; "
        "detect-secrets audit .secrets.baseline) or mark the line `pragma: allowlist secret`"
    )


def test_the_pre_commit_hook_passes_on_every_tracked_file() -> None:
    result = hook(_installed("yelp"), ROOT, ROOT / BASELINE, tracked_files(ROOT))
    # 3: only line numbers of audited findings moved; under pre-commit the hook rewrites the
    # baseline and asks for it to be added. 1: a finding that is not in the baseline.
    assert result.returncode in (0, 3), result.stdout[-3000:] + result.stderr[-2000:]
    assert "Potential secrets" not in result.stdout


def _fake_aws_key_id() -> str:
    return "AKIA" + "".join(secrets.choice(string.ascii_uppercase + "234567") for _ in range(16))


def _password(nbytes: int) -> str:
    """A random URL-safe password that does not start with ``-``: both detect-secrets builds
    skip a quoted keyword value that does (``password = "-..."``), one draw in 64 of
    `secrets.token_urlsafe`, which made the planted-secret tests fail about one run in ten."""
    while (value := secrets.token_urlsafe(nbytes)).startswith("-"):
        pass
    return value


def _repo(tmp_path: Path, files: dict[str, str]) -> Path:
    subprocess.run(["git", "init", "-q"], cwd=tmp_path, check=True)
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    subprocess.run(["git", "add", "."], cwd=tmp_path, check=True)
    return tmp_path


PLANTED: list[tuple[str, Callable[[], str]]] = [
    ("settings.py", lambda: f'DB_PASSWORD = "{_password(24)}"\n'),
    ("deploy.env", lambda: f"AWS_ACCESS_KEY_ID={_fake_aws_key_id()}\n"),
    ("compose.override.yaml",
     lambda: f"services:\n  db:\n    environment:\n      POSTGRES_PASSWORD: {secrets.token_hex(20)}\n"),
    ("main.tf",
     lambda: 'resource "aws_db_instance" "x" {\n  password = "' + _password(24) + '"\n}\n'),
    ("tls.key", lambda: ("-----BEGIN " + "RSA PRIVATE KEY-----\n" + secrets.token_hex(32)
                         + "\n-----END RSA PRIVATE KEY-----\n")),
    ("dsn.py", lambda: f'DSN = "postgresql://app:{_password(12)}@db.example.internal/app"\n'),
]


def test_every_planted_secret_is_found(tool: Path, tmp_path: Path) -> None:
    """With the repository's baseline (its plugins and filters), in a throwaway git repository
    holding one secret of each kind, each in its own file, beside a clean one: each is found
    where it is, by the hook and by a scan."""
    # Generated here, so this file itself holds no secret.
    repo = _repo(tmp_path, {"clean.txt": "nothing to see\n",
                            **{name: content() for name, content in PLANTED}})
    result = hook(tool, repo, ROOT / BASELINE, tracked_files(repo))
    assert result.returncode == 1, result.stdout + result.stderr
    missed = [name for name, _ in PLANTED if f"Location:    {name}:" not in result.stdout]
    assert not missed, result.stdout
    assert "clean.txt" not in result.stdout
    found = {f.split(":")[0] for f in unaudited(rescan(tool, repo, ROOT / BASELINE))}
    assert found == {name for name, _ in PLANTED}, found


def test_an_audit_excuses_only_the_value_it_was_made_for(tool: Path, tmp_path: Path) -> None:
    placeholder = 'api_password = "placeholder-for-the-docs"\n'  # pragma: allowlist secret
    repo = _repo(tmp_path, {"app.py": placeholder})
    audited = rescan(tool, repo, ROOT / BASELINE)
    assert {f.split()[0] for f in unaudited(audited)} == {"app.py:1"}
    for hit in audited["results"]["app.py"]:
        hit["is_secret"] = False  # what `detect-secrets audit` records for a false positive
    baseline = tmp_path / "audited.baseline"
    baseline.write_text(json.dumps(audited))
    assert hook(tool, repo, baseline, ["app.py"]).returncode == 0

    (repo / "app.py").write_text(placeholder + f'db_password = "{_password(20)}"\n')
    result = hook(tool, repo, baseline, ["app.py"])
    assert result.returncode == 1
    assert "Location:    app.py:2" in result.stdout
    assert "app.py:1" not in result.stdout
