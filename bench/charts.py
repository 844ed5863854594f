"""One PNG chart per benchmark, drawn from its JSON in ``bench/results/`` (``make bench`` runs it last).

The JSON stays the record; the chart is for reading a run at a glance. A benchmark with a chart of
its own gets it from :data:`CHARTS`; any other result that has a flat ``summary`` of numbers gets a
bar chart of them, one panel per unit (the name's ``_ms``, ``_s``, ``_rps`` ... suffix).

Run: ``.venv/bin/python bench/charts.py`` → ``bench/results/<benchmark>.png``.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only; no display on CI machines
import matplotlib.pyplot as plt  # after use(): the backend must be chosen first
from matplotlib.axes import Axes
from matplotlib.figure import Figure

RESULTS = Path(__file__).resolve().parent / "results"


def _bars(ax: Axes, labels: list[str], values: list[float], title: str, unit: str, *, log: bool = False) -> None:
    bars = ax.barh(labels, values, color="#4C72B0")
    ax.bar_label(bars, labels=[f"{v:,.2f}" if abs(v) < 10 else f"{v:,.1f}" for v in values], padding=3, fontsize=8)
    ax.set_title(title, fontsize=10)
    ax.set_xlabel(unit)
    if log and min(values, default=0) > 0:
        ax.set_xscale("log")
    ax.invert_yaxis()
    ax.margins(x=0.25)


def gateway_overhead(doc: dict[str, Any]) -> Figure:
    results = doc["results"]
    targets = [t for t in results if t != "direct" and "c32" in results[t]]
    fig, (lat, rps) = plt.subplots(1, 2, figsize=(12, 0.6 * len(targets) + 2))
    p50 = [max(results[t]["c32"].get("added_p50_ms") or 0.0, 0.01) for t in targets]
    _bars(lat, targets, p50, "added p50 latency at concurrency 32 (vs backend direct)", "ms (log)", log=True)
    best = doc.get("max_rps_without_errors", {})
    names = ["direct", *targets]
    _bars(rps, names, [float(best.get(t) or 0.0) for t in names], "max RPS without errors", "requests/s")
    return fig


def failover(doc: dict[str, Any]) -> Figure:
    phases = doc["latency_ms"]
    fig, ax = plt.subplots(figsize=(9, 3.5))
    labels = list(phases)
    _bars(ax, [f"{p} p99" for p in labels] + [f"{p} p50" for p in labels],
          [phases[p]["p99"] for p in labels] + [phases[p]["p50"] for p in labels],
          f"client latency by phase — {doc['client_errors']} client errors, reroute {doc['reroute_ms']} ms, "
          f"return {doc['return_ms']} ms", "ms")
    return fig


def reconcile_scale(doc: dict[str, Any]) -> Figure:
    r = doc["reconcile"]
    fig, (times, memory) = plt.subplots(1, 2, figsize=(12, 3.5))
    steps = {k: r[k] for k in ("apply_s", "models_all_ready_s", "all_ready_s", "recompile_all_s")
             if r.get(k) is not None}
    _bars(times, list(steps), list(steps.values()),
          f"{r['models']} ModelDeployments + {r['workflows']} AutonomousWorkflows", "s")
    rss = {k: r[k] for k in ("operator_idle_rss_mb", "operator_peak_rss_mb", "operator_steady_rss_mb")
           if r.get(k) is not None}
    _bars(memory, list(rss), list(rss.values()), "operator memory", "MB")
    return fig


def engine_path(doc: dict[str, Any]) -> Figure:
    """Tokens/s of every target per variant, each target's ratio to direct against the goal, and (runs that
    scraped both clocks) a request's mean time split into the engine's own and the rest."""
    results = doc["results"]
    pairs = [(variant, target) for variant, by_target in results.items() for target in by_target]
    compared = [(v, t) for v, t in pairs if t != "direct"]
    split = [(v, t) for v, t in pairs if "engine" in results[v][t].get("clock_mean_ms", {})]
    fig, axes = plt.subplots(1, 3 if split else 2, figsize=(19 if split else 13, 0.3 * len(pairs) + 2))
    _bars(axes[0], [f"{v} · {t}" for v, t in pairs], [results[v][t]["tokens_per_s"] for v, t in pairs],
          "generated tokens/s", "tokens/s")
    goal = doc["summary"]["goal"]
    _bars(axes[1], [f"{v} · {t}" for v, t in compared], [results[v][t]["ratio"] for v, t in compared],
          f"ratio to direct, median of the rounds (dashed: the goal, {goal})", "ratio")
    axes[1].axvline(goal, color="#C44E52", linestyle="--", linewidth=1)
    if split:
        labels = [f"{v} · {t}" for v, t in split]
        engine = [results[v][t]["clock_mean_ms"]["engine"] for v, t in split]
        outside = [results[v][t]["latency_mean_ms"] - e for (v, t), e in zip(split, engine, strict=True)]
        axes[2].barh(labels, engine, color="#4C72B0", label="in the engine (vLLM e2e)")
        bars = axes[2].barh(labels, outside, left=engine, color="#DD8452", label="outside the engine")
        axes[2].bar_label(bars, labels=[f"+{o:.0f}" for o in outside], padding=3, fontsize=8)
        axes[2].set_title("a request's mean time", fontsize=10)
        axes[2].set_xlabel("ms")
        axes[2].legend(fontsize=8, loc="upper right", bbox_to_anchor=(1, -0.12), ncol=2)
        axes[2].invert_yaxis()
        axes[2].margins(x=0.2)
    return fig


def retrieval(doc: dict[str, Any]) -> Figure:
    """p50 and p99 of every retrieval path on log scales: Milvus, the degraded path and the hot index span 1000x."""
    paths = doc["retrieval"]["rows"]
    fig, axes = plt.subplots(1, 2, figsize=(13, 0.35 * len(paths) + 2))
    for ax, stat in zip(axes, ("p50", "p99"), strict=True):
        _bars(ax, [row["path"] for row in paths], [row[f"{stat}_ms"] for row in paths],
              f"{stat} per query, {doc['config']['rows']:,} chunks x {doc['config']['dim']}-d", "ms (log)", log=True)
    return fig


def summary_bars(doc: dict[str, Any], name: str) -> Figure | None:
    """Fallback: the ``summary`` numbers, one panel per unit suffix."""
    summary = doc.get("summary")
    if not isinstance(summary, dict):
        return None
    panels: dict[str, dict[str, float]] = {}
    for key, value in summary.items():
        if isinstance(value, int | float) and not isinstance(value, bool):
            unit = key.rsplit("_", 1)[-1] if "_" in key else "value"
            panels.setdefault(unit, {})[key] = float(value)
    if not panels:
        return None
    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 0.45 * max(map(len, panels.values())) + 2),
                             squeeze=False)
    for ax, (unit, values) in zip(axes[0], sorted(panels.items()), strict=True):
        _bars(ax, list(values), list(values.values()), f"{name}: {unit}", unit)
    return fig


CHARTS: dict[str, Callable[[dict[str, Any]], Figure]] = {
    "gateway_overhead": gateway_overhead,
    "failover": failover,
    "reconcile_scale": reconcile_scale,
    "engine": engine_path,
    "engine_tp": engine_path,
    "retrieval": retrieval,
}


def draw(path: Path) -> Path | None:
    """The chart of one result file, written beside it; None when it holds nothing to draw."""
    doc = json.loads(path.read_text())
    fig = CHARTS[path.stem](doc) if path.stem in CHARTS else summary_bars(doc, path.stem)
    if fig is None:
        return None
    machine = doc.get("machine", {})
    fig.suptitle(f"{path.stem} — {machine.get('cpus') or machine.get('nproc', '?')} CPUs, "
                 f"{doc.get('when', '')}", fontsize=9, x=0.01, ha="left")
    fig.tight_layout()
    out = path.with_suffix(".png")
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def main() -> int:
    for path in sorted(RESULTS.glob("*.json")):
        if path.stem == "summary":
            continue
        try:
            out = draw(path)
        except (KeyError, TypeError, ValueError) as exc:  # a result from an older layout: say so, draw the rest
            print(f"{path.name}: no chart ({type(exc).__name__}: {exc})", file=sys.stderr)
            continue
        print(f"{path.name} -> {out.name}" if out else f"{path.name}: nothing to chart")
    return 0


if __name__ == "__main__":
    sys.exit(main())
