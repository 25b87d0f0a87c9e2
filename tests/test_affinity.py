"""`asyncpool.testing.affinity`: the benchmarks' CPU placement, on real processes."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys

import pytest

from asyncpool.testing import affinity

pytestmark = pytest.mark.skipif(not affinity.available(), reason="needs Linux sched_setaffinity")


def test_descendants_are_a_process_its_threads_and_its_children() -> None:
    parent = subprocess.Popen(  # a child that starts a grandchild, both sleeping
        [sys.executable, "-c", "import subprocess, sys, time; "
         "subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(30)']); time.sleep(30)"])
    try:
        for _ in range(200):
            found = affinity.descendants(parent.pid)
            if len(found) >= 2:
                break
            subprocess.run(["sleep", "0.05"], check=True)
        assert parent.pid in found
        assert len(found) >= 2, found  # the grandchild too
        assert os.getpid() not in found
    finally:
        for pid in affinity.descendants(parent.pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, 9)
        parent.wait()


def test_pin_moves_a_running_process() -> None:
    cpus = sorted(os.sched_getaffinity(0))
    target = {cpus[-1]}
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        assert affinity.pin([child.pid], target) >= 1
        assert os.sched_getaffinity(child.pid) == target
    finally:
        child.kill()
        child.wait()


def test_none_leaves_placement_to_the_kernel() -> None:
    before = os.sched_getaffinity(0)
    assert affinity.place("none", [os.getpid()]).startswith("not pinned")
    assert os.sched_getaffinity(0) == before
