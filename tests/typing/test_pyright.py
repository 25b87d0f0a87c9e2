"""User code type-checks under pyright's strict mode (what Pylance users run), with asyncpg's
types installed: no error, every ``assert_type`` holding. mypy and pyright differ where the
types are not spelt out (a type variable solved from a parameter's default: ``Pool(dsn)`` was a
``Pool[Any]`` to pyright), so both check the same files.

pyright runs from a venv of its own (scripts/setup.sh, from requirements/pyright.lock), on the
Node.js its wheel brings: nothing is downloaded here. It resolves ``asyncpool`` to this checkout
(``extraPaths``) and everything else to this interpreter's packages. Without asyncpg-stubs,
pyright reads asyncpg's untyped source: its own methods are partly Unknown, which is asyncpg's,
not ours, so that run is left out.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
_VERSION = re.search(r"^pyright\[nodejs\]==(\S+)$", (ROOT / "requirements/pyright.in").read_text(),
                     re.MULTILINE)
PYRIGHT = ROOT / ".cache" / f"pyright-{_VERSION.group(1) if _VERSION else 'missing'}" / "bin" / "pyright"


def _pyright(path: Path, tmp: Path) -> tuple[dict[str, Any], list[tuple[int, str, str]], str]:
    """pyright's report on `path` in strict mode, and its problems: (line, rule, message)."""
    if not PYRIGHT.exists():
        pytest.fail(f"pyright is not installed at {PYRIGHT}: run scripts/setup.sh")
    config = tmp / "pyrightconfig.json"
    config.write_text(json.dumps({
        "typeCheckingMode": "strict",
        "pythonVersion": f"{sys.version_info[0]}.{sys.version_info[1]}",
        "extraPaths": [str(ROOT)],
    }))
    result = subprocess.run(
        [str(PYRIGHT), "--project", str(config), "--pythonpath", sys.executable, "--outputjson",
         str(path)],
        cwd=tmp, capture_output=True, text=True, timeout=300, check=False,
        # No check for a newer pyright (a request to PyPI); Node.js from the wheel only.
        env={**os.environ, "PYRIGHT_PYTHON_IGNORE_WARNINGS": "1", "PYRIGHT_PYTHON_GLOBAL_NODE": "0"},
    )
    report: dict[str, Any] = json.loads(result.stdout) if result.stdout.startswith("{") else {}
    assert report, result.stdout + result.stderr
    assert report["summary"]["filesAnalyzed"] == 1
    problems = [
        (d["range"]["start"]["line"] + 1, str(d.get("rule")), d["message"])
        for d in report.get("generalDiagnostics", []) if d["severity"] != "information"
    ]
    return report, problems, result.stdout + result.stderr


@pytest.mark.parametrize("name", ["user_code.py", "user_integrations.py"])
def test_user_code_passes_pyright_strict(tmp_path: Path, name: str) -> None:
    report, problems, output = _pyright(HERE / name, tmp_path)
    assert [f"{name}:{line}: {message} ({rule})" for line, rule, message in problems] == []
    assert report["summary"]["errorCount"] == 0, output


def test_a_pool_annotated_with_rows_it_does_not_return_fails_pyright_strict(
        tmp_path: Path) -> None:
    """``pool: Pool[Row] = Pool(dsn)`` (no ``record_class=Row``) and the like: an error on
    each marked line of `user_pool_rows.py`, of the rule named there, and on no other."""
    path = HERE / "user_pool_rows.py"
    marked = {(number, match.group(1))
              for number, line in enumerate(path.read_text().splitlines(), start=1)
              if (match := re.search(r"# error: [a-z-]+ / (report\w+)$", line))}
    assert len(marked) == 14
    _, problems, output = _pyright(path, tmp_path)
    assert {(line, rule) for line, rule, _ in problems} == marked, output
