"""A Lambda Runtime API emulator, and handlers run against it under the real runtime client.

`RuntimeAPI` serves the Runtime API a Lambda runtime talks to (``AWS_LAMBDA_RUNTIME_API``) on
loopback: ``GET /2018-06-01/runtime/invocation/next`` hands out queued events with the
request-id, deadline, function-ARN and trace headers; ``POST .../invocation/{id}/response`` and
``.../error`` complete them; ``POST .../init/error``; and, for SnapStart, ``GET .../restore/next``
(held until the test restores the environment) and ``POST .../restore/error``.

Each event's deadline (``Lambda-Runtime-Deadline-Ms``, `function_timeout` after it is handed out)
is enforced as Lambda enforces it: an invocation with no response by then ends as a ``timeout``
`Outcome` ("Task timed out after ..."), and the execution environment is reset: every
`LambdaProcess` serving the API is killed (after SIGTERM and a grace period, with
``shutdown_grace``, as when an extension is registered), its connections left as they were.

Each event's ``Lambda-Runtime-Trace-Id`` is an X-Ray trace header (``Root=...;Parent=...;Sampled=...``),
the runtime client puts it in ``_X_AMZN_TRACE_ID``; `RuntimeAPI(sampled=True)` marks it sampled, so
the X-Ray SDK (Powertools' Tracer) in the handler sends its subsegments to the daemon address
(``AWS_XRAY_DAEMON_ADDRESS``), which a test can bind itself.

`LambdaProcess` runs ``python -m awslambdaric module.handler``, the runtime interface client AWS
ships for Python images (PyPI ``awslambdaric``), against it: one execution environment the test
can invoke, freeze (SIGSTOP) and thaw (SIGCONT) between invocations, and shut down (SIGTERM)::

    with RuntimeAPI() as api, LambdaProcess(api, "app.handler", path=[here]) as env:
        outcome = api.invoke({"name": "Ada"})
        assert outcome.kind == "response", outcome.body

Only the Runtime API is emulated; the handler runs exactly as in a Lambda container image.
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import TracebackType
from typing import IO, Any, Literal

from asyncpool.testing.harness_error import HarnessError

PREFIX = "/2018-06-01/runtime"
FUNCTION_NAME = "asyncpool-test"
# What Lambda sets for the managed Python runtimes; awslambdaric polls for the next event on a
# thread (so the main thread can run Python signal handlers) only for 3.12 and later.
EXECUTION_ENVS = ("AWS_Lambda_python3.11", "AWS_Lambda_python3.12", "AWS_Lambda_python3.13")


@dataclass
class Outcome:
    """How one invocation ended: the runtime posted a response or an error."""

    request_id: str
    kind: Literal["response", "error", "timeout"]
    body: bytes
    headers: dict[str, str]
    # From the event leaving the emulator to the response arriving: the invocation's duration
    # as Lambda bills it, runtime overhead included.
    seconds: float
    # The X-Ray trace id (``1-...``) the event was sent with.
    trace_id: str = ""

    def json(self) -> Any:
        return json.loads(self.body)


@dataclass
class _Pending:
    request_id: str
    body: bytes
    deadline_ms: int
    trace_header: str
    done: threading.Event = field(default_factory=threading.Event)
    sent_at: float | None = None
    outcome: Outcome | None = None
    timer: threading.Timer | None = None


class RuntimeAPI:
    """The Lambda Runtime API on 127.0.0.1, one thread per HTTP connection.

    `function_timeout` sets each event's deadline header (what ``get_remaining_time_in_millis``
    counts down from), counted from when the event is handed out, and enforced: past it the
    invocation times out and the environments are reset (`on_timeout`). `sampled` marks each
    event's X-Ray trace header sampled (as when the function has active tracing). Events are
    served in order to whichever runtime process asks.
    """

    def __init__(self, *, function_timeout: float = 30.0, sampled: bool = False) -> None:
        self.function_timeout = function_timeout
        self.sampled = sampled
        self._events: queue.Queue[_Pending] = queue.Queue()
        self._pending: dict[str, _Pending] = {}
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._polling = threading.Condition(self._lock)
        self._waiting_for_next = 0
        self.next_calls = 0
        self.first_next_at: float | None = None
        self.init_errors: list[dict[str, Any]] = []
        self.restore_errors: list[dict[str, Any]] = []
        self.restore_requested: threading.Event = threading.Event()
        self._restored = threading.Event()
        # What resets an environment when an invocation times out (each LambdaProcess adds one).
        self.on_timeout: list[Callable[[], None]] = []
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler_class())
        self._server.daemon_threads = True
        self._thread: threading.Thread | None = None

    @property
    def address(self) -> str:
        """``host:port``, the value of ``AWS_LAMBDA_RUNTIME_API``."""
        host, port = self._server.server_address[:2]
        return f"{host!s}:{port}"

    def start(self) -> RuntimeAPI:
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.05},
            name="lambda-runtime-api", daemon=True,
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stopping.set()
        self._restored.set()
        with self._lock:
            timers = [p.timer for p in self._pending.values() if p.timer is not None]
        for timer in timers:
            timer.cancel()
        self._server.shutdown()
        self._server.server_close()
        if self._thread is not None:
            self._thread.join(5)

    def __enter__(self) -> RuntimeAPI:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- what a test does --------------------------------------------------------------------

    def submit(self, event: Any, *, request_id: str | None = None) -> str:
        """Queue an event (JSON-encoded); returns its request id."""
        rid = request_id or str(uuid.uuid4())
        now = time.time()
        deadline_ms = int((now + self.function_timeout) * 1000)  # set again when handed out
        # As Lambda sends it: a new trace per invocation, the function's segment as the parent.
        trace = (f"Root=1-{int(now):08x}-{uuid.uuid4().hex[:24]};Parent={uuid.uuid4().hex[:16]};"
                 f"Sampled={int(self.sampled)}")
        pending = _Pending(rid, json.dumps(event).encode(), deadline_ms, trace)
        with self._lock:
            self._pending[rid] = pending
        self._events.put(pending)
        return rid

    def result(self, request_id: str, timeout: float = 30.0) -> Outcome:
        """Wait for the runtime to post the response or error of `request_id`."""
        pending = self._pending[request_id]
        if not pending.done.wait(timeout):
            raise HarnessError(f"invocation {request_id} got no response within {timeout}s")
        assert pending.outcome is not None
        return pending.outcome

    def invoke(self, event: Any, *, timeout: float = 30.0, request_id: str | None = None) -> Outcome:
        """One invocation: queue `event`, wait for its outcome."""
        return self.result(self.submit(event, request_id=request_id), timeout)

    def wait_idle(self, timeout: float = 30.0, *, runtimes: int = 1) -> None:
        """Wait until `runtimes` runtimes (managed-instance workers) wait in ``GET /next`` with
        nothing queued: INIT is over, or the last invocation's response is in and the
        environment would now be frozen."""
        deadline = time.monotonic() + timeout
        with self._polling:
            while not (self._waiting_for_next >= runtimes and self._events.empty()):
                left = deadline - time.monotonic()
                if left <= 0:
                    raise HarnessError(f"no runtime asked for the next event within {timeout}s")
                self._polling.wait(left)

    def release_restore(self) -> None:
        """SnapStart: answer the held ``GET /restore/next``: the environment is restored."""
        self._restored.set()

    # -- the HTTP side ------------------------------------------------------------------------

    def _next(self) -> _Pending | None:
        with self._polling:
            self._waiting_for_next += 1
            self.next_calls += 1
            if self.first_next_at is None:
                self.first_next_at = time.monotonic()
            self._polling.notify_all()
        try:
            while not self._stopping.is_set():
                try:
                    pending = self._events.get(timeout=0.1)
                except queue.Empty:
                    continue
                pending.sent_at = time.monotonic()
                # Lambda's clock starts when the invocation starts, not when it was queued.
                pending.deadline_ms = int((time.time() + self.function_timeout) * 1000)
                pending.timer = threading.Timer(self.function_timeout, self._time_out, (pending,))
                pending.timer.daemon = True
                pending.timer.start()
                return pending
            return None
        finally:
            with self._polling:
                self._waiting_for_next -= 1
                self._polling.notify_all()

    def _time_out(self, pending: _Pending) -> None:
        """The deadline passed: as Lambda, answer the invoker and reset the environment."""
        message = f"{pending.request_id} Task timed out after {self.function_timeout:.2f} seconds"
        body = json.dumps({"errorMessage": message}).encode()
        if not self._complete(pending.request_id, "timeout", body, {}):
            return
        for reset in list(self.on_timeout):
            reset()

    def _complete(self, request_id: str, kind: Literal["response", "error", "timeout"],
                  body: bytes, headers: dict[str, str]) -> bool:
        with self._lock:
            pending = self._pending.get(request_id)
            if pending is None or pending.done.is_set() or pending.outcome is not None:
                return False
            pending.outcome = Outcome(request_id, kind, body, headers, 0.0)
        if pending.timer is not None and kind != "timeout":
            pending.timer.cancel()
        sent = pending.sent_at if pending.sent_at is not None else time.monotonic()
        trace_id = pending.trace_header.split(";")[0].removeprefix("Root=")
        pending.outcome = Outcome(request_id, kind, body, headers, time.monotonic() - sent, trace_id)
        pending.done.set()
        return True

    def _handler_class(self) -> type[BaseHTTPRequestHandler]:
        api = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # keep-alive, as the runtime client expects

            def setup(self) -> None:
                super().setup()
                # Without it every reply waits for the client's delayed ACK (~40 ms).
                self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

            def log_message(self, format: str, *args: Any) -> None:
                pass

            def handle(self) -> None:
                # A runtime killed mid-request (the tests do that) is not the emulator's error.
                with contextlib.suppress(ConnectionError):
                    super().handle()

            def _reply(self, status: int, body: bytes = b"", headers: Mapping[str, str] = {}) -> None:
                self.send_response(status)
                for name, value in headers.items():
                    self.send_header(name, value)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def _body(self) -> bytes:
                length = int(self.headers.get("Content-Length") or 0)
                return self.rfile.read(length) if length else b""

            def do_GET(self) -> None:
                if self.path == f"{PREFIX}/invocation/next":
                    pending = api._next()
                    if pending is None:
                        with contextlib.suppress(OSError):
                            self._reply(500, b'{"errorMessage": "emulator stopping"}')
                        return
                    self._reply(200, pending.body, {
                        "Lambda-Runtime-Aws-Request-Id": pending.request_id,
                        "Lambda-Runtime-Deadline-Ms": str(pending.deadline_ms),
                        "Lambda-Runtime-Invoked-Function-Arn":
                            f"arn:aws:lambda:us-east-1:000000000000:function:{FUNCTION_NAME}",
                        "Lambda-Runtime-Trace-Id": pending.trace_header,
                    })
                elif self.path == f"{PREFIX}/restore/next":
                    api.restore_requested.set()
                    api._restored.wait()
                    self._reply(200)
                else:
                    self._reply(404, b'{"errorMessage": "unknown path"}')

            def do_POST(self) -> None:
                body = self._body()
                headers = dict(self.headers.items())
                parts = self.path.removeprefix(PREFIX + "/").split("/")
                if len(parts) == 3 and parts[0] == "invocation" and parts[2] in ("response", "error"):
                    kind: Literal["response", "error"] = "response" if parts[2] == "response" else "error"
                    ok = api._complete(parts[1], kind, body, headers)
                    self._reply(202 if ok else 400, b'{"status": "OK"}' if ok else b"{}")
                elif parts == ["init", "error"]:
                    api.init_errors.append(_json_or_raw(body, headers))
                    self._reply(202, b'{"status": "OK"}')
                elif parts == ["restore", "error"]:
                    api.restore_errors.append(_json_or_raw(body, headers))
                    self._reply(202, b'{"status": "OK"}')
                else:
                    self._reply(404, b'{"errorMessage": "unknown path"}')

        return Handler


def _json_or_raw(body: bytes, headers: Mapping[str, str]) -> dict[str, Any]:
    try:
        parsed = json.loads(body)
    except ValueError:
        parsed = {"raw": body.decode(errors="replace")}
    if not isinstance(parsed, dict):
        parsed = {"value": parsed}
    parsed["_error_type"] = headers.get("Lambda-Runtime-Function-Error-Type")
    return parsed


class LambdaProcess:
    """One execution environment: ``python -m awslambdaric <handler>`` against `api`.

    `execution_env` is ``AWS_EXECUTION_ENV`` (None: unset, as in a container image that runs
    awslambdaric itself). `path` goes first on ``PYTHONPATH`` (the function's code); `env` adds
    or, with None values, removes variables. `python` runs the runtime (another interpreter
    needs awslambdaric and the handler's packages installed). Output (the runtime's log lines,
    text or JSON by ``AWS_LAMBDA_LOG_FORMAT``) goes to `log_path`.

    When an invocation times out the environment is reset, as Lambda resets it: SIGKILL, or with
    `shutdown_grace` (seconds) SIGTERM first and SIGKILL that long after, as Lambda does when an
    extension is registered. It is not started again: start another to go on.
    """

    def __init__(
        self,
        api: RuntimeAPI,
        handler: str,
        *,
        log_path: Path,
        path: Sequence[Path | str] = (),
        env: Mapping[str, str | None] | None = None,
        execution_env: str | None = "AWS_Lambda_python3.12",
        python: str = sys.executable,
        shutdown_grace: float | None = None,
    ) -> None:
        self.api = api
        self.shutdown_grace = shutdown_grace
        self.was_reset = threading.Event()
        self.handler = handler
        self.log_path = log_path
        environ = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "_LAMBDA", "_X_AMZN"))}
        environ.update(
            AWS_LAMBDA_RUNTIME_API=api.address,
            AWS_LAMBDA_FUNCTION_NAME=FUNCTION_NAME,
            AWS_LAMBDA_FUNCTION_VERSION="$LATEST",
            AWS_LAMBDA_FUNCTION_MEMORY_SIZE="512",
            AWS_LAMBDA_LOG_GROUP_NAME=f"/aws/lambda/{FUNCTION_NAME}",
            AWS_LAMBDA_LOG_STREAM_NAME="2026/12/03/[$LATEST]emulated",
            AWS_LAMBDA_INITIALIZATION_TYPE="on-demand",
            AWS_REGION="us-east-1",
            AWS_DEFAULT_REGION="us-east-1",
            PYTHONUNBUFFERED="1",
        )
        if execution_env is not None:
            environ["AWS_EXECUTION_ENV"] = execution_env
        pythonpath = [str(p) for p in path]
        if environ.get("PYTHONPATH"):
            pythonpath.append(environ["PYTHONPATH"])
        if pythonpath:
            environ["PYTHONPATH"] = os.pathsep.join(pythonpath)
        for name, value in (env or {}).items():
            if value is None:
                environ.pop(name, None)
            else:
                environ[name] = value
        self.environ = environ
        self.python = python
        self.proc: subprocess.Popen[bytes] | None = None
        self.started_at: float | None = None
        self._log: IO[bytes] | None = None

    def start(self) -> LambdaProcess:
        self._log = open(self.log_path, "ab")  # noqa: SIM115 - closed in stop()
        self.started_at = time.monotonic()
        self.proc = subprocess.Popen(
            [self.python, "-m", "awslambdaric", self.handler],
            env=self.environ, stdin=subprocess.DEVNULL, stdout=self._log, stderr=subprocess.STDOUT,
            # Its own process group: managed-instance workers are its children, stopped with it.
            start_new_session=True,
        )
        self.api.on_timeout.append(self._reset)
        return self

    def _reset(self) -> None:
        """An invocation timed out: end the environment as Lambda does."""
        self.was_reset.set()
        if self.proc is None:
            return
        if self.shutdown_grace is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.proc.pid, signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(self.shutdown_grace)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGCONT)
            os.killpg(self.proc.pid, signal.SIGKILL)

    @property
    def pid(self) -> int:
        assert self.proc is not None, "start() first"
        return self.proc.pid

    def signal(self, sig: int) -> None:
        os.kill(self.pid, sig)

    def freeze(self) -> None:
        """Stop the whole environment, as Lambda does between invocations."""
        self.signal(signal.SIGSTOP)

    def thaw(self) -> None:
        self.signal(signal.SIGCONT)

    def invoke(self, event: Any, *, timeout: float = 30.0, frozen_between: bool = True) -> Outcome:
        """One invocation as Lambda serves it: thaw the environment, invoke, and (with
        `frozen_between`) freeze it again once the runtime is back waiting for the next event."""
        if frozen_between:
            self.thaw()
        outcome = self.api.invoke(event, timeout=timeout)
        if frozen_between:
            self.api.wait_idle(timeout)
            self.freeze()
        return outcome

    def wait(self, timeout: float) -> int | None:
        """The exit status (negative: killed by that signal), or None if still running."""
        assert self.proc is not None
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            return None

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self) -> None:
        with contextlib.suppress(ValueError):
            self.api.on_timeout.remove(self._reset)
        if self.proc is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGCONT)
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)
        if self._log is not None:
            self._log.close()
            self._log = None

    def __enter__(self) -> LambdaProcess:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()
