"""Terminal output: a progress line that works with and without a TTY, and plain tables."""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import TextIO

from asyncpool.load.runner import Progress

# Without a TTY (CI logs) a new line is printed this often instead of redrawing one line.
PLAIN_INTERVAL = 2.0
TTY_INTERVAL = 0.1


def number(value: float) -> str:
    """1234567 -> '1,234,567'."""
    return f"{value:,.0f}"


def millis(seconds: float) -> str:
    return f"{seconds * 1000:,.1f}" if seconds < 0.1 else f"{seconds * 1000:,.0f}"


class ProgressDisplay:
    """Shows a run's `Progress`: one line redrawn on a TTY, a line every few seconds otherwise."""

    def __init__(self, stream: TextIO, label: str, clients: int, *, tty: bool | None = None) -> None:
        self.stream = stream
        self.label = label
        self.clients = clients
        self.tty: bool = stream.isatty() if tty is None else tty
        self.interval: float = TTY_INTERVAL if self.tty else PLAIN_INTERVAL
        self._last_shown = 0.0
        self._last_state: tuple[str, int] | None = None
        self._drawn = False

    def __call__(self, progress: Progress) -> None:
        now = time.monotonic()
        state = (progress.phase, progress.processes_ready)
        changed = state != self._last_state
        # While warming up there is nothing new to say until another process is ready.
        due = progress.phase != "warming" and now - self._last_shown >= self.interval
        if not (changed or due):
            return
        self._last_shown = now
        self._last_state = state
        self._show(self.describe(progress))

    def describe(self, p: Progress) -> str:
        if p.phase == "warming":
            return (f"{self.label}: starting {number(self.clients)} function instances in "
                    f"{p.processes} processes ({p.processes_ready}/{p.processes} ready)")
        parts = [
            f"{self.label}: {p.elapsed:4.1f}/{p.duration:g}s",
            f"{number(p.queries)} queries",
            f"{number(p.queries / p.elapsed) if p.elapsed > 0 else '-'}/s",
            f"errors {number(p.errors)}",
        ]
        if p.server_connections is not None:
            parts.append(f"server connections {p.server_connections}")
        if p.clients_waiting is not None:
            parts.append(f"clients waiting {p.clients_waiting}")
        if p.phase == "closing":
            parts.append("closing")
        return "  ".join(parts)

    def _show(self, text: str) -> None:
        if self.tty:
            self.stream.write("\r\x1b[K" + text)
            self._drawn = True
        else:
            self.stream.write(text + "\n")
        self.stream.flush()

    def done(self) -> None:
        """End the redrawn line so the next output starts on its own line."""
        if self.tty and self._drawn:
            self.stream.write("\n")
            self.stream.flush()
        self._drawn = False


def table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """Rows as aligned columns: the first left-aligned, the others right-aligned."""
    widths = [max(len(str(r[i])) for r in [headers, *rows]) for i in range(len(headers))]

    def line(cells: Sequence[str]) -> str:
        out = [str(cells[0]).ljust(widths[0])]
        out += [str(c).rjust(w) for c, w in zip(cells[1:], widths[1:], strict=True)]
        return "  ".join(out).rstrip()

    rule = "  ".join("-" * w for w in widths)
    return "\n".join([line(headers), rule, *(line(r) for r in rows)])
