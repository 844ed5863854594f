"""``make bench`` ends by drawing a PNG per benchmark: every committed result must still draw. And the gateway
benchmark's split of a replica's CPU into its event loop and the rest."""

from __future__ import annotations

import importlib.util
import shutil
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parents[2]
RESULTS = ROOT / "bench" / "results"


def bench_module(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"bench_{name}", ROOT / "bench" / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("result", sorted(p.name for p in RESULTS.glob("*.json") if p.stem != "summary"))
def test_every_committed_result_draws_a_png(result: str, tmp_path: Path) -> None:
    copy = tmp_path / result
    shutil.copy(RESULTS / result, copy)
    out = bench_module("charts").draw(copy)
    assert out == copy.with_suffix(".png")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 10_000


def test_a_result_without_a_summary_draws_nothing(tmp_path: Path) -> None:
    (tmp_path / "odd.json").write_text('{"machine": {}, "rows": [1, 2]}')
    assert bench_module("charts").draw(tmp_path / "odd.json") is None
    (tmp_path / "flat.json").write_text('{"summary": {"dense_p50_ms": 3.5, "hot_p50_ms": 0.4, "runs": 3}}')
    assert bench_module("charts").draw(tmp_path / "flat.json") == tmp_path / "flat.png"


def test_a_replicas_event_loop_is_its_busiest_thread_and_each_replica_counts(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.syspath_prepend(str(ROOT / "bench"))  # gateway_overhead imports its sibling ``machine``
    split = bench_module("gateway_overhead").loop_and_rest
    before = {(1, 1): 10.0, (1, 2): 1.0, (2, 5): 0.0}
    after = {(1, 1): 14.0, (1, 2): 2.5, (1, 3): 0.5, (2, 5): 3.0, (3, 9): 99.0}  # thread 3 started; pid 3 not asked
    assert split(before, after, [1, 2]) == (4.0 + 3.0, 1.5 + 0.5)
