"""User code type-checks against asyncpool as it would against asyncpg: `user_code.py` (and
`user_integrations.py`, the integrations) passes ``mypy --strict``, and every deliberate
mistake in `user_mistakes.py`, `user_pool_rows.py` and `user_options.py` is caught, on its
line; both with asyncpg's types (asyncpg-stubs, installed here) and without them (asyncpg then
reads as `Any`, as to a user who did not install them: stood in for by a stub that makes every
name `Any`, found first on MYPYPATH). Mistakes caught only with asyncpg's types are marked so.
test_pyright.py checks the same user code (and `user_pool_rows.py`, `user_options.py`) with
pyright.

This folder has no ``__init__.py``: a package named ``typing`` would hide the standard library's
from scripts run from ``tests/``. mypy is pointed at this checkout's asyncpool (MYPYPATH).
"""

from __future__ import annotations

import fcntl
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
_ERROR = re.compile(r"^(?P<path>[^:]+):(?P<line>\d+): error: .*\[(?P<code>[a-z-]+)\]$")


#: asyncpg's modules asyncpool imports, each a stub of `Any` names for the run without types.
_UNTYPED = ("__init__", "connection", "cursor", "prepared_stmt", "transaction", "protocol/__init__")


@pytest.fixture(scope="module")
def shared(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The untyped stubs and mypy's caches, one per kind of run, for the whole test session
    (every pytest-xdist worker's): the first run of a kind checks asyncpool, the standard
    library's and the integrations' stubs, the others reuse that (a cache of each run's own
    cost 3-15 s a run). Every checked file is new to its cache, so its errors are all shown."""
    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent  # the session's directory, above each worker's own
    path = root / "typing-mypy"
    path.mkdir(exist_ok=True)
    return path


def _mypy(path: Path, shared: Path, typed: bool) -> tuple[int, str]:
    paths = [str(ROOT)]
    cache = shared / ("cache-typed" if typed else "cache-untyped")
    # One run of a kind at a time: workers would otherwise each fill the cache at once (and
    # write the stubs while another's mypy reads them).
    with (shared / f"{cache.name}.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not typed:
            for module in _UNTYPED:
                stub = shared / "untyped" / "asyncpg" / f"{module}.pyi"
                stub.parent.mkdir(parents=True, exist_ok=True)
                if not stub.exists():
                    stub.write_text("from typing import Any\ndef __getattr__(name: str) -> Any: ...\n")
            paths.insert(0, str(shared / "untyped"))
        result = _run_mypy(path, cache, paths)
    return result.returncode, result.stdout + result.stderr


def _run_mypy(path: Path, cache: Path, paths: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "mypy", "--strict", "--config-file", str(ROOT / "pyproject.toml"),
         "--no-error-summary", "--show-error-codes", "--cache-dir", str(cache),
         str(path)],
        cwd=ROOT, capture_output=True, text=True, timeout=300, check=False,
        env={**os.environ, "MYPYPATH": os.pathsep.join(paths)},
    )


@pytest.mark.parametrize("typed", [True, False], ids=["asyncpg-stubs", "asyncpg-untyped"])
@pytest.mark.parametrize("name", ["user_code.py", "user_integrations.py"])
def test_user_code_passes_mypy_strict(shared: Path, typed: bool, name: str) -> None:
    status, output = _mypy(HERE / name, shared, typed)
    assert (status, output) == (0, "")


@pytest.mark.parametrize("typed", [True, False], ids=["asyncpg-stubs", "asyncpg-untyped"])
def test_each_mistake_fails_mypy_strict_on_its_line(tmp_path: Path, shared: Path,
                                                    typed: bool) -> None:
    lines = (HERE / "user_mistakes.py").read_text().splitlines()
    assert lines[0] == "# mypy: ignore-errors"
    marked = [
        (number, match.group(1), match.group(2) is not None)
        for number, line in enumerate(lines, start=1)
        if (match := re.search(r"# error: ([a-z-]+)( \(asyncpg-stubs only\))?$", line))
    ]
    assert len(marked) == 34
    expected = {(number, code) for number, code, stubs_only in marked if typed or not stubs_only}
    assert len(expected) == (34 if typed else 26)
    path = tmp_path / "user_mistakes.py"
    path.write_text("\n".join(["#", *lines[1:]]) + "\n")  # same line numbers
    status, output = _mypy(path, shared, typed)
    found = set()
    for line in output.splitlines():
        match = _ERROR.match(line)
        if match:
            assert Path(match["path"]).name == path.name, line  # no error in asyncpool itself
            found.add((int(match["line"]), match["code"]))
    assert status == 1
    assert found == expected, output


def _marked(path: Path, pattern: str) -> set[tuple[int, str]]:
    """(line, code) of each line of `path` whose end matches `pattern` (its group 1: the code)."""
    return {(number, match.group(1))
            for number, line in enumerate(path.read_text().splitlines(), start=1)
            if (match := re.search(pattern, line))}


def _mypy_errors(source: Path, tmp: Path, shared: Path, typed: bool
                 ) -> tuple[int, set[tuple[int, str]], str]:
    """mypy's status and errors, (line, code), on `source`, whose first line (it keeps the
    project's own mypy run quiet) is left out, the others kept on their line numbers."""
    lines = source.read_text().splitlines()
    assert lines[0] == "# mypy: ignore-errors"
    path = tmp / source.name
    path.write_text("\n".join(["#", *lines[1:]]) + "\n")  # same line numbers
    status, output = _mypy(path, shared, typed)
    found = {(int(match["line"]), match["code"]) for line in output.splitlines()
             if (match := _ERROR.match(line))}
    return status, found, output


@pytest.mark.parametrize("typed", [True, False], ids=["asyncpg-stubs", "asyncpg-untyped"])
def test_a_pool_annotated_with_rows_it_does_not_return_fails_mypy_strict(
        tmp_path: Path, shared: Path, typed: bool) -> None:
    """``pool: Pool[Row] = Pool(dsn)`` (no ``record_class=Row``) and the like, each on its
    line; with asyncpg's types only (a Record is `Any` without them: nothing is caught)."""
    source = HERE / "user_pool_rows.py"
    marked = _marked(source, r"# error: ([a-z-]+) / report\w+$")
    assert len(marked) == 15
    status, found, output = _mypy_errors(source, tmp_path, shared, typed)
    assert (status, found) == ((1, marked) if typed else (0, set())), output


@pytest.mark.parametrize("typed", [True, False], ids=["asyncpg-stubs", "asyncpg-untyped"])
def test_a_wrong_option_of_a_config_or_a_loop_fails_mypy_strict(tmp_path: Path, shared: Path,
                                                                typed: bool) -> None:
    """``config.replace(max_size="5")``, a misspelt option of ``replace()`` or ``from_env()``,
    ``loop="main"``: each on its line of `user_options.py`, with asyncpg's types or without."""
    source = HERE / "user_options.py"
    marked = _marked(source, r"# error: ([a-z-]+) / report\w+$")
    assert len(marked) == 10
    status, found, output = _mypy_errors(source, tmp_path, shared, typed)
    assert (status, found) == (1, marked), output
