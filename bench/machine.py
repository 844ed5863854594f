"""The machine a benchmark ran on, and its result file, alike for every benchmark: figures only compare on the
same machine."""

from __future__ import annotations

import contextlib
import json
import os
import platform
import statistics
import time
from datetime import UTC, datetime
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any


def measured_at() -> str:
    """When a result was measured (UTC, to the second): summaries are compared over time by it."""
    return datetime.now(UTC).isoformat(timespec="seconds")


def package_version(dist: str) -> str | None:
    try:
        return version(dist)
    except PackageNotFoundError:
        return None


def describe(*packages: str) -> dict[str, Any]:
    """CPUs, RAM, CPU model, Python, platform, the versions of ``packages`` (None when not installed), and the
    machine's speed when the result was written (``python_loop_ms``)."""
    return {"cpus": os.cpu_count(),
            "ram_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
            "cpu": _cpu_model(), "python": platform.python_version(), "platform": platform.platform(),
            **{pkg: package_version(pkg) for pkg in packages},
            "python_loop_ms": python_loop_ms()}


def python_loop_ms(seconds: float = 3.0) -> float:
    """Median wall time of a fixed pure-Python workload (dicts, ints, a string) run over ``seconds``: how fast one
    core ran for this process when the result was written.

    This VM switches between a fast and a ~1.7x slower phase every 0.3-2 s, and for hours at a time spends more
    of its time in the slow one (the same commands, same code, ran up to 2.5x slower); nothing on the guest shows
    it (no steal time, no other process). Gateway figures move with the interpreter's speed, so each result
    carries this reading: runs far apart are compared, or set aside, by the machine they actually had. The
    median over seconds, not the best run, because the benchmark lived through both phases.
    """
    samples: list[float] = []
    deadline = time.perf_counter() + seconds
    while (start := time.perf_counter()) < deadline:
        total = 0
        for i in range(100_000):
            row = {"id": i, "tokens": i * 3, "name": "req"}
            total += row["tokens"] + len(row["name"])
        samples.append(time.perf_counter() - start)
    return round(statistics.median(samples) * 1000, 1)


def _cpu_model() -> str | None:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return None


def save(path: Path, doc: dict[str, Any]) -> Path:
    """Write a result as indented JSON (its folder made if need be); the path to show, relative to the repo."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc, indent=2) + "\n")
    root = Path(__file__).resolve().parents[1]
    return path.relative_to(root) if path.is_relative_to(root) else path
