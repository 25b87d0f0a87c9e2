"""The ```python blocks of README.md and docs/*.md, read and run as a reader would.

A page's blocks run in order in one namespace (a reader keeps what the page imported and defined
in one module), after the page's placeholders below: the database, and the few names the text
leaves to the reader (`dsn`, a `customer_id`, an ORM model, SDK providers). Two literal
placeholders are replaced: the quick start's DSN by the test database, and certificate paths under
/var/task (files shipped with a Lambda function) by an existing file. Nothing else is changed.

After each block: every pool the page's namespace holds has no connection in use (an example must
give back what it takes), a ``print(x)  # output`` prints that output (``...`` matches anything),
and the block's probe, if it has one, checks what the text around it says.

Run by tests/test_doc_examples.py, one page per process (Lambda runners, signal hooks and global
OpenTelemetry providers stay in it): ``python -m tests.doc_examples PAGE`` with DOC_EXAMPLES_DSN
set prints a line per block and exits 1 if any failed. A block marked
``<!-- doc-example: fragment: why -->`` on the line before its fence is only compiled and its
asyncpool names checked (tests/test_doc_examples.py), not run.
"""

from __future__ import annotations

import ast
import asyncio
import builtins
import contextlib
import inspect
import io
import json
import logging
import os
import re
import symtable
import sys
import tempfile
import textwrap
import traceback
import types
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
_FENCE = re.compile(r"^```(\w*)\s*$")
_MARKER = re.compile(r"^<!--\s*doc-example:\s*([\w-]+)\b(.*?)-->\s*$")
KINDS = ("run", "fragment")


@dataclass(frozen=True)
class Block:
    page: str  # relative to the root: "README.md", "docs/serverless.md"
    line: int  # of the opening fence
    source: str
    kind: str  # "run", or "fragment" (marked: compiled and checked, not run)

    @property
    def label(self) -> str:
        return f"{self.page}:{self.line}"


def pages(root: Path = ROOT) -> list[str]:
    return ["README.md", *(p.relative_to(root).as_posix() for p in sorted((root / "docs").glob("*.md")))]


def blocks(root: Path = ROOT) -> list[Block]:
    """Every ```python block of the pages, with the kind its marker gives (default "run")."""
    found = []
    for page in pages(root):
        lines = (root / page).read_text().splitlines()
        index = 0
        while index < len(lines):
            fence = _FENCE.match(lines[index])
            if fence is None:
                index += 1
                continue
            start = index
            index += 1
            while lines[index] != "```":
                index += 1
            if fence.group(1) == "python":
                kind = "run"
                before = lines[start - 1] if start else ""
                marker = _MARKER.match(before)
                if marker is not None:
                    kind = marker.group(1)
                    if kind not in KINDS or not marker.group(2).strip(":- "):
                        raise ValueError(f"{page}:{start}: say which kind ({KINDS}) and why: {before}")
                found.append(Block(page, start + 1, "\n".join(lines[start + 1:index]) + "\n", kind))
            index += 1
    return found


# -- placeholders ------------------------------------------------------------------------------

_QUICK_START_DSN = "postgresql://app@pgbouncer.internal:6432/app"
_SHIPPED_CERT = re.compile(r"/var/task/certs/[\w.-]+\.pem")

_ORDERS = "customer_id = 1\nsku = 'A-1'\n"
PRELUDES: dict[str, str] = {
    "README.md": _ORDERS,
    "docs/index.md": _ORDERS,
    "docs/migration.md": "import asyncpg\nimport asyncpool\n\nasync def init(conn): ...\n",
    "docs/serverless.md": (
        "from opentelemetry.sdk.trace import TracerProvider\nprovider = TracerProvider()\n"
    ),
    "docs/sqlalchemy.md": """
import sqlalchemy as sa
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

class Base(DeclarativeBase): ...

class Note(Base):
    __tablename__ = "notes"
    id: Mapped[int] = mapped_column(primary_key=True)
    title: Mapped[str] = mapped_column(sa.String(200))
""",
    "docs/telemetry.md": """
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import TracerProvider

metric_reader = InMemoryMetricReader()
meter_provider = MeterProvider(metric_readers=[metric_reader])
tracer_provider = TracerProvider()
""",
}


def prepare(source: str, dsn: str, cert: str) -> str:
    return _SHIPPED_CERT.sub(cert, source.replace(_QUICK_START_DSN, dsn))


# -- probes: what the text around a block says it does -------------------------------------------

Probe = Callable[[dict[str, Any], "Page"], None]
#: A probe runs after the one block containing its key (a line of that block's source).
PROBES: dict[str, Probe] = {}


def probe(key: str) -> Callable[[Probe], Probe]:
    def register(function: Probe) -> Probe:
        PROBES[key] = function
        return function
    return register


def _context() -> Any:
    from asyncpool.integrations.invocation import LocalContext

    return LocalContext(timeout=10)


@probe("@logger.inject_lambda_context\n@pooled_connection(pool)          # a pooled")
def _readme_powertools(ns: dict[str, Any], page: Page) -> None:
    answer = ns["handler"]({"id": "1"}, _context())
    assert (answer["statusCode"], answer["body"]) == (200, "{'id': 1, 'status': 'new', 'customer': 1}")
    assert ns["handler"]({"id": "999"}, _context()) == {"statusCode": 404}


@probe("@metrics.log_metrics")
def _serverless_powertools(ns: dict[str, Any], page: Page) -> None:
    answer = ns["handler"]({"pathParameters": {"id": "1"}}, _context())
    assert answer == {"statusCode": 200, "body": json.dumps({"id": 1, "status": "new"})}, answer
    assert ns["handler"]({"pathParameters": {"id": "999"}}, _context()) == {"statusCode": 404}


@probe("@tracer.capture_lambda_handler    # above: its subsegment covers the whole invocation")
def _tracer(ns: dict[str, Any], page: Page) -> None:
    # Outside Lambda (no LAMBDA_TASK_ROOT) Powertools disables the Tracer; the handler still
    # answers through both decorators. tests/lambda_runtime/test_tracer.py runs X-Ray for real.
    answer = ns["traced_handler"]({"pathParameters": {"id": "1"}}, _context())
    assert answer == {"statusCode": 200, "body": json.dumps({"id": 1, "status": "new"})}, answer
    assert ns["traced_handler"]({"pathParameters": {"id": "999"}}, _context()) == {"statusCode": 404}

    async def below(event: Any, context: Any) -> None: ...

    # "refuses those two there (TypeError when the module is imported)"
    for wrong in (ns["tracer"].capture_lambda_handler(below), ns["metrics"].log_metrics(below)):
        refused = ""
        try:
            ns["pooled_connection"](ns["pool"])(wrong)
        except TypeError as exc:
            refused = str(exc)
        assert "is below @pooled_connection" in refused, "a decorator below pooled_connection was taken"


@probe("async def one(record):")
def _sqs_batch(ns: dict[str, Any], page: Page) -> None:
    # The block makes its own pool (a function module of its own): the handler must open it.
    records = [{"messageId": "m1", "body": json.dumps({"id": 101, "status": "new"})},
               {"messageId": "m2", "body": json.dumps({"id": 1, "status": "dup"})},  # id 1 exists
               {"messageId": "m3", "body": json.dumps({"id": 102, "status": "new"})}]
    answer = ns["handler"]({"Records": records}, _context())
    assert answer == {"batchItemFailures": [{"itemIdentifier": "m2"}]}, answer
    assert ns["pool"].stats().created_total == 1  # the block's pool, one connection


@probe("    await pool.open()                      # no-op after the first invocation")
def _async_handler(ns: dict[str, Any], page: Page) -> None:
    assert ns["handler"]({}, _context()) == {"statusCode": 200, "body": "1"}
    assert ns["handler"]({}, _context()) == {"statusCode": 200, "body": "1"}
    assert ns["pool"].stats().created_total == 1  # one connection across invocations


@probe("app = APIGatewayRestResolver()")
def _resolver(ns: dict[str, Any], page: Page) -> None:
    event = json.loads((ROOT / "examples/lambda_powertools/events/hello.json").read_text())
    answer = ns["handler"](event, _context())
    assert (answer["statusCode"], json.loads(answer["body"])) == (200, {"greeting": "Hello, Ada!"})


@probe('pool = Pool(config=lambda_config(function_timeout=10, name="orders"))')
def _named(ns: dict[str, Any], page: Page) -> None:
    assert (ns["pool"].config.name, ns["pool"].config.max_size) == ("orders", 1)


@probe("async def busy(request: Request, exc: PoolTimeoutError) -> JSONResponse:")
def _mangum(ns: dict[str, Any], page: Page) -> None:
    from fastapi import FastAPI

    from asyncpool import PoolTimeoutError

    app: FastAPI = ns["app"]

    @app.get("/busy")
    async def busy() -> None:
        raise PoolTimeoutError("stand-in for a pool that stayed busy")

    event = json.loads((ROOT / "examples/fastapi_mangum/events/hello_v2.json").read_text())

    def get(path: str) -> dict[str, Any]:
        event["rawPath"] = event["requestContext"]["http"]["path"] = path
        answer: dict[str, Any] = ns["handler"](event, _context())
        return answer

    assert get("/items/1")["body"] == '{"id":1,"status":"new"}'
    assert get("/items/999")["statusCode"] == 404
    answer = get("/busy")
    assert (answer["statusCode"], answer["headers"]["retry-after"]) == (503, "1"), answer
    assert ns["pool"].stats().created_total == 1


def _pytest_files(page: Page, block: str, extra: dict[str, str]) -> None:
    """Run a block that is a conftest.py and a test module, as pytest would, on the app above."""
    import subprocess

    folder = Path(tempfile.mkdtemp(dir=page.tmp))
    conftest, _, tests = block.partition("\n# test_app.py")
    (folder / "conftest.py").write_text(conftest)
    (folder / "test_app.py").write_text(tests.partition("\n")[2])
    (folder / "myapp.py").write_text(page.source_of("async def read_item(") + "\n"
                                     + page.source_of("@app.exception_handler(PoolTimeoutError)"))
    for name, text in extra.items():
        (folder / name).write_text(text)
    env = {k: v for k, v in os.environ.items() if k != "AWS_LAMBDA_FUNCTION_NAME"}
    env["PYTHONPATH"] = os.pathsep.join([str(folder), env.get("PYTHONPATH", "")])
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "no:randomly",
         "-W", "ignore::DeprecationWarning", "test_app.py"],
        cwd=folder, env=env, capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 0, result.stdout[-3000:]
    assert "1 passed" in result.stdout, result.stdout[-3000:]


@probe("    with TestClient(app) as client:")
def _testclient(ns: dict[str, Any], page: Page) -> None:
    _pytest_files(page, page.source_of("    with TestClient(app) as client:"), {})


@probe("    transport = httpx.ASGITransport(app=app)")
def _asgi_transport(ns: dict[str, Any], page: Page) -> None:
    toml = page.fenced("toml", "asyncio_mode")
    _pytest_files(page, page.source_of("    transport = httpx.ASGITransport(app=app)"),
                  {"pyproject.toml": toml})


@probe("def test_handler(tmp_path: Path) -> None:")
def _real_runtime(ns: dict[str, Any], page: Page) -> None:
    folder = Path(tempfile.mkdtemp(dir=page.tmp))
    (folder / "src").mkdir()
    (folder / "src" / "app.py").write_text(
        "from asyncpool import Pool\n"
        "from asyncpool.integrations.aws_lambda import lambda_config\n"
        "from asyncpool.integrations.powertools import current_connection, pooled_connection\n"
        "pool = Pool(config=lambda_config(function_timeout=10))\n"
        "@pooled_connection(pool)\n"
        "async def handler(event, context):\n"
        "    return await current_connection().fetchval('SELECT $1::text', event['name'])\n")
    with contextlib.chdir(folder):
        ns["test_handler"](folder)


@probe("class VaultPassword:")
def _provider(ns: dict[str, Any], page: Page) -> None:
    from asyncpool.credentials.provider import CredentialProvider, ExplainsAuthFailure

    for protocol in (CredentialProvider, ExplainsAuthFailure):
        members = [n for n in [*vars(protocol), *protocol.__annotations__] if not n.startswith("_")]
        assert members, protocol
        for name in members:
            mine, theirs = getattr(ns["VaultPassword"], name), getattr(protocol, name, None)
            if callable(theirs):
                assert inspect.iscoroutinefunction(mine) == inspect.iscoroutinefunction(theirs), name
                assert (list(inspect.signature(mine).parameters)
                        == list(inspect.signature(theirs).parameters)), name


@probe("asyncpool.unnamed.invalidate_all()")
def _invalidate(ns: dict[str, Any], page: Page) -> None:
    pool = ns["pool"]

    async def check() -> None:
        async with pool:
            assert await pool.fetchval("SELECT $1::int", 1) == 1
            pool.invalidate_statement_cache()
            assert await pool.fetchval("SELECT $1::int", 2) == 2
    page.runner.run(check())


@probe('session.add(Note(title="Buy milk"))')
def _sqlalchemy(ns: dict[str, Any], page: Page) -> None:
    titles = page.runner.run(ns["pool"].fetch("SELECT title FROM notes"))
    assert [r["title"] for r in titles] == ["Buy milk"], titles


@probe('pool = await asyncpool.create_pool(dsn, name="orders")')
def _global_providers(ns: dict[str, Any], page: Page) -> None:
    page.runner.run(ns["pool"].fetchval("SELECT 1"))
    data = ns["metric_reader"].get_metrics_data()
    pools = {point.attributes.get("db.client.connection.pool.name")
             for resource in data.resource_metrics for scope in resource.scope_metrics
             for metric in scope.metrics for point in metric.data.data_points}
    assert "orders" in pools, pools  # the pool reports through the global provider


@probe("TelemetryObserver(config, meter_provider=meter_provider, tracer_provider=tracer_provider),")
def _explicit_providers(ns: dict[str, Any], page: Page) -> None:
    assert ns["config"].telemetry is False
    page.runner.run(ns["pool"].open())
    page.runner.run(ns["pool"].fetchval("SELECT 1"))


# -- running a page ------------------------------------------------------------------------------


class Page:
    """One page's blocks, run in order in one namespace, on one loop for its top-level awaits."""

    def __init__(self, page: str, root: Path, tmp: Path) -> None:
        self.page = page
        self.blocks = [b for b in blocks(root) if b.page == page]
        self.text = (root / page).read_text()
        self.tmp = tmp
        self.runner = asyncio.Runner()

    def source_of(self, key: str) -> str:
        (found,) = [b.source for b in self.blocks if key in b.source]
        return found

    def fenced(self, language: str, key: str) -> str:
        (found,) = [body for body in re.findall(rf"^```{language}\n(.*?)^```$", self.text, re.M | re.S)
                    if key in body]
        return str(found)

    def run(self, dsn: str) -> Iterator[tuple[Block, str | None]]:
        cert = self.tmp / "shipped-ca.pem"
        cert.write_text("")  # only its existence is checked before a connection is made
        # A module of its own, as a reader's: SQLAlchemy resolves annotations through sys.modules.
        module = types.ModuleType("doc_example")
        sys.modules[module.__name__] = module
        # "`myapp` is the Mangum example above" (docs/serverless.md): the page's module.
        sys.modules["myapp"] = module
        namespace = module.__dict__
        namespace["dsn"] = dsn
        exec(PRELUDES.get(self.page, ""), namespace)  # noqa: S102 - the placeholders above
        for block in self.blocks:
            if block.kind != "run":
                yield block, None
                continue
            try:
                self._run_block(block, prepare(block.source, dsn, str(cert)), namespace)
            except BaseException:  # reported per block, the page goes on
                yield block, traceback.format_exc(limit=-6)
            else:
                yield block, None

    def _run_block(self, block: Block, source: str, namespace: dict[str, Any]) -> None:
        from asyncpool import Pool

        code = compile(source, block.label, "exec", flags=ast.PyCF_ALLOW_TOP_LEVEL_AWAIT)
        printed = io.StringIO()
        warnings = _Warnings()
        logging.getLogger("asyncpool").addHandler(warnings)
        try:
            with contextlib.redirect_stdout(printed):
                if code.co_flags & inspect.CO_COROUTINE:
                    self.runner.run(eval(code, namespace))  # noqa: S307 - the block, as a reader runs it
                else:
                    exec(code, namespace)  # noqa: S102
                keys = [key for key in PROBES if key in block.source]
                assert len(keys) <= 1, keys
                for key in keys:
                    PROBES[key](namespace, self)
        finally:
            logging.getLogger("asyncpool").removeHandler(warnings)
            sys.stdout.write(printed.getvalue())
        # A name read only where it runs later (an `except` clause, a handler's body) is defined too.
        undefined = sorted(n for n in _globals_read(source)
                           if n not in namespace and not hasattr(builtins, n))
        assert undefined == [], f"names neither defined, imported nor given: {undefined}"
        # The pool warns of what an example should not do: a connection held at close, a leak...
        assert warnings.messages == [], warnings.messages
        claims = [match.group(1) for match in re.finditer(r"^\s*print\(.*\)\s+#\s*(.*)$", source, re.M)]
        outputs = printed.getvalue().splitlines()
        if claims:
            assert len(outputs) >= len(claims), outputs
            for claim, output in zip(claims, outputs, strict=False):
                pattern = ".*".join(re.escape(part) for part in claim.split("..."))
                assert re.fullmatch(pattern, output), f"prints {output!r}, the comment says {claim!r}"
        for name, value in namespace.items():
            if isinstance(value, Pool):
                in_use = value.stats().in_use
                assert in_use == 0, f"{name!r} has {in_use} connection(s) still checked out"


def _globals_read(source: str) -> set[str]:
    """The global names a block reads, in any of its scopes (it is wrapped in a function, as
    top-level await needs one, so what it assigns at its top level is local and left out)."""
    wrapped = "async def _block():\n" + textwrap.indent(source, "    ") + "    pass\n"
    names: set[str] = set()

    def visit(table: symtable.SymbolTable) -> None:
        names.update(s.get_name() for s in table.get_symbols() if s.is_global() and s.is_referenced())
        for child in table.get_children():
            visit(child)

    for child in symtable.symtable(wrapped, "block", "exec").get_children():
        visit(child)
    return names


class _Warnings(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(f"{record.name}: {record.getMessage()}")


def main(argv: list[str]) -> int:
    root = Path(argv[2]) if len(argv) > 2 else ROOT
    failed = 0
    with tempfile.TemporaryDirectory() as tmp:
        page = Page(argv[1], root, Path(tmp))
        for block, error in page.run(os.environ["DOC_EXAMPLES_DSN"]):
            status = "skipped (fragment)" if block.kind != "run" else "ok" if error is None else "FAILED"
            print(f"DOC-EXAMPLE {block.label} {status}", flush=True)
            if error is not None:
                failed += 1
                print(error, file=sys.stderr, flush=True)
                if os.environ.get("DOC_EXAMPLES_STOP_AT_FAILURE"):
                    break  # (a page broken on purpose: the blocks after it need not run)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
