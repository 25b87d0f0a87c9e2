"""Dependency floors sit above known-vulnerable releases, and the development lock is current.

`ADVISORIES` lists, per package the project asks for, the newest release with a published
vulnerability and the advisory; a floor that still admits it fails. The lock
(requirements/dev.lock, written by scripts/lock.sh) must match pyproject.toml, pin every package
with hashes, and be what .venv runs.
"""

from __future__ import annotations

import hashlib
import re
import tomllib
from importlib import metadata
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = ROOT / "pyproject.toml"
LOCK = ROOT / "requirements" / "dev.lock"

# package: (newest vulnerable release, fixed in, advisory)
ADVISORIES: dict[str, tuple[str, str, str]] = {
    "aiohttp": ("3.13.2", "3.13.3", "CVE-2025-69223 and others (aiohttp 3.13.3 release notes)"),
    "starlette": ("0.49.0", "0.49.1", "CVE-2025-62727 (Range header ReDoS in FileResponse)"),
    "urllib3": ("2.6.2", "2.6.3", "CVE-2026-21441 (decompression of redirect bodies)"),
    "h11": ("0.15.0", "0.16.0", "CVE-2025-43859 (chunked-encoding request smuggling)"),
    "jinja2": ("3.1.5", "3.1.6", "CVE-2025-27516 (sandbox escape through |attr)"),
    "requests": ("2.32.3", "2.32.4", "CVE-2024-47081 (.netrc credentials leak)"),
}


def requirements(text: str) -> list[Requirement]:
    """Every requirement pyproject.toml names, base and extras."""
    project = tomllib.loads(text)["project"]
    found = [Requirement(r) for r in project["dependencies"]]
    for extra in project["optional-dependencies"].values():
        found += [Requirement(r) for r in extra]
    return [r for r in found if canonicalize_name(r.name) != canonicalize_name(project["name"])]


def floor_problems(text: str) -> list[str]:
    problems = []
    named = {canonicalize_name(r.name): r for r in requirements(text)}
    for package, (vulnerable, fixed, advisory) in ADVISORIES.items():
        requirement = named.get(canonicalize_name(package))
        if requirement is None:
            problems.append(f"{package} has no floor in pyproject.toml (needs >={fixed}: {advisory})")
        elif requirement.specifier.contains(vulnerable, prereleases=True):
            problems.append(f"{requirement} admits {package} {vulnerable} ({advisory}); use >={fixed}")
    return problems


def locked() -> dict[str, tuple[Version, int]]:
    """name: (version, number of hashes) for every package in the lock."""
    text = LOCK.read_text()
    found: dict[str, tuple[Version, int]] = {}
    for block in re.split(r"\n(?=[a-z0-9])", text):
        match = re.match(r"([A-Za-z0-9_.-]+)==(\S+)", block)
        if match:
            found[canonicalize_name(match.group(1))] = (
                Version(match.group(2)),
                block.count("--hash=sha256:"),
            )
    return found


def test_floors_exclude_known_vulnerable_releases() -> None:
    assert floor_problems(PYPROJECT.read_text()) == []


def test_floor_check_catches_a_floor_that_admits_a_vulnerable_release() -> None:
    text = PYPROJECT.read_text().replace('"aiohttp>=3.13.3"', '"aiohttp>=3.9"')
    assert any("admits aiohttp 3.13.2" in p for p in floor_problems(text))
    text = PYPROJECT.read_text().replace('"starlette>=0.49.1", ', "")
    assert any("starlette has no floor" in p for p in floor_problems(text))


def test_the_lock_is_current_complete_and_hashed() -> None:
    header = LOCK.read_text().splitlines()[1]
    digest = hashlib.sha256(PYPROJECT.read_bytes()).hexdigest()[:16]
    assert f"sha256 {digest}" in header, "pyproject.toml changed since the lock: run scripts/lock.sh"
    pins = locked()
    assert len(pins) >= 50
    assert [name for name, (_, hashes) in pins.items() if hashes == 0] == []
    for requirement in requirements(PYPROJECT.read_text()):
        name = canonicalize_name(requirement.name)
        if requirement.marker is not None and not requirement.marker.evaluate({"extra": "dev"}):
            continue
        assert name in pins, f"{requirement} is not in the lock: run scripts/lock.sh"
        assert requirement.specifier.contains(pins[name][0], prereleases=True), (requirement, pins[name])
    for package, (vulnerable, _, advisory) in ADVISORIES.items():
        if canonicalize_name(package) in pins:
            assert pins[canonicalize_name(package)][0] > Version(vulnerable), advisory


def test_the_development_environment_runs_the_lock() -> None:
    """What .venv has installed is what the lock pins (scripts/setup.sh installs it with hashes)."""
    differ: dict[str, tuple[str, str | None]] = {}
    for name, (version, _) in locked().items():
        try:
            installed = Version(metadata.version(name))
        except metadata.PackageNotFoundError:
            differ[name] = (str(version), None)
            continue
        if installed != version:
            differ[name] = (str(version), str(installed))
    assert differ == {}, "run scripts/setup.sh (locked, installed)"
