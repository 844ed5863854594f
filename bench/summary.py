"""Flatten the benchmark results into ``bench/results/summary.json``: one name → one number.

Runs compare over time by these names (issue 5); each benchmark keeps its full JSON beside it. A figure
whose benchmark has not been run (or could not measure it, e.g. LiteLLM not installed) is listed under
``missing`` instead of being guessed, and ``sources`` says when each result file was measured: a figure
from an optional benchmark that ``make bench`` does not run (``engine_tp``) keeps the date of its own run.

Run: ``.venv/bin/python bench/summary.py`` (``make bench`` runs it last).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import machine

RESULTS = Path(__file__).resolve().parent / "results"

Getter = Callable[[dict[str, dict[str, Any]]], Any]


def _get(doc: str, *path: str) -> Getter:
    def get(docs: dict[str, dict[str, Any]]) -> Any:
        node: Any = docs.get(doc)
        for key in path:
            if not isinstance(node, dict):
                return None
            node = node.get(key)
        return node
    return get


def _gateway_target(docs: dict[str, dict[str, Any]], target: str) -> str:
    """The throughput-optimized variant of a Ray target when it was measured, else the default one."""
    results = docs.get("gateway_overhead", {}).get("results", {})
    return f"{target} (tp)" if f"{target} (tp)" in results else target


def _gw(target: str, level: str, metric: str) -> Getter:
    def get(docs: dict[str, dict[str, Any]]) -> Any:
        name = _gateway_target(docs, target) if target != "litellm" else target
        return _get("gateway_overhead", "results", name, level, metric)(docs)
    return get


def _added_c32(target: str, quantile: str, replicas: int | None = None) -> Getter:
    """Added latency at c=32: the median over the rotating rounds (``--c32-rounds``) when they ran, else the sweep's
    one window against a direct window of another moment; with ``replicas``, the rounds at that replica count
    (``--pair-replicas``) and nothing else."""
    def get(docs: dict[str, dict[str, Any]]) -> Any:
        doc = docs.get("gateway_overhead", {})
        key = f"median_added_{quantile}_ms"
        if replicas:
            rounds = (doc.get("c32_rounds_by_replicas") or {}).get(str(replicas)) or {}
            return (rounds.get(key) or {}).get(target)
        value = ((doc.get("c32_rounds") or {}).get(key) or {}).get(target)
        return value if value is not None else _gw(target, "c32", f"added_{quantile}_ms")(docs)
    return get


def _max_rps(target: str) -> Getter:
    """The target's best error-free window of the sweep (``max_rps_without_errors``), or its best replica count's
    median over the alternating windows (``max_rps_judged``) when higher; LiteLLM's best over its worker counts."""
    def get(docs: dict[str, dict[str, Any]]) -> Any:
        doc = docs.get("gateway_overhead", {})
        best = doc.get("max_rps_without_errors", {})
        names = ([n for n in best if n == "litellm" or n.startswith("litellm, ")]
                 if target == "litellm" else [_gateway_target(docs, target)])
        found = [best.get(name) for name in names]
        found.append((doc.get("max_rps_judged") or {}).get("median_rps", {}).get(target))
        return max((r for r in found if r), default=None)  # 0.0: no error-free window
    return get


def _paired(docs: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The alternating c=256 windows of pilothouse and the pass-through (``--pairs``) at one replica each, or {}."""
    chosen = docs.get("gateway_overhead", {}).get("paired_max_rps", {}).get(_gateway_target(docs, "pilothouse"))
    return chosen if isinstance(chosen, dict) else {}


def _paired_ratio(docs: dict[str, dict[str, Any]]) -> Any:
    """The max-RPS ratio the goal is judged by: each target at its best replica count (``max_rps_judged``), the
    median of alternating c=256 windows; before replica counts were compared, the one-replica median."""
    judged = docs.get("gateway_overhead", {}).get("max_rps_judged")
    return judged.get("ratio") if isinstance(judged, dict) else _paired(docs).get("median_ratio")


def _ratio_at(replicas: int) -> Getter:
    """Median pilothouse / pass-through ratio of the alternating c=256 windows at ``replicas`` replicas each."""
    def get(docs: dict[str, dict[str, Any]]) -> Any:
        pairs = docs.get("gateway_overhead", {}).get("paired_max_rps", {}).values()
        return next((p.get("median_ratio") for p in pairs if isinstance(p, dict) and p.get("replicas") == replicas),
                    None)
    return get


def _loop_us(target: str) -> Getter:
    """Median event-loop CPU per request of the target's replicas over the alternating c=256 windows."""
    def get(docs: dict[str, dict[str, Any]]) -> Any:
        loop = _paired(docs).get("median_event_loop_us_per_request")
        return loop.get(target) if isinstance(loop, dict) else None
    return get


def _outside_engine(target: str) -> Getter:
    """Mean ms a non-streamed c=4 request spent outside vLLM's own clock (client's mean - engine's mean)."""
    def get(docs: dict[str, dict[str, Any]]) -> Any:
        split = _get("engine", "summary", "time_split_mean_ms", "complete c4", target)(docs)
        return round(split["client"] - split["engine"], 1) if isinstance(split, dict) and "engine" in split else None
    return get


FIGURES: dict[str, Getter] = {
    "gateway.added_p50_ms.c32.pilothouse": _added_c32("pilothouse", "p50"),
    "gateway.added_p50_ms.c32.litellm": _gw("litellm", "c32", "added_p50_ms"),
    "gateway.added_p99_ms.c32.pilothouse": _added_c32("pilothouse", "p99"),
    "gateway.added_p99_ms.c32.litellm": _gw("litellm", "c32", "added_p99_ms"),
    "gateway.added_p50_ms.c1.pilothouse": _gw("pilothouse", "c1", "added_p50_ms"),
    "gateway.added_p50_ms.c32.serve_passthrough": _added_c32("serve passthrough", "p50"),
    "gateway.added_p50_ms.c32.pilothouse_direct_port": _added_c32("pilothouse, direct port", "p50"),
    "gateway.added_p99_ms.c32.pilothouse_direct_port": _added_c32("pilothouse, direct port", "p99"),
    "gateway.added_p50_ms.c32.pilothouse.replicas2": _added_c32("pilothouse", "p50", 2),
    "gateway.added_p50_ms.c32.serve_passthrough.replicas2": _added_c32("serve passthrough", "p50", 2),
    "gateway.added_p99_ms.c32.pilothouse.replicas2": _added_c32("pilothouse", "p99", 2),
    "gateway.added_p50_ms.c32.pilothouse_direct_port.replicas2": _added_c32("pilothouse, direct port", "p50", 2),
    "gateway.max_rps.pilothouse": _max_rps("pilothouse"),
    "gateway.max_rps.litellm": _max_rps("litellm"),
    "gateway.max_rps.serve_passthrough": _max_rps("serve passthrough"),
    "gateway.max_rps.direct": _max_rps("direct"),
    "gateway.max_rps_ratio.paired_median": _paired_ratio,
    "gateway.max_rps_ratio.replicas1": _ratio_at(1),
    "gateway.max_rps_ratio.replicas2": _ratio_at(2),
    # the gateway's direct port (a Deployment's pod's way in) in the same rotating windows, at its best count
    "gateway.max_rps.pilothouse_direct_port": _get("gateway_overhead", "max_rps_judged_direct_port", "median_rps",
                                                   "pilothouse, direct port"),
    "gateway.max_rps_ratio.direct_port": _get("gateway_overhead", "max_rps_judged_direct_port", "ratio"),
    "gateway.event_loop_us_per_request.c256.pilothouse": _loop_us("pilothouse"),
    "gateway.event_loop_us_per_request.c256.serve_passthrough": _loop_us("serve passthrough"),
    **{f"gateway.instructions_per_request.{level}.{name}": _get("gateway_instructions", "summary",
                                                                f"{name}_{level}_total_instructions")
       for level in ("c1", "c8") for name in ("pilothouse", "passthrough", "pilothouse_no_budget")},
    **{f"gateway.event_loop_instructions_per_request.{level}.{name}": _get(
        "gateway_instructions", "summary", f"{name}_{level}_event_loop_instructions")
       for level in ("c1", "c8") for name in ("pilothouse", "passthrough")},
    **{f"gateway.instructions_ratio.{level}.pilothouse": _get("gateway_instructions", "summary",
                                                              f"pilothouse_{level}_vs_passthrough_ratio")
       for level in ("c1", "c8")},
    **{f"gateway.serve_share.{figure}.c32.{target}": _get("serve_share", "summary", f"{target}_{figure}")
       for figure in ("added_p50_ms", "cpu_per_request_us")
       for target in ("serve_pilothouse", "serve_pilothouse_direct_port", "serve_passthrough", "uvicorn_pilothouse",
                      "uvicorn_passthrough")},
    **{f"gateway.serve_share.p50_ms.c32.{app}": _get("serve_share", "summary", f"{app}_serve_share_p50_ms")
       for app in ("pilothouse", "passthrough")},
    "failover.client_errors": _get("failover", "client_errors"),
    "failover.reroute_ms": _get("failover", "reroute_ms"),
    "failover.return_ms": _get("failover", "return_ms"),
    "reconcile.all_ready_s": _get("reconcile_scale", "reconcile", "all_ready_s"),
    "reconcile.operator_peak_rss_mb": _get("reconcile_scale", "reconcile", "operator_peak_rss_mb"),
    "reconcile.recompile_all_s": _get("reconcile_scale", "reconcile", "recompile_all_s"),
    "reconcile.operator_idle_rss_mb": _get("reconcile_scale", "reconcile", "operator_idle_rss_mb"),
    "reconcile.operator_steady_rss_mb": _get("reconcile_scale", "reconcile", "operator_steady_rss_mb"),
    "reconcile.operator_steady_cpu_pct": _get("reconcile_scale", "reconcile", "operator_steady_cpu_pct"),
    **{f"reconcile.probe_cpu_us.{level}.{client}": _get("probe_client", "summary", f"cpu_us_per_probe.{level}.{client}")
       for level in ("c1", "c32") for client in ("aiohttp", "httpx")},
    "retrieval.dense_p50_ms": _get("retrieval", "summary", "dense_p50_ms"),
    "retrieval.hybrid_p50_ms": _get("retrieval", "summary", "hybrid_p50_ms"),
    "retrieval.keyword_only_p50_ms": _get("retrieval", "summary", "keyword_only_p50_ms"),
    "retrieval.hot_p50_ms": _get("retrieval", "summary", "hot_p50_ms"),
    "retrieval.faiss_p50_ms": _get("retrieval", "summary", "faiss_p50_ms"),
    "engine.tokens_per_s_ratio": _get("engine", "summary", "tokens_per_s_ratio"),
    "engine.tokens_per_s_ratio.throughput_optimized": _get("engine_tp", "summary", "tokens_per_s_ratio"),
    "engine.tokens_per_s_ratio.complete_c1": _get("engine", "summary", "ratios", "complete c1"),
    "engine.tokens_per_s_ratio.complete_c4": _get("engine", "summary", "ratios", "complete c4"),
    "engine.handle_hop.cpu_ratio.grpc_vs_actor.complete": _get("handle_hop", "summary", "complete_grpc_cpu_ratio"),
    "engine.handle_hop.cpu_ratio.grpc_vs_actor.stream": _get("handle_hop", "summary", "stream_grpc_cpu_ratio"),
    "engine.handle_hop.cpu_ratio.socket_vs_grpc.complete": _get("handle_hop", "summary", "complete_socket_cpu_ratio"),
    "engine.handle_hop.cpu_ratio.socket_vs_grpc.stream": _get("handle_hop", "summary", "stream_socket_cpu_ratio"),
    "engine.handle_hop.latency_p50_ratio.socket_vs_grpc.complete": _get("handle_hop", "summary",
                                                                        "complete_socket_latency_p50_ratio"),
    "engine.outside_engine_mean_ms.c4.direct": _outside_engine("direct"),
    "engine.outside_engine_mean_ms.c4.gateway": _outside_engine("gateway"),
    "engine.gateway_own_mean_ms.c4": _get("engine", "summary", "time_split_mean_ms", "complete c4", "gateway", "own"),
    "cache.semantic_lookup_p50_ms": _get("semantic_cache", "summary", "lookup_p50_ms"),
    "audit.commit_cpu_us_per_record.batch1.kept": _get("audit_writer", "summary", "kept_batch1_us"),
    "audit.commit_cpu_us_per_record.batch1.pool": _get("audit_writer", "summary", "pool_batch1_us"),
    "audit.commit_cpu_us_per_record.batch1.raw_sqlite3": _get("audit_writer", "summary", "raw_batch1_us"),
    "audit.commit_cpu_us_per_record.batch16.kept": _get("audit_writer", "summary", "kept_batch16_us"),
    "audit.commit_cpu_us_per_record.batch16.kept_lease_charges": _get("audit_writer", "summary",
                                                                      "kept_charges_batch16_us"),
    **{f"audit.one_record_commit_wall_ms.{pace}.{name}": _get("audit_writer", "summary", f"{key}_commit_{pace}_wall_ms")
       for pace in ("idle", "back_to_back")
       for name, key in (("raw_sqlite3", "raw"), ("kept_lease_charges", "kept_charges"))},
}


def machine_speeds(docs: dict[str, dict[str, Any]]) -> dict[str, float]:
    """Each result's reading of the machine's speed during its run (``machine.python_loop_ms``): with ``sources``,
    how the machine drifted over a ``make bench``, beside the figures measured on it."""
    return {f"machine.python_loop_ms.{name}": doc["machine"]["python_loop_ms"]
            for name, doc in docs.items() if "python_loop_ms" in doc.get("machine", {})}


def summarise(docs: dict[str, dict[str, Any]]) -> dict[str, Any]:
    figures = {**{name: get(docs) for name, get in FIGURES.items()}, **machine_speeds(docs)}
    return {
        "when": machine.measured_at(),
        "machine": {**machine.describe(), "note": "2-core, 24 GiB CI-class VM, no GPU" if os.cpu_count() == 2 else ""},
        "figures": {k: v for k, v in figures.items() if v is not None},
        "missing": sorted(k for k, v in figures.items() if v is None),
        # when each result was measured: make bench re-runs its own; an optional one (engine_tp) may be older
        "sources": {name: docs[name].get("when") for name in sorted(docs)},
    }


def main() -> None:
    docs = {p.stem: json.loads(p.read_text()) for p in sorted(RESULTS.glob("*.json")) if p.stem != "summary"}
    summary = summarise(docs)
    (RESULTS / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    width = max(map(len, summary["figures"]), default=10)
    for name, value in summary["figures"].items():
        print(f"{name:<{width}}  {value}")
    if summary["missing"]:
        print(f"not measured: {', '.join(summary['missing'])}")


if __name__ == "__main__":
    main()
