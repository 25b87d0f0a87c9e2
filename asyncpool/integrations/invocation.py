"""The Lambda invocation being served: its request id, and whether it is the environment's first.

While an invocation is served (by `asyncpool.integrations.lambda_runner`, the Powertools middleware or the
FastAPI dependency) every record logged by an ``asyncpool.*`` logger carries ``aws_request_id``,
``asyncpool_request_id`` and ``cold_start`` attributes, so a JSON formatter shows which invocation
a leak or a failed connection check belongs to. A leak is logged in the context of the checkout,
so these name the invocation that took the connection; the Lambda runtime's log filter overwrites
``aws_request_id`` with the current invocation's id, ``asyncpool_request_id`` keeps it.
`asyncpool.integrations.lambda_spans` puts the same facts on spans.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
import uuid
from collections.abc import Iterator
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any

# Log record attributes: the Lambda runtime's own name for the request id, Powertools' for the other.
REQUEST_ID_FIELD = "aws_request_id"
COLD_START_FIELD = "cold_start"
# The same request id under a name of ours. The runtime's log filter (awslambdaric) sets
# `aws_request_id` to the invocation running *now* on every record it handles, so a leak noticed
# during a later invocation would lose the id of the one that took the connection; this one stays.
ASYNCPOOL_REQUEST_ID_FIELD = "asyncpool_request_id"


@dataclass(frozen=True, slots=True)
class Invocation:
    """One call of the handler."""

    request_id: str
    function_name: str | None
    cold_start: bool


_current: ContextVar[Invocation | None] = ContextVar("asyncpool_invocation", default=None)


def current_invocation() -> Invocation | None:
    """The invocation this task serves, or None outside one."""
    return _current.get()


class ColdStart:
    """Answers "is this the first invocation?" once with True, then always False.

    An environment initialised ahead of traffic by provisioned concurrency has no cold start, as
    Powertools also counts it.
    """

    __slots__ = ("_first",)

    def __init__(self) -> None:
        self._first = os.environ.get("AWS_LAMBDA_INITIALIZATION_TYPE") != "provisioned-concurrency"

    def take(self) -> bool:
        first, self._first = self._first, False
        return first


@contextlib.contextmanager
def invocation_scope(context: Any, cold_start: ColdStart) -> Iterator[Invocation]:
    """Mark the code inside as serving the invocation `context` (a Lambda context object).

    Nested scopes for the same request (two FastAPI dependencies) share the outer invocation.
    """
    request_id = str(getattr(context, "aws_request_id", None) or "-")
    outer = _current.get()
    if outer is not None and outer.request_id == request_id:
        yield outer
        return
    invocation = Invocation(
        request_id=request_id,
        function_name=getattr(context, "function_name", None),
        cold_start=cold_start.take(),
    )
    _install_log_fields()
    token = _current.set(invocation)
    try:
        yield invocation
    finally:
        _current.reset(token)


_factory_lock = threading.Lock()
_factory_installed: list[bool] = []


def _install_log_fields() -> None:
    """Chain a log-record factory that stamps the invocation on ``asyncpool.*`` records.

    A factory rather than a filter: filters on the ``asyncpool`` logger do not see records of its
    children (``asyncpool.pool``, ``asyncpool.leaks``), and handlers belong to the application.
    """
    with _factory_lock:
        if _factory_installed:
            return
        previous = logging.getLogRecordFactory()

        def factory(*args: Any, **kwargs: Any) -> logging.LogRecord:
            record = previous(*args, **kwargs)
            invocation = _current.get()
            if invocation is not None and _is_asyncpool_logger(record.name):
                setattr(record, REQUEST_ID_FIELD, invocation.request_id)
                setattr(record, ASYNCPOOL_REQUEST_ID_FIELD, invocation.request_id)
                setattr(record, COLD_START_FIELD, invocation.cold_start)
            return record

        logging.setLogRecordFactory(factory)
        _factory_installed.append(True)


def _is_asyncpool_logger(name: str) -> bool:
    return name == "asyncpool" or name.startswith("asyncpool.")


@dataclass
class LocalContext:
    """A stand-in for the Lambda context object, to run handlers in scripts and tests.

    Make one per invocation: each gets its own request id and its own deadline, `timeout`
    seconds after it was made.
    """

    function_name: str = "local"
    timeout: float = 30.0
    memory_limit_in_mb: int = 128
    function_version: str = "$LATEST"
    aws_request_id: str = field(default_factory=lambda: str(uuid.uuid4()))
    log_group_name: str = "/aws/lambda/local"
    log_stream_name: str = "local"
    _deadline: float = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self._deadline = time.monotonic() + self.timeout

    @property
    def invoked_function_arn(self) -> str:
        return f"arn:aws:lambda:us-east-1:000000000000:function:{self.function_name}"

    def get_remaining_time_in_millis(self) -> int:
        return max(0, int((self._deadline - time.monotonic()) * 1000))
