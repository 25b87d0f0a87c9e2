"""User code type-checks under pyright's strict mode (what Pylance users run), with asyncpg's
types installed: no error, every ``assert_type`` holding. mypy and pyright differ where the
types are not spelt out (a type variable solved from a parameter's default: ``Pool(dsn)`` was a
``Pool[Any]`` to pyright), so both check the same files, and refuse the same marked mistakes
(`user_pool_rows.py`, `user_options.py`).

pyright runs from a venv of its own (scripts/setup.sh, from requirements/pyright.lock), on the
Node.js its wheel brings: nothing is downloaded here. It resolves ``asyncpool`` to this checkout
(``extraPaths``) and everything else to this interpreter's packages. Without asyncpg-stubs,
pyright reads asyncpg's untyped source: its own methods are partly Unknown, which is asyncpg's,
not ours, so that run is left out.
"""

from __future__ import annotations

import fcntl
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


#: Every file checked, in one pyright run (each file's report is its own: no file imports another).
FILES = ("user_code.py", "user_integrations.py", "user_pool_rows.py", "user_options.py")


@pytest.fixture(scope="module")
def reports(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """pyright's report on `FILES` in strict mode, made once for the session (the first
    pytest-xdist worker to ask runs it, the others read it): a run costs ~4 s, most of it
    Node.js starting and reading the standard library's and asyncpool's types."""
    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent  # the session's directory, above each worker's own
    shared = root / "typing-pyright"
    shared.mkdir(exist_ok=True)
    saved = shared / "report.json"
    with (shared / "lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not saved.exists():
            saved.write_text(json.dumps(_pyright([HERE / name for name in FILES], shared)))
    result: dict[str, Any] = json.loads(saved.read_text())
    return result


def _pyright(paths: list[Path], tmp: Path) -> dict[str, Any]:
    """pyright's report on `paths` in strict mode, and its output if it made none."""
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
         *map(str, paths)],
        cwd=tmp, capture_output=True, text=True, timeout=300, check=False,
        # No check for a newer pyright (a request to PyPI); Node.js from the wheel only.
        env={**os.environ, "PYRIGHT_PYTHON_IGNORE_WARNINGS": "1", "PYRIGHT_PYTHON_GLOBAL_NODE": "0"},
    )
    report: dict[str, Any] = json.loads(result.stdout) if result.stdout.startswith("{") else {}
    return {"report": report, "output": result.stdout + result.stderr}


def _problems(reports: dict[str, Any], name: str) -> tuple[list[tuple[int, str, str]], str]:
    """The problems pyright found in `name`: (line, rule, message); and its whole output."""
    report, output = reports["report"], reports["output"]
    assert report, output
    assert report["summary"]["filesAnalyzed"] == len(FILES)
    problems = [
        (d["range"]["start"]["line"] + 1, str(d.get("rule")), d["message"])
        for d in report.get("generalDiagnostics", [])
        if d["severity"] != "information" and Path(d.get("file", "")).name == name
    ]
    return problems, output


@pytest.mark.parametrize("name", ["user_code.py", "user_integrations.py"])
def test_user_code_passes_pyright_strict(reports: dict[str, Any], name: str) -> None:
    problems, output = _problems(reports, name)
    assert [f"{name}:{line}: {message} ({rule})" for line, rule, message in problems] == []
    assert not [d for d in reports["report"].get("generalDiagnostics", [])
                if d["severity"] == "error" and Path(d.get("file", "")).name == name], output


@pytest.mark.parametrize(("name", "count"), [("user_pool_rows.py", 15), ("user_options.py", 10)])
def test_each_marked_mistake_fails_pyright_strict(reports: dict[str, Any], name: str,
                                                  count: int) -> None:
    """``pool: Pool[Row] = Pool(dsn)`` (no ``record_class=Row``) and the like
    (`user_pool_rows.py`), ``config.replace(max_size="5")`` and the like (`user_options.py`):
    an error on each marked line, of the rule named there, and on no other."""
    path = HERE / name
    marked = {(number, match.group(1))
              for number, line in enumerate(path.read_text().splitlines(), start=1)
              if (match := re.search(r"# error: [a-z-]+ / (report\w+)$", line))}
    assert len(marked) == count
    problems, output = _problems(reports, name)
    assert {(line, rule) for line, rule, _ in problems} == marked, output
