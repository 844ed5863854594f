"""The machine a benchmark ran on, and its result file, alike for every benchmark: figures only compare on the
same machine."""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
from datetime import UTC, datetime
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import IO, Any


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
    machine's speed during the run when ``sample_speed`` was started (``python_loop_ms``)."""
    return {"cpus": os.cpu_count(),
            "ram_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
            "cpu": _cpu_model(), "python": platform.python_version(), "platform": platform.platform(),
            **{pkg: package_version(pkg) for pkg in packages}, **_speed_reading()}


# The reference workload, timed in CPU time in a side process every half second while a benchmark runs. CPU time,
# because on this VM a slow phase makes the same instructions take longer (CPU time and wall time agree, 24-29 ms
# against 15-19 for 100,000 rounds), while the guest's own run queue, which the benchmark fills, does not count.
_SAMPLER = """
import os, time
parent = os.getppid()
while os.getppid() == parent:
    start = time.thread_time()
    total = 0
    for i in range(10_000):
        row = {"id": i, "tokens": i * 3, "name": "req"}
        total += row["tokens"] + len(row["name"])
    print(round((time.thread_time() - start) * 10_000, 2), flush=True)
    time.sleep(0.5)
"""

# One benchmark per process, so one sampler per process: module state saves threading it through every benchmark
# function down to the one that writes the result.
_sampler: tuple[subprocess.Popen[bytes], IO[str]] | None = None


def sample_speed() -> None:
    """Start timing the reference workload beside the benchmark, until ``describe`` writes the reading.

    This VM switches between a fast and a ~1.7x slower phase, for seconds or for hours, and nothing on the guest
    shows it (no steal time, no other process): the same commands on the same code have run up to 2.5x slower.
    Gateway and engine figures move with it, so a result carries the machine's speed *during* its run
    (``python_loop_ms``: the workload's median CPU ms per 100,000 rounds; lower is faster), and runs are
    compared, or set aside, by it. A reading taken after the run missed it: a whole ``make bench`` whose
    backend ran at 0.7x its morning RPS read a fast 15-16 ms at the end of every benchmark. ~0.4% of a core.
    """
    global _sampler
    out = tempfile.TemporaryFile("w+")  # noqa: SIM115 - open for the whole benchmark, closed by _speed_reading
    proc = subprocess.Popen([sys.executable, "-c", _SAMPLER], stdout=out)
    atexit.register(proc.kill)
    _sampler = (proc, out)


def _speed_reading() -> dict[str, Any]:
    global _sampler
    if _sampler is None:
        return {}
    (proc, out), _sampler = _sampler, None
    proc.kill()
    proc.wait()
    with out:
        out.seek(0)
        samples = sorted(float(line) for line in out.read().split())
    if not samples:
        return {}
    return {"python_loop_ms": round(statistics.median(samples), 1),
            "python_loop_ms_p10_p90": [samples[len(samples) // 10], samples[len(samples) * 9 // 10]],
            "python_loop_samples": len(samples)}


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
