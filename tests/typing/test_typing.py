"""User code type-checks against asyncpool as it would against asyncpg: `user_code.py` passes
``mypy --strict``, and every deliberate mistake in `user_mistakes.py` is caught, on its line.

This folder has no ``__init__.py``: a package named ``typing`` would hide the standard library's
from scripts run from ``tests/``. mypy is pointed at this checkout's asyncpool (MYPYPATH).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
_ERROR = re.compile(r"^(?P<path>[^:]+):(?P<line>\d+): error: .*\[(?P<code>[a-z-]+)\]$")


def _mypy(path: Path, cache: Path) -> tuple[int, str]:
    result = subprocess.run(
        [sys.executable, "-m", "mypy", "--strict", "--config-file", str(ROOT / "pyproject.toml"),
         "--no-error-summary", "--show-error-codes", "--cache-dir", str(cache), str(path)],
        cwd=ROOT, capture_output=True, text=True, timeout=300, check=False,
        env={**os.environ, "MYPYPATH": str(ROOT)},
    )
    return result.returncode, result.stdout + result.stderr


def test_user_code_passes_mypy_strict(tmp_path: Path) -> None:
    status, output = _mypy(HERE / "user_code.py", tmp_path / "cache")
    assert (status, output) == (0, "")


def test_each_mistake_fails_mypy_strict_on_its_line(tmp_path: Path) -> None:
    lines = (HERE / "user_mistakes.py").read_text().splitlines()
    assert lines[0] == "# mypy: ignore-errors"
    expected = {
        (number, match.group(1))
        for number, line in enumerate(lines, start=1)
        if (match := re.search(r"# error: ([a-z-]+)$", line))
    }
    assert len(expected) == 23
    path = tmp_path / "user_mistakes.py"
    path.write_text("\n".join(["#", *lines[1:]]) + "\n")  # same line numbers
    status, output = _mypy(path, tmp_path / "cache")
    found = set()
    for line in output.splitlines():
        match = _ERROR.match(line)
        if match:
            assert Path(match["path"]).name == path.name, line  # no error in asyncpool itself
            found.add((int(match["line"]), match["code"]))
    assert status == 1
    assert found == expected, output
