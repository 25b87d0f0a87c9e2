"""Connection spans, leak events and trace ids on logs, through a real OpenTelemetry SDK."""

from __future__ import annotations

import asyncio
import logging
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import pytest
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.trace import SpanKind, StatusCode

import asyncpool
from asyncpool import Pool
from asyncpool.connect.dsn import Target, dsn_password, parse_target
from asyncpool.telemetry import semconv as sc
from asyncpool.telemetry.logs import SPAN_ID, TRACE_ID
from asyncpool.telemetry.metrics import qualified_name
from asyncpool.testing import PostgresServer
from asyncpool.testing.faultproxy import FaultProxy
from asyncpool.testing.mitm import FakeServer
from tests.conftest import Pooler
from tests.pgpass_support import catch_all_pgpass, remote_name
from tests.telemetry_support import Sdk
from tests.waiting import until


@pytest.fixture
def sdk() -> Iterator[Sdk]:
    s = Sdk()
    yield s
    s.shutdown()


class SlowSecret:
    """A credentials provider that takes a moment, like a Secrets Manager call."""

    requires_tls = False

    def __init__(self, password: str) -> None:
        self._password = password
        self.calls = 0

    async def password(self, target: Target) -> str:
        self.calls += 1
        await asyncio.sleep(0.01)
        return self._password

    async def refresh(self, target: Target) -> bool:
        return False

    async def warm(self, target: Target) -> None:
        return None

    async def close(self) -> None:
        return None


def ids(span: ReadableSpan) -> tuple[str, str]:
    context = span.get_span_context()
    assert context is not None
    return format(context.trace_id, "032x"), format(context.span_id, "016x")


def times(span: ReadableSpan) -> tuple[int, int]:
    assert span.start_time is not None
    assert span.end_time is not None
    return span.start_time, span.end_time


def parent_id(span: ReadableSpan) -> int | None:
    return span.parent.span_id if span.parent is not None else None


async def test_connect_span_is_a_client_span_in_the_callers_trace(pooler: Pooler, sdk: Sdk) -> None:
    target = parse_target(pooler.dsn())
    secret = SlowSecret(dsn_password(pooler.dsn()) or "")
    async with sdk.pool(pooler.dsn(), name="spans", min_size=0, credentials=secret) as pool:
        with sdk.tracer.start_as_current_span("GET /orders") as request:
            assert await pool.fetchval("SELECT 1") == 1

    [connect] = sdk.spans(f"connect {target.database}")
    [credentials] = sdk.spans(sc.CREDENTIALS_SPAN)
    assert connect.kind is SpanKind.CLIENT
    assert dict(connect.attributes or {}) == {
        sc.DB_SYSTEM_NAME: "postgresql",
        sc.DB_OPERATION_NAME: "connect",  # "{db.operation.name} {target}", as its name
        sc.DB_NAMESPACE: target.database,
        sc.SERVER_ADDRESS: target.host,
        sc.SERVER_PORT: target.port,
        sc.POOL_NAME: "spans",
    }
    assert connect.status.status_code is StatusCode.UNSET
    assert parent_id(connect) == request.get_span_context().span_id
    assert ids(connect)[0] == ids(credentials)[0]

    assert credentials.kind is SpanKind.INTERNAL
    assert parent_id(credentials) == connect.get_span_context().span_id  # type: ignore[union-attr]
    assert dict(credentials.attributes or {}) == {sc.CREDENTIALS_PROVIDER: "SlowSecret"}
    assert secret.calls == 1
    connect_start, connect_end = times(connect)
    credentials_start, credentials_end = times(credentials)
    assert connect_start <= credentials_start <= credentials_end <= connect_end


async def test_logins_the_pool_makes_on_its_own_are_in_no_requests_trace(
    postgres: PostgresServer, sdk: Sdk
) -> None:
    """A pool opened inside a request (lazily, a Lambda's first invocation) opens its min_size
    in that request's trace, but the logins it makes later on its own (housekeeping keeping
    min_size after expiry, the background fill of ``open(wait=False)``) belong to no request:
    they were all children of the span that opened the pool, long after it ended, and stamped
    with the invocation it served."""
    from asyncpool.integrations.invocation import ColdStart, invocation_scope
    from asyncpool.integrations.lambda_spans import INVOCATION_ID, InvocationSpanProcessor

    sdk.tracer_provider.add_span_processor(InvocationSpanProcessor())
    database = parse_target(postgres.dsn()).database
    waited = sdk.pool(postgres.dsn(), name="own-waited", min_size=1, max_lifetime=0.2)
    background = sdk.pool(postgres.dsn(), name="own-background", min_size=1)
    lambda_context = SimpleNamespace(aws_request_id="first-invocation")
    with (invocation_scope(lambda_context, ColdStart()),
          sdk.tracer.start_as_current_span("first request") as request):
        await waited.open()
        await background.open(wait=False)
        await until(lambda: background.stats().idle == 1)
    request_id = request.get_span_context().span_id
    try:
        opened = {(dict(s.attributes or {})[sc.POOL_NAME], parent_id(s))
                  for s in sdk.spans(f"connect {database}")}
        assert opened == {("own-waited", request_id), ("own-background", None)}
        sdk.exporter.clear()
        waited.expire_all()
        # Housekeeping (every max_lifetime / 2) brings it back to min_size.
        await until(lambda: len(sdk.spans(f"connect {database}")) >= 1)
        [refill] = sdk.spans(f"connect {database}")
        assert parent_id(refill) is None
        # (Nor is it stamped with the invocation that opened the pool.)
        assert INVOCATION_ID not in dict(refill.attributes or {})
    finally:
        await waited.close()
        await background.close()


async def test_failed_login_span_has_error_type_and_the_log_has_the_trace_ids(
    postgres: PostgresServer, sdk: Sdk, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="asyncpool")
    dsn = postgres.dsn().replace(postgres.app.password, "wrong-password")
    async with sdk.pool(dsn, name="bad-login", min_size=0) as pool:
        with (
            sdk.tracer.start_as_current_span("GET /orders") as request,
            pytest.raises(asyncpool.AuthenticationError),
        ):
            await pool.fetchval("SELECT 1")

    [connect] = sdk.spans(f"connect {postgres.database}")
    attributes = dict(connect.attributes or {})
    assert attributes[sc.ERROR_TYPE] == "asyncpool.errors.AuthenticationError"  # what the caller got
    assert attributes[sc.DB_RESPONSE_STATUS_CODE] == "28P01"
    assert connect.status.status_code is StatusCode.ERROR
    assert connect.status.description is None
    assert parent_id(connect) == request.get_span_context().span_id

    [failure] = [r for r in caplog.records if r.name == "asyncpool.pool"]
    assert "authentication failed" in failure.getMessage()
    assert "wrong-password" not in failure.getMessage()
    context = request.get_span_context()
    assert getattr(failure, TRACE_ID) == format(context.trace_id, "032x")
    assert getattr(failure, SPAN_ID) == format(context.span_id, "016x")


async def test_a_login_whose_caller_was_cancelled_is_abandoned_not_failed(
    postgres: PostgresServer, sdk: Sdk
) -> None:
    """A request cancelled while its acquire logs in (its client went away): the connect span
    is no error, only marked abandoned; create_errors counts it under CancelledError (a
    deadline cutting logins that hang is an outage, which the metrics must show)."""
    async with (
        FaultProxy.to_dsn(postgres.dsn()) as proxy,
        sdk.pool(proxy.dsn(postgres.dsn()), name="gone", min_size=0, acquire_timeout=30,
                 connect_timeout=30) as pool,
    ):
        proxy.set_mode("stall")
        with sdk.tracer.start_as_current_span("GET /report") as request:
            caller = asyncio.create_task(pool.fetchval("SELECT 1"))
        await until(lambda: pool.stats().connecting == 1)
        caller.cancel()
        with pytest.raises(asyncio.CancelledError):
            await caller
        await until(lambda: bool(sdk.spans(f"connect {postgres.database}")))
        proxy.set_mode("pass")
        assert await pool.fetchval("SELECT 1") == 1
        stats, collected = pool.stats(), sdk.collect()

    abandoned, connected = sdk.spans(f"connect {postgres.database}")
    assert abandoned.status.status_code is StatusCode.UNSET
    attributes = dict(abandoned.attributes or {})
    assert attributes[sc.CONNECT_ABANDONED] is True
    assert sc.ERROR_TYPE not in attributes
    assert parent_id(abandoned) == request.get_span_context().span_id
    assert sc.CONNECT_ABANDONED not in dict(connected.attributes or {})
    errors = {p.attributes[sc.ERROR_TYPE]: p.value for p in collected.points(sc.CREATE_ERRORS.name)}
    assert errors == {"asyncpool.errors.AuthenticationError": 0, "asyncpool.errors.ConnectError": 0,
                      "asyncpool.errors.PoolerExhaustedError": 0,
                      "asyncio.exceptions.CancelledError": 1}
    assert stats.connect_errors_total == 0
    assert collected.histogram(sc.CREATE_TIME.name).count == 1


async def test_a_reclaimed_leak_is_an_event_on_the_holders_span_and_its_log_names_that_trace(
    pooler: Pooler, sdk: Sdk, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="asyncpool.leaks")
    async with sdk.pool(pooler.dsn(), name="leaky", min_size=1, max_size=2,
                        leak_timeout=0.5) as pool:

        async def bystander() -> None:
            # Acquires first, so the leak timer is armed from this task's context; returns its
            # connection well within leak_timeout.
            with sdk.tracer.start_as_current_span("bystander"):
                async with pool.acquire():
                    await asyncio.sleep(0.05)

        async def handler() -> None:
            with sdk.tracer.start_as_current_span("POST /import"):
                async with pool.acquire():
                    await asyncio.sleep(3600)

        other = asyncio.create_task(bystander())
        await asyncio.sleep(0.01)
        with pytest.raises(asyncpool.ConnectionLeakedError):
            await asyncio.wait_for(handler(), 5)
        await other
        leaked_total = pool.stats().leaked_total
        collected = sdk.collect()

    assert leaked_total == 1
    assert collected.value(sc.LEAKS.name, asyncpool__leak__action="reclaim") == 1
    [holder] = sdk.spans("POST /import")
    [event] = [e for e in holder.events if e.name == sc.LEAK_EVENT]
    attributes = dict(event.attributes or {})
    assert attributes[sc.POOL_NAME] == "leaky"
    assert attributes[sc.LEAK_ACTION] == "reclaim"
    assert float(attributes[sc.LEAK_HELD_SECONDS]) > 0.49  # type: ignore[arg-type]  # timers may fire 1 ms early
    assert "handler" in str(attributes[sc.CODE_STACKTRACE])
    [bystander_span] = sdk.spans("bystander")
    assert not [e for e in bystander_span.events if e.name == sc.LEAK_EVENT]
    assert not sdk.spans(sc.LEAK_SPAN)

    [record] = [r for r in caplog.records if r.name == "asyncpool.leaks"]
    assert (getattr(record, TRACE_ID), getattr(record, SPAN_ID)) == ids(holder)


async def test_a_leak_outside_any_span_gets_a_span_of_its_own(
    postgres: PostgresServer, sdk: Sdk, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="asyncpool.leaks")
    async with sdk.pool(postgres.dsn(), name="untraced", min_size=0, leak_timeout=0.2,
                        leak_action="log") as pool:
        conn = await pool.acquire()
        await until_leaked(pool)
        await pool.release(conn)
        collected = sdk.collect()

    assert collected.value(sc.LEAKS.name, asyncpool__leak__action="log") == 1
    [span] = sdk.spans(sc.LEAK_SPAN)
    assert span.parent is None
    assert [e.name for e in span.events] == [sc.LEAK_EVENT]
    assert dict(span.events[0].attributes or {})[sc.LEAK_ACTION] == "log"
    # Only logged, not reclaimed: the holder carried on, so this is no error.
    assert span.status.status_code is StatusCode.UNSET
    start, end = times(span)
    assert end - start > 190_000_000  # it covers the holding time (timers may fire 1 ms early)
    leak_log = next(r for r in caplog.records if "past leak_timeout" in r.getMessage())
    assert (getattr(leak_log, TRACE_ID), getattr(leak_log, SPAN_ID)) == ("0", "0")


async def until_leaked(pool: Pool) -> None:
    async with asyncio.timeout(5):
        while pool.stats().leaked_total == 0:
            await asyncio.sleep(0.02)


@pytest.fixture
def query_spans(sdk: Sdk) -> Iterator[None]:
    """opentelemetry-instrumentation-asyncpg's query spans, into this test's SDK only."""
    from opentelemetry.instrumentation.asyncpg import AsyncPGInstrumentor

    instrumentor = AsyncPGInstrumentor()  # type: ignore[no-untyped-call]
    instrumentor.instrument(tracer_provider=sdk.tracer_provider)
    yield
    instrumentor.uninstrument()


def _parent(spans: list[ReadableSpan], span: ReadableSpan) -> ReadableSpan | None:
    wanted = span.parent.span_id if span.parent is not None else None
    return next((s for s in spans if s.context is not None and s.context.span_id == wanted), None)


async def test_the_pools_own_statements_are_marked_in_the_request_trace(
    postgres: PostgresServer, sdk: Sdk, query_spans: None
) -> None:
    """The checkout check (SELECT 1) and the ROLLBACK after a cancelled query sit under an
    asyncpool.pool_statement span, inside the request's trace; the caller's query does not."""
    async with sdk.pool(postgres.dsn(), name="own", min_size=1, max_size=1,
                        validate_after=0) as pool:
        with sdk.tracer.start_as_current_span("GET /orders"):
            assert await pool.fetchval("SELECT 41 + 1") == 42
            async with pool.acquire() as conn:
                await conn.execute("BEGIN")
                with pytest.raises(TimeoutError):
                    await conn.execute("SELECT pg_sleep(5)", timeout=0.1)
        await until(lambda: pool.stats().idle == 1)

    spans = sdk.spans()
    request = next(s for s in spans if s.name == "GET /orders")
    marked = [s for s in spans if s.name.startswith(sc.POOL_STATEMENT_SPAN)]
    validate, reset = f"{sc.POOL_STATEMENT_SPAN} validate", f"{sc.POOL_STATEMENT_SPAN} reset"
    # Two checkouts, each checked (validate_after=0); one ROLLBACK after the timed-out query.
    assert sorted(s.name for s in marked) == [reset, validate, validate]
    for span in marked:
        assert span.kind is SpanKind.INTERNAL
        assert dict(span.attributes or {})[sc.POOL_NAME] == "own"
        assert _parent(spans, span) is request
    queries = [s for s in spans if s.kind is SpanKind.CLIENT and not s.name.startswith("connect")]
    under = {name: [q for q in queries if (p := _parent(spans, q)) is not None and p.name == name]
             for name in (validate, reset)}
    assert [q.name for q in under[validate]] == ["SELECT", "SELECT"]
    assert [q.name for q in under[reset]] == ["ROLLBACK"]
    ours = [q for q in queries if q not in under[validate] and q not in under[reset]]
    assert [q.name for q in ours] == ["SELECT", "BEGIN", "SELECT"]
    assert all(_parent(spans, s) is request for s in ours), [s.name for s in ours]


async def test_an_instrumentation_installed_after_the_pool_opened_sees_the_helpers(
    postgres: PostgresServer, sdk: Sdk
) -> None:
    """The query helpers run asyncpg's fetch, fetchrow, fetchval and execute bodies themselves only
    while asyncpg's methods are its own: wrapped by opentelemetry-instrumentation-asyncpg, even after
    the pool opened, each statement gets its span; unwrapped again, none."""
    from opentelemetry.instrumentation.asyncpg import AsyncPGInstrumentor

    async with sdk.pool(postgres.dsn(), name="late", min_size=1, max_size=1) as pool:
        assert await pool.fetchval("SELECT 1") == 1
        instrumentor = AsyncPGInstrumentor()  # type: ignore[no-untyped-call]
        instrumentor.instrument(tracer_provider=sdk.tracer_provider)
        try:
            assert await pool.fetchval("SELECT 2") == 2
            assert await pool.fetchrow("SELECT 3") == (3,)
            assert await pool.fetch("SELECT 4") == [(4,)]
            assert await pool.execute("SELECT $1::int", 9) == "SELECT 1"
            async with pool.acquire() as conn:  # the proxy's reads and execute too
                assert await conn.fetchval("SELECT 6") == 6
                assert await conn.fetch("SELECT 7") == [(7,)]
                assert await conn.execute("SELECT $1::int", 10) == "SELECT 1"
        finally:
            instrumentor.uninstrument()
        assert await pool.fetchval("SELECT 5") == 5
        assert await pool.execute("SELECT $1::int", 11) == "SELECT 1"
        async with pool.acquire() as conn:
            assert await conn.fetchval("SELECT 8") == 8
            assert await conn.execute("SELECT $1::int", 12) == "SELECT 1"

    queries = [s for s in sdk.spans() if s.kind is SpanKind.CLIENT and not s.name.startswith("connect")]
    assert [dict(q.attributes or {}).get("db.statement") for q in queries] == [
        "SELECT 2", "SELECT 3", "SELECT 4", "SELECT $1::int", "SELECT 6", "SELECT 7",
        "SELECT $1::int"]


_INSTRUMENTED_FIRST = textwrap.dedent("""
    import asyncio, sys
    from opentelemetry.instrumentation.asyncpg import AsyncPGInstrumentor
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    AsyncPGInstrumentor().instrument(tracer_provider=provider)
    import functools, asyncpg
    calls = []
    wrapped = asyncpg.Connection.fetch

    @functools.wraps(wrapped)  # a plain function over the instrumentation's wrapper
    async def fetch(self, query, *args, **kwargs):
        calls.append(query)
        return await wrapped(self, query, *args, **kwargs)

    asyncpg.Connection.fetch = fetch
    import asyncpool  # after the instrumentation, as under opentelemetry-instrument

    async def main():
        async with asyncpool.Pool(sys.argv[1], max_size=1, telemetry=False) as pool:
            await pool.fetchval("SELECT 1")
            await pool.fetchrow("SELECT 2")
            await pool.fetch("SELECT 3")
            await pool.execute("SELECT 5 + $1::int", 0)
            async with pool.acquire() as conn:
                await conn.fetch("SELECT 4")
                await conn.execute("SELECT 6 + $1::int", 0)

    asyncio.run(main())
    print(sorted(s.attributes["db.statement"] for s in exporter.get_finished_spans()
                 if "db.statement" in s.attributes), calls)
""")


def test_an_instrumentation_installed_before_asyncpool_was_imported_sees_the_helpers(
    postgres: PostgresServer,
) -> None:
    """Under ``opentelemetry-instrument`` (the ADOT Lambda layer), asyncpg is wrapped before
    asyncpool is imported: asyncpool takes the unwrapped methods as asyncpg's own, so the
    wrappers still run, a plain ``functools.wraps`` one too."""
    done = subprocess.run([sys.executable, "-c", _INSTRUMENTED_FIRST, postgres.dsn()],
                          capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split("\n")[-2] == (
        "['SELECT 1', 'SELECT 2', 'SELECT 3', 'SELECT 4', 'SELECT 5 + $1::int', "
        "'SELECT 6 + $1::int'] ['SELECT 3', 'SELECT 4']")


async def test_a_failed_check_is_marked_by_its_error_type_without_the_error_text(
    postgres: PostgresServer, sdk: Sdk
) -> None:
    """The checkout check gets no answer: its span in the request's trace has status ERROR and
    error.type, as the connect span; neither the error's text nor a traceback is copied."""
    async with FaultProxy.to_dsn(postgres.dsn()) as proxy:
        pool = sdk.pool(proxy.dsn(postgres.dsn()), name="checked", min_size=1, max_size=1,
                        validate_after=0, connect_timeout=0.3, acquire_timeout=10)
        await pool.open()
        proxy.set_mode("stall")
        with sdk.tracer.start_as_current_span("GET /orders") as request:
            caller = asyncio.create_task(pool.fetchval("SELECT 1"))
        await until(lambda: pool.stats().validation_failures_total == 1)
        proxy.set_mode("pass")
        assert await caller == 1
        await pool.close()

    [check] = sdk.spans(f"{sc.POOL_STATEMENT_SPAN} validate")
    assert parent_id(check) == request.get_span_context().span_id
    assert check.status.status_code is StatusCode.ERROR
    assert check.status.description is None
    assert dict(check.attributes or {})[sc.ERROR_TYPE] == "TimeoutError"
    assert list(check.events) == []


class TokenInTheMessage(SlowSecret):
    """Fails as a secret store that stops answering might, with a token in the message."""

    async def password(self, target: Target) -> str:
        raise ValueError(f"GET https://store.example/?token={LEAKY_TOKEN}: 503")


LEAKY_TOKEN = "tok-8f2b1c7e"  # pragma: allowlist secret


def _span_text(span: ReadableSpan) -> str:
    return repr((span.attributes, span.status.description, [(e.name, e.attributes)
                                                             for e in span.events]))


async def test_a_failed_credential_fetch_marks_its_span_by_class_without_the_message(
    postgres: PostgresServer, sdk: Sdk
) -> None:
    provider = TokenInTheMessage("")
    async with sdk.pool(postgres.dsn(), name="creds", min_size=0, credentials=provider) as pool:
        with pytest.raises(asyncpool.CredentialsError):
            await pool.fetchval("SELECT 1")

    [credentials] = sdk.spans(sc.CREDENTIALS_SPAN)
    assert credentials.status.status_code is StatusCode.ERROR
    assert credentials.status.description is None
    assert dict(credentials.attributes or {}) == {
        sc.CREDENTIALS_PROVIDER: "TokenInTheMessage",
        sc.ERROR_TYPE: "asyncpool.errors.CredentialsError",  # what the pool made of ValueError
    }
    assert list(credentials.events) == []
    [connect] = sdk.spans(f"connect {postgres.database}")
    assert connect.status.status_code is StatusCode.ERROR
    for span in (credentials, connect):
        assert LEAKY_TOKEN not in _span_text(span)


async def test_an_iam_token_that_cannot_be_signed_marks_the_credentials_span(
    aws: None, postgres: PostgresServer, sdk: Sdk
) -> None:
    """The role's credentials are gone after open() (a revoked session): signing fails at the
    next login, and the credentials span says so with the class IamAuth raised."""
    import botocore.exceptions
    from aiobotocore.session import AioSession

    session = AioSession()
    signed = [0]

    def sign(**_: object) -> None:
        signed[0] += 1
        if signed[0] > 1:  # warm() at open() signs once
            raise botocore.exceptions.NoCredentialsError()

    session.register("before-sign.rds.connect", sign)
    auth = asyncpool.IamAuth(region="us-east-1", session=session)
    async with sdk.pool(postgres.dsn(), name="iam", min_size=0, credentials=auth,
                        allow_unprotected_credentials=True) as pool:
        with pytest.raises(asyncpool.CredentialsError, match="no AWS credentials found"):
            await pool.fetchval("SELECT 1")

    [credentials] = sdk.spans(sc.CREDENTIALS_SPAN)
    assert credentials.status.status_code is StatusCode.ERROR
    assert credentials.status.description is None
    assert dict(credentials.attributes or {}) == {
        sc.CREDENTIALS_PROVIDER: "IamAuth", sc.ERROR_TYPE: "asyncpool.errors.CredentialsError"}
    assert list(credentials.events) == []


class NeverAnswers(SlowSecret):
    """A secret store that stops answering."""

    async def password(self, target: Target) -> str:
        await asyncio.Event().wait()
        raise AssertionError("never reached")


async def test_a_credential_fetch_cut_by_the_connect_timeout_is_an_error_span(
    postgres: PostgresServer, sdk: Sdk
) -> None:
    """The login timed out while the provider ran: the credentials step failed with it (it was
    left UNSET, an apparently healthy step taking the whole connect_timeout)."""
    async with sdk.pool(postgres.dsn(), name="creds-hang", min_size=0, connect_timeout=0.2,
                        credentials=NeverAnswers("")) as pool:
        with pytest.raises(asyncpool.PoolTimeoutError, match=r"connect_timeout=0\.2s"):
            async with pool.acquire(timeout=0.3):
                pass

    # The first login, cut at connect_timeout (the pool's retry was cut by the acquire's).
    connect = sdk.spans(f"connect {postgres.database}")[0]
    assert dict(connect.attributes or {})[sc.ERROR_TYPE] == "asyncpool.errors.ConnectError"
    [credentials] = [s for s in sdk.spans(sc.CREDENTIALS_SPAN)
                     if s.parent is not None and s.parent.span_id == connect.context.span_id]
    assert credentials.status.status_code is StatusCode.ERROR
    assert credentials.status.description is None
    assert dict(credentials.attributes or {}) == {
        sc.CREDENTIALS_PROVIDER: "NeverAnswers",
        sc.ERROR_TYPE: "asyncpool.errors.ConnectError",
    }
    assert list(credentials.events) == []


async def test_a_credential_fetch_whose_caller_went_away_stays_unset(
    postgres: PostgresServer, sdk: Sdk
) -> None:
    """The caller was cancelled (a client that went away) during the fetch: nothing failed."""
    async with sdk.pool(postgres.dsn(), name="creds-gone", min_size=0,
                        credentials=NeverAnswers("")) as pool:
        caller = asyncio.create_task(pool.fetchval("SELECT 1"))
        await asyncio.sleep(0.1)
        caller.cancel()
        with pytest.raises(asyncio.CancelledError):
            await caller

    [credentials] = sdk.spans(sc.CREDENTIALS_SPAN)
    assert credentials.status.status_code is StatusCode.UNSET
    assert sc.ERROR_TYPE not in dict(credentials.attributes or {})


async def test_a_withheld_password_file_password_is_marked_as_the_callers_error(
        sdk: Sdk, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A .pgpass password for another machine without verified TLS is held back and the login
    refused before anything is sent: the connect span and `create_errors` name the class the
    caller gets (`AuthMethodRefusedError`), and neither carries the password."""
    name = remote_name()
    secret = "pgpass-Telemetry-4711"  # pragma: allowlist secret
    catch_all_pgpass(tmp_path, monkeypatch, secret)
    async with FakeServer(tls="refuse", auth="password") as fake:
        pool = sdk.pool(f"postgresql://app@{name}:{fake.port}/app", min_size=1)
        with pytest.raises(asyncpool.AuthMethodRefusedError) as info:
            await pool.open()
    assert fake.received == []
    refused = qualified_name(type(info.value))
    assert refused == "asyncpool.errors.AuthMethodRefusedError"
    [connect] = sdk.spans("connect app")
    assert connect.status.status_code is StatusCode.ERROR
    assert (connect.attributes or {})[sc.ERROR_TYPE] == refused
    assert sdk.collect().value(sc.CREATE_ERRORS.name, error__type=refused) == 1
    spans = sdk.spans()
    assert spans
    for span in spans:
        assert secret not in repr(dict(span.attributes or {})) + repr(span.status)
