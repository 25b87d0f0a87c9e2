"""A PNG of a bench run: throughput and latency against concurrent clients."""

from __future__ import annotations

from collections import defaultdict
from typing import Any


def series_name(run: dict[str, Any]) -> str:
    name = f"{run['driver']} ({run['prepared_statements']})"
    if run["driver"] == "asyncpool" and run["telemetry"] != "off":
        name += f" telemetry={run['telemetry']}"
    return name


def draw_chart(document: dict[str, Any], path: str) -> None:
    """Two panels from a bench JSON document: queries/s, and p50/p99 latency (pgbench: mean)."""
    try:
        import matplotlib
    except ModuleNotFoundError:
        raise SystemExit("--chart needs matplotlib: pip install 'asyncpool-pg[bench]'") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for run in document["runs"]:
        series[series_name(run)].append(run)
    fig, (through, latency) = plt.subplots(1, 2, figsize=(12, 4.8))
    for name, runs in series.items():
        runs.sort(key=lambda r: r["clients"])
        clients = [r["clients"] for r in runs]
        line = through.plot(clients, [r["queries_per_s"] for r in runs], marker="o", label=name)
        color = line[0].get_color()
        p50 = [r["latency_ms"]["p50"] for r in runs]
        if all(v is not None for v in p50):
            latency.plot(clients, p50, marker="o", color=color, label=f"{name} p50")
            latency.plot(clients, [r["latency_ms"]["p99"] for r in runs], marker="^",
                         linestyle="--", color=color, label=f"{name} p99")
        else:
            latency.plot(clients, [r["latency_ms"]["mean"] for r in runs], marker="s",
                         linestyle=":", color=color, label=f"{name} mean")
    target = document["target"]
    limit = target.get("server_connections_limit")
    where = target["label"] + (f", {limit} server connections" if limit else "")
    through.set(title=f"Throughput through {where}", xlabel="concurrent clients",
                ylabel="queries/s")
    latency.set(title="Latency", xlabel="concurrent clients", ylabel="ms")
    for ax in (through, latency):
        ax.grid(True, alpha=0.3)
        ax.set_ylim(bottom=0)
        ax.legend(fontsize="small")
    machine = document["machine"]
    fig.suptitle(f"asyncpool {document['asyncpool_version']} bench, {machine['cpus']} CPUs, "
                 f"{document['created']}", fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
