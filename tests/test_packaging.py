"""What a user installs: the wheel and the sdist built from this checkout, and the wheel installed
into a fresh venv.

Every other test runs against the editable install, which reads the source tree: a data file
left out of the wheel, a lost ``py.typed``, an extra that does not declare what its integration
imports, only show up here. The distributions are built once, offline, with the installed build
backend (hatchling, in the dev extra); without it, pip's isolated build fetches it from PyPI.
"""

from __future__ import annotations

import ast
import email
import importlib.util
import subprocess
import sys
import tarfile
import tomllib
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from email.message import Message
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.utils import canonicalize_name

import asyncpool
from asyncpool.errors import missing_dependency
from asyncpool.testing.postgres import PostgresServer

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "asyncpool"
DIST = "asyncpool_pg"

# Each third-party import in the package (longest matching prefix) and what provides it: the base
# install (""), an extra, or the application. An import missing here fails
# test_every_import_is_declared: declare its distribution in pyproject.toml, then add it here.
APPLICATION = "application"
PROVIDERS: dict[str, tuple[str, str]] = {
    "asyncpg": ("", "asyncpg"),
    "opentelemetry": ("", "opentelemetry-api"),
    # Exporters and span processors take the SDK objects the application made: it has the SDK.
    "opentelemetry.sdk": (APPLICATION, "opentelemetry-sdk"),
    # `asyncpool bench --telemetry sdk` checks for it first and says what to install.
    "opentelemetry.exporter": (APPLICATION, "opentelemetry-exporter-otlp-proto-common"),
    # Present in the Lambda runtime with SnapStart; imported under try (register_snapstart_hooks).
    "snapshot_restore_py": (APPLICATION, "snapshot-restore-py"),
    # Under TYPE_CHECKING only (a TypeVar default, PEP 696, before Python 3.13: `Pool[Row]`):
    # type checkers bundle it with the standard library's stubs (typeshed).
    "typing_extensions": (APPLICATION, "typing-extensions"),
    "aiobotocore": ("iam", "aiobotocore"),
    "botocore": ("iam", "aiobotocore"),  # aiobotocore pins the botocore it works with
    "aws_lambda_powertools": ("lambda", "aws-lambda-powertools"),
    "starlette": ("fastapi", "starlette"),
    "sqlalchemy": ("sqlalchemy", "sqlalchemy"),
    "psycopg": ("bench", "psycopg"),
    "psycopg_pool": ("bench", "psycopg-pool"),
    "matplotlib": ("bench", "matplotlib"),
    # The test harness (asyncpool.testing) only: the demo and bench use its stdlib-only parts.
    "testcontainers": ("dev", "testcontainers"),
    "docker": ("dev", "testcontainers"),
    "moto": ("dev", "moto"),
    "cryptography": ("dev", "moto"),
}

# The integrations and the extra their ImportError names when their framework is missing.
INTEGRATIONS: dict[str, tuple[str, str]] = {
    "asyncpool.integrations.powertools": ("aws_lambda_powertools", "lambda"),
    "asyncpool.integrations.fastapi": ("starlette", "fastapi"),
    "asyncpool.integrations.sqlalchemy": ("sqlalchemy", "sqlalchemy"),
}

# Modules that take the application's OpenTelemetry SDK objects, and the import that names it.
NEEDS_SDK: dict[str, str] = {"asyncpool.integrations.lambda_spans": "opentelemetry.sdk"}

# Not for users: the wheel must hold none of these.
NOT_SHIPPED = ("tests/", "benchmarks/", "docs/", "examples/", "__pycache__", ".pyc", ".env", ".cache/")


@dataclass(frozen=True)
class Dists:
    wheel: Path
    sdist: Path

    def wheel_names(self) -> list[str]:
        with zipfile.ZipFile(self.wheel) as zf:
            return zf.namelist()

    def sdist_names(self) -> list[str]:
        """Paths inside the sdist, without its ``asyncpool_pg-<version>/`` prefix."""
        with tarfile.open(self.sdist) as tf:
            return [n.split("/", 1)[1] for n in tf.getnames() if "/" in n]

    def dist_info(self, name: str) -> bytes:
        with zipfile.ZipFile(self.wheel) as zf:
            [path] = [n for n in zf.namelist() if n == f"{n.split('/')[0]}/{name}" and ".dist-info/" in n]
            return zf.read(path)

    def metadata(self) -> Message:
        return email.message_from_bytes(self.dist_info("METADATA"))


def _backend_path(tmp: Path) -> str:
    """A PYTHONPATH where hatchling imports: where this venv has it, or (no dev extra) PyPI's."""
    spec = importlib.util.find_spec("hatchling")
    if spec is not None and spec.origin is not None:
        return str(Path(spec.origin).parents[1])
    target = tmp / "backend"
    build_system = tomllib.loads((ROOT / "pyproject.toml").read_text())["build-system"]
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--target", str(target), *build_system["requires"]],
        check=True, timeout=120,
    )
    return str(target)


@pytest.fixture(scope="module")
def dists(tmp_path_factory: pytest.TempPathFactory) -> Dists:
    out = tmp_path_factory.mktemp("dist")
    code = (
        "import sys\nfrom hatchling.build import build_sdist, build_wheel\n"
        "print(build_wheel(sys.argv[1]))\nprint(build_sdist(sys.argv[1]))\n"
    )
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": _backend_path(out)}
    done = subprocess.run([sys.executable, "-c", code, str(out)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    wheel_name, sdist_name = done.stdout.split()
    return Dists(out / wheel_name, out / sdist_name)


# --- contents -------------------------------------------------------------------------------------


def _tracked() -> list[str] | None:
    """The files git tracks (relative to the repository), or None outside a git checkout."""
    done = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True,
                          check=False)
    return done.stdout.splitlines() if done.returncode == 0 else None


def _source_files() -> set[str]:
    """The package's files as the wheel should hold them (relative to the repository): the
    tracked ones. The build reads the working copy, so a file left there untracked (a dump, a
    scratch module) would be published from it, and not from a clean checkout."""
    tracked = _tracked()
    if tracked is not None:
        return {n for n in tracked if n.startswith(f"{PACKAGE.name}/")}
    return {
        str(p.relative_to(ROOT)) for p in PACKAGE.rglob("*")
        if p.is_file() and "__pycache__" not in p.parts and p.suffix != ".pyc"
    }


def wheel_content_problems(names: list[str], source: set[str]) -> list[str]:
    shipped = {n for n in names if not n.startswith(f"{DIST}-")}
    problems = [f"missing from the wheel: {n}" for n in sorted(source - shipped)]
    problems += [f"in the wheel, not tracked in asyncpool/ (add it to git, or remove it from the "
                 f"working copy): {n}" for n in sorted(shipped - source)]
    problems += [f"does not belong in the wheel: {n}" for n in sorted(shipped)
                 if any(bad in n for bad in NOT_SHIPPED)]
    if "asyncpool/py.typed" not in shipped:
        problems.append("asyncpool/py.typed is missing: type checkers would ignore the package")
    if not any(n.endswith(".dist-info/licenses/LICENSE") for n in names):
        problems.append("the license text is missing")
    return problems


def test_the_wheel_holds_the_package_its_data_files_and_nothing_else(dists: Dists) -> None:
    source = _source_files()
    # The data files the code reads at run time (importlib.resources), not only modules.
    assert {"asyncpool/py.typed", "asyncpool/testing/pgbouncer.ini"} <= source
    assert wheel_content_problems(dists.wheel_names(), source) == []


def test_the_content_check_catches_a_missing_data_file_and_a_stray_test() -> None:
    source = {"asyncpool/__init__.py", "asyncpool/py.typed", "asyncpool/testing/pgbouncer.ini"}
    names = ["asyncpool/__init__.py", "asyncpool/py.typed", "tests/test_x.py",
             f"{DIST}-0.1.0.dist-info/licenses/LICENSE"]
    problems = wheel_content_problems(names, source)
    assert "missing from the wheel: asyncpool/testing/pgbouncer.ini" in problems
    assert "does not belong in the wheel: tests/test_x.py" in problems
    assert any("py.typed is missing" in p for p in wheel_content_problems(names[:1], source))


def test_the_sdist_holds_the_tracked_files_only(dists: Dists) -> None:
    """Top-level entries are pyproject.toml's allowlist, which matches what git tracks; below
    them the build takes whatever the working copy holds, so each file is checked: a stray one
    (a dump in tests/, a scratch module in asyncpool/) would be published."""
    tracked = _tracked()
    if tracked is None:
        pytest.skip("not a git checkout")
    top = {line.split("/", 1)[0] for line in tracked}
    names = dists.sdist_names()
    assert {n.split("/", 1)[0] for n in names} == top | {"PKG-INFO"}
    assert sorted(set(names) - set(tracked) - {"PKG-INFO"}) == [], (
        "in the sdist, not tracked by git: add them to git, or remove them from the working copy")
    assert [n for n in names if "__pycache__" in n or n.endswith(".pyc")
            or (n.startswith(".env.") and n != ".env.example")] == []


# --- metadata -------------------------------------------------------------------------------------


def declared(meta: Message) -> dict[str, set[str]]:
    """Distribution names in Requires-Dist, by extra ("" for the base install)."""
    found: dict[str, set[str]] = {}
    for line in meta.get_all("Requires-Dist") or []:
        req = Requirement(line)
        marker = req.marker
        extras = [e for e in ("iam", "lambda", "fastapi", "sqlalchemy", "bench", "docs", "dev")
                  if marker is not None and "extra" in str(marker) and marker.evaluate({"extra": e})]
        for extra in extras or [""]:
            found.setdefault(extra, set()).add(canonicalize_name(req.name))
    return found


def third_party_imports(root: Path) -> Iterator[tuple[str, str]]:
    """(module path, imported name) for every import of a module outside asyncpool and the
    standard library, in functions and under TYPE_CHECKING included."""
    for path in sorted(root.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            for name in names:
                top = name.split(".")[0]
                if top != "asyncpool" and top not in sys.stdlib_module_names:
                    yield str(path.relative_to(root.parent)), name


def provider(name: str) -> tuple[str, str] | None:
    parts = name.split(".")
    for n in range(len(parts), 0, -1):
        found = PROVIDERS.get(".".join(parts[:n]))
        if found is not None:
            return found
    return None


def import_problems(imports: list[tuple[str, str]], requires: dict[str, set[str]]) -> list[str]:
    problems = []
    for where, name in imports:
        found = provider(name)
        if found is None:
            problems.append(f"{where} imports {name}: no extra declares it (tests/test_packaging.py)")
            continue
        extra, dist = found
        if extra == APPLICATION:
            continue
        if extra == "dev" and not where.startswith("asyncpool/testing/"):
            problems.append(f"{where} imports {name}, which only the dev extra installs")
        if canonicalize_name(dist) not in requires.get(extra, set()):
            label = f"extra {extra!r}" if extra else "the base install"
            problems.append(f"{where} imports {name}, but {label} does not require {dist}")
    return problems


def test_every_import_is_declared_by_the_base_install_or_its_extra(dists: Dists) -> None:
    requires = declared(dists.metadata())
    # The dev extra names the others (asyncpool-pg[iam,...]) rather than their packages.
    requires["dev"] |= {d for extra, dists_ in requires.items() if extra not in ("", "dev")
                        for d in dists_}
    assert import_problems(list(third_party_imports(PACKAGE)), requires) == []


def test_the_import_check_catches_an_undeclared_dependency() -> None:
    requires = {"": {"asyncpg", "opentelemetry-api"}, "fastapi": {"fastapi", "mangum"}}
    imports = [("asyncpool/integrations/fastapi.py", "starlette.requests"),
               ("asyncpool/new.py", "orjson"),
               ("asyncpool/pool/pool.py", "moto.core")]
    problems = import_problems(imports, requires)
    assert "asyncpool/integrations/fastapi.py imports starlette.requests, but extra 'fastapi' does " \
           "not require starlette" in problems
    assert any(p.startswith("asyncpool/new.py imports orjson: no extra") for p in problems)
    assert "asyncpool/pool/pool.py imports moto.core, which only the dev extra installs" in problems


def test_metadata(dists: Dists) -> None:
    meta = dists.metadata()
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert meta["Name"] == "asyncpool-pg"
    assert meta["Version"] == asyncpool.__version__ == project["version"]
    assert meta["License-Expression"] == "MIT"
    assert meta["License-File"] == "LICENSE"
    assert meta["Description-Content-Type"] == "text/markdown"
    assert "## Install" in (meta.get_payload() or "")
    # The classifiers name each Python the suite runs on, and requires-python admits exactly those.
    versions = [c.rsplit(" ", 1)[1] for c in meta.get_all("Classifier") or []
                if c.startswith("Programming Language :: Python :: 3.")]
    assert versions == ["3.11", "3.12", "3.13"]
    assert SpecifierSet(meta["Requires-Python"]) == SpecifierSet(">=3.11")
    assert set(meta.get_all("Provides-Extra") or []) >= {"iam", "lambda", "fastapi", "sqlalchemy", "bench"}
    assert "asyncpool = asyncpool.cli.main:main" in dists.dist_info("entry_points.txt").decode()


# --- without an extra -----------------------------------------------------------------------------


NOT_INSTALLED = """
import sys


class NotInstalled:
    \"\"\"Fails the import of `name` and its submodules as Python does when it is not installed.\"\"\"

    def __init__(self, name):
        self.name = name

    def find_spec(self, fullname, path=None, target=None):
        if fullname == self.name or fullname.startswith(self.name + "."):
            raise ModuleNotFoundError(f"No module named {self.name!r}", name=self.name)
"""


@pytest.mark.parametrize("module", sorted(INTEGRATIONS))
def test_an_integration_without_its_extra_says_which_extra_to_install(module: str) -> None:
    framework, extra = INTEGRATIONS[module]
    assert PROVIDERS[framework][0] == extra
    code = f"{NOT_INSTALLED}\nsys.meta_path.insert(0, NotInstalled({framework!r}))\nimport {module}\n"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                          check=False)
    last = done.stderr.strip().splitlines()[-1]
    assert last == (f"ModuleNotFoundError: {module} needs {framework}, which is not installed: "
                    f"pip install 'asyncpool-pg[{extra}]'")


@pytest.mark.parametrize("module", sorted(NEEDS_SDK))
def test_a_module_of_the_sdk_without_it_says_what_to_install(module: str) -> None:
    missing = NEEDS_SDK[module]
    assert PROVIDERS[missing] == (APPLICATION, "opentelemetry-sdk")
    code = f"{NOT_INSTALLED}\nsys.meta_path.insert(0, NotInstalled({missing!r}))\nimport {module}\n"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                          check=False)
    last = done.stderr.strip().splitlines()[-1]
    assert last == (f"ModuleNotFoundError: {module} needs {missing}, which is not installed: "
                    "pip install opentelemetry-sdk")


# --- installed --------------------------------------------------------------------------------------

USER_SCRIPT = '''
"""A user's code, type-checked against the installed wheel."""

import asyncio
import sys

import asyncpg

import asyncpool
from asyncpool import Pool, PoolStats, PoolTimeoutError


class Row(asyncpg.Record):
    pass


async def main(dsn: str) -> None:
    async with Pool(dsn, max_size=1) as pool:
        async with pool.transaction() as conn:
            rows: list[Row] = await conn.fetch("SELECT 41 + 1 AS n", record_class=Row)
        stats: PoolStats = pool.stats()
        try:
            async with pool.acquire(timeout=0.5), pool.acquire(timeout=0.01):
                pass
        except PoolTimeoutError as exc:
            error: asyncpool.PoolError = exc
            print(rows[0]["n"], stats.size, type(error).__name__, asyncpool.__file__)


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1]))
'''


# The Pythons the wheel is installed for: the venvs scripts/setup.sh builds (their packages stand in
# for the dependencies PyPI would give), and this one for its own version, whichever it is.
THIS_PYTHON = f"{sys.version_info.major}.{sys.version_info.minor}"
PYTHONS = {
    "3.11": ROOT / ".venv" / "bin" / "python",
    "3.12": ROOT / ".venv312" / "bin" / "python",
    "3.13": ROOT / ".venv313" / "bin" / "python",
    THIS_PYTHON: Path(sys.executable),
}


def _purelib(python: Path) -> str:
    return subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                          capture_output=True, text=True, check=True, timeout=60).stdout.strip()


@pytest.fixture(scope="module")
def venvs(dists: Dists, tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Path]:
    """Python version -> a fresh venv with the wheel installed and, for its dependencies, the
    packages of the venv of that Python (offline). Their directory is a plain path entry: its .pth
    files, the editable install's among them, are not read, so ``asyncpool`` is the wheel's."""
    made: dict[str, Path] = {}

    def venv_for(version: str) -> Path:
        if version in made:
            return made[version]
        base = PYTHONS[version]
        if not base.exists():
            pytest.skip(f"no {base.parent.parent.name} (scripts/setup.sh builds it when Python "
                        f"{version} is installed)")
        venv = tmp_path_factory.mktemp(f"venv{version}")
        subprocess.run([base, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=60)
        python = venv / "bin" / "python"
        Path(_purelib(python), "dependencies.pth").write_text(_purelib(base) + "\n")
        subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "-q",
                        "--no-deps", "--no-index", str(dists.wheel)], check=True, timeout=120)
        made[version] = venv
        return venv

    return venv_for


@pytest.fixture(params=sorted(PYTHONS))
def installed(request: pytest.FixtureRequest, venvs: Callable[[str], Path]) -> Path:
    return venvs(request.param)


def _run(argv: list[str | Path], cwd: Path) -> subprocess.CompletedProcess[str]:
    """`argv` in `cwd` (outside the checkout, which ``python -c`` would put first on sys.path),
    without PYTHONPATH: the asyncpool it imports is the wheel's."""
    env = {"PATH": "/usr/bin:/bin", "HOME": str(cwd)}
    return subprocess.run(argv, capture_output=True, text=True, timeout=120, env=env, check=False, cwd=cwd)


def test_the_installed_wheel_imports_runs_its_command_and_a_pool(
    installed: Path, postgres: PostgresServer, tmp_path: Path
) -> None:
    python = installed / "bin" / "python"
    code = (
        "import sys, asyncpool\n"
        "from asyncpool.testing.pgbouncer import shared_settings\n"
        "print(asyncpool.__file__)\n"
        "print(shared_settings()['pool_mode'])\n"  # a data file, read with importlib.resources
    )
    done = _run([python, "-c", code], cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    where, pool_mode = done.stdout.split()
    assert where.startswith(str(installed)), where
    assert pool_mode == "transaction"
    command = _run([installed / "bin" / "asyncpool", "--version"], cwd=tmp_path)
    assert command.stdout.strip() == f"asyncpool {asyncpool.__version__}", command.stderr
    script = tmp_path / "app.py"
    script.write_text(USER_SCRIPT)
    done = _run([python, script, postgres.dsn()], cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    n, size, error, where = done.stdout.split()
    assert (n, size, error) == ("42", "1", "PoolTimeoutError")
    assert where.startswith(str(installed))


def test_mypy_strict_sees_the_installed_packages_types(
    venvs: Callable[[str], Path], tmp_path: Path
) -> None:
    """py.typed works from the wheel: mypy reads the installed asyncpool, not an Any."""
    installed = venvs(THIS_PYTHON)  # where mypy and asyncpg-stubs are
    script = tmp_path / "app.py"
    script.write_text(USER_SCRIPT + "\nreveal_type(Pool.stats)\n")
    done = _run([sys.executable, "-m", "mypy", "--strict", "--no-incremental",
                 "--python-executable", installed / "bin" / "python", script], cwd=tmp_path)
    record = "asyncpg.protocol.record.Record"
    assert (f'Revealed type is "def [PoolRecordT_co <: {record} = {record}] '
            '(self: asyncpool.pool.pool.Pool[PoolRecordT_co]) -> asyncpool.stats.PoolStats"'
            in done.stdout), done.stdout
    assert done.returncode == 0, done.stdout


def test_a_missing_module_error_without_a_name_still_says_what_to_install() -> None:
    """A ModuleNotFoundError raised by hand may have no `name`: the message said "needs None"."""
    error = missing_dependency(ModuleNotFoundError("No module named 'x.y'"),
                               "asyncpool.integrations.fastapi", "'asyncpool-pg[fastapi]'")
    assert str(error) == ("asyncpool.integrations.fastapi needs a package that is not installed "
                          "(No module named 'x.y'): pip install 'asyncpool-pg[fastapi]'")
    assert "None" not in str(error)
