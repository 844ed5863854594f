"""``make bench`` ends by drawing a PNG per benchmark: every committed result must still draw."""

from __future__ import annotations

import importlib.util
import shutil
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parents[2]
RESULTS = ROOT / "bench" / "results"


def charts() -> ModuleType:
    spec = importlib.util.spec_from_file_location("bench_charts", ROOT / "bench" / "charts.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("result", sorted(p.name for p in RESULTS.glob("*.json") if p.stem != "summary"))
def test_every_committed_result_draws_a_png(result: str, tmp_path: Path) -> None:
    copy = tmp_path / result
    shutil.copy(RESULTS / result, copy)
    out = charts().draw(copy)
    assert out == copy.with_suffix(".png")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 10_000


def test_a_result_without_a_summary_draws_nothing(tmp_path: Path) -> None:
    (tmp_path / "odd.json").write_text('{"machine": {}, "rows": [1, 2]}')
    assert charts().draw(tmp_path / "odd.json") is None
    (tmp_path / "flat.json").write_text('{"summary": {"dense_p50_ms": 3.5, "hot_p50_ms": 0.4, "runs": 3}}')
    assert charts().draw(tmp_path / "flat.json") == tmp_path / "flat.png"
