"""`asyncpool.integrations.lambda_workers`: only a managed-instance worker asks for the parent-death
signal, and the kernel then has it (read back with ``PR_GET_PDEATHSIG``)."""

from __future__ import annotations

import ctypes
import multiprocessing
import os
import signal
import sys

import pytest

from asyncpool.integrations import lambda_workers

PR_GET_PDEATHSIG = 2
MANAGED = {"AWS_LAMBDA_MAX_CONCURRENCY": "2"}


def _death_signal() -> int:
    value = ctypes.c_int(0)
    assert ctypes.CDLL(None).prctl(PR_GET_PDEATHSIG, ctypes.byref(value), 0, 0, 0) == 0
    return value.value


def _in_worker(environ: dict[str, str], out: multiprocessing.SimpleQueue) -> None:  # type: ignore[type-arg]
    out.put((lambda_workers.managed_instance_parent(environ),
             lambda_workers.sigterm_when_parent_ends(environ), _death_signal()))


def _run_worker(environ: dict[str, str]) -> tuple[int | None, bool, int]:
    ctx = multiprocessing.get_context("fork")  # as awslambdaric forks its workers
    out = ctx.SimpleQueue()
    child = ctx.Process(target=_in_worker, args=(environ, out))
    child.start()
    child.join(30)
    assert child.exitcode == 0
    result: tuple[int | None, bool, int] = out.get()
    return result


pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="prctl is Linux's")


def test_a_managed_instance_worker_gets_sigterm_when_its_parent_ends() -> None:
    assert _run_worker(MANAGED) == (os.getpid(), True, signal.SIGTERM)


def test_a_child_outside_managed_instances_is_left_alone() -> None:
    assert _run_worker({}) == (None, False, 0)


def test_the_runtime_process_itself_is_not_a_worker() -> None:
    assert lambda_workers.managed_instance_parent(MANAGED) is None
    assert lambda_workers.sigterm_when_parent_ends(MANAGED) is False
