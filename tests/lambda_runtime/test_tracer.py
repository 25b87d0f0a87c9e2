"""Powertools' Tracer (X-Ray) stacked with `pooled_connection`, under the real Lambda runtime.

tests/lambda_functions/traced.py runs under awslambdaric against the Runtime API emulator, which
sends each event with a sampled X-Ray trace header. The X-Ray SDK sends each finished subsegment
tree over UDP to ``AWS_XRAY_DAEMON_ADDRESS``: here a socket of the test's (`XRayDaemon`), so the
tests read the documents X-Ray would get.
"""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from asyncpool.testing import PgBouncerServer
from asyncpool.testing.lambda_runtime import LambdaProcess, RuntimeAPI
from tests.lambda_env import app_clients
from tests.lambda_runtime.support import FUNCTIONS, environment, invoke, response

Subsegment = dict[str, Any]


class XRayDaemon:
    """A UDP socket on 127.0.0.1 standing in for the X-Ray daemon: keeps what the SDK sends."""

    def __init__(self) -> None:
        self._socket = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self._socket.bind(("127.0.0.1", 0))
        self._socket.settimeout(0.1)
        self.address = f"127.0.0.1:{self._socket.getsockname()[1]}"
        self.documents: list[Subsegment] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._receive, name="xray-daemon", daemon=True)
        self._thread.start()

    def _receive(self) -> None:
        while not self._stop.is_set():
            try:
                datagram = self._socket.recv(65536)
            except TimeoutError:
                continue
            header, _, body = datagram.partition(b"\n")
            assert json.loads(header) == {"format": "json", "version": 1}
            with self._lock:
                self.documents.append(json.loads(body))

    def trace(self, trace_id: str, count: int, within: float = 5.0) -> list[Subsegment]:
        """The subsegments of `trace_id`, nested ones flattened, once `count` have arrived."""
        deadline = time.monotonic() + within
        while True:
            with self._lock:
                found = [s for d in self.documents if d["trace_id"] == trace_id for s in flatten(d)]
            if len(found) >= count or time.monotonic() > deadline:
                return found
            time.sleep(0.02)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self._socket.close()


def flatten(document: Subsegment) -> Iterator[Subsegment]:
    """A subsegment and those nested in it (sent as one document when they all closed),
    each with ``parent_id`` set as when sent apart."""
    yield document
    for child in document.get("subsegments", []):
        yield from flatten({**child, "parent_id": document["id"], "trace_id": document["trace_id"]})


def by_name(subsegments: list[Subsegment]) -> dict[str, Subsegment]:
    named = {s["name"]: s for s in subsegments}
    assert len(named) == len(subsegments), [s["name"] for s in subsegments]
    return named


def closed(subsegment: Subsegment) -> bool:
    return subsegment["in_progress"] is False and subsegment["end_time"] >= subsegment["start_time"]


@pytest.fixture
def xray() -> Iterator[XRayDaemon]:
    daemon = XRayDaemon()
    yield daemon
    daemon.close()


@pytest.fixture
def sampled_api() -> Iterator[RuntimeAPI]:
    with RuntimeAPI(function_timeout=10, sampled=True) as api:
        yield api


def traced(api: RuntimeAPI, pooler: PgBouncerServer, tmp_path: Path, xray: XRayDaemon,
           **env: str) -> LambdaProcess:
    """tests/lambda_functions/traced.py's handler, as on Lambda with active tracing."""
    return environment(api, pooler, tmp_path, handler="traced.handler", env={
        # Only there is Powertools' Tracer enabled and X-Ray's SDK in its Lambda mode (the
        # trace header from _X_AMZN_TRACE_ID, a subsegment sent as soon as it closes).
        "LAMBDA_TASK_ROOT": str(FUNCTIONS),
        "AWS_XRAY_DAEMON_ADDRESS": xray.address,
        **env,
    })


async def test_tracer_above_traces_every_warm_invocation_and_its_query(
    sampled_api: RuntimeAPI, own_pgbouncer: PgBouncerServer, tmp_path: Path, xray: XRayDaemon
) -> None:
    """The order docs/serverless.md gives: the handler subsegment covers the invocation, the
    capture_method one nests in it and ends after the query; every invocation's subsegments
    close and are sent; one connection serves them all."""
    with traced(sampled_api, own_pgbouncer, tmp_path, xray) as proc:
        outcomes = [await invoke(sampled_api, {"op": "greet"}) for _ in range(10)]
        for n, outcome in enumerate(outcomes):
            body = response(outcome, proc)
            assert body["greeting"] == "Hello, Ada"
            assert (body["pool"]["created_total"], body["pool"]["in_use"]) == (1, 1)
            subsegments = await asyncio.to_thread(xray.trace, outcome.trace_id, 2)
            named = by_name(subsegments)
            assert set(named) == {"## handler", "## traced.greeting"}, n
            handler, greeting = named["## handler"], named["## traced.greeting"]
            assert all(closed(s) for s in subsegments), subsegments
            assert greeting["parent_id"] == handler["id"]
            # Around the query (X-Ray's times are rounded to the microsecond).
            assert greeting["start_time"] - 1e-5 <= body["query_started"]
            assert body["query_done"] <= greeting["end_time"] + 1e-5
            assert handler["start_time"] <= greeting["start_time"]
            assert greeting["end_time"] <= handler["end_time"]
            assert handler["annotations"] == {"ColdStart": n == 0, "Service": "traced"}
            assert "fault" not in handler
        assert len(await app_clients(own_pgbouncer)) == 1


async def test_a_failing_statement_is_recorded_and_the_connection_reused(
    sampled_api: RuntimeAPI, own_pgbouncer: PgBouncerServer, tmp_path: Path, xray: XRayDaemon
) -> None:
    with traced(sampled_api, own_pgbouncer, tmp_path, xray) as proc:
        response(await invoke(sampled_api, {"op": "greet"}), proc)

        failed = await invoke(sampled_api, {"op": "fail"})
        assert failed.kind == "error"
        assert failed.json()["errorType"] == "DivisionByZeroError"
        named = by_name(await asyncio.to_thread(xray.trace, failed.trace_id, 2))
        divide, handler = named["## traced.divide"], named["## handler"]
        assert closed(divide)
        assert closed(handler)
        [error] = divide["cause"]["exceptions"]
        assert (error["type"], error["message"]) == ("DivisionByZeroError", "division by zero")
        assert divide["fault"] is True
        # The handler's subsegment points at the same exception; Powertools adds its fields as
        # metadata (the statement's text, not its arguments).
        assert (handler["fault"], handler["cause"]) == (True, error["id"])
        assert divide["metadata"]["traced"]["traced.divide error"]["query"] == "SELECT 1 / $1::int"

        caught = await invoke(sampled_api, {"op": "fail_caught"})
        body = response(caught, proc)
        assert (body["caught"], body["after"]) == ("DivisionByZeroError", 1)
        subsegments = await asyncio.to_thread(xray.trace, caught.trace_id, 3)
        assert all(closed(s) for s in subsegments)
        faults = sorted((s["name"], s.get("fault", False)) for s in subsegments)
        # The caught error stays on its subsegment; the handler answered.
        assert faults == [("## handler", False), ("## traced.divide", False), ("## traced.divide", True)]

        stats = response(await invoke(sampled_api, {"op": "stats"}), proc)["pool"]
        assert (stats["created_total"], stats["closed_total"], stats["in_use"]) == (1, 0, 1)
        assert len(await app_clients(own_pgbouncer)) == 1


async def test_an_invocation_cut_off_at_the_deadline_closes_its_subsegments(
    own_pgbouncer: PgBouncerServer, tmp_path: Path, xray: XRayDaemon
) -> None:
    """The runner cancels the handler before Lambda's timeout: the capture_method subsegment
    ends with the cancellation, the handler's with HandlerTimeoutError, and both are sent."""
    with (RuntimeAPI(function_timeout=1.5, sampled=True) as api,
          traced(api, own_pgbouncer, tmp_path, xray) as proc):
        # The deadline counts from the event's submission: let INIT (X-Ray's imports) end first.
        await asyncio.to_thread(api.wait_idle)
        response(await invoke(api, {"op": "greet"}), proc)
        late = await invoke(api, {"op": "nap", "seconds": 5})
        assert late.json()["errorType"] == "HandlerTimeoutError"
        named = by_name(await asyncio.to_thread(xray.trace, late.trace_id, 2))
        nap, handler = named["## traced.nap"], named["## handler"]
        assert closed(nap)
        assert closed(handler)
        assert nap["parent_id"] == handler["id"]
        assert [e["type"] for e in nap["cause"]["exceptions"]] == ["CancelledError"]
        assert [e["type"] for e in handler["cause"]["exceptions"]] == ["HandlerTimeoutError"]
        after = response(await invoke(api, {"op": "greet"}), proc)["pool"]
        assert (after["created_total"], after["closed_total"]) == (1, 0)


async def test_the_middleware_traced_by_powertools_is_named_pooled_connection(
    sampled_api: RuntimeAPI, own_pgbouncer: PgBouncerServer, tmp_path: Path, xray: XRayDaemon
) -> None:
    """POWERTOOLS_TRACE_MIDDLEWARES=true: Powertools opens a subsegment around the middleware,
    named after it; it holds the checkout, the handler's work and the release."""
    env = {"POWERTOOLS_TRACE_MIDDLEWARES": "true"}
    with traced(sampled_api, own_pgbouncer, tmp_path, xray, **env) as proc:
        outcome = await invoke(sampled_api, {"op": "greet"})
        response(outcome, proc)
        named = by_name(await asyncio.to_thread(xray.trace, outcome.trace_id, 3))
        assert set(named) == {"## handler", "## pooled_connection", "## traced.greeting"}
        assert named["## pooled_connection"]["parent_id"] == named["## handler"]["id"]
        assert named["## traced.greeting"]["parent_id"] == named["## pooled_connection"]["id"]


async def test_tracer_below_pooled_connection_is_refused_at_init(
    sampled_api: RuntimeAPI, own_pgbouncer: PgBouncerServer, tmp_path: Path, xray: XRayDaemon
) -> None:
    """Below, capture_lambda_handler would time the creation of a coroutine (a subsegment of a
    few microseconds whose response is the coroutine's repr), and the handler's error would
    not be on it: the import fails instead, saying which order to use."""
    with traced(sampled_api, own_pgbouncer, tmp_path, xray, TEST_TRACER_BELOW="1") as proc:
        # The runtime reports the import's error to /init/error and exits.
        status = await asyncio.to_thread(proc.wait, 20.0)
        assert status is not None, proc.log()[-2000:]
    [error] = sampled_api.init_errors
    assert error["errorType"] == "TypeError", error
    assert error["errorMessage"].startswith("Tracer.capture_lambda_handler is below @pooled_connection")
    assert "directly on the async def" in error["errorMessage"]

async def test_concurrent_traced_coroutines_hit_xray_s_one_stack_per_thread(
    sampled_api: RuntimeAPI, own_pgbouncer: PgBouncerServer, tmp_path: Path, xray: XRayDaemon
) -> None:
    """X-Ray's limit, not asyncpool's (aws-xray-sdk-python#164): its Lambda context keeps one
    subsegment stack per thread, and every task of an invocation runs on the runtime's thread.
    Two capture_method coroutines gathered, the first to start ending first: it closes the
    other's subsegment, whose response then cannot be recorded (AlreadyEndedException). The
    connection still goes back. Tracing the function that gathers works."""
    with traced(sampled_api, own_pgbouncer, tmp_path, xray) as proc:
        broken = await invoke(sampled_api, {"op": "gather"})
        assert broken.kind == "error"
        assert broken.json()["errorType"] == "AlreadyEndedException"

        outcome = await invoke(sampled_api, {"op": "gather_outside"})
        body = response(outcome, proc)
        assert body["naps"] == [0.05, 0.3]
        assert (body["pool"]["created_total"], body["pool"]["in_use"]) == (1, 1)
        named = by_name(await asyncio.to_thread(xray.trace, outcome.trace_id, 2))
        together = named["## traced.naps_together"]
        assert closed(together)
        assert together["parent_id"] == named["## handler"]["id"]
        assert together["end_time"] - together["start_time"] >= 0.3


async def test_asyncpool_s_opentelemetry_spans_beside_xray(
    sampled_api: RuntimeAPI, own_pgbouncer: PgBouncerServer, tmp_path: Path, xray: XRayDaemon
) -> None:
    """An OpenTelemetry SDK in the same function: asyncpool's spans carry the invocation they
    were made in while X-Ray traces the same invocations; neither sees the other."""
    with traced(sampled_api, own_pgbouncer, tmp_path, xray, TEST_OTEL="1") as proc:
        first = await invoke(sampled_api, {"op": "greet"})
        response(first, proc)
        second = await invoke(sampled_api, {"op": "spans"})
        spans = response(second, proc)["spans"]
        [connect] = [s for s in spans if s["name"].startswith("connect ")]
        assert connect["attributes"]["faas.invocation_id"] == first.request_id
        assert connect["attributes"]["faas.coldstart"] is True
        for outcome in (first, second):
            names = {s["name"] for s in await asyncio.to_thread(xray.trace, outcome.trace_id, 1)}
            assert "## handler" in names
            assert not any(name.startswith("connect ") for name in names)

