"""Failover: kill the primary backend under load, bring it back, and see what the client notices.

Same pieces as ``gateway_overhead.py`` (each its own process on loopback): two FakeBackends with a
fixed 20 ms latency (``org/primary`` and ``org/fallback``, told apart by the ``model`` field of their
answers), the Pilothouse gateway on a local Ray Serve with one route listing both (budgets, audit and
metrics on), and a load generator at concurrency 32 that records every request: when it started and
ended, its status and which backend answered.

Timeline: load starts; at ``--kill-at`` the primary's process is SIGKILLed (connections refused from
then on); at ``--revive-at`` a new primary starts on the same port; load runs until ``--duration``.

Reported (table + ``bench/results/failover.json``):

- **client errors**: non-200 answers the client saw over the whole run (the goal is 0: the gateway
  retries a failed non-streamed attempt on the fallback before answering);
- **reroute**: from the kill until every request *started* after that moment was answered by the
  fallback (requests in flight at the kill are retried, so they count as rerouted once they return);
- **return**: from the revive until the first request answered by the primary again (bounded below
  by the circuit breaker's cooldown, ``serving/breaker.py``; the operator is not part of this run, so
  the RoutingTable keeps listing the primary first);
- p50/p99 latency before the kill, between kill and revive, and after the return.

Run: ``.venv/bin/python bench/failover.py`` (``--help`` for options).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import machine
from gateway_overhead import KEY, PY, ROOT, Proc, _run, chat_body, free_port, start_ray, wait_http

RESULTS = ROOT / "bench" / "results" / "failover.json"
PRIMARY, FALLBACK = "org/primary", "org/fallback"
ROUTE_MODEL = "wf/extract"


# ---- role: load generator that keeps every request ------------------------------------------------------
def role_trace(url: str, concurrency: int, duration: float) -> None:
    import aiohttp

    body = chat_body(ROUTE_MODEL)
    headers = {"content-type": "application/json", "authorization": f"Bearer {KEY}"}

    async def main() -> list[list[Any]]:
        records: list[list[Any]] = []  # [start (epoch s), end, status, answering model]
        connector = aiohttp.TCPConnector(limit=concurrency, limit_per_host=concurrency)
        async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=30)) as session:
            deadline = time.time() + duration

            async def worker() -> None:
                while time.time() < deadline:
                    start = time.time()
                    try:
                        async with session.post(url, data=body, headers=headers) as r:
                            payload = await r.json(content_type=None)
                            model = payload.get("model") if r.status == 200 else None
                            records.append([start, time.time(), r.status, model])
                    except Exception as exc:
                        records.append([start, time.time(), type(exc).__name__, None])

            print(json.dumps({"started": time.time()}), flush=True)
            await asyncio.gather(*(worker() for _ in range(concurrency)))
        return records

    print(json.dumps({"records": _run(main())}), flush=True)


# ---- analysis (pure) ----------------------------------------------------------------------------------
def _pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    values = sorted(values)
    return round(values[min(len(values) - 1, int(len(values) * q))], 1)


def analyse(records: list[list[Any]], killed: float, revived: float) -> dict[str, Any]:
    """Figures from the per-request trace; times are epoch seconds, results in ms."""
    records = sorted(records, key=lambda r: r[0])
    errors = [r for r in records if r[2] != 200]
    # Reroute: the earliest moment after the kill from which every request started was served by the fallback.
    reroute_at = killed
    for start, _end, status, model in records:
        if killed <= start < revived and (status != 200 or model != FALLBACK):
            reroute_at = max(reroute_at, start)
    returned = next((r[0] for r in records if r[0] >= revived and r[3] == PRIMARY), None)

    def lat(lo: float, hi: float) -> list[float]:
        return [(e - s) * 1000 for s, e, status, _ in records if lo <= s < hi and status == 200]

    phases = {"before kill": lat(0, killed), "primary down": lat(killed, revived),
              "after return": lat(returned or float("inf"), float("inf"))}
    return {
        "requests": len(records),
        "client_errors": len(errors),
        "error_kinds": sorted({str(r[2]) for r in errors}),
        "served_by_primary": sum(1 for r in records if r[3] == PRIMARY),
        "served_by_fallback": sum(1 for r in records if r[3] == FALLBACK),
        "reroute_ms": round((reroute_at - killed) * 1000, 1),
        "return_ms": round((returned - revived) * 1000, 1) if returned is not None else None,
        "latency_ms": {name: {"n": len(v), "p50": _pct(v, 0.5), "p99": _pct(v, 0.99)} for name, v in phases.items()},
    }


# ---- orchestration --------------------------------------------------------------------------------------
def write_fixtures(folder: Path, primary: str, fallback: str) -> dict[str, Any]:
    from pilothouse.operator.api import RoutingTable

    def backend(name: str, model: str, url: str, role: str) -> dict[str, Any]:
        return {"modelDeployment": name, "model": model, "endpoint": url, "engine": "external", "tier": "small",
                "contextWindow": 8192, "healthy": True, "role": role, "reason": "bench",
                "pricing": {"inputPerMillionUSD": 1.0, "outputPerMillionUSD": 2.0}}

    table = RoutingTable.model_validate({
        "workflow": "wf", "namespace": "bench", "revision": 1, "generatedAt": datetime.now(UTC).isoformat(),
        "degraded": False,
        "routes": [{"step": "extract", "tier": "small", "maxTokens": 256, "backends": [
            backend("primary", PRIMARY, primary, "primary"), backend("fallback", FALLBACK, fallback, "fallback")]}],
        "budget": {"policy": "bench", "state": "Ok", "action": "none",
                   "limits": [{"window": "day", "maxCostUSD": 1e9}]},
    })
    routing = folder / "routing.json"
    routing.write_text(table.model_dump_json(by_alias=True, indent=2))
    keys = folder / "keys.yaml"
    keys.write_text(f"{KEY}: team-bench\n")
    return {"routing": str(routing), "keys": str(keys), "store_url": f"sqlite:///{folder}/store.db"}


def start_backend(folder: Path, port: int, model: str) -> Proc:
    proc = Proc([PY, str(ROOT / "bench" / "gateway_overhead.py"), "--role", "backend", "--port", str(port),
                 "--model", model], log=folder / f"backend-{model.split('/')[-1]}-{port}.log")
    proc.readline(30)
    return proc


def bench(args: argparse.Namespace) -> dict[str, Any]:
    folder = Path(tempfile.mkdtemp(prefix="pilothouse-failover-"))
    procs: list[Proc] = []
    try:
        pport, fport = free_port(), free_port()
        primary = start_backend(folder, pport, PRIMARY)
        procs += [primary, start_backend(folder, fport, FALLBACK)]
        fixtures = write_fixtures(folder, f"http://127.0.0.1:{pport}/v1", f"http://127.0.0.1:{fport}/v1")
        ray_proc, port = start_ray(folder, fixtures, f"http://127.0.0.1:{pport}/v1", False, False)
        procs.append(ray_proc)
        url = f"http://127.0.0.1:{port}/v1/chat/completions"
        wait_http(url, 60, method="POST", body=chat_body(ROUTE_MODEL))
        load = subprocess.Popen([PY, __file__, "--role", "trace", "--url", url, "--concurrency",
                                 str(args.concurrency), "--duration", str(args.duration)],
                                stdout=subprocess.PIPE, text=True, cwd=ROOT)
        assert load.stdout is not None
        t0 = json.loads(load.stdout.readline())["started"]
        time.sleep(max(0.0, t0 + args.kill_at - time.time()))
        killed = time.time()
        os.killpg(primary.p.pid, signal.SIGKILL)  # the process dies with its open connections
        primary.p.wait(5)
        time.sleep(max(0.0, t0 + args.revive_at - time.time()))
        primary = start_backend(folder, pport, PRIMARY)
        revived = time.time()
        procs.append(primary)
        out, _ = load.communicate(timeout=args.duration + 60)
        records = json.loads(out.strip().splitlines()[-1])["records"]
        return {**analyse(records, killed, revived), "kill_at_s": args.kill_at, "revive_at_s": args.revive_at,
                "revive_started_s": round(revived - t0, 2), "concurrency": args.concurrency,
                "duration_s": args.duration}
    finally:
        for p in reversed(procs):
            p.stop()


def report(result: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(highlight=False, width=120)
    table = Table(title=f"Failover at concurrency {result['concurrency']}: primary killed at {result['kill_at_s']} s, "
                        f"back at {result['revive_started_s']} s")
    for col in ("metric", "value"):
        table.add_column(col)
    table.add_row("requests", str(result["requests"]))
    table.add_row("client-visible errors", f"{result['client_errors']} {result['error_kinds'] or ''}")
    table.add_row("kill → all traffic on the fallback", f"{result['reroute_ms']} ms")
    table.add_row("primary back → first answer from it", "never" if result["return_ms"] is None
                  else f"{result['return_ms']} ms")
    table.add_row("served by primary / fallback", f"{result['served_by_primary']} / {result['served_by_fallback']}")
    for phase, lat in result["latency_ms"].items():
        table.add_row(f"latency {phase} (n={lat['n']})", f"p50 {lat['p50']} ms · p99 {lat['p99']} ms")
    console.print(table)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--role", choices=["main", "trace"], default="main", help=argparse.SUPPRESS)
    parser.add_argument("--url", help=argparse.SUPPRESS)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--duration", type=float, default=30.0, help="seconds of load (default 30)")
    parser.add_argument("--kill-at", type=float, default=8.0, help="seconds into the load (default 8)")
    parser.add_argument("--revive-at", type=float, default=14.0, help="seconds into the load (default 14)")
    parser.add_argument("--output", type=Path, default=RESULTS)
    args = parser.parse_args()
    if args.role == "trace":
        role_trace(args.url, args.concurrency, args.duration)
        return
    machine.sample_speed()
    result = bench(args)
    result |= {"when": machine.measured_at(), "machine": machine.describe("ray")}
    report(result)
    print(f"wrote {machine.save(args.output, result)}", file=sys.stderr)


if __name__ == "__main__":
    main()
