"""User code type-checks against asyncpool as it would against asyncpg: `user_code.py` passes
``mypy --strict``, and every deliberate mistake in `user_mistakes.py` is caught, on its line."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
_ERROR = re.compile(r"^(?P<path>[^:]+):(?P<line>\d+): error: .*\[(?P<code>[a-z-]+)\]$")


def _mypy(path: Path) -> tuple[int, str]:
    result = subprocess.run(
        [sys.executable, "-m", "mypy", "--strict", "--config-file", str(ROOT / "pyproject.toml"),
         "--no-error-summary", "--show-error-codes", str(path.relative_to(ROOT))],
        cwd=ROOT, capture_output=True, text=True, timeout=300, check=False,
    )
    return result.returncode, result.stdout + result.stderr


def test_user_code_passes_mypy_strict() -> None:
    status, output = _mypy(HERE / "user_code.py")
    assert (status, output) == (0, "")


def test_each_mistake_fails_mypy_strict_on_its_line() -> None:
    path = HERE / "user_mistakes.py"
    expected = {
        (number, match.group(1))
        for number, line in enumerate(path.read_text().splitlines(), start=1)
        if (match := re.search(r"# error: ([a-z-]+)$", line))
    }
    assert len(expected) == 11
    status, output = _mypy(path)
    found = set()
    for line in output.splitlines():
        match = _ERROR.match(line)
        if match:
            assert Path(match["path"]).name == path.name, line  # no error in asyncpool itself
            found.add((int(match["line"]), match["code"]))
    assert status == 1
    assert found == expected, output
