"""CPU per health probe of an external ModelDeployment: the operator's aiohttp prober against httpx.

Why: the operator probes every external model once per health interval (``GET {endpoint}/models``): 1,000
models at the default 10 s make 100 probes a second, so the client's CPU per call is most of an idle
operator's CPU (``reconcile_scale.py``). Two clients, in turns, against the same local server:

- **aiohttp prober**: ``operator.health.EndpointProber.probe``, the operator's path (one pooled session);
- **httpx**: one ``httpx.AsyncClient`` and ``client.get(url, headers=..., timeout=...)``, the operator's path before
  2d2e3e0 (httpx 0.28, its default pool).

The server (aiohttp, answering a small model list) runs in its own process; the clients share this one, each
measured by this process's CPU time (``time.process_time``) over ``--probes`` probes at concurrency 1, 8 and 32,
after a warm-up. Reported: CPU microseconds per probe, median of ``--rounds`` rounds, and aiohttp / httpx; a
table on stdout and ``bench/results/probe_client.json``.

Run: ``.venv/bin/python bench/probe_client.py`` (~40 s).
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import gateway_overhead as go
import httpx
import machine

from pilothouse.operator.health import EndpointProber

RESULTS = go.ROOT / "bench" / "results" / "probe_client.json"
CONCURRENCY = (1, 8, 32)
CLIENTS = ("aiohttp prober", "httpx")
KEY = "sk-bench"


def serve(port: int) -> None:
    """The ``server`` role: an OpenAI-style ``GET /v1/models``, until killed."""
    from aiohttp import web

    async def models(_: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [{"id": "served-model", "object": "model"}]})

    app = web.Application()
    app.router.add_get("/v1/models", models)
    print("ready", flush=True)
    web.run_app(app, host="127.0.0.1", port=port, print=None, access_log=None)


async def cpu_per_probe(client: str, base_url: str, probes: int, concurrency: int) -> float:
    """CPU microseconds per probe of ``client`` at ``concurrency``, over ``probes`` probes after a warm-up."""
    if client == "httpx":
        http = httpx.AsyncClient()

        async def one() -> None:
            response = await http.get(f"{base_url}/models", headers={"Authorization": f"Bearer {KEY}"}, timeout=5.0)
            assert response.status_code == 200, response.status_code
        close: Callable[[], Awaitable[None]] = http.aclose
    else:
        prober = EndpointProber()

        async def one() -> None:
            health = await prober.probe(base_url, KEY)
            assert health.ready, health.message
        close = prober.aclose

    slots = asyncio.Semaphore(concurrency)

    async def bounded() -> None:
        async with slots:
            await one()

    try:
        await asyncio.gather(*(bounded() for _ in range(max(concurrency * 4, 50))))  # connections opened
        started = time.process_time()
        await asyncio.gather(*(bounded() for _ in range(probes)))
        return (time.process_time() - started) / probes * 1e6
    finally:
        await close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--role", choices=["bench", "server"], default="bench")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--probes", type=int, default=2000, help="probes per client, concurrency and round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--output", type=Path, default=RESULTS)
    args = parser.parse_args()
    if args.role == "server":
        serve(args.port)
        return
    machine.sample_speed()
    from rich.console import Console
    from rich.table import Table

    port = go.free_port()
    server = subprocess.Popen([sys.executable, __file__, "--role", "server", "--port", str(port)],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert server.stdout is not None and server.stdout.readline().strip() == "ready"
        base_url = f"http://127.0.0.1:{port}/v1"
        go.wait_http(f"{base_url}/models", 30)
        samples: dict[str, dict[int, list[float]]] = {c: {n: [] for n in CONCURRENCY} for c in CLIENTS}
        for round_ in range(args.rounds):
            for concurrency in CONCURRENCY:
                for client in CLIENTS[round_ % 2:] + CLIENTS[:round_ % 2]:  # who goes first alternates
                    samples[client][concurrency].append(
                        asyncio.run(cpu_per_probe(client, base_url, args.probes, concurrency)))
    finally:
        server.terminate()
        server.wait(10)

    us = {client: {n: round(statistics.median(v), 1) for n, v in by.items()} for client, by in samples.items()}
    table = Table(title=f"CPU us per health probe (GET /v1/models), median of {args.rounds} rounds of {args.probes}")
    for column in ("concurrency", *CLIENTS, "aiohttp / httpx"):
        table.add_column(column, justify="right")
    for n in CONCURRENCY:
        table.add_row(str(n), *(f"{us[c][n]:.0f}" for c in CLIENTS), f"{us['aiohttp prober'][n] / us['httpx'][n]:.3f}")
    Console(highlight=False).print(table)
    summary = {f"cpu_us_per_probe.c{n}.{c.split()[0]}": us[c][n] for n in CONCURRENCY for c in CLIENTS}
    summary.update({f"cpu_ratio.c{n}.aiohttp_vs_httpx": round(us["aiohttp prober"][n] / us["httpx"][n], 3)
                    for n in CONCURRENCY})
    doc = {"benchmark": "probe_client", "when": machine.measured_at(),
           "machine": machine.describe("aiohttp", "httpx", "httpcore"),
           "config": {"probes": args.probes, "rounds": args.rounds, "concurrency": list(CONCURRENCY)},
           "cpu_us_per_probe": us, "samples": samples, "summary": summary}
    print(f"wrote {machine.save(args.output, doc)}")


if __name__ == "__main__":
    main()
