"""Run a load spec: spawn the worker processes, start them together, sample the server, add up."""

from __future__ import annotations

import asyncio
import contextlib
import multiprocessing
import queue
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

from asyncpool.connect.dsn import redact, redact_dsn
from asyncpool.load.result import LoadResult, WorkerReport
from asyncpool.load.sampler import SamplingTask, make_sampler
from asyncpool.load.spec import LoadSpec
from asyncpool.load.worker import worker_main

_POLL = 0.05
_CLOSE_GRACE = 30.0


class LoadError(RuntimeError):
    """A load run could not be carried out (a worker crashed, warm-up never finished...)."""


@dataclass(frozen=True)
class LoadTarget:
    """Where the load goes and how to watch it.

    kind: ``pgbouncer`` or ``postgres`` (a direct server).
    admin_dsn: PgBouncer's admin console, for ``SHOW POOLS`` (server connections, waiting clients).
    postgres_dsn: a direct PostgreSQL DSN; counts backends when no admin console is given.
    server_limit: the most server connections the target should use (default_pool_size or
        max_connections), shown next to what was used.
    named_statements: whether named prepared statements work through it (a direct server, or
        PgBouncer >= 1.21 with max_prepared_statements > 0), so ``"on"`` is the mode to run.
    """

    label: str
    dsn: str = field(repr=False)
    kind: Literal["pgbouncer", "postgres"]
    admin_dsn: str | None = field(default=None, repr=False)
    postgres_dsn: str | None = field(default=None, repr=False)
    server_limit: int | None = None
    named_statements: bool = False

    def __str__(self) -> str:
        return f"{self.label} ({redact_dsn(self.dsn)})"


@dataclass
class Progress:
    """What the display shows while a run goes on."""

    phase: Literal["warming", "running", "closing"]
    processes_ready: int
    processes: int
    elapsed: float
    duration: float
    queries: int
    errors: int
    server_connections: int | None
    clients_waiting: int | None


async def run_load(
    spec: LoadSpec,
    target: LoadTarget,
    on_progress: Callable[[Progress], None] | None = None,
) -> LoadResult:
    """Run `spec` against `target` in `spec.processes` worker processes and add up the results."""
    _check_driver_available(spec)
    ctx = multiprocessing.get_context("spawn")
    start = ctx.Event()
    outbox: Any = ctx.Queue()
    procs = [
        ctx.Process(target=worker_main, args=(spec, n, start, outbox), name=f"asyncpool-load-{n}",
                    daemon=True)
        for n in range(spec.processes)
    ]
    sampler = make_sampler(target.kind, target.dsn, target.admin_dsn, target.postgres_dsn)
    sampling = SamplingTask(sampler) if sampler else None
    run = _Run(spec, procs, outbox, sampling, on_progress)
    finished = False
    try:
        if sampling is not None:
            await sampling.start()
        for proc in procs:
            proc.start()
        await run.wait_ready(spec.warmup_budget)
        start.set()
        reports = await run.wait_reports(time.monotonic() + spec.duration + _CLOSE_GRACE)
        finished = True
    finally:
        server = await sampling.stop() if sampling is not None else None
        grace = 5.0 if finished else 0.0
        await asyncio.get_running_loop().run_in_executor(None, _reap, procs, grace)
        outbox.close()
    return LoadResult.combine(target.label, spec, reports, server, target.server_limit)


class _Run:
    """The parent's view of one run: worker messages, progress, failures."""

    def __init__(self, spec: LoadSpec, procs: list[Any], outbox: Any,
                 sampling: SamplingTask | None,
                 on_progress: Callable[[Progress], None] | None) -> None:
        self.spec = spec
        self.procs = procs
        self.outbox = outbox
        self.sampling = sampling
        self.on_progress = on_progress
        self.ready: set[int] = set()
        self.counts: dict[int, tuple[int, int]] = {}
        self.reports: dict[int, WorkerReport] = {}
        self.started_at: float | None = None

    async def wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while len(self.ready) < len(self.procs):
            await self._pump(deadline, "warm up")
        self.started_at = time.monotonic()

    async def wait_reports(self, deadline: float) -> list[WorkerReport]:
        while len(self.reports) < len(self.procs):
            await self._pump(deadline, "finish")
        return [self.reports[n] for n in sorted(self.reports)]

    async def _pump(self, deadline: float, doing: str) -> None:
        """Handle queued messages, report progress, and notice dead or stuck workers."""
        got = False
        while True:
            try:
                message = self.outbox.get_nowait()
            except queue.Empty:
                break
            got = True
            self._handle(message)
        if not got:
            for n, proc in enumerate(self.procs):
                if not proc.is_alive() and n not in self.reports:
                    # A last message may still be in flight from a worker that just exited.
                    await asyncio.sleep(0.2)
                    if not self._drain_one():
                        raise LoadError(f"worker process {n} exited ({proc.exitcode}) without "
                                        "a result; see its traceback above")
            if time.monotonic() > deadline:
                raise LoadError(f"worker processes did not {doing} in time "
                                f"({len(self.ready)}/{len(self.procs)} ready)")
            await asyncio.sleep(_POLL)
        self._report_progress()

    def _drain_one(self) -> bool:
        try:
            message = self.outbox.get_nowait()
        except queue.Empty:
            return False
        self._handle(message)
        return True

    def _handle(self, message: tuple[Any, ...]) -> None:
        kind, process = message[0], message[1]
        if kind == "ready":
            self.ready.add(process)
        elif kind == "progress":
            self.counts[process] = (message[2], message[3])
        elif kind == "report":
            report: WorkerReport = message[2]
            self.reports[process] = report
            self.counts[process] = (report.tally.queries, report.tally.error_count)
        elif kind == "failed":
            raise LoadError(f"worker process {process} failed:\n{redact(message[2])}")

    def _report_progress(self) -> None:
        if self.on_progress is None:
            return
        latest = self.sampling.latest if self.sampling is not None else None
        running = self.started_at is not None
        elapsed = time.monotonic() - self.started_at if self.started_at is not None else 0.0
        phase: Literal["warming", "running", "closing"] = (
            "warming" if not running else "running" if elapsed < self.spec.duration else "closing"
        )
        self.on_progress(
            Progress(
                phase=phase,
                processes_ready=len(self.ready),
                processes=len(self.procs),
                elapsed=min(elapsed, self.spec.duration),
                duration=self.spec.duration,
                queries=sum(q for q, _ in self.counts.values()),
                errors=sum(e for _, e in self.counts.values()),
                server_connections=latest[0] if latest else None,
                clients_waiting=latest[1] if latest else None,
            )
        )


def _reap(procs: list[Any], grace: float) -> None:
    """Wait up to `grace` seconds for workers to exit, then stop any that did not."""
    deadline = time.monotonic() + grace
    for proc in procs:
        if proc.pid is None:
            continue
        proc.join(max(0.0, deadline - time.monotonic()))
        if proc.is_alive():
            proc.terminate()
            proc.join(2)
        if proc.is_alive():
            proc.kill()
            proc.join(2)


def _check_driver_available(spec: LoadSpec) -> None:
    """Fail before spawning anything when the run needs a module this install lacks."""
    import importlib.util

    needs: list[tuple[str, str]] = []
    if spec.driver == "psycopg-pool":
        needs.append(("psycopg_pool", "pip install 'asyncpool-pg[bench]'"))
    if spec.prepared_statements == "unnamed":
        needs.append(("asyncpool.unnamed", "this asyncpool build has no 'unnamed' mode"))
    if spec.exports_telemetry:
        hint = "pip install opentelemetry-sdk opentelemetry-exporter-otlp-proto-common"
        needs.append(("opentelemetry.sdk", hint))
        needs.append(("opentelemetry.exporter.otlp.proto.common", hint))
    for module, hint in needs:
        with contextlib.suppress(ModuleNotFoundError):
            if importlib.util.find_spec(module) is not None:
                continue
        raise LoadError(f"{spec.driver}/{spec.prepared_statements}: {module} is missing ({hint})")
