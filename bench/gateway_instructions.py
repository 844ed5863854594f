"""Gateway instructions per request: the gateway's CPU cost per request counted, not timed.

Why: this VM's speed moves 1.5-2.5x between phases without a trace on the guest (README, "The machine's speed"),
so CPU seconds per request from different runs cannot be compared, and within one run they drift. Under valgrind's
callgrind a process's executed instructions are counted: the same code and inputs give the same count within
~0.1%, whatever the machine's phase or load. The gateway's cost per request is the lever behind the c=32 latency
and max-RPS goals (``gateway_overhead.py``); counted, it can be compared across runs and commits.

Each target is an ASGI app under uvicorn (uvloop, httptools: the server a Serve replica runs) in its own process,
under ``valgrind --tool=callgrind --instr-atstart=no --separate-threads=yes``:

- **passthrough**: ``gateway_overhead.passthrough_app``, the same FastAPI pass-through as that benchmark's Serve
  floor (one pooled aiohttp session);
- **pilothouse**: ``serving.gateway.build_app`` with ``gateway_overhead``'s fixtures: API key, a BudgetPolicy rule
  whose cap never binds (the ledger reserves and commits every request), audit and metrics on, SQLite store;
- **pilothouse, no budget**: the same gateway without the BudgetPolicy rule: the ledger's share.

The backend (``gateway_overhead``'s FakeBackend, 20 ms) and the load generator (its load role) run natively. Each
target gets ``--warmup`` requests uncounted; then, for each concurrency, the counters are zeroed and counting is
switched on (``callgrind_control --zero``, ``--instr=on``), ``--requests`` requests are sent, and the counts are dumped
(``--dump``), read per thread, and counting is switched off again. At concurrency 1 every request commits its own audit
transaction; at 8 the group commit shares them.

Reported per target and concurrency: instructions per request on the event loop's thread (the main thread: what
bounds a replica's requests per second) and on all other threads (the audit and ledger writers), their total, and
each total's ratio to the pass-through's. Not under Ray Serve: its replica wrapper adds the same to both targets,
and Ray does not start under valgrind in minutes. Results: a rich table and ``bench/results/gateway_instructions.json``
(its ``summary`` is what ``summary.py`` reads).

Run: ``.venv/bin/python bench/gateway_instructions.py`` (about 2 minutes; needs ``valgrind``, on Debian
``apt-get install valgrind``).
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import gateway_overhead as go
import machine

RESULTS = go.ROOT / "bench" / "results" / "gateway_instructions.json"
TARGETS = ("passthrough", "pilothouse", "pilothouse, no budget")
BASELINE = "passthrough"
MAIN_THREAD = 1  # callgrind numbers a process's threads from 1, in creation order: the main thread is 1


def serve(target: str, config: dict[str, Any], port: int) -> None:
    """The ``server`` role: one target's app under uvicorn, until killed."""
    import uvicorn

    if target == BASELINE:
        app = go.passthrough_app(config["backend"])
    else:
        from pilothouse.serving.gateway import build_app

        routing = config["routing"] if target == "pilothouse" else config["routing_nobudget"]
        app = build_app(routing, api_keys=config["keys"], store_url=config["store_url"])
    uvicorn.run(app, host="127.0.0.1", port=port, loop="uvloop", http="httptools", access_log=False,
                log_level="warning")


def instructions_by_thread(out: Path, part: int = 1) -> dict[int, int]:
    """Instructions counted per thread in dump ``part`` of a callgrind run whose ``--callgrind-out-file`` was ``out``.

    With ``--separate-threads=yes`` each dump writes one file per thread, ``<out>.<part>-<thread>``, whose
    ``totals:`` (or, in older valgrinds, ``summary:``) line holds the thread's instructions."""
    counts: dict[int, int] = {}
    for path in out.parent.glob(f"{out.name}.{part}-*"):
        match = re.fullmatch(rf"{re.escape(out.name)}\.{part}-(\d+)", path.name)
        if match is None:
            continue
        for line in path.read_text().splitlines():
            if line.startswith(("totals:", "summary:")):
                counts[int(match.group(1))] = int(line.split()[1])
                break
    return counts


def per_request(threads: dict[int, int], requests: int) -> dict[str, int]:
    """Instructions per request on the main thread (the event loop's), on all other threads, and in all."""
    main = threads.get(MAIN_THREAD, 0)
    rest = sum(threads.values()) - main
    return {"event_loop": round(main / requests), "other_threads": round(rest / requests),
            "total": round((main + rest) / requests)}


def model_for(target: str) -> str:
    """The model a target is asked for: the pass-through forwards the backend's own, the gateways route."""
    return go.model_for("serve passthrough" if target == BASELINE else "pilothouse")


def load(url: str, target: str, concurrency: int, requests: int) -> dict[str, Any]:
    """``requests`` requests at ``concurrency`` from ``gateway_overhead``'s load generator; its result line."""
    out = subprocess.run([go.PY, go.__file__, "--role", "load", "--url", url, "--model", model_for(target),
                          "--concurrency", str(concurrency), "--requests", str(requests), "--seconds", "1e9",
                          "--warmup", "0"], capture_output=True, text=True, check=True, cwd=go.ROOT)
    result: dict[str, Any] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


def control(pid: int, option: str) -> None:
    """One ``callgrind_control`` command to the counted process."""
    subprocess.run(["callgrind_control", option, str(pid)], check=True, capture_output=True)


def count(target: str, config: dict[str, Any], folder: Path, args: argparse.Namespace) -> dict[str, Any]:
    """Start ``target`` under callgrind, warm it up uncounted, then count each concurrency's requests."""
    port = go.free_port()
    slug = re.sub(r"\W+", "-", target)
    out = folder / f"callgrind-{slug}.out"
    proc = go.Proc(["valgrind", "--tool=callgrind", "--instr-atstart=no", "--separate-threads=yes",
                    f"--callgrind-out-file={out}", "-q", go.PY, __file__, "--role", "server", "--target", target,
                    "--config", str(folder / "config.json"), "--port", str(port)], log=folder / f"{slug}.log")
    url = f"http://127.0.0.1:{port}/v1/chat/completions"
    results: dict[str, Any] = {}
    try:
        go.wait_http(url, 300, method="POST", body=go.chat_body(model_for(target)))  # imports under valgrind: ~15 s
        load(url, target, max(args.concurrency), args.warmup)
        for part, concurrency in enumerate(args.concurrency, start=1):
            # zeroed first: without it, the second level's dump held wrapped-around totals (~6e16 a request)
            control(proc.p.pid, "--zero")
            control(proc.p.pid, "--instr=on")
            answered = load(url, target, concurrency, args.requests)
            control(proc.p.pid, "--dump")
            control(proc.p.pid, "--instr=off")
            if answered["errors"] or answered["ok"] != args.requests:
                raise RuntimeError(f"{target} at c={concurrency}: {answered['ok']} answered, "
                                   f"{answered['errors']} errors ({answered['error_kinds']})")
            threads = instructions_by_thread(out, part)
            results[f"c{concurrency}"] = {**per_request(threads, args.requests), "requests": args.requests,
                                          "threads_counted": len(threads)}
    finally:
        proc.stop(30)
    return results


def ratio(results: dict[str, dict[str, Any]], target: str, level: str) -> float | None:
    """``target``'s total at ``level`` over the pass-through's, or None where the pass-through was not counted."""
    base = results.get(BASELINE, {}).get(level)
    return results[target][level]["total"] / base["total"] if base else None


def summarise(results: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The flat figures ``summary.py`` reads: totals and event-loop counts per target and concurrency, and each
    gateway's total as a ratio to the pass-through's."""
    summary: dict[str, Any] = {}
    for target, levels in results.items():
        name = go.figure_name(target)
        for level, row in levels.items():
            summary[f"{name}_{level}_total_instructions"] = row["total"]
            summary[f"{name}_{level}_event_loop_instructions"] = row["event_loop"]
            times = ratio(results, target, level)
            if target != BASELINE and times is not None:
                summary[f"{name}_{level}_vs_passthrough_ratio"] = round(times, 2)
    return summary


def report(results: dict[str, dict[str, Any]], args: argparse.Namespace) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"Instructions per request (callgrind), {args.requests} requests per row, "
                        "20 ms backend, uvicorn + uvloop")
    for column in ("target", "concurrency", "event loop", "other threads", "total", "vs passthrough"):
        table.add_column(column, justify="left" if column == "target" else "right")
    for target, levels in results.items():
        for level, row in levels.items():
            times = ratio(results, target, level)
            table.add_row(target, level[1:], f"{row['event_loop']:,}", f"{row['other_threads']:,}",
                          f"{row['total']:,}", "-" if times is None else f"{times:.2f}x")
    Console(highlight=False, width=120).print(table)


def bench(args: argparse.Namespace) -> None:
    machine.sample_speed()
    for tool in ("valgrind", "callgrind_control"):
        if shutil.which(tool) is None:
            sys.exit(f"{tool} is not installed: on Debian, apt-get install valgrind")
    folder = Path(tempfile.mkdtemp(prefix="pilothouse-instructions-"))
    backend_port = go.free_port()
    backend = go.Proc([go.PY, go.__file__, "--role", "backend", "--port", str(backend_port)],
                      log=folder / "backend.log")
    try:
        backend.readline(60)
        backend_url = f"http://127.0.0.1:{backend_port}/v1"
        config = {**go.write_fixtures(folder, backend_url), "backend": backend_url}
        (folder / "config.json").write_text(json.dumps(config))
        results = {target: count(target, config, folder, args) for target in args.targets}
    finally:
        backend.stop(10)
    report(results, args)
    doc = {"benchmark": "gateway_instructions", "when": machine.measured_at(), "machine": machine.describe(),
           "setup": {"requests": args.requests, "warmup": args.warmup, "concurrency": args.concurrency,
                     "server": "uvicorn, uvloop, httptools; one process per target under callgrind",
                     "backend": f"FakeBackend, {go.LATENCY_S * 1000:.0f} ms, {go.REPLY_TOKENS} tokens",
                     "pilothouse": "API key, BudgetPolicy rule (day cap 1e9 USD), audit and metrics on, SQLite"},
           "results": results, "summary": summarise(results)}
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(doc, indent=2) + "\n")
    shutil.rmtree(folder, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--role", choices=["main", "server"], default="main", help=argparse.SUPPRESS)
    parser.add_argument("--target", choices=TARGETS, help=argparse.SUPPRESS)
    parser.add_argument("--config", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--targets", nargs="+", choices=TARGETS, default=list(TARGETS))
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8], help="counted levels (default 1 8)")
    parser.add_argument("--requests", type=int, default=300, help="counted requests per level (default 300)")
    parser.add_argument("--warmup", type=int, default=100, help="uncounted requests first (default 100)")
    parser.add_argument("--output", type=Path, default=RESULTS)
    args = parser.parse_args()
    if args.role == "server":
        serve(args.target, json.loads(args.config.read_text()), args.port)
    else:
        bench(args)


if __name__ == "__main__":
    main()
