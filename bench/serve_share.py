"""Serve's share of the gateway's added latency at c=32: the same two apps under Ray Serve and under plain uvicorn.

Why: the c=32 goal (added p50 <= 5 ms, ``gateway_overhead.py``) is judged under Ray Serve, where it is missed on
this VM's slow phase, while the gateway's own work per request is counted without Serve (``gateway_instructions.py``:
2.04x the pass-through's instructions on the event loop). This benchmark splits the difference in one run: each app
under Serve's production mode and each app outside it, with nothing else changed.

Targets, every one in each round, the order rotating by round (``gateway_overhead.rotating_rounds``):

- **direct**: the 20 ms backend (``gateway_overhead``'s FakeBackend), the baseline of every round;
- **serve passthrough**, **serve pilothouse**: ``gateway_overhead``'s Ray instance in Serve's throughput-optimized
  mode (HAProxy on the Serve port, direct ingress: what the operator renders for a cluster), one replica each;
- **serve pilothouse, direct port**: the same gateway replica on its direct port (``GatewayArgs.direct_port``,
  ``serving.direct``): a uvicorn server of the replica's own, on its event loop, past Serve's per-request ingress;
- **uvicorn passthrough**, **uvicorn pilothouse**: the same apps with the same fixtures, each in a process of its
  own under uvicorn with uvloop and httptools (the server Serve's direct ingress runs inside a replica;
  ``gateway_instructions``'s server role). The uvicorn gateway has a store file of its own.

Reported per target: the median over rounds of its added p50 and p99 against the same round's direct window, its
requests per second, and its serving process's CPU per answered request (the Serve replica's, or the uvicorn
process's); then, per app, **Serve's share**: its added p50 under Serve less its added p50 under uvicorn.
Results: a rich table and ``bench/results/serve_share.json`` (its ``summary`` is what ``summary.py`` reads).

Run: ``.venv/bin/python bench/serve_share.py`` (about 3 minutes; ``--rounds``, ``--duration``).
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import gateway_overhead as go
import machine

RESULTS = go.ROOT / "bench" / "results" / "serve_share.json"
SERVER = go.ROOT / "bench" / "gateway_instructions.py"
APPS = {"passthrough": "serve passthrough", "pilothouse": "pilothouse"}
"""App -> its name among ``gateway_overhead``'s Ray targets (and so its model and replica label there)."""
DIRECT = "serve pilothouse, direct port"
"""The gateway replica's own server (``serving.direct``): the same replica, past Serve's per-request ingress."""


def start_uvicorn(app: str, config: Path, folder: Path) -> tuple[go.Proc, str]:
    """``app`` under plain uvicorn (``gateway_instructions``'s server role), answering: its process and URL."""
    port = go.free_port()
    proc = go.Proc([go.PY, str(SERVER), "--role", "server", "--target", app, "--config", str(config),
                    "--port", str(port)], log=folder / f"uvicorn-{app}.log")
    url = f"http://127.0.0.1:{port}/v1/chat/completions"
    try:
        go.wait_http(url, 120, method="POST", body=go.chat_body(go.model_for(APPS[app])))
    except TimeoutError:
        proc.stop(5)
        raise
    return proc, url


def serve_share(rounds: dict[str, Any]) -> dict[str, float | None]:
    """Per app, its median added p50 under Serve less under uvicorn (None where either is missing)."""
    added = rounds["median_added_p50_ms"]
    shares: dict[str, float | None] = {}
    for app in APPS:
        under, outside = added.get(f"serve {app}"), added.get(f"uvicorn {app}")
        shares[app] = None if under is None or outside is None else round(under - outside, 2)
    return shares


def summarise(rounds: dict[str, Any]) -> dict[str, Any]:
    """The flat figures ``summary.py`` reads (and ``charts.py`` draws, by their unit suffix): added p50 per target,
    its serving process's median CPU per request, and Serve's share per app."""
    summary: dict[str, Any] = {}
    for target, value in rounds["median_added_p50_ms"].items():
        summary[f"{go.figure_name(target)}_added_p50_ms"] = value
    for target in rounds["rounds"][0] if rounds["rounds"] else ():
        cpu = [r[target]["cpu_us_per_request"] for r in rounds["rounds"] if "cpu_us_per_request" in r[target]]
        if cpu:
            summary[f"{go.figure_name(target)}_cpu_per_request_us"] = round(statistics.median(cpu), 1)
    for app, share in serve_share(rounds).items():
        summary[f"{app}_serve_share_p50_ms"] = share
    return summary


def report(rounds: dict[str, Any], summary: dict[str, Any], args: argparse.Namespace) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"c=32, {args.rounds} rotating rounds of {args.duration:.0f} s windows, 20 ms backend, "
                        "median over rounds")
    for column in ("target", "added p50 ms", "added p99 ms", "RPS", "CPU us/request"):
        table.add_column(column, justify="left" if column == "target" else "right")
    for target in rounds["rounds"][0]:
        rps = statistics.median(r[target]["rps"] or 0.0 for r in rounds["rounds"])
        cpu = summary.get(f"{go.figure_name(target)}_cpu_per_request_us")
        table.add_row(target, go.fmt_ms(rounds["median_added_p50_ms"].get(target, 0.0), 2),
                      go.fmt_ms(rounds["median_added_p99_ms"].get(target, 0.0), 2), f"{rps:,.0f}",
                      "-" if cpu is None else f"{cpu:,.0f}")
    console = Console(highlight=False, width=120)
    console.print(table)
    console.print("Serve's share of the added p50 (under Serve less under uvicorn), ms: "
                  + ", ".join(f"{app} {go.fmt_ms(v, 2)}" for app, v in serve_share(rounds).items()))


def bench(args: argparse.Namespace) -> None:
    machine.sample_speed()
    started = time.perf_counter()
    folder = Path(tempfile.mkdtemp(prefix="pilothouse-serve-share-"))
    procs: list[go.Proc] = []
    try:
        backend_port = go.free_port()
        backend = go.Proc([go.PY, go.__file__, "--role", "backend", "--port", str(backend_port)],
                          log=folder / "backend.log")
        procs.append(backend)
        backend.readline(30)
        backend_url = f"http://127.0.0.1:{backend_port}/v1"
        fixtures = go.write_fixtures(folder, backend_url)
        config = folder / "uvicorn.json"
        config.write_text(json.dumps({**fixtures, "backend": backend_url,
                                      "store_url": f"sqlite:///{folder}/store-uvicorn.db"}))
        targets = {"direct": (f"{backend_url}/chat/completions", go.BACKEND_MODEL)}
        cpu_pids: dict[str, int] = {}
        ray_proc, urls, pids = go.up(folder, fixtures, (backend_url, backend.p.pid), True, False, 1,
                                     direct_port=go.free_port())
        procs.append(ray_proc)
        for app, ray_name in APPS.items():
            targets[f"serve {app}"] = (urls[ray_name], go.model_for(ray_name))
            cpu_pids[f"serve {app}"] = next(pid for pid, name in pids.items() if name == go.REPLICA[ray_name])
        targets[DIRECT] = (urls[go.DIRECT], go.model_for("pilothouse"))
        cpu_pids[DIRECT] = cpu_pids["serve pilothouse"]  # the same replica, reached on its own server
        for app, ray_name in APPS.items():
            proc, url = start_uvicorn(app, config, folder)
            procs.append(proc)
            targets[f"uvicorn {app}"] = (url, go.model_for(ray_name))
            cpu_pids[f"uvicorn {app}"] = proc.p.pid
        rounds = go.rotating_rounds(targets, args.rounds, args, cpu_pids)
    finally:
        for proc in reversed(procs):
            proc.stop()
    summary = summarise(rounds)
    report(rounds, summary, args)
    doc = {"benchmark": "serve_share", "when": machine.measured_at(), "machine": machine.describe("ray", "uvicorn"),
           "setup": {"rounds": args.rounds, "duration_s": args.duration, "concurrency": 32,
                     "serve": "throughput-optimized, HAProxy on the Serve port, direct ingress, 1 replica per app",
                     "uvicorn": "uvloop, httptools, one process per app",
                     "pilothouse": "API key, BudgetPolicy rule (day cap 1e9 USD), audit and metrics on, SQLite"},
           "c32_rounds": rounds, "summary": summary, "total_s": round(time.perf_counter() - started, 1)}
    print(f"wrote {machine.save(args.output, doc)}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3, help="rotating c=32 rounds (default 3)")
    parser.add_argument("--duration", type=float, default=8.0, help="seconds per window (default 8)")
    parser.add_argument("--output", type=Path, default=RESULTS)
    args = parser.parse_args()
    bench(args)


if __name__ == "__main__":
    main()
