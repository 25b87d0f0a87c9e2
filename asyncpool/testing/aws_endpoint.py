"""Local AWS for tests: fake static credentials, and an endpoint answered by moto.

`LocalAwsEndpoint` listens on 127.0.0.1 and serves moto's in-memory services over real HTTP:
clients point `endpoint_url` at it and go through their whole HTTP stack (aiobotocore's
included, which moto's in-process mock does not support). moto's own server needs Flask; this
needs only what moto already depends on. The service and region come from the request's SigV4
credential scope, so one endpoint serves every region, each with its own data, as AWS does.
"""

from __future__ import annotations

import os
import re
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

# Static, obviously fake credentials: signing is real, nothing can reach AWS with them.
ACCESS_KEY_ID = "AKIDASYNCPOOLTEST"
SECRET_ACCESS_KEY = "asyncpool-test-secret-access-key"  # noqa: S105 - fake on purpose
SESSION_TOKEN = "asyncpool-test-session-token"  # noqa: S105 - fake on purpose


def aws_environment(*, credentials: bool = True, region: str | None = None) -> dict[str, str | None]:
    """Environment changes (None: unset) that cut a process off from real AWS configuration:
    no profiles, no instance metadata, and the fake credentials above unless `credentials` is
    False. Apply with ``monkeypatch.setenv``/``delenv``."""
    env: dict[str, str | None] = {
        name: None for name in os.environ if name.startswith(("AWS_", "BOTO_"))
    }
    env.update(
        AWS_CONFIG_FILE=os.devnull,
        AWS_SHARED_CREDENTIALS_FILE=os.devnull,
        AWS_EC2_METADATA_DISABLED="true",
    )
    if credentials:
        env.update(
            AWS_ACCESS_KEY_ID=ACCESS_KEY_ID,
            AWS_SECRET_ACCESS_KEY=SECRET_ACCESS_KEY,
            AWS_SESSION_TOKEN=SESSION_TOKEN,
        )
    if region is not None:
        env["AWS_REGION"] = region
    return env


_SCOPE = re.compile(r"Credential=[^/]+/\d{8}/(?P<region>[^/]+)/(?P<service>[^/]+)/aws4_request")


class LocalAwsEndpoint:
    """``with LocalAwsEndpoint() as aws:`` then ``endpoint_url=aws.url``; `calls` counts requests
    per ``X-Amz-Target`` operation (``secretsmanager.GetSecretValue``...)."""

    def __init__(self) -> None:
        from moto.core.botocore_stubber import BotocoreStubber

        self._stubber = BotocoreStubber()
        self._lock = threading.Lock()
        self.calls: dict[str, int] = {}
        #: Seconds each request waits before it is answered (a slow or hanging AWS endpoint).
        self.delay: float = 0.0
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler_class())
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host!s}:{port}"

    def start(self) -> LocalAwsEndpoint:
        self._thread = threading.Thread(
            target=self._server.serve_forever, name="local-aws", daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        if self._thread is not None:
            self._thread.join(5)

    def __enter__(self) -> LocalAwsEndpoint:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def count(self, operation: str) -> int:
        """Requests seen for `operation` (for example ``"GetSecretValue"``)."""
        return sum(n for name, n in self.calls.items() if name.endswith("." + operation))

    def _answer(self, method: str, path: str, headers: dict[str, str], body: bytes) -> tuple[
        int, dict[str, str], bytes
    ]:
        from botocore.awsrequest import AWSPreparedRequest
        from botocore.compat import HTTPHeaders

        scope = _SCOPE.search(headers.get("Authorization", ""))
        if scope is None:
            return 403, {}, b'{"__type": "MissingAuthenticationTokenException"}'
        service, region = scope["service"], scope["region"]
        prepared_headers = HTTPHeaders()
        for key, value in headers.items():
            prepared_headers[key] = value
        request = AWSPreparedRequest(
            method, f"https://{service}.{region}.amazonaws.com{path}", prepared_headers, body, False
        )
        with self._lock:
            target = headers.get("X-Amz-Target", f"{service}.{method}")
            self.calls[target] = self.calls.get(target, 0) + 1
            answer: Any = self._stubber.process_request(request)
        if answer is None:
            return 404, {}, b"{}"
        status, reply_headers, reply = answer
        data = reply.encode() if isinstance(reply, str) else bytes(reply)
        return int(status), {str(k): str(v) for k, v in reply_headers.items()}, data

    def _handler_class(self) -> type[BaseHTTPRequestHandler]:
        endpoint = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def _serve(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                status, headers, data = endpoint._answer(
                    self.command, self.path, dict(self.headers.items()), body
                )
                if endpoint.delay:  # (counted in `calls` already)
                    time.sleep(endpoint.delay)
                self.send_response(status)
                for key, value in headers.items():
                    if key.lower() not in ("content-length", "transfer-encoding", "connection"):
                        self.send_header(key, value)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_POST = do_PUT = do_DELETE = _serve

            def log_message(self, format: str, *args: Any) -> None:
                return None

        return Handler
