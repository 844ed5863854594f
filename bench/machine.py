"""The machine a benchmark ran on, and its result file, alike for every benchmark: figures only compare on the
same machine."""

from __future__ import annotations

import contextlib
import json
import os
import platform
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
    """CPUs, RAM, CPU model, Python, platform, and the versions of ``packages`` (None when not installed)."""
    return {"cpus": os.cpu_count(),
            "ram_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
            "cpu": _cpu_model(), "python": platform.python_version(), "platform": platform.platform(),
            **{pkg: package_version(pkg) for pkg in packages}}


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
