"""The command's plumbing: argument parsing, lazy imports, progress without a TTY, tables."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys

import pytest

from asyncpool.cli.main import build_parser, main
from asyncpool.cli.output import ProgressDisplay, table
from asyncpool.load.runner import Progress


def _progress(phase: str = "running", elapsed: float = 1.0, queries: int = 1000,
              ready: int = 2) -> Progress:
    return Progress(phase=phase, processes_ready=ready, processes=2, elapsed=elapsed,  # type: ignore[arg-type]
                    duration=10, queries=queries, errors=0, server_connections=50,
                    clients_waiting=7)


def test_without_a_tty_progress_is_plain_lines_at_a_slow_pace() -> None:
    stream = io.StringIO()
    display = ProgressDisplay(stream, "PgBouncer 1.24", 500, tty=False)
    display(_progress("warming", ready=0))
    display(_progress("warming", ready=0))  # nothing new: not repeated
    display(_progress("warming", ready=1))
    display(_progress(elapsed=0.5))
    display(_progress(elapsed=0.6))  # within the plain-output interval: skipped
    display(_progress("closing", elapsed=10))
    display.done()
    text = stream.getvalue()
    assert "\r" not in text
    assert "\x1b" not in text
    lines = text.splitlines()
    assert len(lines) == 4
    assert "(1/2 ready)" in lines[1]
    assert "1,000 queries" in lines[2]
    assert "server connections 50" in lines[2]
    assert lines[3].endswith("closing")


def test_on_a_tty_progress_redraws_one_line() -> None:
    stream = io.StringIO()
    display = ProgressDisplay(stream, "run", 10, tty=True)
    display(_progress(elapsed=1.0))
    display(_progress("closing", elapsed=10))
    display.done()
    text = stream.getvalue()
    assert text.count("\r\x1b[K") == 2
    assert text.endswith("\n")
    assert text.count("\n") == 1


def test_tables_align_columns() -> None:
    text = table(["run", "queries/s"], [["asyncpool on", "12,345"], ["pgbench", "9"]])
    lines = text.splitlines()
    assert lines[0] == "run           queries/s"
    assert lines[2] == "asyncpool on     12,345"
    assert lines[3] == "pgbench               9"


def test_arguments_are_checked_before_anything_starts() -> None:
    parser = build_parser()
    args = parser.parse_args(["bench", "--clients", "500,2000", "--driver", "asyncpool,asyncpg",
                              "--prepared-statements", "on,off"])
    assert args.clients == [500, 2000]
    assert args.driver == ["asyncpool", "asyncpg"]
    for bad in (["bench", "--clients", "0"], ["bench", "--driver", "jdbc"],
                ["demo", "--duration", "-1"], ["bench", "--prepared-statements", "sometimes"]):
        with pytest.raises(SystemExit) as exit_info:
            parser.parse_args(bad)
        assert exit_info.value.code == 2


def test_doctor_without_a_dsn_is_a_usage_error(monkeypatch: pytest.MonkeyPatch,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.delenv("ASYNCPOOL_DSN", raising=False)
    with pytest.raises(SystemExit) as exit_info:
        main(["doctor"])
    assert exit_info.value.code == 2
    assert "ASYNCPOOL_DSN" in capsys.readouterr().err


@pytest.mark.parametrize("argv", [
    ["doctor", "--dsn=postgresql://app:{secret}@127.0.0.1:1/app"],  # doctor takes it positionally
    ["bench", "--dns", "postgresql://app:{secret}@127.0.0.1:1/app"],
    ["demo", "--d=postgresql://app:{secret}@127.0.0.1:1/app"],  # ambiguous: quoted whole
    ["doctor", "postgresql://app@127.0.0.1:1/app", "password={secret}"],
])
def test_a_usage_error_never_echoes_a_password(argv: list[str],
                                               capsys: pytest.CaptureFixture[str]) -> None:
    """argparse quotes the arguments it refuses, on stderr, which CI logs keep."""
    secret = "Vq7pLmZr2xKw9Tn"  # pragma: allowlist secret
    with pytest.raises(SystemExit) as exit_info:
        main([arg.format(secret=secret) for arg in argv])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "error:" in err
    assert not any(secret[i:i + 4] in err for i in range(len(secret) - 3)), err


def test_the_console_script_starts_without_loading_the_heavy_parts() -> None:
    code = (
        "import sys, json\n"
        "from asyncpool.cli.main import build_parser\n"
        "build_parser().parse_args(['bench'])\n"
        "print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in "
        "('matplotlib', 'psycopg', 'psycopg_pool', 'opentelemetry') or "
        "m.startswith(('asyncpool.load', 'asyncpool.testing', 'asyncpool.cli.bench')))))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, timeout=60)
    assert json.loads(out.stdout) == []


def test_import_asyncpool_does_not_import_the_cli() -> None:
    out = subprocess.run(
        [sys.executable, "-c", "import sys, asyncpool; print(any(m.startswith(('asyncpool.cli', "
         "'asyncpool.load')) for m in sys.modules))"],
        capture_output=True, text=True, check=True, timeout=60,
    )
    assert out.stdout.strip() == "False"


def test_the_installed_console_script_runs() -> None:
    script = os.path.join(os.path.dirname(sys.executable), "asyncpool")
    if not os.path.exists(script):
        pytest.skip("asyncpool is not installed in this environment (pip install -e .)")
    out = subprocess.run([script, "--version"], check=False, capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0
    assert out.stdout.startswith("asyncpool ")
