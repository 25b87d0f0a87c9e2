"""The documentation site: strict MkDocs catches what it should, the API reference is built from the
docstrings, and the docs cite only files that are in the repository.

scripts/test.sh builds the real site with `mkdocs build --strict` (warnings are errors); these tests
show that such a build is not vacuous.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MKDOCS = Path(sys.executable).with_name("mkdocs")
TOP_LEVEL = ("asyncpool/", "docs/", "examples/", "tests/", "benchmarks/", "scripts/", "terraform/",
             "deploy/", ".ci/")


def _build(root: Path) -> subprocess.CompletedProcess[str]:
    if not MKDOCS.exists():
        pytest.fail(f"mkdocs is not installed next to {sys.executable}: pip install -e '.[docs]'")
    return subprocess.run([str(MKDOCS), "build", "--strict", "--site-dir", str(root / "site")],
                          cwd=root, capture_output=True, text=True, check=False, timeout=120)


@pytest.fixture
def site_copy(tmp_path: Path) -> Path:
    """The docs and mkdocs.yml in a scratch folder (the package is imported from the venv)."""
    shutil.copytree(ROOT / "docs", tmp_path / "docs")
    shutil.copy(ROOT / "mkdocs.yml", tmp_path / "mkdocs.yml")
    return tmp_path


def test_the_site_builds_and_the_api_reference_comes_from_docstrings(site_copy: Path) -> None:
    result = _build(site_copy)
    assert result.returncode == 0, result.stderr[-3000:]
    pool_page = (site_copy / "site" / "api" / "pool" / "index.html").read_text()
    # Methods that exist only in docstrings until now (issue #18), with their docstrings' words.
    for name in ("expire_all", "terminate", "invalidate_statement_cache", "raw", "wait"):
        assert name in pool_page, name
    assert "Start the pool and open" in pool_page  # Pool.open's docstring


def test_a_broken_link_fails_the_strict_build(site_copy: Path) -> None:
    (site_copy / "docs" / "troubleshooting.md").write_text("# T\n\n[gone](no-such-page.md)\n")
    result = _build(site_copy)
    assert result.returncode != 0
    assert "no-such-page.md" in result.stderr


def test_a_missing_api_object_fails_the_strict_build(site_copy: Path) -> None:
    with (site_copy / "docs" / "api" / "pool.md").open("a") as page:
        page.write("\n::: asyncpool.NoSuchThing\n")
    result = _build(site_copy)
    assert result.returncode != 0
    assert "asyncpool.NoSuchThing" in result.stderr


def test_the_docs_cite_only_files_in_the_repository() -> None:
    pages = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
    cited = 0
    missing = []
    for page in pages:
        text = page.read_text()
        for path in re.findall(r"`([A-Za-z0-9_.\-/]+)`", text) + re.findall(r"\]\(([^)#\s]+)", text):
            if path.startswith(("http:", "https:")) or not path.startswith(TOP_LEVEL):
                continue
            cited += 1
            base = ROOT if not path.startswith("../") else page.parent
            if not (base / path.rstrip("/")).exists():
                missing.append(f"{page.relative_to(ROOT)}: {path}")
    assert cited > 50  # the check reads the references it is meant to
    assert missing == []
    for page in pages:
        # Notes kept outside the repository (the team's field notes) are not something to cite.
        assert "FIELD-NOTES" not in page.read_text(), page
