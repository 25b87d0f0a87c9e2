"""requirements/matrix.lock (the Python 3.12 / 3.13 test venvs) is current: written from
requirements/matrix.in, at the versions requirements/dev.lock pins, every package with hashes."""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MATRIX_IN = ROOT / "requirements" / "matrix.in"
MATRIX_LOCK = ROOT / "requirements" / "matrix.lock"
DEV_LOCK = ROOT / "requirements" / "dev.lock"


def pins(text: str) -> dict[str, tuple[str, int]]:
    found = {}
    for block in re.split(r"\n(?=[a-z0-9])", text):
        match = re.match(r"([A-Za-z0-9_.-]+)==(\S+)", block)
        if match:
            name = re.sub(r"[-_.]+", "-", match.group(1)).lower()
            found[name] = (match.group(2), block.count("--hash=sha256:"))
    return found


def test_matrix_lock_is_written_from_matrix_in() -> None:
    digest = hashlib.sha256(MATRIX_IN.read_bytes()).hexdigest()[:16]
    assert f"requirements/matrix.in (sha256 {digest}...)" in MATRIX_LOCK.read_text(), (
        "requirements/matrix.in changed: run scripts/lock.sh"
    )


def test_matrix_lock_pins_dev_lock_versions_with_hashes() -> None:
    matrix, dev = pins(MATRIX_LOCK.read_text()), pins(DEV_LOCK.read_text())
    assert {"asyncpg", "awslambdaric", "pytest"} <= set(matrix)
    for name, (version, hashes) in matrix.items():
        assert hashes > 0, name
        if name in dev:
            assert dev[name][0] == version, f"{name}: {version} here, {dev[name][0]} in dev.lock"
