"""A throwaway Prometheus (the machine's binary, Debian's `prometheus` package) for dashboard tests.

Only the binary runs, with a config and storage folder of its own, on a free loopback port, as the
harness's service user; the package's system service is never started.
"""

from __future__ import annotations

import json
import os
import shutil
import time
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

from asyncpool.testing.harness_error import HarnessError
from asyncpool.testing.ports import free_port
from asyncpool.testing.process import ServerProcess, chown_tree, make_workdir, remove_tree

_INSTALL = "install Debian's prometheus package (apt-get install --no-install-recommends prometheus)"


def prometheus_binary() -> str:
    """``ASYNCPOOL_PROMETHEUS``, or `prometheus` on PATH, or /usr/bin/prometheus."""
    found = os.environ.get("ASYNCPOOL_PROMETHEUS") or shutil.which("prometheus")
    if found is None and Path("/usr/bin/prometheus").exists():
        found = "/usr/bin/prometheus"
    if found is None:
        raise HarnessError(f"no prometheus binary: {_INSTALL}, or set ASYNCPOOL_PROMETHEUS")
    return found


class PrometheusServer:
    """Scrapes `targets` (``job name -> host:port``) every `scrape_interval` seconds."""

    def __init__(self, targets: dict[str, str], scrape_interval: float = 1.0) -> None:
        self.binary: str = prometheus_binary()
        self.targets = targets
        self.scrape_interval = scrape_interval
        self.port: int = free_port()
        self.workdir: Path = make_workdir("prometheus")
        self._process: ServerProcess | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 30.0) -> PrometheusServer:
        interval = f"{int(self.scrape_interval * 1000)}ms"
        jobs = "".join(
            f"  - job_name: {json.dumps(job)}\n    static_configs:\n"
            f"      - targets: [{json.dumps(target)}]\n"
            for job, target in self.targets.items()
        )
        config = self.workdir / "prometheus.yml"
        config.write_text(
            f"global:\n  scrape_interval: {interval}\n  evaluation_interval: {interval}\n"
            f"scrape_configs:\n{jobs}"
        )
        (self.workdir / "data").mkdir()
        chown_tree(self.workdir)
        self._process = ServerProcess(
            "prometheus",
            [self.binary, f"--config.file={config}", f"--storage.tsdb.path={self.workdir / 'data'}",
             f"--web.listen-address=127.0.0.1:{self.port}", "--storage.tsdb.retention.time=1h"],
            self.workdir / "prometheus.log",
            self.workdir,
        )
        self._process.start()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self._process.running():
                raise HarnessError(f"prometheus exited: {self._process.log_tail()}")
            try:
                with urllib.request.urlopen(f"{self.url}/-/ready", timeout=1) as reply:  # noqa: S310
                    if reply.status == 200:
                        return self
            except OSError:
                pass
            time.sleep(0.1)
        self.stop()
        raise HarnessError(f"prometheus not ready within {timeout:g}s")

    def stop(self) -> None:
        if self._process is not None:
            self._process.stop()
        remove_tree(self.workdir)

    def __enter__(self) -> PrometheusServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def query(self, expr: str) -> list[dict[str, Any]]:
        """An instant query's result vector (each: ``{"metric": labels, "value": [t, "v"]}``)."""
        url = f"{self.url}/api/v1/query?{urllib.parse.urlencode({'query': expr})}"
        try:
            with urllib.request.urlopen(url, timeout=10) as reply:  # noqa: S310 - our loopback URL
                body = json.load(reply)
        except urllib.error.HTTPError as exc:
            raise HarnessError(f"prometheus refused {expr!r}: {exc.read().decode()[:500]}") from exc
        if body.get("status") != "success":
            raise HarnessError(f"prometheus query {expr!r} failed: {body}")
        data = body["data"]
        if data["resultType"] != "vector":
            raise HarnessError(f"{expr!r} is a {data['resultType']}, not an instant vector")
        result: list[dict[str, Any]] = data["result"]
        return result

    def targets_up(self) -> dict[str, bool]:
        """Each job's health as Prometheus last scraped it."""
        return {r["metric"]["job"]: r["value"][1] == "1" for r in self.query("up")}
