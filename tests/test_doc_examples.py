"""The documentation's Python blocks run as written and do what their text says.

Every ```python block of README.md and docs/*.md is compiled, its asyncpool names are looked up
and its calls to asyncpool bound to their signatures (here, in-process); then each page's blocks
run in order against PgBouncer (the current one of the suite's stack), one process per page
(tests/doc_examples.py says how, and which placeholders a page gets). AWS is never called: the
blocks that name IamAuth or SecretsManagerAuth only build their pools, which reach no endpoint
before open().
"""

from __future__ import annotations

import ast
import asyncio
import builtins
import importlib
import inspect
import os
import re
import shutil
import subprocess
import sys
import typing
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from asyncpool.testing import ServerStack
from asyncpool.testing.aws_endpoint import aws_environment
from tests.doc_examples import ROOT, Block, _globals_read, blocks

BLOCKS = blocks()
PAGES = sorted({block.page for block in BLOCKS})
DATABASE = "doc_examples"
_SCHEMA = """
CREATE TABLE orders (id int PRIMARY KEY, status text, customer int);
INSERT INTO orders VALUES (1, 'new', 1);
CREATE TABLE stock (sku text PRIMARY KEY, n int);
INSERT INTO stock VALUES ('A-1', 10);
CREATE TABLE notes (id serial PRIMARY KEY, title varchar(200));
"""


@pytest.fixture(scope="module")
def doc_dsn(stack: ServerStack) -> str:
    """A database of the examples' own (orders, stock, notes), reached through PgBouncer."""

    async def create() -> None:
        admin = await asyncpg.connect(stack.postgres.admin_dsn)
        try:
            await admin.execute(f"DROP DATABASE IF EXISTS {DATABASE} WITH (FORCE)")
            await admin.execute(f"CREATE DATABASE {DATABASE} OWNER app")
        finally:
            await admin.close()
        conn = await asyncpg.connect(stack.postgres.dsn(database=DATABASE))
        try:
            await conn.execute(_SCHEMA)
        finally:
            await conn.close()

    asyncio.run(create())
    return stack.current.dsn(database=DATABASE)


def _run_page(page: str, dsn: str, root: Path = ROOT, *,
              stop_at_failure: bool = False) -> subprocess.CompletedProcess[str]:
    """Run `page`'s blocks in a process of their own; with `stop_at_failure`, none after the
    first that fails (the page then fails as it would with them)."""
    env = {k: v for k, v in os.environ.items() if v is not None}
    for name, value in aws_environment(region="us-east-1").items():
        if value is None:
            env.pop(name, None)
        else:
            env[name] = value
    env.update(
        PYTHONPATH=os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]),
        DOC_EXAMPLES_DSN=dsn,
        ASYNCPOOL_DSN=dsn,  # "DSN from ASYNCPOOL_DSN" (lambda_config)
        ASYNCPOOL_TEST_DSN=dsn,  # the real-runtime test's "database for the tests"
        DB_AUTH="iam",  # docs/poolers.md reads it
        AWS_LAMBDA_FUNCTION_NAME="doc-examples",  # the handlers run as on Lambda
    )
    if stop_at_failure:
        env["DOC_EXAMPLES_STOP_AT_FAILURE"] = "1"
    return subprocess.run(
        [sys.executable, "-m", "tests.doc_examples", page, str(root)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=90, check=False,
    )


# -- every block: compiles, and what it names of asyncpool exists with the arguments it passes ---


class _Names(ast.NodeVisitor):
    """asyncpool objects a block names (imports, `asyncpool.X` chains), and calls to them bound to
    their signatures. Names bound to a pool (`pool = asyncpool.Pool(...)`, `create_pool`) resolve
    to Pool, so `pool.transaction(...)` is checked too."""

    def __init__(self, known: dict[str, Any]) -> None:
        self.known = known
        self.problems: list[str] = []

    def resolve(self, node: ast.expr) -> Any:
        if isinstance(node, ast.Name):
            return self.known.get(node.id)
        if isinstance(node, ast.Attribute):
            return self.resolve_attribute(node)
        if isinstance(node, ast.Await):
            return self.resolve(node.value)
        if isinstance(node, ast.Call):
            called = self.resolve(node.func)
            from asyncpool import Pool, create_pool

            if called is create_pool or (inspect.isclass(called) and issubclass(called, Pool)):
                return _Instance(Pool)
        return None

    def resolve_attribute(self, node: ast.Attribute) -> Any:
        owner = self.resolve(node.value)
        if owner is None or hasattr(owner, node.attr):
            return None if owner is None else getattr(owner, node.attr)
        if inspect.ismodule(owner) and owner.__name__.startswith("asyncpool"):
            try:  # a submodule not imported yet
                return importlib.import_module(f"{owner.__name__}.{node.attr}")
            except ImportError:
                pass
        self.problems.append(f"line {node.lineno}: {ast.unparse(node)}: no such attribute")
        return None

    def visit_Import(self, node: ast.Import) -> None:
        for alias in node.names:
            if alias.name.split(".")[0] == "asyncpool":
                module = importlib.import_module(alias.name)
                self.known[alias.asname or "asyncpool"] = module if alias.asname else sys.modules["asyncpool"]

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        if not (node.module or "").startswith("asyncpool"):
            return
        module = importlib.import_module(node.module or "")
        for alias in node.names:
            if not hasattr(module, alias.name):
                self.problems.append(f"line {node.lineno}: {node.module} has no {alias.name}")
            else:
                self.known[alias.asname or alias.name] = getattr(module, alias.name)

    def visit_Assign(self, node: ast.Assign) -> None:
        self.generic_visit(node)
        value = self.resolve(node.value)
        for target in node.targets:
            if isinstance(target, ast.Name) and isinstance(value, _Instance):
                self.known[target.id] = value

    def visit_Call(self, node: ast.Call) -> None:
        self.generic_visit(node)
        called = self.resolve(node.func)
        if called is None or isinstance(called, _Instance) or not callable(called):
            return
        if not getattr(called, "__module__", "").startswith("asyncpool"):
            return
        if any(isinstance(a, ast.Starred) for a in node.args) or any(k.arg is None for k in node.keywords):
            return
        try:
            signature = inspect.signature(called)
        except (TypeError, ValueError):
            return
        try:
            bound = signature.bind(*node.args, **{k.arg: k.value for k in node.keywords if k.arg})
        except TypeError as error:
            self.problems.append(f"line {node.lineno}: {ast.unparse(node.func)}(...): {error}")
            return
        for name, parameter in signature.parameters.items():
            # `**options: Unpack[PoolOptions]` (Pool, create_pool, lambda_config) takes its keys only
            allowed = _unpacked_keys(called, name) if parameter.kind is parameter.VAR_KEYWORD else None
            for key in sorted(set(bound.arguments.get(name, {})) - (allowed or set())) if allowed else ():
                self.problems.append(f"line {node.lineno}: {ast.unparse(node.func)}(...): "
                                     f"no option {key!r}")


def _unpacked_keys(called: Any, parameter: str) -> set[str] | None:
    """The keys of the TypedDict a `**parameter: Unpack[...]` takes, or None."""
    function = called.__init__ if inspect.isclass(called) else called
    try:
        hint = typing.get_type_hints(function, include_extras=True).get(parameter)
    except (NameError, TypeError):
        return None
    if typing.get_origin(hint) is not typing.Unpack:
        return None
    (typed_dict,) = typing.get_args(hint)
    return set(typed_dict.__required_keys__ | typed_dict.__optional_keys__)


class _Instance:
    """An instance of `cls` in a block: its attributes are the class's (methods, bound)."""

    def __init__(self, cls: type) -> None:
        self.cls = cls

    def __getattr__(self, name: str) -> Any:
        attribute = getattr(self.cls, name)
        if inspect.isfunction(attribute):
            return attribute.__get__(object.__new__(self.cls))
        return attribute


def _static_problems(block: Block, known: dict[str, Any]) -> list[str]:
    tree = compile(block.source, block.label, "exec",
                   flags=ast.PyCF_ONLY_AST | ast.PyCF_ALLOW_TOP_LEVEL_AWAIT)
    visitor = _Names(known)
    visitor.visit(tree)
    return visitor.problems


# A block defining a Lambda handler: a function module a reader copies whole.
_HANDLER = re.compile(r"^(async )?def \w*handler\(", re.M)


def test_a_block_with_a_handler_runs_alone() -> None:
    """The batch recipe, the plain `async_handler` and the `resolve_async` handler read `pool`,
    `logger` and imports of earlier blocks, and failed when copied alone: each block that defines
    a handler imports or defines every name it reads."""
    handlers = [block for block in BLOCKS if _HANDLER.search(block.source)]
    assert len(handlers) >= 5  # the check reads the blocks it is meant to
    borrowed = {block.label: sorted(n for n in _globals_read(block.source)
                                    if not hasattr(builtins, n))
                for block in handlers}
    assert {label: names for label, names in borrowed.items() if names} == {}


def test_the_blocks_are_found() -> None:
    # README, and the docs pages with examples; a parser that finds nothing checks nothing.
    assert len(BLOCKS) >= 30
    assert {"README.md", "docs/serverless.md", "docs/telemetry.md"} <= set(PAGES)
    # Few blocks may opt out of running, each saying why (none does today).
    assert sum(block.kind != "run" for block in BLOCKS) <= 3


@pytest.mark.parametrize("page", PAGES)
def test_every_block_compiles_and_its_asyncpool_names_and_calls_exist(page: str) -> None:
    known: dict[str, Any] = {}  # a page's imports carry over to its later blocks
    problems = []
    for block in BLOCKS:
        if block.page == page:
            problems += [f"{block.label}: {p}" for p in _static_problems(block, known)]
    assert problems == []


def test_the_name_check_catches_a_wrong_name_and_a_wrong_argument() -> None:
    source = (
        "import asyncpool\n"
        "from asyncpool.integrations.aws_lambda import lambda_config, no_such_helper\n"
        "pool = asyncpool.Pool(dsn, max_connections=5)\n"
        "other = await asyncpool.create_pool(dsn)\n"
        "async with other.transaction(isolation='serializable', retries=3) as conn: ...\n"
        "asyncpool.unnamed.invalidate_everything()\n"
    )
    problems = _static_problems(Block("x.md", 1, source, "run"), {})
    assert len(problems) == 4, problems
    assert "no_such_helper" in problems[0]
    assert "max_connections" in problems[1]
    assert "retries" in problems[2]
    assert "invalidate_everything" in problems[3]


# -- the pages' blocks, run ------------------------------------------------------------------------


@pytest.mark.parametrize("page", PAGES)
def test_the_page_blocks_run_and_do_what_the_text_says(page: str, doc_dsn: str) -> None:
    result = _run_page(page, doc_dsn)
    ran = [line for line in result.stdout.splitlines() if line.startswith("DOC-EXAMPLE ")]
    assert result.returncode == 0, "\n".join(ran) + "\n" + result.stderr[-6000:]
    assert len(ran) == sum(block.page == page for block in BLOCKS), result.stdout[-3000:]


@pytest.fixture
def docs_copy(tmp_path: Path) -> Path:
    shutil.copy(ROOT / "README.md", tmp_path / "README.md")
    shutil.copytree(ROOT / "docs", tmp_path / "docs")
    return tmp_path


@pytest.mark.parametrize("case", [
    # an argument the pool does not take
    ("docs/index.md", "max_size=5)", "max_connections=5)", "max_connections"),
    # a claimed output that is not what it prints
    ("README.md", "in_use=0, connecting=0", "in_use=1, connecting=0", "the comment says"),
    # an example that keeps its connection
    ("docs/index.md", "async with pool.acquire() as conn:", "if conn := await pool.acquire():",
     "cannot be given back"),
    # what the text says it does: the batch handler reports only the record that failed
    ("docs/serverless.md", "    await pool.open()               # async_handler",
     "    # await pool.open()               # async_handler", "batchItemFailures"),
], ids=["argument", "output", "leak", "behaviour"])
def test_a_broken_example_fails(docs_copy: Path, doc_dsn: str, case: tuple[str, str, str, str]) -> None:
    page, old, new, says = case
    path = docs_copy / page
    assert path.read_text().count(old) == 1
    path.write_text(path.read_text().replace(old, new))
    # The blocks after the broken one (seconds of them on docs/serverless.md) are not run.
    result = _run_page(page, doc_dsn, docs_copy, stop_at_failure=True)
    assert result.returncode == 1
    assert "FAILED" in result.stdout
    assert says in result.stderr, result.stderr[-3000:]
