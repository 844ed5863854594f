"""``make bench`` ends by drawing a PNG per benchmark: every committed result must still draw. And the gateway
benchmark's split of a replica's CPU into its event loop and the rest, and how the max-RPS figures are judged
across replica counts."""

from __future__ import annotations

import importlib.util
import json
import shutil
import time
from pathlib import Path
from types import ModuleType

import pytest

from tests.fakes.openai_backend import ThreadedFake

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


def _pairs(replicas: int, passthrough: float, pilothouse: float, ratio: float) -> dict[str, object]:
    return {"replicas": replicas, "median_ratio": ratio,
            "median_rps": {"serve passthrough": passthrough, "pilothouse": pilothouse}}


def test_max_rps_is_each_targets_best_replica_count_and_paired_only_where_both_peak_together(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.syspath_prepend(str(ROOT / "bench"))
    judged = bench_module("gateway_overhead").judged
    both_at_two = judged({"one": _pairs(1, 2300.0, 1650.0, 0.72), "two": _pairs(2, 2500.0, 1960.0, 0.79)})
    assert both_at_two == {"replicas": {"serve passthrough": 2, "pilothouse": 2}, "paired": True, "ratio": 0.79,
                           "median_rps": {"serve passthrough": 2500.0, "pilothouse": 1960.0}}
    # the pass-through peaks at one replica: the ratio of the two peaks, not the two-replica windows' median
    apart = judged({"one": _pairs(1, 2600.0, 1650.0, 0.63), "two": _pairs(2, 2500.0, 1960.0, 0.79)})
    assert apart is not None and not apart["paired"]
    assert apart["ratio"] == round(1960.0 / 2600.0, 3) and apart["replicas"]["serve passthrough"] == 1
    assert judged({}) is None


def test_the_direct_port_shares_the_rotating_max_rps_windows_and_is_judged_on_its_own(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Each c=256 window has the pass-through beside every gateway, the order rotating; each gateway's ratio is its
    own, a window with errors sustains nothing, and the direct port is judged only where it was measured."""
    monkeypatch.syspath_prepend(str(ROOT / "bench"))
    gateway_overhead = bench_module("gateway_overhead")
    direct = gateway_overhead.DIRECT
    rps = {"serve passthrough": [2000.0, 2200.0, 1800.0], "pilothouse": [1500.0, 1650.0, 1500.0],
           direct: [1900.0, 2000.0, 1700.0]}
    order: list[str] = []

    def load(url: str, model: str, concurrency: int, args: object) -> dict[str, object]:
        order.append(url)
        window = len([u for u in order if u == url]) - 1
        errors = 3 if url == direct and window == 1 else 0
        return {"rps": rps[url][window], "errors": errors, "sent": 1000}

    monkeypatch.setattr(gateway_overhead, "load", load)
    monkeypatch.setattr(gateway_overhead, "thread_cpu", lambda pids: {})
    urls = {t: t for t in rps}
    pids = {t: [1] for t in rps}
    args = type("Args", (), {"pairs": 3})()
    two = gateway_overhead.alternate(urls, args, pids, ("pilothouse", direct))
    assert order == ["serve passthrough", "pilothouse", direct, "pilothouse", direct, "serve passthrough",
                     direct, "serve passthrough", "pilothouse"]
    assert [r["ratios"] for r in two["rounds"]] == [{"pilothouse": 0.75, direct: 0.95},
                                                    {"pilothouse": 0.75, direct: None},
                                                    {"pilothouse": 0.833, direct: 0.944}]
    assert two["median_ratios"] == {"pilothouse": 0.75, direct: 0.947} and two["median_ratio"] == 0.75
    assert two["median_rps"][direct] == 1800.0  # the window with errors is left out
    order.clear()
    one = gateway_overhead.alternate(urls, type("Args", (), {"pairs": 2})(), pids)
    assert order == ["serve passthrough", "pilothouse", "pilothouse", "serve passthrough"]
    paired = {"one": {"replicas": 1, **one}, "two": {"replicas": 2, **two}}
    judged = gateway_overhead.judged(paired, direct)
    assert judged == {"replicas": {"serve passthrough": 2, direct: 2}, "paired": True, "ratio": 0.947,
                      "median_rps": {"serve passthrough": 2000.0, direct: 1800.0}}
    assert gateway_overhead.judged({"one": {"replicas": 1, **one}}, direct) is None  # never measured: no figure
    figures = bench_module("summary").summarise({"gateway_overhead": {"max_rps_judged_direct_port": judged}})[
        "figures"]
    assert (figures["gateway.max_rps.pilothouse_direct_port"], figures["gateway.max_rps_ratio.direct_port"]) == (
        1800.0, 0.947)


def test_the_summary_takes_the_judged_ratio_and_litellms_best_worker_count(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.syspath_prepend(str(ROOT / "bench"))
    results = {"serve passthrough (tp)": {"c256": {"rps": 2400.0, "errors": 0}},
               "pilothouse (tp)": {"c256": {"rps": 1700.0, "errors": 0}, "c32": {"rps": 1900.0, "errors": 3}},
               "litellm": {"c256": {"rps": 170.0, "errors": 0}},
               "litellm, 2 workers": {"c256": {"rps": 300.0, "errors": 0}}}
    best = bench_module("gateway_overhead").max_rps_without_errors(results)
    assert best["pilothouse (tp)"] == 1700.0  # not the c=32 window that had errors
    figures = bench_module("summary").summarise({"gateway_overhead": {
        "results": results, "max_rps_without_errors": best,
        "paired_max_rps": {"pilothouse (tp)": _pairs(1, 2300.0, 1650.0, 0.72),
                           "pilothouse (tp), 2 replicas": _pairs(2, 2500.0, 1960.0, 0.79)},
        "max_rps_judged": {"ratio": 0.79, "median_rps": {"serve passthrough": 2500.0, "pilothouse": 1960.0}},
    }})["figures"]
    assert figures["gateway.max_rps_ratio.paired_median"] == 0.79
    assert (figures["gateway.max_rps_ratio.replicas1"], figures["gateway.max_rps_ratio.replicas2"]) == (0.72, 0.79)
    assert figures["gateway.max_rps.pilothouse"] == 1960.0  # the judged median, above the sweep's best window
    assert figures["gateway.max_rps.serve_passthrough"] == 2500.0
    assert figures["gateway.max_rps.litellm"] == 300.0


def test_each_result_carries_the_machines_speed_and_the_summary_lists_it_per_benchmark(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The VM's speed drifts by up to 2.5x over hours: a result written today must say how fast the machine was."""
    monkeypatch.syspath_prepend(str(ROOT / "bench"))
    machine = bench_module("machine")
    assert "python_loop_ms" not in machine.describe()  # no sampler: no reading is made up
    machine.sample_speed()
    time.sleep(3)  # the side process's start-up, then a sample every half second
    described = machine.describe()
    assert 0 < described["python_loop_ms"] < 10_000 and described["python_loop_samples"] >= 2
    low, high = described["python_loop_ms_p10_p90"]
    assert low <= described["python_loop_ms"] <= high
    assert "python_loop_ms" not in machine.describe()  # read once: the sampler is stopped with the result
    figures = bench_module("summary").summarise({
        "failover": {"machine": {"cpus": 2, "python_loop_ms": 16.5}, "client_errors": 0},
        "retrieval": {"machine": {"cpus": 2, "python_loop_ms": 31.0}},
        "handle_hop": {"machine": {"cpus": 2}},  # written before the reading existed: nothing is guessed
    })["figures"]
    assert {k: v for k, v in figures.items() if k.startswith("machine.")} == {
        "machine.python_loop_ms.failover": 16.5, "machine.python_loop_ms.retrieval": 31.0}
    assert figures["failover.client_errors"] == 0


def test_added_latency_at_c32_is_taken_within_each_rotating_round(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each round's targets run in a rotated order, each compared with the direct window of its own round; the
    summary takes the median over the rounds, not the sweep's single window."""
    monkeypatch.syspath_prepend(str(ROOT / "bench"))
    gateway_overhead = bench_module("gateway_overhead")
    base = {"direct": 20.0, "serve passthrough": 21.0, "pilothouse": 23.0}
    drift = iter([0.0, 0.0, 0.0, 5.0, 5.0, 5.0, 1.0, 1.0, 1.0])  # the machine slows in round 2, as it does
    order: list[str] = []

    def load(url: str, model: str, concurrency: int, args: object) -> dict[str, object]:
        name = next(n for n in base if url.startswith(n))
        order.append(name)
        p50 = base[name] + next(drift)
        return {"p50_ms": p50, "p99_ms": p50 * 2, "rps": 1000.0, "errors": 0}

    monkeypatch.setattr(gateway_overhead, "load", load)
    urls = {"serve passthrough": "serve passthrough/v1", "pilothouse": "pilothouse/v1"}
    args = type("Args", (), {"c32_rounds": 3})()
    rotated = gateway_overhead.rotated_c32(urls, "direct", args)
    assert order == ["direct", "serve passthrough", "pilothouse", "serve passthrough", "pilothouse", "direct",
                     "pilothouse", "direct", "serve passthrough"]
    assert rotated["median_added_p50_ms"] == {"serve passthrough": 1.0, "pilothouse": 3.0}
    assert rotated["median_added_p99_ms"] == {"serve passthrough": 2.0, "pilothouse": 6.0}
    sweep = {"direct": {"c32": {"added_p50_ms": 0.0}}, "pilothouse (tp)": {"c32": {"added_p50_ms": 5.7}}}
    summarise = bench_module("summary").summarise
    assert summarise({"gateway_overhead": {"results": sweep, "c32_rounds": rotated}})["figures"][
        "gateway.added_p50_ms.c32.pilothouse"] == 3.0
    assert summarise({"gateway_overhead": {"results": sweep}})["figures"]["gateway.added_p50_ms.c32.pilothouse"] == 5.7
    # the rounds at two replicas each (the CRD's advice on 2 cores) are their own figures, never the sweep's window
    two = {"median_added_p50_ms": {"serve passthrough": 0.4, "pilothouse": 1.2}, "median_added_p99_ms": {}}
    figures = summarise({"gateway_overhead": {"results": sweep, "c32_rounds": rotated,
                                              "c32_rounds_by_replicas": {"2": two}}})["figures"]
    assert (figures["gateway.added_p50_ms.c32.pilothouse"], figures["gateway.added_p50_ms.c32.pilothouse.replicas2"],
            figures["gateway.added_p50_ms.c32.serve_passthrough.replicas2"]) == (3.0, 1.2, 0.4)
    assert "gateway.added_p99_ms.c32.pilothouse.replicas2" not in figures
    assert "gateway.added_p50_ms.c32.pilothouse.replicas2" not in summarise({"gateway_overhead": {"results": sweep}})[
        "figures"]


def test_serves_share_is_each_apps_added_latency_under_serve_less_under_uvicorn(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The same two apps under Serve and under plain uvicorn in one rotating run: each app's share is taken from the
    medians over rounds, and a serving process's CPU per request is its CPU over the window's answered requests."""
    monkeypatch.syspath_prepend(str(ROOT / "bench"))
    serve_share = bench_module("serve_share")
    go = serve_share.go
    p50 = {"direct": 25.0, "serve passthrough": 28.0, "serve pilothouse": 37.0, "uvicorn passthrough": 25.5,
           "uvicorn pilothouse": 26.5}
    cpu = dict.fromkeys(range(1, 5), 0.0)
    pid_of = {"serve passthrough": 1, "serve pilothouse": 2, "uvicorn passthrough": 3, "uvicorn pilothouse": 4}
    drift = iter([0.0] * 5 + [4.0] * 5 + [1.0] * 5)  # round 2 runs on a slower machine: every target alike

    def load(url: str, model: str, concurrency: int, args: object) -> dict[str, object]:
        slow = next(drift)
        if url in pid_of:
            cpu[pid_of[url]] += 0.5 if url.endswith("pilothouse") else 0.25  # over 1,000 answers
        return {"p50_ms": p50[url] + slow, "p99_ms": 2 * (p50[url] + slow), "rps": 125.0, "errors": 0, "ok": 1000}

    monkeypatch.setattr(go, "load", load)
    monkeypatch.setattr(go, "cpu_seconds", lambda pid: cpu[pid])
    targets = {name: (name, "m") for name in p50}
    rounds = go.rotating_rounds(targets, 3, type("Args", (), {})(), pid_of)
    assert rounds["median_added_p50_ms"] == {"serve passthrough": 3.0, "serve pilothouse": 12.0,
                                             "uvicorn passthrough": 0.5, "uvicorn pilothouse": 1.5}
    summary = serve_share.summarise(rounds)
    assert (summary["pilothouse_serve_share_p50_ms"], summary["passthrough_serve_share_p50_ms"]) == (10.5, 2.5)
    assert summary["serve_pilothouse_cpu_per_request_us"] == 500.0
    assert summary["uvicorn_passthrough_cpu_per_request_us"] == 250.0
    assert "direct_cpu_per_request_us" not in summary  # the backend's process is not one of the apps
    figures = bench_module("summary").summarise({"serve_share": {"summary": summary}})["figures"]
    assert figures["gateway.serve_share.p50_ms.c32.pilothouse"] == 10.5
    assert figures["gateway.serve_share.added_p50_ms.c32.uvicorn_pilothouse"] == 1.5


def test_an_engine_round_pools_its_two_runs_of_a_target(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each round runs a target twice (palindromic order): its tokens/s is that pair's, so a round whose machine
    slowed between the two runs counts the two halves together, not as two rounds."""
    monkeypatch.syspath_prepend(str(ROOT / "bench"))

    def run(tokens: int, seconds: float) -> dict[str, object]:
        return {"tokens": tokens, "elapsed_s": seconds, "requests": tokens // 128, "latency_s": [0.2],
                "ttft_s": [], "tokens_per_request": [128], "clocks": {}, "errors": 0, "error_kinds": {}}

    runs = [run(1280, 1.0), run(1280, 3.0), run(2560, 2.0), run(2560, 2.0)]
    pooled = bench_module("engine_path").pooled(runs, [{} for _ in runs])
    assert pooled["per_round_tokens_per_s"] == [640.0, 1280.0]
    assert pooled["tokens_per_s"] == 960.0


def test_engine_targets_at_c1_take_turns_and_each_is_timed_by_its_own_requests(
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """At concurrency 1 the engine benchmark's targets take turns request by request in one run: each gets
    every other request, and its tokens/s is over the time the client waited on it, so the slower one shows."""
    monkeypatch.syspath_prepend(str(ROOT / "bench"))
    engine_path = bench_module("engine_path")
    with ThreadedFake("small") as fast, ThreadedFake("small") as slow:
        fast.latency(0.01)
        slow.latency(0.03)
        targets = [(f"{b.url}/chat/completions", None, "small") for b in (fast, slow)]
        engine_path.role_load(targets, 1, False, 0.6, 1, 8, {})
        first, second = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
        with pytest.raises(ValueError, match="concurrency 1 only"):
            engine_path.role_load(targets, 4, False, 0.1, 0, 8, {})
    assert first["errors"] == second["errors"] == 0
    assert 0 <= first["requests"] - second["requests"] <= 1 and second["requests"] >= 5
    for result in (first, second):
        assert result["elapsed_s"] == pytest.approx(sum(result["latency_s"]), abs=0.002)
    per_token = [r["elapsed_s"] / r["tokens"] for r in (first, second)]
    assert per_token[1] > 1.5 * per_token[0]


COUNTED = """
import sys, threading
def work(n):
    return sum(range(n))
print("ready", flush=True)
sys.stdin.readline()  # counting is switched on before this line arrives
helper = threading.Thread(target=work, args=(100_000,))
helper.start()
work(400_000)
helper.join()
print("done", flush=True)
sys.stdin.readline()  # and dumped before this one
"""


@pytest.mark.skipif(shutil.which("callgrind_control") is None,
                    reason="valgrind is not installed: apt-get install valgrind")
def test_instructions_are_read_per_thread_from_a_real_callgrind_dump(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """The gateway's instruction counts come from callgrind's per-thread dump files: the main thread (the event
    loop's) is thread 1, only what ran while counting was on is counted, and the other threads are summed apart."""
    import subprocess
    import sys

    monkeypatch.syspath_prepend(str(ROOT / "bench"))
    counted = bench_module("gateway_instructions")
    out = tmp_path / "callgrind.out"
    proc = subprocess.Popen(["valgrind", "--tool=callgrind", "--instr-atstart=no", "--separate-threads=yes",
                             f"--callgrind-out-file={out}", "-q", sys.executable, "-S", "-c", COUNTED],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert proc.stdin is not None and proc.stdout is not None
    try:
        assert proc.stdout.readline().strip() == "ready"
        subprocess.run(["callgrind_control", "--instr=on", str(proc.pid)], check=True, capture_output=True)
        proc.stdin.write("go\n")
        proc.stdin.flush()
        assert proc.stdout.readline().strip() == "done"
        subprocess.run(["callgrind_control", "--dump", str(proc.pid)], check=True, capture_output=True)
        proc.stdin.write("exit\n")
        proc.stdin.flush()
        assert proc.wait(60) == 0
    finally:
        proc.kill()
    threads = counted.instructions_by_thread(out, 1)
    assert set(threads) == {1, 2}  # the main thread and the helper; nothing from other dumps (the one at exit)
    # four times the helper's work, plus the thread's start and join; the interpreter's start-up, before counting was
    # on, would add ~40 million more (measured: 4.0x the helper's count with it off at start-up, 6.3x with it on)
    assert 3 * threads[2] < threads[1] < 5 * threads[2] and threads[2] > 0
    split = counted.per_request(threads, 2)
    assert split == {"event_loop": round(threads[1] / 2), "other_threads": round(threads[2] / 2),
                     "total": round((threads[1] + threads[2]) / 2)}
    assert counted.instructions_by_thread(out, 2) == {}  # a dump that was never taken


def test_the_summary_lists_instructions_per_request_and_the_ratio_to_the_passthrough(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.syspath_prepend(str(ROOT / "bench"))
    results = {"passthrough": {"c1": {"event_loop": 600, "other_threads": 0, "total": 600}},
               "pilothouse": {"c1": {"event_loop": 1200, "other_threads": 600, "total": 1800}},
               "pilothouse, no budget": {"c1": {"event_loop": 1100, "other_threads": 100, "total": 1200}}}
    doc = {"machine": {"cpus": 2}, "summary": bench_module("gateway_instructions").summarise(results)}
    figures = bench_module("summary").summarise({"gateway_instructions": doc})["figures"]
    assert figures["gateway.instructions_per_request.c1.pilothouse"] == 1800
    assert figures["gateway.instructions_per_request.c1.passthrough"] == 600
    assert figures["gateway.instructions_per_request.c1.pilothouse_no_budget"] == 1200
    assert figures["gateway.event_loop_instructions_per_request.c1.pilothouse"] == 1200
    assert figures["gateway.instructions_ratio.c1.pilothouse"] == 3.0
    assert "gateway.instructions_per_request.c8.pilothouse" not in figures  # not measured: not guessed
