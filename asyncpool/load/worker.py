"""A worker process: many simulated function instances on one event loop.

Protocol with the parent (`asyncpool.load.runner`), over one queue: the worker sends
``("ready", process)`` once its instances are warm, waits for the start event, sends
``("progress", process, queries, errors)`` twice a second while running, and ends with
``("report", process, WorkerReport)`` or ``("failed", process, traceback)``.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import time
import traceback
from collections import Counter
from typing import Any

from asyncpool.load.clients import LoadClient, make_client
from asyncpool.load.result import Tally, WorkerReport, error_name
from asyncpool.load.spec import LoadSpec

PROGRESS_INTERVAL = 0.5
SLOW_LOGIN = 0.25
_CLOSE_TIMEOUT = 10.0


class Instance:
    """One simulated function instance: its client, and whether it ever got a query through."""

    __slots__ = ("args", "client", "number", "served")

    def __init__(self, spec: LoadSpec, number: int) -> None:
        self.number: int = number
        self.client: LoadClient = make_client(spec, number)
        self.args: int = spec.parameters
        self.served: bool = False

    async def warm_up(self, gate: asyncio.Semaphore, failures: Counter[str]) -> None:
        """Create the pool and run one query, as a cold start would; failures are counted.

        `gate` bounds the logins in flight, so a thousand instances per process do not all
        start a login at once and time out together. A login still running after
        `SLOW_LOGIN` gives its place up: a refused instance retrying inside its acquire
        timeout must not hold up the others.
        """
        await gate.acquire()
        attempt = asyncio.ensure_future(self._first_query())
        try:
            await asyncio.wait({attempt}, timeout=SLOW_LOGIN)
        finally:
            gate.release()
        try:
            await attempt
        except Exception as exc:
            failures[error_name(exc)] += 1
        else:
            self.served = True

    async def _first_query(self) -> None:
        await self.client.open()
        await self.client.query((0,) * self.args)

    async def run(self, end: float, tally: Tally) -> None:
        """Query back to back until `end` (perf_counter time); count what completes by then."""
        client = self.client
        record = tally.histogram.record
        clock = time.perf_counter
        width = self.args
        iteration = 0
        while True:
            started = clock()
            if started >= end:
                return
            iteration += 1
            try:
                await client.query((iteration,) * width)
            except Exception as exc:
                if clock() <= end:  # like queries, errors count inside the window only
                    tally.error(exc)
                await client.after_error()
                continue
            done = clock()
            if done <= end:
                record(done - started)
                tally.queries += 1
                self.served = True


def leaking(spec: LoadSpec, number: int) -> bool:
    """Whether instance `number` injects a leak: `spec.leaks` of them, spread evenly."""
    if not spec.leaks:
        return False
    return number in {i * spec.clients // spec.leaks for i in range(spec.leaks)}


def worker_main(spec: LoadSpec, process: int, start: Any, outbox: Any) -> None:
    """Process entry point (spawned by the runner)."""
    # Ctrl-C reaches the whole process group: the parent decides when workers stop.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # Leak reports are counted in the result; their stack traces would flood the terminal.
    logging.getLogger("asyncpool").addHandler(logging.NullHandler())
    logging.getLogger("asyncpool").propagate = False
    try:
        if spec.exports_telemetry:
            from asyncpool.load.telemetry_sdk import install_sdk

            install_sdk(aggregate_checkout_times=spec.telemetry == "sdk-aggregated")
        report = asyncio.run(_run(spec, process, start, outbox))
    except BaseException:
        outbox.put(("failed", process, traceback.format_exc()))
        raise SystemExit(1) from None
    outbox.put(("report", process, report))


async def _run(spec: LoadSpec, process: int, start: Any, outbox: Any) -> WorkerReport:
    loop = asyncio.get_running_loop()
    loop.set_exception_handler(_quiet_refusals)
    instances = [Instance(spec, n) for n in spec.share(process)]
    warmup_errors: Counter[str] = Counter()
    gate = asyncio.Semaphore(spec.connect_concurrency)
    await asyncio.gather(*(inst.warm_up(gate, warmup_errors) for inst in instances))
    outbox.put(("ready", process))
    # A parent that died without starting the run must not leave this process behind.
    if not await loop.run_in_executor(None, start.wait, spec.warmup_budget):
        raise RuntimeError("the parent never started the run")

    tally = Tally()
    cpu_started = time.process_time()
    end = time.perf_counter() + spec.duration
    leakers = [
        asyncio.create_task(inst.client.leak()) for inst in instances if leaking(spec, inst.number)
    ]
    reporter = asyncio.create_task(_report_progress(process, tally, outbox))
    try:
        await asyncio.gather(*(inst.run(end, tally) for inst in instances))
        cpu_used = time.process_time() - cpu_started
    finally:
        reporter.cancel()
        for task in leakers:
            task.cancel()
        await asyncio.gather(reporter, *leakers, return_exceptions=True)
    report = WorkerReport(
        process=process,
        clients=len(instances),
        tally=tally,
        warmup_errors=warmup_errors,
        served=sum(inst.served for inst in instances),
        connect_errors=sum(inst.client.connect_errors() for inst in instances),
        leaks_injected=len(leakers),
        leaks_reclaimed=sum(inst.client.leaks_reclaimed() for inst in instances),
        cpu_seconds=cpu_used,
    )
    try:
        async with asyncio.timeout(_CLOSE_TIMEOUT):
            await asyncio.gather(*(inst.client.close() for inst in instances),
                                 return_exceptions=True)
    except TimeoutError:
        pass  # the process exits next; the servers see the sockets close
    return report


def _quiet_refusals(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
    """Drop asyncpg's "Future exception was never retrieved" noise for refused logins.

    When a server drops a login during TLS negotiation (sslmode=prefer), asyncpg leaves a failed
    future behind; the refusal itself is already counted.
    """
    if isinstance(context.get("exception"), ConnectionError) and "never retrieved" in str(
        context.get("message", "")
    ):
        return
    loop.default_exception_handler(context)


async def _report_progress(process: int, tally: Tally, outbox: Any) -> None:
    while True:
        await asyncio.sleep(PROGRESS_INTERVAL)
        outbox.put(("progress", process, tally.queries, tally.error_count))
